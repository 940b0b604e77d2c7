# SPDX-License-Identifier: Apache-2.0
r"""
KL divergences from variational-dropout posteriors to the log-uniform prior.

With :math:`q(w) = \mathcal{N}(\theta, \alpha\theta^2)` and :math:`p(w) \propto 1/|w|`,

.. math::

    -\mathrm{KL}(q \,\|\, p) = C + \tfrac{1}{2}\log\alpha
        - \mathbb{E}_{\varepsilon\sim\mathcal{N}(1,\alpha)}\log|\varepsilon| ,

which has no closed form and, the prior being improper, is defined only up to the
constant :math:`C` [1, §4]. Two published fits are offered by :func:`log_uniform_kl`.
The registered KLs let :class:`~pyro.infer.TraceMeanField_ELBO` use them analytically,
including through ``.to_event()`` (``Independent``) wrappers.
"""

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.distributions import Normal, register_kl

from .correlated_variational_dropout_normal import CorrelatedVariationalDropoutNormal
from .group_variational_dropout_normal import GroupVariationalDropoutNormal
from .improper_log_uniform import ImproperLogUniform
from .log_uniform_noise_prior import LogUniformNoisePrior
from .truncated_log_normal import TruncatedLogNormal
from .truncated_log_normal_dropout import TruncatedLogNormalDropout
from .truncated_log_uniform import TruncatedLogUniform
from .util import check_kl_approx, normal_log_alpha
from .variational_dropout_normal import VariationalDropoutNormal

# Kingma, Salimans, Welling (2015), §3.3 / eq. (10): cubic fit of -KL for α ≤ 1.
KINGMA_C1 = 1.16145124
KINGMA_C2 = -1.50204118
KINGMA_C3 = 0.58629921
# Molchanov, Ashukha, Vetrov (2017), eq. (14): sigmoid fit of -KL valid for every α.
MOLCHANOV_K1 = 0.63576
MOLCHANOV_K2 = 1.87320
MOLCHANOV_K3 = 1.48695


def _molchanov_u(inner):
    r""":math:`u = \sigma(-(k_2 + k_3\log\alpha))` of :class:`_MolchanovKL`, in three elementwise passes."""
    return inner.mul(-MOLCHANOV_K3).sub_(MOLCHANOV_K2).sigmoid_()


class _MolchanovKL(Function):
    r"""
    The Molchanov fit as one autograd node (fewer elementwise passes than autograd of the formula):

    .. math::

        \mathrm{KL} = k_1 u - \tfrac{1}{2}\log\sigma(\log\alpha), \qquad
        \frac{\partial\,\mathrm{KL}}{\partial\log\alpha} = -k_1 k_3 u (1 - u) - \tfrac{1}{2}\sigma(-\log\alpha),
        \qquad u = \sigma(-(k_2 + k_3\log\alpha)) .

    With ``low``/``high`` it is the KL of ``log_alpha.clamp(low, high)`` (gradient 0 outside the bounds, as autograd
    of ``clamp`` gives) without a separate ``clamp`` node, whose backward takes four elementwise passes.
    The backward pass is itself differentiable (it recomputes from ``log_alpha`` when a graph is being built).
    """

    @staticmethod
    def forward(ctx, log_alpha, low=None, high=None):
        clipped = low is not None or high is not None
        inner = log_alpha.clamp(low, high) if clipped else log_alpha
        u = _molchanov_u(inner)
        log_sigmoid = F.logsigmoid(inner)
        ctx.clip = (low, high) if clipped else None
        # only log α (which the guide keeps anyway): the clipped log α and u, two more tensors of the weight's size
        # kept until the backward pass, are recomputed there (bitwise the same values)
        ctx.save_for_backward(log_alpha)
        return log_sigmoid.mul_(-0.5).add_(u, alpha=MOLCHANOV_K1)

    @staticmethod
    def backward(ctx, grad):
        (log_alpha,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiable ops on log_alpha
            inner = log_alpha if ctx.clip is None else log_alpha.clamp(*ctx.clip)
            u = torch.sigmoid(-(MOLCHANOV_K2 + MOLCHANOV_K3 * inner))
            d = grad * (MOLCHANOV_K1 * MOLCHANOV_K3 * (u * u - u) - 0.5 * torch.sigmoid(-inner))
            if ctx.clip is not None:
                d = torch.where(inner == log_alpha, d, torch.zeros_like(d))
            return d, None, None
        inner = log_alpha if ctx.clip is None else log_alpha.clamp(*ctx.clip)
        u = _molchanov_u(inner)
        # -2 dKL/dlog α = σ(-log α) + 2 k1 k3 (u - u²)
        d = inner.neg().sigmoid_().add_(torch.addcmul(u, u, u, value=-1.0), alpha=2 * MOLCHANOV_K1 * MOLCHANOV_K3)
        d = d.mul_(grad).mul_(-0.5)
        if ctx.clip is not None:
            # 0 where log α was clipped: d - d * [clipped], with the indicator as a float (|inner - log α| > 0) made
            # by sign; on CPU comparisons to a bool mask and masked_fill_ take about ten times as long
            clipped = torch.sub(inner, log_alpha).abs_().sign_()
            d = d.addcmul_(d, clipped, value=-1.0)
        return d, None, None


def log_uniform_kl(log_alpha, approx="molchanov"):
    r"""
    Elementwise :math:`\mathrm{KL}(\mathcal{N}(\theta, \alpha\theta^2) \,\|\, p(w) \propto 1/|w|)`
    as a function of :math:`\log\alpha`.

    - ``"molchanov"`` [2]: :math:`-\mathrm{KL} \approx k_1\sigma(k_2 + k_3\log\alpha)
      - \tfrac{1}{2}\log(1 + 1/\alpha) - k_1`, valid for every :math:`\alpha`. Its constant is
      chosen so that the KL tends to 0 as :math:`\alpha \to \infty` (a weight that is pure
      noise costs nothing); this corresponds to
      :math:`C = -\tfrac{1}{2}(\gamma + \log 2) \approx -0.635` in the exact expression
      above, since :math:`\mathbb{E}\log|z| = -\tfrac{1}{2}(\gamma + \log 2)` for
      :math:`z \sim \mathcal{N}(0, 1)` (:math:`\gamma` is Euler's constant).
    - ``"kingma"`` [1]: :math:`-\mathrm{KL} \approx \tfrac{1}{2}\log\alpha + c_1\alpha + c_2\alpha^2
      + c_3\alpha^3`, fitted for :math:`\alpha \le 1` with the published constant dropped
      (:math:`C = 0` in that formula; the KL is therefore not 0 at any special point and
      can be negative: :math:`-(c_1 + c_2 + c_3) \approx -0.246` at :math:`\alpha = 1`). As in
      the paper, :math:`\alpha` is clamped at 1 inside this fit, so the KL is constant and
      its gradient with respect to :math:`\log\alpha` is zero for :math:`\alpha > 1`;
      guides that use it should cap :math:`\log\alpha` at 0.

    Both are finite, with finite gradients, for every finite :math:`\log\alpha`
    (tested for :math:`\log\alpha \in [-20, 20]`). Their accuracy against numerical
    quadrature of the exact expectation is tested in ``tests/distributions/test_kl.py``.

    :param torch.Tensor log_alpha: :math:`\log\alpha`, any shape.
    :param str approx: ``"molchanov"`` (default) or ``"kingma"``.
    :returns: the KL divergence, elementwise, with the shape of ``log_alpha``.
    :rtype: torch.Tensor

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural
        Networks." ICML 2017.
    """
    check_kl_approx(approx)
    if not torch.is_tensor(log_alpha):
        log_alpha = torch.as_tensor(log_alpha, dtype=torch.get_default_dtype())
    if approx == "molchanov":
        return _MolchanovKL.apply(log_alpha)
    log_alpha = log_alpha.clamp(max=0.0)
    alpha = log_alpha.exp()
    neg_kl = 0.5 * log_alpha + alpha * (KINGMA_C1 + alpha * (KINGMA_C2 + alpha * KINGMA_C3))
    return -neg_kl


def _expand_kl(kl, q, p):
    if kl.shape == q.batch_shape == p.batch_shape:
        return kl
    shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    return kl.expand(shape) if kl.shape != shape else kl


@register_kl(VariationalDropoutNormal, ImproperLogUniform)
@register_kl(CorrelatedVariationalDropoutNormal, ImproperLogUniform)
def _kl_variationaldropoutnormal_improperloguniform(q, p):
    log_alpha = q.log_alpha
    approx = check_kl_approx(q.kl_approx or p.kl_approx)
    if q.log_alpha_clip is None:
        kl = log_uniform_kl(log_alpha, approx)
    elif approx == "molchanov":
        kl = _MolchanovKL.apply(log_alpha, *q.log_alpha_clip)  # the clip inside the KL's node
    else:
        kl = log_uniform_kl(log_alpha.clamp(*q.log_alpha_clip), approx)
    return _expand_kl(kl, q, p)


@register_kl(Normal, ImproperLogUniform)
def _kl_normal_improperloguniform(q, p):
    # Any factorized Normal N(μ, σ²) is a dropout posterior with α = σ²/μ².
    log_alpha = normal_log_alpha(q.loc, q.scale)
    kl = log_uniform_kl(log_alpha, p.kl_approx)
    return _expand_kl(kl, q, p)


def _spread_over_groups(kl_groups, q, p):
    """A KL per noise variable (of ``q.noise_shape``) spread evenly over its group's weights: the site's shape."""
    shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    return (kl_groups / q.group_size).expand(shape)


@register_kl(GroupVariationalDropoutNormal, ImproperLogUniform)
def _kl_groupvariationaldropoutnormal_improperloguniform(q, p):
    # the KL of the group model (see GroupVariationalDropoutNormal): once per noise variable, not per weight
    log_alpha = q.noise_log_alpha
    if q.log_alpha_clip is not None:
        log_alpha = log_alpha.clamp(*q.log_alpha_clip)
    kl = log_uniform_kl(log_alpha, check_kl_approx(q.kl_approx or p.kl_approx))
    return _spread_over_groups(kl, q, p)


@register_kl(TruncatedLogNormal, TruncatedLogUniform)
def _kl_truncatedlognormal_truncatedloguniform(q, p):
    r"""
    :math:`\log(b_p - a_p) - H(\log\theta)` when :math:`[a_q, b_q] \subseteq [a_p, b_p]` (the KL is invariant
    under :math:`\theta \mapsto \log\theta`, where the prior is uniform), ``inf`` otherwise [Neklyudov et al.
    2017, §4.1].
    """
    kl = (p.high - p.low).log() - q.log_entropy()
    inside = (q.low >= p.low) & (q.high <= p.high)
    return torch.where(inside, kl, torch.full_like(kl, float("inf")))


@register_kl(TruncatedLogNormalDropout, LogUniformNoisePrior)
def _kl_truncatedlognormaldropout_loguniformnoiseprior(q, p):
    if (q.low, q.high) != (p.low, p.high):
        raise ValueError(
            f"structured Bayesian pruning needs the posterior's interval of log s, ({q.low}, {q.high}), to be the "
            f"prior's, ({p.low}, {p.high}): give the guide the prior's bounds (the guide reads them from the prior)"
        )
    noise = q.noise
    prior = TruncatedLogUniform(torch.full_like(noise.low, p.low), torch.full_like(noise.high, p.high))
    return _spread_over_groups(_kl_truncatedlognormal_truncatedloguniform(noise, prior), q, p)
