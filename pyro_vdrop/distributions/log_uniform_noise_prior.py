# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from .truncated_log_uniform import TruncatedLogUniform

#: Neklyudov et al. (2017), §5: the interval of log θ of structured Bayesian pruning's prior and posterior.
SBP_LOG_NOISE_INTERVAL = (-20.0, 0.0)


class LogUniformNoisePrior(TorchDistribution):
    r"""
    The prior of a weight site under structured Bayesian pruning [1]: the weight is
    :math:`w = \theta \odot s` with a point estimate :math:`\theta` (held by the guide) and multiplicative
    noise :math:`s`, one variable per group (unit or channel), with the proper truncated log-uniform prior

    .. math::

        \log s_g \sim \mathrm{Uniform}(a, b) \qquad (:class:`TruncatedLogUniform`).

    Use it as the prior of the weight sites with a guide whose posterior is
    :class:`~pyro_vdrop.distributions.TruncatedLogNormalDropout` (``AutoVariationalDropout(model,
    noise="sbp")``); their KL (the exact KL of the noise, once per group) is registered with
    :func:`torch.distributions.kl.kl_divergence`::

        model = bayesianize(net, prior=LogUniformNoisePrior(-20.0, 0.0))

    The weight itself has no density under this prior without :math:`\theta`: :meth:`log_prob` and
    :meth:`sample` raise. Train with :class:`~pyro.infer.TraceMeanField_ELBO` inside
    :func:`~pyro_vdrop.poutine.local_reparam` (which puts the registered KL on the site and never asks for
    the prior density), and predict with the guide.

    :param float low: :math:`a`, the lower bound of :math:`\log s` (default -20 [1]).
    :param float high: :math:`b > a`, the upper bound of :math:`\log s` (default 0 [1]).

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative
        Noise." NeurIPS 2017.
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        low: float = SBP_LOG_NOISE_INTERVAL[0],
        high: float = SBP_LOG_NOISE_INTERVAL[1],
        batch_shape=torch.Size(),
        event_shape=torch.Size(),
        *,
        dtype=None,
        device=None,
        validate_args=None,
    ):
        low, high = float(low), float(high)
        if not (torch.isfinite(torch.tensor([low, high])).all() and low < high):
            raise ValueError(f"LogUniformNoisePrior: needs finite low < high (bounds of log s), got {low}, {high}")
        self.low, self.high = low, high
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=validate_args)

    @property
    def noise(self) -> TruncatedLogUniform:
        """The prior of one noise variable, a scalar :class:`TruncatedLogUniform`."""
        dtype = self.dtype or torch.get_default_dtype()
        low = torch.tensor(self.low, dtype=dtype, device=self.device)
        return TruncatedLogUniform(low, torch.tensor(self.high, dtype=dtype, device=self.device))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogUniformNoisePrior, _instance)
        new.low, new.high, new.dtype, new.device = self.low, self.high, self.dtype, self.device
        super(LogUniformNoisePrior, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        raise NotImplementedError(
            "LogUniformNoisePrior: the density of a weight w = θ ⊙ s depends on the guide's θ, so the prior has none "
            "of its own. Train with TraceMeanField_ELBO inside pyro_vdrop.poutine.local_reparam(), which uses the "
            "registered KL of the noise, and a guide with noise='sbp' (AutoVariationalDropout)."
        )

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "LogUniformNoisePrior: a weight w = θ ⊙ s cannot be drawn from the prior without θ; sample from the "
            "guide (pyro_vdrop.infer.Predictive(model, guide=guide, ...))."
        )

    def rsample(self, sample_shape=torch.Size()):
        return self.sample(sample_shape)

    def __repr__(self):
        return (
            f"{type(self).__name__}(low={self.low}, high={self.high}, batch_shape={tuple(self.batch_shape)}, "
            f"event_shape={tuple(self.event_shape)})"
        )


__all__ = ["SBP_LOG_NOISE_INTERVAL", "LogUniformNoisePrior"]
