# SPDX-License-Identifier: Apache-2.0
"""
The names of the gradient estimators for weight sites, shared by
:func:`~pyro_vdrop.poutine.local_reparam`, :func:`~pyro_vdrop.poutine.estimator_handler`,
:func:`~pyro_vdrop.infer.gradient_variance` and the training loop.

``"lrt"`` (the local reparameterization trick [1, §2.3]) and ``"flipout"`` [2] are the estimators for
training; ``"per-example"`` (an explicit weight sample per example, :math:`M` times the memory of a weight)
and ``"mean"`` (no noise: the posterior mean) are references for diagnostics; ``"single-sample"`` is plain
Pyro without the handler: one weight sample shared by the minibatch.

**References**

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
[2] Wen, Vicol, Ba, Tran, Grosse. "Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches."
    ICLR 2018.
"""

LRT = "lrt"
FLIPOUT = "flipout"
PER_EXAMPLE = "per-example"
MEAN = "mean"
SINGLE_SAMPLE = "single-sample"

#: The estimators of :func:`~pyro_vdrop.poutine.local_reparam`.
ESTIMATORS = (LRT, FLIPOUT, PER_EXAMPLE, MEAN)

#: Every estimator name: those of :func:`~pyro_vdrop.poutine.local_reparam`, and ``"single-sample"`` (no handler).
ALL_ESTIMATORS = ESTIMATORS + (SINGLE_SAMPLE,)

__all__ = ["ALL_ESTIMATORS", "ESTIMATORS", "FLIPOUT", "LRT", "MEAN", "PER_EXAMPLE", "SINGLE_SAMPLE"]
