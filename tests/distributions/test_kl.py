# SPDX-License-Identifier: Apache-2.0
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn
from torch.distributions import kl_divergence

from pyro_vdrop.distributions import (
    CorrelatedVariationalDropoutNormal,
    ImproperLogUniform,
    VariationalDropoutNormal,
    log_uniform_kl,
)
from pyro_vdrop.infer import init_to_fan_in

integrate = pytest.importorskip("scipy.integrate", reason="scipy is needed for the quadrature tests")

# E log|z| for z ~ N(0, 1); the Molchanov fit's constant makes KL -> 0 as alpha -> inf.
MOLCHANOV_CONSTANT = (np.euler_gamma + math.log(2)) / 2


def expected_log_abs(alpha):
    """E log|eps| for eps ~ N(1, alpha), by 1-D quadrature (log singularity moved to an endpoint)."""
    s = math.sqrt(alpha)
    u = 1 / s

    def integrand(t):
        phi = math.exp(-0.5 * (t - u) ** 2) + math.exp(-0.5 * (t + u) ** 2)
        return math.log(t) * phi / math.sqrt(2 * math.pi)

    value, _ = integrate.quad(integrand, 0, u + 40, limit=500, epsabs=1e-12, epsrel=1e-12, points=[u])
    return math.log(s) + value


def exact_kl_up_to_constant(log_alpha):
    """-0.5 log alpha + E log|eps|: the exact KL to the log-uniform prior, without its constant."""
    return np.array([-0.5 * la + expected_log_abs(math.exp(la)) for la in log_alpha])


def test_quadrature_against_monte_carlo():
    # sanity check of the reference itself: 2M draws, s.e. < 1e-3
    torch.manual_seed(0)
    z = torch.randn(2_000_000, dtype=torch.float64)
    for alpha in [0.01, 1.0, 10.0]:
        mc = (1 + math.sqrt(alpha) * z).abs().log().mean().item()
        assert abs(mc - expected_log_abs(alpha)) < 3e-3


def test_molchanov_fit_against_quadrature():
    # Fit error reported by Molchanov et al. is ~1e-2; measured 0.0094 over log alpha in [-10, 10].
    log_alpha = np.linspace(-10, 10, 81)
    exact = exact_kl_up_to_constant(log_alpha) + MOLCHANOV_CONSTANT
    fit = log_uniform_kl(torch.tensor(log_alpha, dtype=torch.float64), "molchanov").numpy()
    assert np.abs(fit - exact).max() < 0.012
    # and it tends to 0 for pure-noise weights
    assert abs(log_uniform_kl(torch.tensor(30.0, dtype=torch.float64)).item()) < 1e-6


def test_kingma_fit_against_quadrature():
    # The cubic fit is valid for alpha <= 1. Align its (dropped) constant by the minimax offset;
    # measured max deviation 0.020 over log alpha in [-10, 0].
    log_alpha = np.linspace(-10, 0, 41)
    diff = log_uniform_kl(torch.tensor(log_alpha, dtype=torch.float64), "kingma").numpy()
    diff = diff - exact_kl_up_to_constant(log_alpha)
    assert (diff.max() - diff.min()) / 2 < 0.025


def test_kingma_fit_is_clamped_above_alpha_one():
    la = torch.tensor([0.0, 1.0, 5.0], requires_grad=True)
    kl = log_uniform_kl(la, "kingma")
    assert torch.allclose(kl, kl[0].expand(3))
    kl.sum().backward()
    assert (la.grad[1:] == 0).all()


@pytest.mark.parametrize("approx", ["molchanov", "kingma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_at_extremes(approx, dtype):
    log_alpha = torch.linspace(-20, 20, 101, dtype=dtype, requires_grad=True)
    kl = log_uniform_kl(log_alpha, approx)
    assert kl.dtype == dtype and torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(log_alpha.grad).all()
    # the KL decreases (weakly) as the noise grows: more noise, less information
    assert (kl[1:] <= kl[:-1] + 1e-6).all()


@pytest.mark.parametrize("approx", ["molchanov", "kingma"])
def test_finite_gradients_at_zero_loc(approx):
    prior = ImproperLogUniform(kl_approx=approx).expand([3])
    loc = torch.zeros(3, requires_grad=True)
    log_alpha = torch.tensor([-20.0, 0.0, 20.0], requires_grad=True)
    kl_divergence(VariationalDropoutNormal(loc, log_alpha), prior).sum().backward()
    assert loc.grad is None  # the multiplicative KL depends on log alpha alone
    assert torch.isfinite(log_alpha.grad).all()
    loc = torch.zeros(3, requires_grad=True)
    log_sigma2 = torch.full((3,), -10.0, requires_grad=True)
    q = VariationalDropoutNormal.from_additive(loc, log_sigma2, log_alpha_clip=(-8, 8))
    kl_divergence(q, prior).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_sigma2.grad).all()
    loc = torch.zeros(3, requires_grad=True)
    scale = torch.ones(3, requires_grad=True)
    kl = kl_divergence(dist.Normal(loc, scale), prior)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_bad_approx():
    with pytest.raises(ValueError, match="kl_approx must be one of"):
        log_uniform_kl(torch.zeros(2), "exact")


def test_kl_through_independent_sums():
    loc, log_alpha = torch.randn(2, 5), torch.randn(2, 5)
    q = VariationalDropoutNormal(loc, log_alpha).to_event(1)
    p = ImproperLogUniform().expand([2, 5]).to_event(1)
    kl = kl_divergence(q, p)
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, log_uniform_kl(log_alpha).sum(-1))
    # the example: an unbatched vector
    q = VariationalDropoutNormal(loc[0], log_alpha[0]).to_event(1)
    p = ImproperLogUniform().expand([5]).to_event(1)
    torch.testing.assert_close(kl_divergence(q, p), log_uniform_kl(log_alpha[0]).sum())


def test_kl_broadcasts_log_alpha_to_batch_shape():
    q = VariationalDropoutNormal(torch.randn(4, 3), torch.tensor(-1.0))
    kl = kl_divergence(q, ImproperLogUniform().expand([4, 3]))
    assert kl.shape == (4, 3)
    torch.testing.assert_close(kl, log_uniform_kl(torch.tensor(-1.0)).expand(4, 3))


def test_approx_choice_without_global_state():
    loc, log_alpha = torch.randn(3), torch.full((3,), -2.0)
    molchanov, kingma = log_uniform_kl(log_alpha), log_uniform_kl(log_alpha, "kingma")
    assert not torch.allclose(molchanov, kingma)
    # the prior's default ...
    torch.testing.assert_close(
        kl_divergence(VariationalDropoutNormal(loc, log_alpha), ImproperLogUniform().expand([3])), molchanov
    )
    torch.testing.assert_close(
        kl_divergence(VariationalDropoutNormal(loc, log_alpha), ImproperLogUniform(kl_approx="kingma").expand([3])),
        kingma,
    )
    # ... is overridden by the posterior's choice
    torch.testing.assert_close(
        kl_divergence(VariationalDropoutNormal(loc, log_alpha, kl_approx="kingma"), ImproperLogUniform().expand([3])),
        kingma,
    )


def test_kl_clip_applies_to_kl_only():
    q = VariationalDropoutNormal(torch.ones(2), torch.tensor([-12.0, 12.0]), log_alpha_clip=(-8.0, 8.0))
    kl = kl_divergence(q, ImproperLogUniform().expand([2]))
    torch.testing.assert_close(kl, log_uniform_kl(torch.tensor([-8.0, 8.0])))
    torch.testing.assert_close(q.variance, torch.tensor([-12.0, 12.0]).exp())


def test_normal_kl_uses_alpha_from_scale_and_loc():
    loc, scale = torch.randn(4), torch.rand(4) + 0.1
    kl = kl_divergence(dist.Normal(loc, scale), ImproperLogUniform().expand([4]))
    torch.testing.assert_close(kl, log_uniform_kl(2 * (scale.log() - loc.abs().log())))


def test_correlated_posterior_counts_marginal_kl_per_weight():
    loc, log_alpha = torch.randn(3, 4), torch.randn(1, 4)
    q = CorrelatedVariationalDropoutNormal(loc, log_alpha).to_event(2)
    kl = kl_divergence(q, ImproperLogUniform().expand([3, 4]).to_event(2))
    torch.testing.assert_close(kl, 3 * log_uniform_kl(log_alpha).sum())


class TinyRegression(PyroModule):
    def __init__(self):
        super().__init__()
        self.fc = PyroModule[nn.Linear](2, 1, bias=False)
        self.fc.weight = PyroSample(ImproperLogUniform().expand([1, 2]).to_event(2))

    def forward(self, x, y=None):
        mean = self.fc(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def test_trace_mean_field_elbo_with_autonormal_matches_hand_computation():
    # AutoNormal samples an auxiliary "<name>_unconstrained" Normal and hands the model a Delta, so
    # the prior term is Monte Carlo: ELBO = log p(y|w) + log p(w) - log q(w) at the sampled w.
    model = TinyRegression()
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in, init_scale=0.3)
    x, y = torch.randn(20, 2), torch.randn(20)
    guide(x, y)  # create the parameters
    loc = guide.locs.fc.weight.detach()
    scale = guide.scales.fc.weight.detach()
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().loss(model, guide, x, y)
    pyro.set_rng_seed(3)
    q = dist.Normal(loc, scale)
    w = q.rsample()
    log_lik = dist.Normal((x @ w.T).squeeze(-1), 0.5).log_prob(y).sum()
    elbo = log_lik - w.abs().log().sum() - q.log_prob(w).sum()
    assert loss == pytest.approx(-elbo.item(), rel=1e-5)


def test_trace_mean_field_elbo_uses_the_registered_kl_for_a_normal_guide():
    model = TinyRegression()
    x, y = torch.randn(20, 2), torch.randn(20)
    loc, scale = torch.tensor([[0.7, -0.2]]), torch.tensor([[0.3, 0.1]])

    def guide(x, y=None):
        pyro.sample("fc.weight", dist.Normal(loc, scale).to_event(2))

    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().loss(model, guide, x, y)
    pyro.set_rng_seed(3)
    w = dist.Normal(loc, scale).rsample()
    log_lik = dist.Normal((x @ w.T).squeeze(-1), 0.5).log_prob(y).sum()
    kl = log_uniform_kl(2 * (scale.log() - loc.abs().log())).sum()
    assert loss == pytest.approx(-(log_lik - kl).item(), rel=1e-5)


def test_trace_mean_field_elbo_trains_and_trace_elbo_runs():
    model = TinyRegression()
    x = torch.randn(100, 2)
    y = x @ torch.tensor([2.0, 0.0])
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    for _ in range(500):
        svi.step(x, y)
    # Trace_ELBO also runs on the same model and guide (Monte Carlo KL)
    assert math.isfinite(Trace_ELBO().loss(model, guide, x, y))
    loc = guide.locs.fc.weight.detach()[0]
    assert abs(loc[0] - 2.0) < 0.2


def _molchanov_formula(log_alpha):
    # the published fit, written out with autograd (the reference for the fused implementation)
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    return -(k1 * torch.sigmoid(k2 + k3 * log_alpha) - 0.5 * torch.nn.functional.softplus(-log_alpha) - k1)


def test_fused_molchanov_kl_matches_autograd_of_the_formula():
    log_alpha = torch.linspace(-20, 20, 81, dtype=torch.float64, requires_grad=True)
    kl = log_uniform_kl(log_alpha, "molchanov")
    expected = _molchanov_formula(log_alpha)
    assert torch.allclose(kl, expected, rtol=1e-12, atol=1e-14)
    weights = torch.rand(81, dtype=torch.float64)  # a non-uniform incoming gradient
    (grad,) = torch.autograd.grad((kl * weights).sum(), log_alpha)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), log_alpha)
    assert torch.allclose(grad, expected_grad, rtol=1e-6, atol=1e-14)


def test_fused_molchanov_kl_gradcheck_and_gradgradcheck():
    log_alpha = (torch.rand(4, 5, dtype=torch.float64) * 40 - 20).requires_grad_()

    def fn(x):
        return log_uniform_kl(x, "molchanov")

    assert torch.autograd.gradcheck(fn, (log_alpha,))
    assert torch.autograd.gradgradcheck(fn, (log_alpha,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_molchanov_kl_finite_far_out(dtype, device):
    log_alpha = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], dtype=dtype, device=device)
    log_alpha.requires_grad_()
    kl = log_uniform_kl(log_alpha, "molchanov")
    kl.sum().backward()
    assert kl.dtype == dtype and kl.device == log_alpha.device
    assert torch.isfinite(kl).all() and torch.isfinite(log_alpha.grad).all()
    # KL -> -log(alpha)/2 + k1 as alpha -> 0, and -> 0 as alpha -> inf; its slope -> -1/2 and 0
    assert kl[0].item() == pytest.approx(5e3 + 0.63576, rel=1e-6)
    assert abs(kl[-1].item()) < 1e-30
    assert log_alpha.grad[0].item() == pytest.approx(-0.5) and log_alpha.grad[-1].item() == 0


@pytest.mark.parametrize("approx", ["molchanov", "kingma"])
def test_clipped_kl_gradients_match_autograd_of_clamp(approx):
    # the clip is fused into the Molchanov node: values and gradients (0 outside the bounds, passed at them) equal
    # autograd of log_uniform_kl(log_alpha.clamp(low, high))
    log_alpha = torch.cat([torch.linspace(-12, 12, 49, dtype=torch.float64), torch.tensor([-8.0, 8.0])])
    log_alpha.requires_grad_()
    q = VariationalDropoutNormal(torch.ones(51, dtype=torch.float64), log_alpha, log_alpha_clip=(-8.0, 8.0))
    kl = kl_divergence(q, ImproperLogUniform(kl_approx=approx).expand([51]))
    expected = log_uniform_kl(log_alpha.clamp(-8.0, 8.0), approx)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-14)
    weights = torch.rand(51, dtype=torch.float64)
    (grad,) = torch.autograd.grad((kl * weights).sum(), log_alpha)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), log_alpha)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    inside = (log_alpha >= -8) & (log_alpha <= 8)
    if approx == "kingma":  # the Kingma fit is flat above log α = 0 by itself
        inside &= log_alpha <= 0
    assert (grad[~inside] == 0).all() and (grad[inside] != 0).all()


def test_clipped_molchanov_kl_gradcheck_and_gradgradcheck():
    # the clipped KL as SVI computes it (the registered KL of a posterior with log_alpha_clip), through the public API;
    # points away from the bounds (finite differences cannot straddle a kink)
    log_alpha = torch.tensor([-11.0, -9.5, -3.0, 0.5, 7.0, 9.0, 12.0], dtype=torch.float64, requires_grad=True)

    def fn(x):
        q = VariationalDropoutNormal(torch.ones_like(x), x, kl_approx="molchanov", log_alpha_clip=(-8.0, 8.0))
        return torch.distributions.kl_divergence(q, ImproperLogUniform().expand(x.shape))

    assert torch.autograd.gradcheck(fn, (log_alpha,))
    assert torch.autograd.gradgradcheck(fn, (log_alpha,))


@pytest.mark.parametrize("clip", [None, (-8.0, 8.0)])
def test_molchanov_kl_keeps_only_log_alpha(clip):
    from pyro_vdrop.distributions.kl import MOLCHANOV_K1, MOLCHANOV_K2, MOLCHANOV_K3, _MolchanovKL

    # the fused node recomputes the clipped log α and u in the backward pass: it keeps nothing of its own
    log_alpha = torch.randn(6, 4).mul(5).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kl = _MolchanovKL.apply(log_alpha, *(clip or ()))
    assert len(saved) == 1 and saved[0] is log_alpha
    (grad,) = torch.autograd.grad(kl.sum(), log_alpha)
    reference = log_alpha.detach().clone().requires_grad_()
    ref = reference.clamp(*clip) if clip else reference
    u = torch.sigmoid(-(MOLCHANOV_K2 + MOLCHANOV_K3 * ref))
    (expected,) = torch.autograd.grad((MOLCHANOV_K1 * u - 0.5 * torch.nn.functional.logsigmoid(ref)).sum(), reference)
    torch.testing.assert_close(grad, expected)
