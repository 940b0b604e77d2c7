# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all


def check_interval(low, high, name):
    """Raises a :class:`ValueError` unless ``low < high`` everywhere and both are finite."""
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"{name}: low and high must be finite (a bounded interval of log θ), got {low}, {high}")
    if not (low < high).all():
        raise ValueError(f"{name}: needs low < high, got low={low}, high={high}")


class TruncatedLogUniform(TorchDistribution):
    r"""
    The log-uniform distribution on a bounded interval [1, §4.1]: a positive variable :math:`\theta` with
    :math:`\log\theta \sim \mathrm{Uniform}(a, b)`,

    .. math::

        p(\theta) = \frac{1}{(b - a)\,\theta}, \qquad e^a \le \theta \le e^b .

    Unlike the improper log-uniform prior of variational dropout
    (:class:`~pyro_vdrop.distributions.ImproperLogUniform`) it is proper, so the ELBO with it is a true lower
    bound of the evidence (the point of Hron et al. [2]); its KL from a
    :class:`~pyro_vdrop.distributions.TruncatedLogNormal` on the same interval is finite and in closed form
    (registered with :func:`torch.distributions.kl.kl_divergence`).

    :param torch.Tensor low: :math:`a`, the lower bound of :math:`\log\theta` (finite).
    :param torch.Tensor high: :math:`b > a`, the upper bound of :math:`\log\theta` (finite).

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative
        Noise." NeurIPS 2017.
    [2] Hron, Matthews, Ghahramani. "Variational Bayesian dropout: pitfalls and fixes." ICML 2018.
    """

    arg_constraints = {"low": constraints.real, "high": constraints.real}
    has_rsample = True

    def __init__(self, low, high, validate_args=None):
        self.low, self.high = broadcast_all(low, high)
        super().__init__(self.low.shape, validate_args=validate_args)
        if self._validate_args:
            check_interval(self.low, self.high, type(self).__name__)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.low.exp(), self.high.exp())

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedLogUniform, _instance)
        batch_shape = torch.Size(batch_shape)
        new.low = self.low.expand(batch_shape)
        new.high = self.high.expand(batch_shape)
        super(TruncatedLogUniform, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.low.dtype, device=self.low.device)
        return (self.low + u * (self.high - self.low)).exp()

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        log_value = value.log()
        inside = (log_value >= self.low) & (log_value <= self.high)
        log_p = -log_value - (self.high - self.low).log()
        return torch.where(inside, log_p, torch.full_like(log_p, -float("inf")))

    def cdf(self, value):
        return ((value.log() - self.low) / (self.high - self.low)).clamp(0, 1)

    def icdf(self, value):
        return (self.low + value * (self.high - self.low)).exp()

    @property
    def mean(self):
        return (self.high.exp() - self.low.exp()) / (self.high - self.low)

    @property
    def variance(self):
        second = ((2 * self.high).exp() - (2 * self.low).exp()) / (2 * (self.high - self.low))
        return second - self.mean.pow(2)

    def entropy(self):
        # H(θ) = H(log θ) + E[log θ]
        return (self.high - self.low).log() + 0.5 * (self.low + self.high)


__all__ = ["TruncatedLogUniform"]
