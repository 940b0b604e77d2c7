# SPDX-License-Identifier: Apache-2.0
"""
The effect-based variational-dropout guide, after Pyro's :class:`~pyro.infer.autoguide.AutoNormalMessenger`.
"""

from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.distribution import Distribution
from pyro.infer.autoguide import AutoMessenger
from pyro.poutine.util import site_is_subsample

from .base import AutoVariationalDropoutBase
from .options import VariationalDropoutOptions


class AutoVariationalDropoutMessenger(AutoVariationalDropoutBase, AutoMessenger):
    r"""
    :class:`~pyro.infer.autoguide.AutoMessenger` with variational-dropout posteriors [1]: the
    effect-based twin of :class:`~pyro_vdrop.infer.AutoVariationalDropout`, with the same options,
    parameters and guide distributions (exactly a
    :class:`~pyro_vdrop.distributions.VariationalDropoutNormal` or
    :class:`~pyro_vdrop.distributions.CorrelatedVariationalDropoutNormal` in ``.to_event(event_dim)``
    at each weight site of the model). It runs inside the model, so parameters are created lazily at
    the first call, and it can be subclassed to give other sites another posterior::

        class Guide(AutoVariationalDropoutMessenger):
            def get_posterior(self, name, prior):
                if name == "sigma":
                    scale = pyro.param("sigma_q", lambda: torch.tensor(1.0), constraint=constraints.positive)
                    return dist.LogNormal(0.0, scale)
                return super().get_posterior(name, prior)

    Usage is as for any Pyro guide::

        guide = AutoVariationalDropoutMessenger(model, parameterization="additive")
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())

    One difference from :class:`~pyro_vdrop.infer.AutoVariationalDropout`: guide and model share each
    sample site here, so ``kl_scale`` multiplies the site's ``scale`` for both :math:`\log p(w)` and
    :math:`\log q(w)`. :class:`~pyro.infer.TraceMeanField_ELBO` then gives ``kl_scale * KL`` (as the
    autoguide does) and :class:`~pyro.infer.Trace_ELBO` gives an unbiased estimate of it too.

    See :class:`~pyro_vdrop.infer.AutoVariationalDropout` for every other option (keywords, or one
    :class:`~pyro_vdrop.infer.autoguide.VariationalDropoutOptions` as ``options=``).

    :param callable model: A Pyro model.
    :param VariationalDropoutOptions options: The options as one object (e.g. from
        :func:`~pyro_vdrop.infer.autoguide.preset`).
    :param tuple amortized_plates: As for :class:`~pyro.infer.autoguide.AutoNormalMessenger`: plates over
        which guide parameters are shared.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick."
        NeurIPS 2015.
    """

    def __init__(
        self,
        model: Callable,
        *,
        options: VariationalDropoutOptions | None = None,
        amortized_plates: tuple[str, ...] = (),
        **keywords: Any,
    ):
        super().__init__(model, amortized_plates=amortized_plates)
        self._set_options(options, keywords)
        self._computing_median = False

    def _combine_hint(self, name):
        return (
            f"Subclass {type(self).__name__} and override get_posterior() to return another posterior for "
            f"site {name!r}, falling back to super().get_posterior() for the weight sites."
        )

    def _pyro_sample(self, msg):
        super()._pyro_sample(msg)
        if msg["is_observed"] or site_is_subsample(msg) or self._computing_median:
            return
        if msg["name"] in self._layouts and self.kl_scale != 1:
            # Guide and model share this site: scaling it scales log p(w) and log q(w), i.e. the KL.
            msg["scale"] = self.kl_scale * msg["scale"]

    def get_posterior(self, name: str, prior: Distribution) -> Distribution | torch.Tensor:
        self._check_site(name, prior)
        if name not in self._layouts:
            self._init_site(name, prior)
        if self._computing_median:
            return self._get_loc(name)
        return self.posterior(name)

    def _init_site(self, name, prior):
        self._set_like(*self.args_kwargs)
        try:
            with torch.no_grad():
                value = self._init_loc({"name": name, "fn": prior, "is_observed": False}).detach()
                init_loc = self._adjust_plates(value, prior.event_dim)
        finally:
            self._set_like(None, None)
        self._create_params(name, init_loc, prior.event_dim)

    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        r"""
        Returns the posterior median (= mean) :math:`\theta` of each weight site. With arguments, runs
        the model once first (creating the parameters if needed), as
        :meth:`~pyro.infer.autoguide.AutoNormalMessenger.median` does.

        :return: A dict mapping sample site name to median tensor.
        :rtype: dict
        """
        if args or kwargs:
            self._computing_median = True
            try:
                with torch.no_grad():
                    self(*args, **kwargs)
            finally:
                self._computing_median = False
        return self._medians()


__all__ = ["AutoVariationalDropoutMessenger"]
