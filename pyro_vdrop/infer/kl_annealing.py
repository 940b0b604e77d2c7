# SPDX-License-Identifier: Apache-2.0
r"""
KL annealing ("warm-up") for any guide: scales the terms of the latent sites of both the model and the guide.

With every latent site's log-density scaled by :math:`\beta` and the observed sites left alone, any Pyro ELBO
computes

.. math::

    \mathcal{L}_\beta = \mathbb{E}_q[\log p(y \mid w)] - \beta\, \mathrm{KL}(q(w) \,\|\, p(w)),

analytically (:class:`~pyro.infer.TraceMeanField_ELBO`, :func:`~pyro_vdrop.poutine.local_reparam`) or by
Monte Carlo (:class:`~pyro.infer.Trace_ELBO`, autoguides' auxiliary sites). Raising :math:`\beta` from near 0
to 1 over the first epochs lets the data term shape the posterior before the KL pulls it to the prior [1, §3]
[2, §4.1] — the usual cure when a Bayesian network trained with the full KL from the start ends at chance.

**References**

[1] Sønderby, Raiko, Maaløe, Sønderby, Winther. "Ladder Variational Autoencoders." NeurIPS 2016.
[2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
"""

import numbers
from collections.abc import Callable

from pyro.poutine.handlers import _make_handler
from pyro.poutine.messenger import Messenger


class KLAnnealingMessenger(Messenger):
    r"""
    Multiplies the scale of every latent (unobserved) sample site by ``weight``, in the model and in the guide;
    observed sites keep their scale. Inside it an ELBO is :math:`\mathbb{E}_q[\log p(y \mid w)] - \beta\,
    \mathrm{KL}(q \,\|\, p)`. Put it around the whole step, so that it sees both the guide and the model::

        for epoch in range(num_epochs):
            with pyro_vdrop.infer.kl_annealing(weight=min(1.0, (epoch + 1) / warmup_epochs)):
                for x, y in batches:
                    svi.step(x, y)

    It composes with :func:`~pyro_vdrop.poutine.local_reparam` (whose analytic KL takes the guide site's scale)
    and with the subsampling scale of :class:`~pyro.plate`.

    :param float weight: :math:`\beta \ge 0`; 1 is the ELBO.
    """

    def __init__(self, weight: float):
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not weight >= 0:
            raise ValueError(f"kl_annealing: weight must be a number >= 0 (1 is the ELBO), got {weight!r}")
        super().__init__()
        self.weight = float(weight)

    def _pyro_sample(self, msg):
        if msg["is_observed"]:
            return
        msg["scale"] = self.weight * msg["scale"]


@_make_handler(KLAnnealingMessenger, __name__)
def kl_annealing(fn: Callable | None = None, weight: float = 1.0) -> KLAnnealingMessenger | Callable:  # type: ignore[empty-body]
    ...


__all__ = ["KLAnnealingMessenger", "kl_annealing"]
