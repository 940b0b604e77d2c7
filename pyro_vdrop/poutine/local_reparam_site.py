# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import kl_divergence

from pyro_vdrop.distributions.util import base_distribution


class LocalReparamSite(TorchDistribution):
    """
    The distribution recorded at a guide site whose value is a :class:`~pyro_vdrop.poutine.LazyWeight`.

    It stands for ``base`` (available as :attr:`base`, with the same shapes, support and moments) and
    marks that the site's contribution to the ELBO was computed analytically by
    :class:`~pyro_vdrop.poutine.LocalReparamMessenger`: the guide site carries a zero log-density and the
    model site :math:`-\\mathrm{KL}(q \\| p)`. No KL is registered for this class on purpose, so that
    :class:`~pyro.infer.TraceMeanField_ELBO` uses those recorded terms instead of computing the KL a
    second time. Its ``rsample`` is not available: the weight is never sampled.

    :param base: The site's guide distribution.
    :param lazy: The site's lazy value.
    """

    arg_constraints = {}
    has_rsample = True

    def __init__(self, base, lazy):
        self.base = base
        self.lazy = lazy
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    @property
    def mean(self):
        return self.base.mean

    @property
    def variance(self):
        return self.base.variance

    def expand(self, batch_shape, _instance=None):
        return LocalReparamSite(self.base.expand(batch_shape), self.lazy)

    def _unavailable(self, what):
        raise NotImplementedError(
            f"local_reparam: site {self.lazy.site!r} has no sampled weight, so its {what} is not available; its "
            "contribution to the ELBO is the analytic KL recorded on the model site. Use the distribution "
            "`.base` outside the handler."
        )

    def rsample(self, sample_shape=torch.Size()):
        self._unavailable("sample")

    def log_prob(self, value):
        """
        Zero (the site's contribution is the analytic KL on the model site), or the log-density of the
        ordinary sample that was drawn when an autoguide transformed this auxiliary value (e.g. ``exp`` for a
        positive site), which is then the site's value for the ELBO.
        """
        if self.lazy.guide_sampled:
            return self.base.log_prob(self.lazy.materialize())
        return self.lazy.loc.new_zeros(()).expand(self.batch_shape)

    def __repr__(self):
        return f"LocalReparamSite({self.base!r})"


class LocalReparamKL(TorchDistribution):
    """
    The distribution recorded at a model site whose value is a :class:`~pyro_vdrop.poutine.LazyWeight`.

    It stands for the prior ``base`` (available as :attr:`base` and ``base_dist``, with the same shapes and
    support) and its :meth:`log_prob` is the site's analytic ELBO term :math:`-\\mathrm{KL}(q \\| p)`, where
    ``q`` is the lazy value's Gaussian. The KL is computed only when something asks for the log-density —
    an ELBO's :meth:`~pyro.poutine.trace_struct.Trace.compute_log_prob` — so that prediction
    (:class:`~pyro_vdrop.infer.Predictive`, the ArviZ export, evaluation), which never asks, does not pay for
    it. The site's ``scale`` and ``mask`` are those of the guide site that made the lazy value.

    :param base: The site's prior.
    :param lazy: The site's lazy value.
    """

    arg_constraints = {}

    def __init__(self, base, lazy):
        self.base = base
        self.lazy = lazy
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def base_dist(self):
        return self.base

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        return LocalReparamKL(self.base.expand(batch_shape), self.lazy)

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            f"local_reparam: site {self.lazy.site!r} is a weight whose value is a lazy Gaussian; sample the prior "
            "`.base` instead"
        )

    def log_prob(self, value):
        """:math:`-\\mathrm{KL}(q \\| p)` (unscaled), whatever ``value`` is: the site holds no sampled weight."""
        q = self.lazy.distribution
        names = type(base_distribution(q)).__name__, type(base_distribution(self.base)).__name__
        try:
            kl = kl_divergence(q, self.base)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"local_reparam at site {self.lazy.site!r}: there is no weight sample, so the ELBO needs the "
                f"analytic KL(q || p), and none is registered for q = {names[0]}, p = {names[1]}. Register one with "
                "torch.distributions.kl.register_kl, or exclude the site with local_reparam(sites=...)."
            ) from e
        return -kl

    def __repr__(self):
        return f"LocalReparamKL({self.base!r})"
