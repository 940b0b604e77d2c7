# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from .truncated_log_normal import TruncatedLogNormal
from .util import safe_log_abs


class TruncatedLogNormalDropout(TorchDistribution):
    r"""
    The weight posterior of structured Bayesian pruning [1]: log-normal multiplicative noise shared by a group
    of weights (a unit or a channel),

    .. math::

        w = \theta \odot s, \qquad s_g \sim \mathrm{LogN}_{[a, b]}(\mu_g, \sigma_g^2)
        \quad (:class:`~pyro_vdrop.distributions.TruncatedLogNormal`),

    with one noise variable shared along the dims in which the noise parameters have size 1 (as
    :class:`CorrelatedVariationalDropoutNormal`). :math:`\theta` is a point estimate. Against
    :class:`~pyro_vdrop.distributions.LogUniformNoisePrior` on the same interval the KL is the exact, finite
    KL of the noise, :math:`\sum_g \mathrm{KL}(q(s_g) \,\|\, p(s_g))`, registered with
    :func:`torch.distributions.kl.kl_divergence` (spread evenly over each group's weights, so that it has the
    site's shape). Under :func:`~pyro_vdrop.poutine.local_reparam` the noise is drawn exactly on the layer's
    inputs (outputs) per example.

    A group is pruned when the signal-to-noise ratio of its noise, :math:`\mathbb{E}s/\sqrt{\mathrm{Var}\,s}`,
    is below 1 [1, §4.3]; :attr:`noise_log_alpha` is :math:`\log(\mathrm{Var}\,s/(\mathbb{E}s)^2) = -2\log
    \mathrm{SNR}`, the quantity that equals :math:`\log\alpha` for Gaussian noise :math:`\mathcal{N}(1, \alpha)`,
    so the SNR rule is :math:`\log\alpha > 0`.

    The joint of the weights is degenerate; :meth:`log_prob` returns the sum of the marginal log-densities
    (a mean-field surrogate, as for :class:`CorrelatedVariationalDropoutNormal`).

    :param torch.Tensor loc: :math:`\theta`.
    :param torch.Tensor noise_loc: :math:`\mu` of :math:`\log s` per group (shape: the noise's, right-aligned).
    :param torch.Tensor noise_scale: :math:`\sigma > 0` of :math:`\log s` per group, the shape of ``noise_loc``.
    :param float low: :math:`a`, the lower bound of :math:`\log s`.
    :param float high: :math:`b`, the upper bound of :math:`\log s`.

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative
        Noise." NeurIPS 2017.
    """

    arg_constraints = {"loc": constraints.real, "noise_loc": constraints.real, "noise_scale": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc, noise_loc, noise_scale, low, high, validate_args=None):
        loc = torch.as_tensor(loc)
        noise_loc, noise_scale = torch.broadcast_tensors(
            torch.as_tensor(noise_loc, dtype=loc.dtype, device=loc.device),
            torch.as_tensor(noise_scale, dtype=loc.dtype, device=loc.device),
        )
        shape = torch.broadcast_shapes(loc.shape, noise_loc.shape)
        self.loc = loc.expand(shape)
        self.noise_shape = torch.Size((1,) * (len(shape) - noise_loc.dim()) + tuple(noise_loc.shape))
        self.noise_loc = noise_loc.reshape(self.noise_shape)
        self.noise_scale = noise_scale.reshape(self.noise_shape)
        self.low, self.high = float(low), float(high)
        super().__init__(shape, validate_args=validate_args)

    @property
    def noise(self) -> TruncatedLogNormal:
        """The distribution of the noise variables, of batch shape :attr:`noise_shape`."""
        low = torch.full_like(self.noise_loc, self.low)
        return TruncatedLogNormal(self.noise_loc, self.noise_scale, low, torch.full_like(low, self.high))

    @property
    def group_size(self) -> int:
        """The number of weights sharing one noise variable."""
        return self.batch_shape.numel() // self.noise_shape.numel()

    @property
    def noise_log_alpha(self) -> torch.Tensor:
        r""":math:`\log(\mathrm{Var}\,s / (\mathbb{E}s)^2) = -2\log\mathrm{SNR}` of each noise variable."""
        return self.noise.log_relative_variance

    @property
    def mean(self):
        return self.loc * self.noise.mean

    @property
    def median(self):
        """The median of each weight's marginal, :math:`\\theta` times the median of its noise."""
        return self.loc * self.noise.icdf(0.5)

    @property
    def variance(self):
        return self.loc.pow(2) * self.noise.variance

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return (self.loc * self.noise.rsample(sample_shape)).expand(shape)

    def log_prob(self, value):
        # the marginal of w_ij = θ_ij s_g: a scaled truncated log-normal, summed over the weights (a surrogate of
        # the degenerate joint)
        s = value / self.loc
        return self.noise.log_prob(s.clamp(min=torch.finfo(s.dtype).tiny)) - safe_log_abs(self.loc)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedLogNormalDropout, _instance)
        batch_shape = torch.Size(batch_shape)
        extra = len(batch_shape) - len(self.noise_shape)
        new.loc = self.loc.expand(batch_shape)
        new.noise_shape = torch.Size(tuple(batch_shape[:extra]) + tuple(self.noise_shape))
        noise_batch = torch.Size(tuple(batch_shape[:extra]) + tuple(self.noise_shape))
        new.noise_loc = self.noise_loc.expand(noise_batch)
        new.noise_scale = self.noise_scale.expand(noise_batch)
        new.low, new.high = self.low, self.high
        super(TruncatedLogNormalDropout, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self):
        return f"{type(self).__name__}(loc: {self.loc.size()}, noise_shape: {tuple(self.noise_shape)})"


__all__ = ["TruncatedLogNormalDropout"]
