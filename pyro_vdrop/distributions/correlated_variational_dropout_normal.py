# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import _standard_normal

from .util import check_kl_approx, clamped_exp, floor_scale


class CorrelatedVariationalDropoutNormal(TorchDistribution):
    r"""
    The correlated-noise variational-dropout posterior ("variational dropout A" [1, §3.3]):

    .. math::

        w = \theta \odot s, \qquad s \sim \mathcal{N}(1, \alpha) ,

    where one noise variable :math:`s` is shared by every weight along the dimensions in
    which ``log_alpha`` has size 1. For a linear weight of shape ``(out, in)`` with
    ``log_alpha`` of shape ``(1, in)`` (or ``(in,)``), :math:`s_i` multiplies the whole
    column :math:`\theta_{:, i}`: all outgoing weights of input unit :math:`i` share one
    noise, which is Gaussian dropout on the layer's inputs. For a convolution weight
    ``(out, in/groups, *kernel)`` the input axis is dim 1 and ``log_alpha`` has shape
    ``(1, in/groups, 1, ...)``.

    Each weight's marginal is :math:`\mathcal{N}(\theta, \alpha\theta^2)`, as for
    :class:`VariationalDropoutNormal`; the joint is degenerate (rank one per noise
    variable). Consequences:

    - the registered KL against :class:`ImproperLogUniform` counts the marginal KL of
      every weight (the paper's practice), not once per noise variable;
    - :meth:`log_prob` returns the sum of the marginal log-densities, a mean-field
      surrogate. The joint density does not exist (Hron et al. 2018: the KL of the
      correlated posterior to the log-uniform prior is infinite), so a Monte Carlo ELBO
      (``Trace_ELBO``) with this posterior is not meaningful; use ``TraceMeanField_ELBO``.

    :param torch.Tensor loc: The mean :math:`\theta`.
    :param torch.Tensor log_alpha: :math:`\log\alpha`, broadcastable to ``loc``; its own
        shape (right-aligned against ``loc``) is the shape of the shared noise.
    :param str kl_approx: As for :class:`VariationalDropoutNormal`.
    :param tuple log_alpha_clip: As for :class:`VariationalDropoutNormal`.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    """

    arg_constraints = {"loc": constraints.real, "log_alpha": constraints.real}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc, log_alpha, *, kl_approx=None, log_alpha_clip=None, validate_args=None):
        loc = torch.as_tensor(loc)
        log_alpha = torch.as_tensor(log_alpha, dtype=loc.dtype, device=loc.device)
        shape = torch.broadcast_shapes(loc.shape, log_alpha.shape)
        if kl_approx is not None:
            check_kl_approx(kl_approx)
        self.loc = loc.expand(shape)
        self.log_alpha = log_alpha.expand(shape)
        noise = (1,) * (len(shape) - log_alpha.dim()) + tuple(log_alpha.shape)
        self.noise_shape = torch.Size(noise)
        self.kl_approx = kl_approx
        self.log_alpha_clip = log_alpha_clip
        super().__init__(shape, validate_args=validate_args)

    @property
    def mean(self):
        return self.loc

    @property
    def scale(self):
        """
        The marginal standard deviation :math:`\\sqrt{\\alpha}|\\theta|` of each weight, with
        :math:`\\sqrt{\\alpha}` clamped at the dtype's largest finite number (0 where θ = 0, not NaN, where it
        overflows).
        """
        return clamped_exp(0.5 * self.log_alpha) * self.loc.abs()

    @property
    def variance(self):
        """
        The marginal variance :math:`\\alpha\\theta^2` of each weight, with :math:`\\alpha` clamped at the dtype's
        largest finite number as in :attr:`VariationalDropoutNormal.variance` (0 where θ = 0, not NaN, where
        :math:`\\exp(\\log\\alpha)` overflows).
        """
        return clamped_exp(self.log_alpha) * self.loc.pow(2)

    @property
    def alpha(self):
        return self.log_alpha.exp()

    @property
    def noise_log_alpha(self) -> torch.Tensor:
        r""":math:`\log\alpha` of the noise variables, of shape :attr:`noise_shape` (one entry per noise
        variable; the entries along the shared size-1 dims are equal by construction)."""
        index = tuple(slice(0, 1) if n == 1 else slice(None) for n in self.noise_shape)
        return self.log_alpha[index]

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        noise_shape = torch.Size(sample_shape) + self.noise_shape
        eps = _standard_normal(noise_shape, dtype=self.loc.dtype, device=self.loc.device)
        # the noise is clamped to the dtype's finite range, so that θ = 0 gives w = 0 (not inf * 0 = NaN) where
        # sqrt(α) ε overflows
        big = torch.finfo(self.loc.dtype).max
        s = (1 + clamped_exp(0.5 * self.noise_log_alpha) * eps).clamp(-big, big)
        return (self.loc * s).expand(shape)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self._marginal().log_prob(value)

    def entropy(self):
        return self._marginal().entropy()

    def _marginal(self):
        # the product of the marginals N(θ, αθ²), the mean-field surrogate of the degenerate joint
        return torch.distributions.Normal(self.loc, floor_scale(self.scale), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(CorrelatedVariationalDropoutNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.log_alpha = self.log_alpha.expand(batch_shape)
        # New leading dims get independent noise; existing dims keep their sharing.
        extra = len(batch_shape) - len(self.noise_shape)
        new.noise_shape = torch.Size(tuple(batch_shape[:extra]) + tuple(self.noise_shape))
        new.kl_approx = self.kl_approx
        new.log_alpha_clip = self.log_alpha_clip
        super(CorrelatedVariationalDropoutNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self):
        return f"{type(self).__name__}(loc: {self.loc.size()}, noise_shape: {tuple(self.noise_shape)})"
