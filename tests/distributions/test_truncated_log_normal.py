# SPDX-License-Identifier: Apache-2.0
"""The structured-Bayesian-pruning pair: TruncatedLogNormal, TruncatedLogUniform and their KL."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_vdrop.distributions import TruncatedLogNormal, TruncatedLogUniform

stats = pytest.importorskip("scipy.stats", reason="scipy is needed for the quadrature tests")
integrate = pytest.importorskip("scipy.integrate", reason="scipy is needed for the quadrature tests")

INTERVALS = [(-20.0, 0.0), (-5.0, 5.0), (-1.0, 2.0)]
LOCS = [-25.0, -10.0, -3.0, -1.0, 0.0, 0.5, 3.0]
SCALES = [0.01, 0.1, 0.5, 1.0, 3.0, 10.0]


def _scipy(loc, scale, low, high):
    """The truncated normal of log θ, from scipy (an implementation independent of ours)."""
    return stats.truncnorm((low - loc) / scale, (high - loc) / scale, loc=loc, scale=scale)


def quadrature_kl(loc, scale, low, high):
    r"""
    KL(q || p) of log θ (the KL is invariant under θ ↦ log θ) by quadrature over the quantiles:
    :math:`\int_0^1 \log q(F^{-1}(u))\,du + \log(b - a)`, which is smooth however concentrated q is.
    """
    tn = _scipy(loc, scale, low, high)
    neg_entropy, _ = integrate.quad(lambda u: tn.logpdf(tn.ppf(u)), 0.0, 1.0, limit=200, epsabs=1e-10)
    return neg_entropy + math.log(high - low)


def _dist(loc, scale, low, high, dtype=torch.float64):
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    return TruncatedLogNormal(t(loc), t(scale), t(low), t(high))


@pytest.mark.parametrize("low,high", INTERVALS)
def test_kl_matches_quadrature(low, high):
    errors = []
    for loc, scale in itertools.product(LOCS, SCALES):
        q = _dist(loc, scale, low, high)
        p = TruncatedLogUniform(torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64))
        kl = kl_divergence(q, p).item()
        expected = quadrature_kl(loc, scale, low, high)
        errors.append((abs(kl - expected), loc, scale, kl, expected))
    worst = max(errors)
    assert worst[0] < 1e-3, f"worst |KL - quadrature| = {worst[0]:.2e} at loc={worst[1]}, scale={worst[2]}: {worst[3:]}"


@pytest.mark.parametrize("loc,scale", [(-3.0, 0.5), (0.0, 0.05), (-1.0, 2.0), (-25.0, 1.0)])
def test_kl_matches_quadrature_in_float32(loc, scale):
    low, high = -20.0, 0.0
    q = _dist(loc, scale, low, high, dtype=torch.float32)
    p = TruncatedLogUniform(torch.tensor(low), torch.tensor(high))
    assert kl_divergence(q, p).item() == pytest.approx(quadrature_kl(loc, scale, low, high), abs=1e-3)


def test_kl_is_infinite_when_the_posterior_leaves_the_prior_interval():
    q = _dist(-1.0, 1.0, -20.0, 1.0)
    p = TruncatedLogUniform(torch.tensor(-20.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert kl_divergence(q, p).item() == math.inf


def test_kl_against_a_wider_prior_adds_the_log_ratio_of_the_widths():
    q = _dist(-1.0, 0.7, -5.0, 0.0)
    narrow = TruncatedLogUniform(torch.tensor(-5.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    wide = TruncatedLogUniform(torch.tensor(-20.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert (kl_divergence(q, wide) - kl_divergence(q, narrow)).item() == pytest.approx(math.log(20 / 5), abs=1e-12)


@pytest.mark.parametrize(
    "loc,scale,low,high", [(-1.0, 0.5, -20.0, 0.0), (0.0, 2.0, -5.0, 5.0), (-22.0, 1.0, -20.0, 0.0)]
)
def test_log_prob_and_moments_against_scipy(loc, scale, low, high):
    q = _dist(loc, scale, low, high)
    tn = _scipy(loc, scale, low, high)
    x = np.linspace(low + 1e-3, high - 1e-3, 7)
    theta = torch.tensor(np.exp(x))
    # q(θ) = q(log θ) / θ
    assert q.log_prob(theta).numpy() == pytest.approx(tn.logpdf(x) - x, rel=1e-9, abs=1e-9)
    mean, _ = integrate.quad(lambda u: math.exp(tn.ppf(u)), 0, 1, epsabs=1e-13)
    second, _ = integrate.quad(lambda u: math.exp(2 * tn.ppf(u)), 0, 1, epsabs=1e-13)
    assert q.mean.item() == pytest.approx(mean, rel=1e-6)
    assert q.variance.item() == pytest.approx(second - mean**2, rel=1e-5, abs=1e-14)
    assert q.log_mean().item() == pytest.approx(tn.mean(), rel=1e-9, abs=1e-9)
    assert q.log_entropy().item() == pytest.approx(tn.entropy(), rel=1e-9, abs=1e-9)
    outside = torch.tensor([math.exp(low) * 0.99, math.exp(high) * 1.01], dtype=torch.float64)
    unchecked = TruncatedLogNormal(q.loc, q.scale, q.low, q.high, validate_args=False)
    assert (unchecked.log_prob(outside) == -math.inf).all()
    with pytest.raises(ValueError, match="support"):
        q.log_prob(outside)


@pytest.mark.parametrize("loc,scale", [(-1.0, 0.5), (0.0, 0.1), (-3.0, 3.0), (-22.0, 1.0), (2.0, 0.3)])
def test_rsample_moments_and_snr_against_monte_carlo(loc, scale):
    torch.manual_seed(0)
    q = _dist(loc, scale, -20.0, 0.0)
    n = 400_000
    s = q.rsample((n,))
    assert ((s >= math.exp(-20.0)) & (s <= 1.0)).all()
    mean, var = s.mean(), s.var()
    # 5 standard errors of the Monte Carlo mean, variance and SNR (the SNR's by the delta method, loosely)
    se_mean = (var / n).sqrt()
    assert abs(mean - q.mean) < 5 * se_mean
    fourth = ((s - mean) ** 4).mean()
    se_var = ((fourth - var**2) / n).sqrt()
    assert abs(var - q.variance) < 5 * se_var
    snr_mc = (mean / var.sqrt()).item()
    # the SNR against its definition E θ / sqrt(Var θ), and against the closed-form moments
    assert q.snr.item() == pytest.approx(snr_mc, rel=0.02)
    assert q.snr.item() == pytest.approx((q.mean / q.variance.sqrt()).item(), rel=1e-9)


def test_rsample_is_reparameterized():
    loc = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    q = TruncatedLogNormal(loc, scale, torch.tensor(-20.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    torch.manual_seed(0)
    s = q.rsample((200_000,))
    s.mean().backward()
    # d E[θ] / d μ, d E[θ] / d σ from the closed form, by central differences
    h = 1e-5

    def mean_at(m, sd):
        return _dist(m, sd, -20.0, 0.0).mean.item()

    d_loc = (mean_at(-1.0 + h, 0.5) - mean_at(-1.0 - h, 0.5)) / (2 * h)
    d_scale = (mean_at(-1.0, 0.5 + h) - mean_at(-1.0, 0.5 - h)) / (2 * h)
    assert loc.grad.item() == pytest.approx(d_loc, rel=0.03)
    assert scale.grad.item() == pytest.approx(d_scale, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_gradients_are_finite_over_the_domain(dtype):
    loc = torch.tensor([-40.0, -20.0, -10.0, -1.0, 0.0, 5.0, 20.0], dtype=dtype, requires_grad=True)
    log_scale = torch.tensor([-8.0, -3.0, 0.0, 1.0, 2.0, -5.0, 0.5], dtype=dtype, requires_grad=True)
    low, high = torch.tensor(-20.0, dtype=dtype), torch.tensor(0.0, dtype=dtype)
    q = TruncatedLogNormal(loc, log_scale.exp(), low, high)
    kl = kl_divergence(q, TruncatedLogUniform(low.expand(7), high.expand(7)))
    assert torch.isfinite(kl).all(), kl
    assert (kl > -1e-4).all(), kl  # a KL, up to rounding
    kl.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()
    assert torch.isfinite(q.snr).all() and torch.isfinite(q.mean).all()


def test_truncated_log_uniform_moments_and_density():
    torch.manual_seed(0)
    p = TruncatedLogUniform(torch.tensor(-3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    s = p.rsample((400_000,))
    assert abs(s.mean() - p.mean) < 5 * (s.var() / s.numel()).sqrt()
    assert s.var().item() == pytest.approx(p.variance.item(), rel=0.02)
    mass, _ = integrate.quad(
        lambda t: math.exp(p.log_prob(torch.tensor(t, dtype=torch.float64)).item()), math.exp(-3), math.e
    )
    assert mass == pytest.approx(1.0, abs=1e-8)
    entropy, _ = integrate.quad(
        lambda u: -p.log_prob(p.icdf(torch.tensor(u, dtype=torch.float64))).item(), 0, 1, epsabs=1e-12
    )
    assert p.entropy().item() == pytest.approx(entropy, abs=1e-8)


@pytest.mark.parametrize("low,high", [(0.0, 0.0), (1.0, -1.0), (-math.inf, 0.0)])
def test_bad_interval_is_an_error(low, high):
    with pytest.raises(ValueError, match="low"):
        TruncatedLogUniform(torch.tensor(low), torch.tensor(high))
    with pytest.raises(ValueError, match="low"):
        TruncatedLogNormal(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(low), torch.tensor(high))


def test_expand_keeps_parameters():
    q = _dist(-1.0, 0.5, -20.0, 0.0).expand([3, 2])
    assert q.batch_shape == (3, 2)
    assert torch.equal(q.mean, torch.full((3, 2), _dist(-1.0, 0.5, -20.0, 0.0).mean.item(), dtype=torch.float64))
    p = TruncatedLogUniform(torch.tensor(-2.0), torch.tensor(0.0)).expand([4])
    assert p.batch_shape == (4,) and p.rsample().shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loc,log_scale", [(-40.0, -8.0), (30.0, -6.0)])
def test_entropy_deep_in_a_tail_is_that_of_the_exponential_limit(loc, log_scale, dtype):
    # far beyond a bound (|bound - μ| / σ ~ 1e4..1e5) the truncated normal of log θ is the bound plus (minus) an
    # exponential variable of mean σ² / |bound - μ|, whose entropy is 1 + log(σ² / |bound - μ|)
    low, high, scale = -20.0, 0.0, math.exp(log_scale)
    bound = low if loc < low else high
    expected = 1 + math.log(scale**2 / abs(bound - loc))
    q = TruncatedLogNormal(*(torch.tensor(v, dtype=dtype) for v in (loc, scale, low, high)))
    assert q.log_entropy().item() == pytest.approx(expected, abs=1e-3)
    assert q.log_entropy().dtype == dtype
