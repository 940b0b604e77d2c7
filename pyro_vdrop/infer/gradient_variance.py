# SPDX-License-Identifier: Apache-2.0

from collections.abc import Callable, Iterable, Sequence

import pyro
import torch
from pyro.infer import ELBO, TraceMeanField_ELBO

from pyro_vdrop.poutine import estimator_handler
from pyro_vdrop.poutine.estimators import FLIPOUT, LRT, MEAN, PER_EXAMPLE, SINGLE_SAMPLE

#: The estimators compared in [1, Table 1] (plus Flipout [2]), and the local_reparam estimator
#: behind each (``None``: no handler, i.e. Pyro's one weight sample per minibatch, the estimator
#: :data:`~pyro_vdrop.poutine.estimators.SINGLE_SAMPLE`).
GRADIENT_ESTIMATORS = {
    "lrt": LRT,
    "flipout": FLIPOUT,
    "per-example weights": PER_EXAMPLE,
    "single weight sample": None,
    "no noise": MEAN,
}


def gradient_variance(
    model: Callable,
    guide: Callable,
    *args,
    params: Iterable[str],
    estimator: str = "lrt",
    num_draws: int = 50,
    batches: Sequence[tuple] | None = None,
    elbo: ELBO | None = None,
    **kwargs,
) -> dict[str, dict[str, float]]:
    r"""
    Estimates the variance of the ELBO gradient with respect to chosen parameters, over repeated
    noise draws on a fixed minibatch (or over the given ``batches``), for one gradient estimator [1, §2].

    For each parameter :math:`\phi` and draw :math:`s = 1..S` the gradient :math:`g_s = \nabla_\phi
    \widehat{\mathcal{L}}_s` is computed; the result is the mean over the elements of :math:`\phi` of the
    unbiased sample variance :math:`\frac{1}{S-1}\sum_s (g_s - \bar g)^2`, as in [1, Table 1].

    Estimators: ``"lrt"`` and ``"flipout"`` (under :func:`~pyro_vdrop.poutine.local_reparam`),
    ``"per-example weights"`` (an explicit weight sample for every example), ``"single weight sample"``
    (plain Pyro: one weight sample shared by the minibatch) and ``"no noise"`` (the posterior mean
    weights; the variance then only comes from varying ``batches``).

    :param callable model: The Pyro model.
    :param callable guide: The guide (its parameters are created by a first call if needed).
    :param args: Positional arguments of ``model`` and ``guide`` (the fixed minibatch), unless ``batches``.
    :param params: Names of parameters in Pyro's param store.
    :param str estimator: One of :data:`GRADIENT_ESTIMATORS`.
    :param int num_draws: Number :math:`S \ge 2` of gradient draws.
    :param batches: Optional sequence of argument tuples; draw ``s`` uses ``batches[s % len(batches)]``.
    :param elbo: The ELBO (default :class:`~pyro.infer.TraceMeanField_ELBO`).
    :param kwargs: Keyword arguments of ``model`` and ``guide``.
    :returns: For each parameter name, ``{"variance": ..., "mean_sq": ...}`` (mean per-element variance and
        mean squared mean gradient).
    :rtype: dict

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    [2] Wen, Vicol, Ba, Tran, Grosse. "Flipout: Efficient Pseudo-Independent Weight
        Perturbations on Mini-Batches." ICLR 2018.
    """
    if estimator not in GRADIENT_ESTIMATORS:
        raise ValueError(
            f"gradient_variance: estimator must be one of {sorted(GRADIENT_ESTIMATORS)}, got {estimator!r}"
        )
    if num_draws < 2:
        raise ValueError(f"gradient_variance: num_draws must be at least 2, got {num_draws}")
    params = list(params)
    if not params:
        raise ValueError("gradient_variance: params must name at least one parameter")
    elbo = TraceMeanField_ELBO() if elbo is None else elbo
    mode = GRADIENT_ESTIMATORS[estimator] or SINGLE_SAMPLE

    def handler():
        return estimator_handler(mode)

    def batch(s):
        return args if batches is None else tuple(batches[s % len(batches)])

    store = pyro.get_param_store()
    if any(name not in store for name in params):
        with handler():
            guide(*batch(0), **kwargs)
    missing = [name for name in params if name not in store]
    if missing:
        raise KeyError(f"gradient_variance: parameters {missing} are not in Pyro's param store; known: {sorted(store)}")
    leaves = [pyro.param(name).unconstrained() for name in params]

    mean = [torch.zeros_like(p) for p in leaves]
    m2 = [torch.zeros_like(p) for p in leaves]
    for s in range(num_draws):
        with handler():
            loss = elbo.differentiable_loss(model, guide, *batch(s), **kwargs)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for i, g in enumerate(grads):  # Welford's update
            g = torch.zeros_like(leaves[i]) if g is None else g.detach()
            delta = g - mean[i]
            mean[i] += delta / (s + 1)
            m2[i] += delta * (g - mean[i])
    return {
        name: {"variance": (m2[i] / (num_draws - 1)).mean().item(), "mean_sq": mean[i].pow(2).mean().item()}
        for i, name in enumerate(params)
    }
