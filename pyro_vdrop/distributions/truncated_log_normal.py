# SPDX-License-Identifier: Apache-2.0

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .truncated_log_uniform import check_interval

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_SQRT_HALF = math.sqrt(0.5)


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for large ``-x`` (Mächler 2012)."""
    return torch.where(x > -math.log(2), (-x.expm1()).log(), (-x.exp()).log1p())


def log_ndtr_diff(lo, hi):
    r"""
    :math:`\log(\Phi(hi) - \Phi(lo))` for ``lo < hi``, accurate in both tails: the difference is taken on the
    side of 0 where the two normal CDFs are small (:math:`\Phi(hi) - \Phi(lo) = \Phi(-lo) - \Phi(-hi)`).
    """
    upper = lo > 0  # both in the upper tail: use the survival functions
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + _log1mexp(torch.special.log_ndtr(a) - log_b)


def _log_normal_pdf(x):
    return -0.5 * x * x - _LOG_SQRT_2PI


class TruncatedLogNormal(TorchDistribution):
    r"""
    The truncated log-normal distribution of structured Bayesian pruning [1, §4.1]: a positive variable
    :math:`\theta` with :math:`\log\theta \sim \mathcal{N}(\mu, \sigma^2)` truncated to :math:`[a, b]`,

    .. math::

        q(\theta) = \frac{\varphi\big((\log\theta - \mu)/\sigma\big)}{\sigma Z\,\theta}, \qquad
        Z = \Phi(\beta) - \Phi(\alpha), \quad \alpha = \frac{a - \mu}{\sigma}, \ \beta = \frac{b - \mu}{\sigma},

    for :math:`e^a \le \theta \le e^b`. Moments and signal-to-noise ratio in closed form:

    .. math::

        \mathbb{E}\theta^k = e^{k\mu + k^2\sigma^2/2}\,\frac{\Phi(\beta - k\sigma) - \Phi(\alpha - k\sigma)}{Z},
        \qquad \mathrm{SNR} = \frac{\mathbb{E}\theta}{\sqrt{\mathrm{Var}\,\theta}} ,

    and its KL from :class:`~pyro_vdrop.distributions.TruncatedLogUniform` on the same interval is
    :math:`\log(b - a) - H(\log\theta)` with the truncated normal's entropy
    :math:`H = \log(\sqrt{2\pi e}\,\sigma Z) + \frac{\alpha\varphi(\alpha) - \beta\varphi(\beta)}{2Z}`
    (registered with :func:`torch.distributions.kl.kl_divergence`).

    ``rsample`` is reparameterized by the inverse CDF; :meth:`from_standard_normal` maps a standard normal
    :math:`\epsilon` to a sample (through :math:`u = \Phi(\epsilon)`), which the local reparameterization uses
    to draw the noise of a layer's units per example.

    :param torch.Tensor loc: :math:`\mu`, the location of :math:`\log\theta` before truncation.
    :param torch.Tensor scale: :math:`\sigma > 0`.
    :param torch.Tensor low: :math:`a`, the lower bound of :math:`\log\theta` (finite).
    :param torch.Tensor high: :math:`b > a`, the upper bound of :math:`\log\theta` (finite).

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative
        Noise." NeurIPS 2017.
    """

    arg_constraints = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "low": constraints.real,
        "high": constraints.real,
    }
    has_rsample = True

    def __init__(self, loc, scale, low, high, validate_args=None):
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        super().__init__(self.loc.shape, validate_args=validate_args)
        if self._validate_args:
            check_interval(self.low, self.high, type(self).__name__)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.low.exp(), self.high.exp())

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedLogNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("loc", "scale", "low", "high"):
            setattr(new, name, getattr(self, name).expand(batch_shape))
        super(TruncatedLogNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    # ---- the standardized bounds -------------------------------------------------------

    @property
    def _alpha(self):
        return (self.low - self.loc) / self.scale

    @property
    def _beta(self):
        return (self.high - self.loc) / self.scale

    @property
    def log_normalizer(self):
        r""":math:`\log Z = \log(\Phi(\beta) - \Phi(\alpha))`, the log-mass of the interval before truncation."""
        return log_ndtr_diff(self._alpha, self._beta)

    def _log_moment(self, k):
        r""":math:`\log\mathbb{E}\theta^k`."""
        s = k * self.scale
        return k * self.loc + 0.5 * s * s + log_ndtr_diff(self._alpha - s, self._beta - s) - self.log_normalizer

    # ---- sampling and density -----------------------------------------------------------

    def from_standard_normal(self, eps):
        r"""
        The sample :math:`\theta = \exp(\mu + \sigma\,\Phi^{-1}(\Phi(\alpha) + \Phi(\epsilon) Z))` for a standard
        normal ``eps`` (broadcastable to the batch shape), differentiable with respect to the parameters. The
        inverse CDF is taken in the tail where the CDF values are small (as :func:`log_ndtr_diff`), and the
        result is clamped to :math:`[e^a, e^b]` against rounding.
        """
        alpha, beta = self._alpha, self._beta
        upper = alpha > 0  # the interval lies right of the mode: sample -x from the mirrored interval
        lo = torch.where(upper, -beta, alpha)
        hi = torch.where(upper, -alpha, beta)
        eps = torch.where(upper, -eps, eps)
        # Φ^{-1}(Φ(lo) + u (Φ(hi) - Φ(lo))) computed as Φ^{-1}(exp(logaddexp(log Φ(lo), log u + log Z)))
        log_u = torch.special.log_ndtr(eps)
        log_cdf = torch.logaddexp(torch.special.log_ndtr(lo), log_u + log_ndtr_diff(lo, hi))
        z = torch.special.ndtri(log_cdf.exp().clamp(max=1.0))
        z = torch.where(upper, -z, z)
        x = (self.loc + self.scale * z).clamp(min=self.low, max=self.high)
        return x.exp()

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.from_standard_normal(eps)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        x = value.log()
        log_p = _log_normal_pdf((x - self.loc) / self.scale) - self.scale.log() - self.log_normalizer - x
        inside = (x >= self.low) & (x <= self.high)
        return torch.where(inside, log_p, torch.full_like(log_p, -float("inf")))

    def icdf(self, value):
        # u = Φ(ε) ⇔ ε = Φ^{-1}(u)
        return self.from_standard_normal(torch.special.ndtri(torch.as_tensor(value, dtype=self.loc.dtype)))

    # ---- moments --------------------------------------------------------------------------

    @property
    def mean(self):
        return self._log_moment(1).exp()

    @property
    def variance(self):
        return (2 * self._log_moment(1) + self.log_relative_variance).exp()

    @property
    def log_relative_variance(self):
        r"""
        :math:`\log(\mathrm{Var}\,\theta / (\mathbb{E}\theta)^2) = -2\log\mathrm{SNR}`, computed as
        :math:`\log(\exp(r) - 1)` with :math:`r = \log\mathbb{E}\theta^2 - 2\log\mathbb{E}\theta \ge 0`. For Gaussian
        noise :math:`\mathcal{N}(1, \alpha)` the same quantity is :math:`\log\alpha`: this is the dropout rate
        :math:`\log\alpha` that pruning compares with its threshold.
        """
        r = (self._log_moment(2) - 2 * self._log_moment(1)).clamp(min=torch.finfo(self.loc.dtype).tiny)
        return torch.where(r > 1, r + _log1mexp(-r), r.expm1().log())

    @property
    def snr(self):
        r"""The signal-to-noise ratio :math:`\mathbb{E}\theta / \sqrt{\mathrm{Var}\,\theta}` [1, §4.3]."""
        return (-0.5 * self.log_relative_variance).exp()

    def entropy(self):
        r""":math:`H(\theta) = H(\log\theta) + \mathbb{E}\log\theta`."""
        return self.log_entropy() + self.log_mean()

    def log_mean(self):
        r""":math:`\mathbb{E}\log\theta = \mu + \sigma\,(\varphi(\alpha) - \varphi(\beta)) / Z`."""
        log_z = self.log_normalizer
        a, b = self._alpha, self._beta
        ratio = (_log_normal_pdf(a) - log_z).exp() - (_log_normal_pdf(b) - log_z).exp()
        return self.loc + self.scale * ratio

    def log_entropy(self):
        r"""
        The entropy of :math:`\log\theta`, a truncated normal:
        :math:`\log(\sqrt{2\pi e}\,\sigma Z) + (\alpha\varphi(\alpha) - \beta\varphi(\beta)) / (2Z)`.

        Computed in float64 and without the cancellation of the formula when the interval lies in a tail of
        the normal (:math:`\alpha \gg 0` or :math:`\beta \ll 0`, e.g. :math:`\mu` far below :math:`a` with a
        small :math:`\sigma`), where :math:`\log Z \approx -\alpha^2/2` and :math:`\alpha\varphi(\alpha)/(2Z)
        \approx \alpha^2/2` cancel: there the terms are taken relative to :math:`\alpha^2/2` through the scaled
        complementary error function :math:`\operatorname{erfcx}`.
        """
        dtype = self.loc.dtype
        a, b = self._alpha.double(), self._beta.double()
        flip = b < 0  # the entropy is unchanged by the reflection [α, β] -> [-β, -α]
        a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
        # the interval around the mode (a <= 0 <= b): the formula as it stands
        log_z = log_ndtr_diff(a, b)
        center = a * (_log_normal_pdf(a) - log_z).exp() - b * (_log_normal_pdf(b) - log_z).exp()
        center = log_z + 0.5 * center
        # the upper tail (a > 0): log Φc(x) = -x²/2 + e(x), e(x) = log(erfcx(x/√2)/2)
        tail = a > 0
        a_t = torch.where(tail, a, torch.ones_like(a))  # placeholders keep the unused branch finite
        b_t = torch.where(tail, b, torch.full_like(b, 2.0))
        e_a = (0.5 * torch.special.erfcx(a_t * _SQRT_HALF)).log()
        e_b = (0.5 * torch.special.erfcx(b_t * _SQRT_HALF)).log()
        half_gap = 0.5 * (b_t - a_t) * (b_t + a_t)  # (b² - a²) / 2 >= 0
        delta = e_b - e_a - half_gap  # log(Φc(b) / Φc(a)) <= 0
        ell = _log1mexp(delta)  # log(1 - Φc(b)/Φc(a)); log Z = -a²/2 + e_a + ell
        inv_mills = (-_LOG_SQRT_2PI - e_a).exp()  # φ(a)/Φc(a)
        # log Z + a φ(a)/(2Z) = e_a + ell + a/2 (φ(a)/Z - a), with φ(a)/Z - a = (M - a) / (1 - r) + a r / (1 - r)
        upper = e_a + ell + 0.5 * a_t * ((inv_mills - a_t) * (-ell).exp() + a_t * (delta - ell).exp())
        upper = upper - 0.5 * b_t * (-half_gap - _LOG_SQRT_2PI - e_a - ell).exp()
        h = torch.where(tail, upper, center)
        return (_LOG_SQRT_2PI + 0.5 + self.scale.double().log() + h).to(dtype)


__all__ = ["TruncatedLogNormal", "log_ndtr_diff"]
