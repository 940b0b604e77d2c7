# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import Normal
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .util import check_kl_approx, clamped_exp, floor_scale


def _alpha_loc(loc, log_alpha):
    r""":math:`\alpha\theta` with :math:`\alpha` clamped at the dtype's largest finite number (a new tensor)."""
    return log_alpha.exp().clamp_(max=torch.finfo(log_alpha.dtype).max).mul_(loc)


class _DropoutVariance(torch.autograd.Function):
    r"""
    :math:`\sigma^2 = \exp(\log\alpha)\,\theta^2` as one autograd node: the backward pass takes three
    elementwise passes (:math:`\partial/\partial\theta = 2\alpha\theta g`, :math:`\partial/\partial\log\alpha
    = \sigma^2 g`) where autograd of the formula takes six, which is about 0.6 ms of a 784-300-100-10 MLP step on
    CPU. The backward pass is itself differentiable (it recomputes from the inputs when a graph is being built).

    :math:`\alpha` is clamped at the dtype's largest finite number (one in-place pass), so that where
    :math:`\exp(\log\alpha)` overflows (:math:`\log\alpha` > 88.7 in float32) a weight with θ = 0 has variance
    0 and gradients 0 instead of ``inf * 0 = NaN``. Wherever :math:`\alpha` is finite, values and gradients are
    bitwise those of the unclamped formula.
    """

    @staticmethod
    def forward(ctx, loc, log_alpha):
        variance = _alpha_loc(loc, log_alpha).mul_(loc)
        # the inputs and the output, which the guide and the local reparameterization keep anyway; αθ, a tensor of
        # the weight's size kept until the backward pass, is recomputed there (bitwise the same values)
        ctx.save_for_backward(loc, log_alpha, variance)
        return variance

    @staticmethod
    def backward(ctx, grad):
        loc, log_alpha, variance = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiable ops on the inputs
            alpha = clamped_exp(log_alpha)
            return grad * 2 * alpha * loc, grad * alpha * loc * loc
        return _alpha_loc(loc, log_alpha).mul_(grad).mul_(2.0), variance * grad


class _AdditiveLogAlpha(torch.autograd.Function):
    r"""
    :math:`\log\alpha = \log\sigma^2 - 2\log\max(|\theta|, \text{tiny})` (see :func:`safe_log_abs`) as one
    autograd node: four elementwise passes forward and five backward where autograd of the formula takes five and
    about eight (abs, clamp, log, scale, subtract); about 0.5 ms of a 300×784 layer on CPU. The gradient with
    respect to :math:`\theta` is :math:`-2g/\theta`, and 0 where :math:`|\theta|` < tiny (the clamp), as autograd
    gives. The backward pass is itself differentiable.
    """

    @staticmethod
    def forward(ctx, loc, log_sigma2):
        ctx.save_for_backward(loc)
        log_abs = loc.abs().clamp_(min=torch.finfo(loc.dtype).tiny).log_()
        return torch.add(log_sigma2, log_abs, alpha=-2.0)

    @staticmethod
    def backward(ctx, grad):
        (loc,) = ctx.saved_tensors
        tiny = torch.finfo(loc.dtype).tiny
        if torch.is_grad_enabled():  # double backward: differentiable ops
            below = loc.abs() < tiny
            return torch.where(below, torch.zeros_like(grad), -2 * grad / loc), grad
        # [|θ| < tiny] as a float (1 or 0; NaN where θ is) made by sign, since on CPU a comparison to a bool mask and
        # masked_fill_ take about ten times as long: -2g/θ where |θ| >= tiny (θ + 0 = θ exactly), and where
        # |θ| < tiny g/(θ + 1) times 0 (finite, so the product is 0)
        below = torch.rsub(loc.abs(), tiny).clamp_(min=0.0).sign_()
        return grad.div(loc + below).mul_(below.sub_(1.0).mul_(2.0)), grad


class VariationalDropoutNormal(Normal):
    r"""
    The variational-dropout posterior of a weight [1, §3]: a reparameterized Normal

    .. math::

        q(w) = \mathcal{N}(w \mid \theta, \alpha\theta^2), \qquad
        \text{scale} = \exp(\tfrac{1}{2}\log\alpha)\,|\theta| ,

    so that multiplying ``loc`` by Gaussian noise :math:`\xi \sim \mathcal{N}(1, \alpha)`
    gives a sample (Gaussian dropout with rate :math:`\alpha`). Against the
    :class:`~pyro_vdrop.distributions.ImproperLogUniform` prior its KL divergence depends
    on :math:`\log\alpha` alone and is registered with :func:`torch.distributions.kl.kl_divergence`.

    Two parameterizations share this class:

    - multiplicative (the paper's): ``VariationalDropoutNormal(loc, log_alpha)``;
    - additive (sparse variational dropout [2]): ``VariationalDropoutNormal.from_additive(loc, log_sigma2)``
      with :math:`\sigma^2 = \alpha\theta^2` learned directly, so that gradients with respect
      to :math:`\theta` are not dominated by the multiplicative noise;
      :attr:`log_alpha` is then derived as :math:`\log\sigma^2 - \log\theta^2`.

    Everything a :class:`~pyro.distributions.Normal` offers (``rsample``, ``log_prob``,
    ``entropy``, ``mean``, ``variance``, ``expand``, ``to_event``) works, and guides or
    effect handlers that understand a factorized Normal understand this class too.

    :param torch.Tensor loc: The mean :math:`\theta`.
    :param torch.Tensor log_alpha: :math:`\log\alpha`, broadcastable with ``loc``
        (e.g. one value per layer, per unit, or per weight).
    :param str kl_approx: The KL approximation (``"molchanov"`` or ``"kingma"``) used against
        :class:`~pyro_vdrop.distributions.ImproperLogUniform`; ``None`` (default) defers to the prior's.
    :param tuple log_alpha_clip: Optional ``(low, high)`` bounds applied to :math:`\log\alpha`
        inside the KL only (sparse variational dropout uses ``(-8, 8)`` [2]). The sampling
        distribution is unchanged.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural
        Networks." ICML 2017.
    """

    arg_constraints = {"loc": constraints.real, "log_alpha": constraints.real}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc, log_alpha, *, kl_approx=None, log_alpha_clip=None, validate_args=None):
        loc, log_alpha = broadcast_all(loc, log_alpha)
        self._init(loc, log_alpha, None, kl_approx, log_alpha_clip, validate_args, "multiplicative")

    @classmethod
    def from_additive(cls, loc, log_sigma2, *, kl_approx=None, log_alpha_clip=None, validate_args=None):
        r"""
        Builds the posterior from the additive parameterization of sparse variational
        dropout [2]: :math:`q(w) = \mathcal{N}(\theta, \sigma^2)` with
        :math:`\log\alpha = \log\sigma^2 - \log\theta^2` (``|θ|`` is clamped at the dtype's
        smallest normal number so that ``θ = 0`` gives a large finite ``log_alpha``).

        :param torch.Tensor loc: The mean :math:`\theta`.
        :param torch.Tensor log_sigma2: :math:`\log\sigma^2`, broadcastable with ``loc``.
        :rtype: VariationalDropoutNormal
        """
        loc, log_sigma2 = broadcast_all(loc, log_sigma2)
        log_alpha = _AdditiveLogAlpha.apply(loc, log_sigma2)  # log_sigma2 - 2 * safe_log_abs(loc), one node
        new = cls.__new__(cls)
        new._init(loc, log_alpha, log_sigma2, kl_approx, log_alpha_clip, validate_args, "additive")
        return new

    def _init(self, loc, log_alpha, log_sigma2, kl_approx, log_alpha_clip, validate_args, parameterization):
        if kl_approx is not None:
            check_kl_approx(kl_approx)
        if log_alpha_clip is not None:
            low, high = log_alpha_clip
            if not low < high:
                raise ValueError(f"log_alpha_clip must be (low, high) with low < high, got {log_alpha_clip!r}")
        self.loc = loc
        self.log_alpha = log_alpha
        # scale and variance are computed on first use: the local reparameterization needs only the
        # variance, the KL neither (see the scale and variance properties).
        self._log_sigma2 = log_sigma2
        self._scale = None
        self._variance = None
        self.kl_approx = kl_approx
        self.log_alpha_clip = log_alpha_clip
        self.parameterization = parameterization
        super(torch.distributions.Normal, self).__init__(loc.shape, validate_args=validate_args)

    @property
    def scale(self):
        r"""
        The standard deviation :math:`\sqrt{\alpha}|\theta|` (multiplicative) or :math:`\sigma` (additive),
        floored where its square is still a normal number, so that a zero scale (θ = 0 with the
        multiplicative form) does not make ``log_prob`` NaN. :math:`\sqrt{\alpha}` is clamped at the dtype's
        largest finite number, so θ = 0 gives the floor even where it overflows (:math:`\log\alpha` > 177 in
        float32). Computed on first use.
        """
        if self._scale is None:
            if self._log_sigma2 is None:
                scale = clamped_exp(0.5 * self.log_alpha) * self.loc.abs()
            else:
                scale = (0.5 * self._log_sigma2).exp()
            self._scale = floor_scale(scale)
        return self._scale

    @property
    def variance(self):
        r"""
        The variance :math:`\alpha\theta^2` (multiplicative) or :math:`\sigma^2` (additive), computed on first
        use from :math:`\log\alpha` and :math:`\theta` (or :math:`\log\sigma^2`) directly, without the floor of
        :attr:`scale` (it may be 0 where θ = 0).

        In the multiplicative form :math:`\alpha` is clamped at the dtype's largest finite number, so the variance
        and its gradients are 0 where θ = 0 for every finite :math:`\log\alpha`, not NaN where
        :math:`\exp(\log\alpha)` overflows (:math:`\log\alpha` > 88.7 in float32, 709.8 in float64). Beyond that
        bound it is :math:`\alpha_{\max}\theta^2`, a lower bound of :math:`\alpha\theta^2` (inf where
        :math:`|\theta|` > 1); below it, the exact formula.
        """
        if self._variance is None:
            if self._log_sigma2 is None:
                self._variance = _DropoutVariance.apply(self.loc, self.log_alpha)
            else:
                self._variance = self._log_sigma2.exp()
        return self._variance

    @property
    def alpha(self):
        r"""The dropout variance :math:`\alpha = \exp(\log\alpha)`."""
        return self.log_alpha.exp()

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(VariationalDropoutNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.log_alpha = self.log_alpha.expand(batch_shape)
        new._log_sigma2 = None if self._log_sigma2 is None else self._log_sigma2.expand(batch_shape)
        new._scale = None if self._scale is None else self._scale.expand(batch_shape)
        new._variance = None if self._variance is None else self._variance.expand(batch_shape)
        new.kl_approx = self.kl_approx
        new.log_alpha_clip = self.log_alpha_clip
        new.parameterization = self.parameterization
        super(torch.distributions.Normal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self):
        sizes = f"loc: {self.loc.size()}, log_alpha: {self.log_alpha.size()}"
        return f"{type(self).__name__}({sizes}, {self.parameterization})"
