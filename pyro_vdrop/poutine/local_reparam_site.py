# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import TorchDistribution


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
