# SPDX-License-Identifier: Apache-2.0
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal, init_to_value
from pyro.infer.autoguide.initialization import InitMessenger
from torch import nn

from pyro_vdrop.distributions import (
    CorrelatedVariationalDropoutNormal,
    ImproperLogUniform,
    VariationalDropoutNormal,
)
from pyro_vdrop.infer import AutoVariationalDropout, init_to_fan_in

from .models import BNN

# Molchanov, Ashukha, Vetrov (2017), eq. (14), written out independently of the package.
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def molchanov_kl(log_alpha):
    return -(K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * torch.log1p(torch.exp(-log_alpha)) - K1)


def linear_model(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([3, x.shape[-1]]).to_event(2))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w.T, 0.5).to_event(1), obs=y)


def linear_data(n=40, d=4, dtype=torch.float32, device="cpu"):
    x = torch.randn(n, d, dtype=dtype, device=device)
    w = torch.randn(3, d, dtype=dtype, device=device)
    y = x @ w.T + 0.5 * torch.randn(n, 3, dtype=dtype, device=device)
    return x, y


VARIANTS = {
    "B": {},
    "A": {"noise": "correlated"},
    "A2": {"noise": "correlated", "kl_scale": 1 / 3},
    "B-layer": {"granularity": "layer"},
    "B-unit": {"granularity": "unit"},
    "sparse": {"parameterization": "additive"},
    "gaussian-dropout": {"noise": "correlated", "dropout_rate": 0.3},
    "gaussian-dropout-B": {"dropout_rate": 0.3},
    "kingma": {"kl_approx": "kingma"},
}
ALPHA_SHAPES = {
    "B": ("log_alphas", (3, 4)),
    "A": ("log_alphas", (1, 4)),
    "A2": ("log_alphas", (1, 4)),
    "B-layer": ("log_alphas", (1, 1)),
    "B-unit": ("log_alphas", (1, 4)),
    "sparse": ("log_sigma2s", (3, 4)),
    "gaussian-dropout": None,
    "gaussian-dropout-B": None,
    "kingma": ("log_alphas", (3, 4)),
}


def _site_params(guide):
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_svi_changes_the_right_parameters(variant):
    kwargs = VARIANTS[variant]
    x, y = linear_data()
    x[:, -1] = 0.0  # an input that is always 0 gives θ[:, -1] no data gradient
    guide = AutoVariationalDropout(linear_model, **kwargs)
    guide(x, y)
    before = _site_params(guide)
    expected = {"AutoVariationalDropout.locs.w": (3, 4)}
    if ALPHA_SHAPES[variant] is not None:
        container, shape = ALPHA_SHAPES[variant]
        expected[f"AutoVariationalDropout.{container}.w"] = shape
    assert {k: tuple(v.shape) for k, v in before.items()} == expected

    svi = SVI(linear_model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for _ in range(3):
        svi.step(x, y)
    after = _site_params(guide)
    for name in expected:
        assert not torch.equal(before[name], after[name]), name
    theta_before, theta_after = before["AutoVariationalDropout.locs.w"], after["AutoVariationalDropout.locs.w"]
    assert not torch.equal(theta_before[:, :-1], theta_after[:, :-1])
    if kwargs.get("parameterization") == "additive":
        # log α = log σ² - log θ², so the KL pulls every θ, the unused input's too
        assert not torch.equal(theta_before[:, -1], theta_after[:, -1])
    else:
        # the KL depends on α alone: θ of an input that is always 0 gets no gradient at all
        assert torch.equal(theta_before[:, -1], theta_after[:, -1])


def _hand_loss(guide, x, y, kwargs, la_param):
    """-ELBO of linear_model under TraceMeanField_ELBO, from the parameters and a fresh N(0, 1) draw."""
    theta = pyro.param("AutoVariationalDropout.locs.w").detach()
    if kwargs.get("parameterization") == "additive":
        log_sigma2 = la_param
        log_alpha = log_sigma2 - theta.pow(2).log()
        w = theta + (0.5 * log_sigma2).exp() * torch.empty_like(theta).normal_()
        kl = molchanov_kl(log_alpha.clamp(-8, 8))
    else:
        log_alpha = la_param.clamp(max=0.0).expand(theta.shape)
        if kwargs.get("noise") == "correlated":
            # w = θ s, one s ~ N(1, α) per input unit (column)
            eps = torch.empty(1, theta.shape[1], dtype=theta.dtype).normal_()
            w = theta * (1 + (0.5 * log_alpha).exp() * eps)
        else:
            # a Normal's draw: w = θ + sqrt(α) |θ| ε
            w = theta + (0.5 * log_alpha).exp() * theta.abs() * torch.empty_like(theta).normal_()
        kl = molchanov_kl(log_alpha)
    loglik = torch.distributions.Normal(x @ w.T, 0.5).log_prob(y).sum()
    return -(loglik - kwargs.get("kl_scale", 1.0) * kl.sum()).item()


@pytest.mark.parametrize("variant", ["B", "A", "A2", "B-unit", "sparse", "gaussian-dropout"])
def test_elbo_equals_hand_computation(variant):
    kwargs = VARIANTS[variant]
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, **kwargs)
    guide(x, y)
    # move the variance parameters away from their (uniform) initial values
    if variant == "sparse":
        la_param = -4.0 + torch.randn(3, 4)
        pyro.get_param_store()["AutoVariationalDropout.log_sigma2s.w"] = la_param.clone()
    elif variant == "gaussian-dropout":
        la_param = torch.tensor(math.log(0.3 / 0.7))
    else:
        la_param = -1.0 + torch.randn(ALPHA_SHAPES[variant][1])
        la_param.view(-1)[0] = 0.5  # above the cap log α ≤ 0
        pyro.get_param_store()["AutoVariationalDropout.log_alphas.w"] = la_param.clone()
    pyro.set_rng_seed(1)
    loss = TraceMeanField_ELBO().loss(linear_model, guide, x, y)
    pyro.set_rng_seed(1)
    expected = _hand_loss(guide, x, y, kwargs, la_param)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_correlated_noise_covariance():
    x, y = linear_data(d=3)
    guide = AutoVariationalDropout(linear_model, noise="correlated", granularity="unit", max_log_alpha=None)
    guide(x, y)
    alpha = torch.tensor([[0.2, 0.5, 1.5]])
    pyro.get_param_store()["AutoVariationalDropout.log_alphas.w"] = alpha.log()
    theta = pyro.param("AutoVariationalDropout.locs.w").detach()
    num_samples = 20000
    with pyro.plate("particles", num_samples, dim=-1):
        trace = poutine.trace(guide).get_trace(x, y)
    site = trace.nodes["w"]
    assert type(site["fn"].base_dist) is CorrelatedVariationalDropoutNormal
    w = site["value"].detach().reshape(num_samples, -1)  # (num_samples, 3 * 3), row-major (out, in)
    empirical = torch.cov(w.T)
    # Cov(w_ai, w_bj) = δ_ij α_i θ_ai θ_bi: one noise per input unit (column)
    t = theta.reshape(-1)
    same_unit = (torch.arange(9)[:, None] % 3) == (torch.arange(9)[None, :] % 3)
    a = alpha.expand(3, 3).reshape(-1)
    expected = torch.where(same_unit, a[:, None] * t[:, None] * t[None, :], torch.zeros(()))
    # Monte Carlo standard error of a covariance ≈ sqrt(Var_a Var_b / n); allow 5 standard errors
    sd = (a * t.pow(2)).sqrt()
    tol = 5 * sd[:, None] * sd[None, :] / math.sqrt(num_samples)
    assert ((empirical - expected).abs() <= tol).all()


def test_additive_and_multiplicative_give_the_same_posterior():
    x, y = linear_data()
    mult = AutoVariationalDropout(linear_model, max_log_alpha=None)
    mult(x, y)
    add = AutoVariationalDropout(linear_model, parameterization="additive", log_alpha_clip=None)
    add._pyro_name = "Additive"
    add(x, y)
    store = pyro.get_param_store()
    theta = pyro.param("AutoVariationalDropout.locs.w").detach()
    log_alpha = torch.randn(3, 4)
    store["AutoVariationalDropout.log_alphas.w"] = log_alpha
    store["Additive.locs.w"] = theta.clone()
    store["Additive.log_sigma2s.w"] = log_alpha + theta.pow(2).log()
    q_mult = poutine.trace(mult).get_trace(x, y).nodes["w"]["fn"]
    q_add = poutine.trace(add).get_trace(x, y).nodes["w"]["fn"]
    assert torch.allclose(q_mult.base_dist.loc, q_add.base_dist.loc)
    assert torch.allclose(q_mult.base_dist.scale, q_add.base_dist.scale, rtol=1e-5)
    assert torch.allclose(q_mult.base_dist.log_alpha, q_add.base_dist.log_alpha, atol=1e-5)
    prior = ImproperLogUniform().expand([3, 4]).to_event(2)
    kl_mult = torch.distributions.kl_divergence(q_mult, prior)
    kl_add = torch.distributions.kl_divergence(q_add, prior)
    assert torch.allclose(kl_mult, kl_add, rtol=1e-5)
    pyro.set_rng_seed(3)
    loss_mult = TraceMeanField_ELBO().loss(linear_model, mult, x, y)
    pyro.set_rng_seed(3)
    loss_add = TraceMeanField_ELBO().loss(linear_model, add, x, y)
    assert loss_mult == pytest.approx(loss_add, rel=1e-5)


@pytest.mark.parametrize("noise", ["independent", "correlated"])
def test_fixed_alpha_gets_no_gradient(noise):
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, noise=noise, dropout_rate=0.2)
    svi = SVI(linear_model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(3):
        svi.step(x, y)
    q = poutine.trace(guide).get_trace(x, y).nodes["w"]["fn"].base_dist
    assert not q.log_alpha.requires_grad
    assert q.loc.requires_grad
    assert torch.allclose(guide.log_alpha()["w"], torch.full((3, 4), math.log(0.2 / 0.8)))
    assert list(pyro.get_param_store().keys()) == ["AutoVariationalDropout.locs.w"]


def test_max_log_alpha_caps_the_posterior():
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model)  # multiplicative: log α ≤ 0 (the paper)
    guide(x, y)
    pyro.get_param_store()["AutoVariationalDropout.log_alphas.w"] = torch.full((3, 4), 2.0)
    q = poutine.trace(guide).get_trace(x, y).nodes["w"]["fn"].base_dist
    assert (q.log_alpha == 0).all()
    assert (guide.log_alpha()["w"] == 0).all()


@pytest.mark.parametrize("create_graph", [False, True])
def test_max_log_alpha_gradient_is_clamps_except_back_from_above_the_cap(create_graph):
    # at or below the cap the gradient is clamp's; above it, only a gradient that lowers log α passes
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, max_log_alpha=0.5)
    guide(x, y)
    init = torch.tensor([[-20.0, -1.0, 0.0, 0.5], [0.5 - 1e-6, 0.5 + 1e-6, 3.0, -0.1], [1e3, -1e3, 0.25, 0.75]])
    pyro.get_param_store()["AutoVariationalDropout.log_alphas.w"] = init
    weights = torch.tensor([[1.0, -2.0, 0.5, -1.0], [2.0, -0.5, 1.5, 1.0], [-3.0, 0.25, -1.0, 0.75]])
    trace = poutine.trace(guide).get_trace(x, y)
    param = trace.nodes["AutoVariationalDropout.log_alphas.w"]["value"].unconstrained()
    capped = trace.nodes["w"]["fn"].base_dist.log_alpha
    assert torch.equal(capped, init.clamp(max=0.5))
    (grad,) = torch.autograd.grad((capped * weights).sum(), param, create_graph=create_graph)
    leaf = init.clone().requires_grad_()
    (clamps,) = torch.autograd.grad((leaf.clamp(max=0.5) * weights).sum(), leaf)
    below, above = init <= 0.5, init > 0.5
    assert torch.equal(grad[below], clamps[below]) and (grad[below] != 0).all()
    assert torch.equal(grad[above], torch.where(weights[above] > 0, weights[above], 0.0))
    assert (grad[above] != 0).any() and (grad[above] == 0).any()  # both cases are exercised


def test_log_alpha_above_the_cap_comes_back_when_the_data_want_less_noise():
    # the KL of the α ≤ 1 variants pushes log α up to the cap; a clamp's zero gradient above it froze α at 1
    # for good (table1.py's runs from log α = 0). Here the data (many points, small noise) want little weight noise.
    pyro.set_rng_seed(0)
    x = torch.randn(500, 4)
    y = x @ torch.tensor([2.0, -1.0, 0.5, 1.5]) + 0.01 * torch.randn(500)

    def model(x, y):
        w = pyro.sample("w", ImproperLogUniform().expand([4]).to_event(1))
        with pyro.plate("data", len(x), subsample_size=100) as idx:
            pyro.sample("y", dist.Normal(x[idx] @ w, 0.1), obs=y[idx])

    guide = AutoVariationalDropout(model, init_log_alpha=0.5)  # every raw log α above the cap 0
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(200):
        svi.step(x, y)
    raw = pyro.param("AutoVariationalDropout.log_alphas.w").detach()
    in_force = guide.log_alpha()["w"]
    assert (raw < 0).all() and (in_force < -1).all(), (raw, in_force)


def test_kl_approx_and_clip_reach_the_distribution():
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, kl_approx="kingma", log_alpha_clip=(-5.0, 5.0))
    q = poutine.trace(guide).get_trace(x, y).nodes["w"]["fn"]
    assert type(q.base_dist) is VariationalDropoutNormal
    assert q.base_dist.kl_approx == "kingma"
    assert q.base_dist.log_alpha_clip == (-5.0, 5.0)
    assert q.reinterpreted_batch_ndims == 2


@pytest.mark.parametrize("kl_scale", [1 / 3, 0.0])
def test_kl_scale(kl_scale):
    x, y = linear_data()
    full = AutoVariationalDropout(linear_model)
    full(x, y)
    scaled = AutoVariationalDropout(linear_model, kl_scale=kl_scale)  # shares the parameters (same names)
    scaled(x, y)
    pyro.get_param_store()["AutoVariationalDropout.log_alphas.w"] = -1.0 + torch.randn(3, 4).clamp(max=0.9)
    kl = molchanov_kl(pyro.param("AutoVariationalDropout.log_alphas.w").detach()).sum().item()

    # TraceMeanField_ELBO: the analytic KL is multiplied by kl_scale
    pyro.set_rng_seed(5)
    loss_full = TraceMeanField_ELBO().loss(linear_model, full, x, y)
    pyro.set_rng_seed(5)
    loss_scaled = TraceMeanField_ELBO().loss(linear_model, scaled, x, y)
    assert loss_full - loss_scaled == pytest.approx((1 - kl_scale) * kl, rel=1e-4, abs=1e-3)

    # Trace_ELBO: only log q(w) is scaled (documented), so the losses differ by (kl_scale - 1) log q(w)
    pyro.set_rng_seed(6)
    loss_full = Trace_ELBO().loss(linear_model, full, x, y)
    pyro.set_rng_seed(6)
    trace = poutine.trace(full).get_trace(x, y)
    log_q = trace.nodes["w"]["fn"].log_prob(trace.nodes["w"]["value"]).item()
    pyro.set_rng_seed(6)
    loss_scaled = Trace_ELBO().loss(linear_model, scaled, x, y)
    assert loss_scaled - loss_full == pytest.approx((kl_scale - 1) * log_q, rel=1e-4, abs=1e-3)


def test_kl_scale_can_be_annealed():
    guide = AutoVariationalDropout(linear_model)
    guide.kl_scale = 0.25
    assert guide.kl_scale == 0.25
    with pytest.raises(ValueError, match="kl_scale"):
        guide.kl_scale = -1.0


def test_save_and_load(tmp_path):
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, noise="correlated")
    svi = SVI(linear_model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(3):
        svi.step(x, y)
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    expected_log_alpha = guide.log_alpha()

    # the param store
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    loaded = AutoVariationalDropout(linear_model, noise="correlated")
    loaded(x, y)  # creates the parameters, which keep the loaded values
    for name, value in expected.items():
        assert torch.equal(pyro.param(name).detach(), value)
    assert torch.equal(loaded.log_alpha()["w"], expected_log_alpha["w"])

    # the module's state_dict
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = AutoVariationalDropout(linear_model, noise="correlated")
    fresh(x, y)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.median()["w"], expected["AutoVariationalDropout.locs.w"])
    assert torch.equal(fresh.log_alpha()["w"], expected_log_alpha["w"])


def regression_model(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def regression_data(n=100):
    x = torch.randn(n, 2)
    y = x[:, 0] + 0.5 * torch.randn(n)
    # the irrelevant input: exactly uncorrelated, in the sample, with the relevant one and the target
    q, _ = torch.linalg.qr(torch.stack([x[:, 0], y], -1))
    x1 = x[:, 1] - q @ (q.T @ x[:, 1])
    x[:, 1] = x1 / x1.std()
    return x, y


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_vd_prunes_an_irrelevant_input(seed):
    pyro.set_rng_seed(seed)
    x, y = regression_data()
    guide = AutoVariationalDropout(regression_model, parameterization="additive")
    num_steps = 200
    optim = pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / num_steps)})  # lr decays 100x
    svi = SVI(regression_model, guide, optim, TraceMeanField_ELBO())
    for _ in range(num_steps):
        svi.step(x, y)
    log_alpha = guide.log_alpha()["w"]
    assert log_alpha[0] < 0, log_alpha
    assert log_alpha[1] > 3, log_alpha
    assert guide.median()["w"][0] == pytest.approx(1.0, abs=0.2)
    stats = guide.sparsity()
    assert stats["total"]["num_pruned"] == 1
    assert stats["total"]["compression"] == 2.0


def test_sparsity_counts():
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, max_log_alpha=None)
    guide(x, y)
    log_alpha = torch.tensor([[4.0, 2.0, 3.5, -1.0], [0.0, 3.1, 2.9, 8.0], [-5.0, 1.0, 1.0, 1.0]])
    pyro.get_param_store()["AutoVariationalDropout.log_alphas.w"] = log_alpha
    stats = guide.sparsity()
    expected_pruned = int((log_alpha > 3).sum())  # 4.0, 3.5, 3.1, 8.0
    assert stats["sites"]["w"] == {
        "num_weights": 12,
        "num_pruned": expected_pruned,
        "num_kept": 12 - expected_pruned,
        "fraction_pruned": expected_pruned / 12,
        "compression": 12 / (12 - expected_pruned),
    }
    assert stats["total"] == stats["sites"]["w"]
    assert guide.sparsity(threshold=0.5)["total"]["num_pruned"] == int((log_alpha > 0.5).sum())


def test_quantiles_are_those_of_the_marginals():
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model)
    guide(x, y)
    theta = pyro.param("AutoVariationalDropout.locs.w").detach()
    log_alpha = pyro.param("AutoVariationalDropout.log_alphas.w").detach()
    q = guide.quantiles([0.1, 0.5, 0.9])["w"]
    marginal = torch.distributions.Normal(theta, (0.5 * log_alpha).exp() * theta.abs())
    assert q.shape == (3, 3, 4)
    for i, p in enumerate([0.1, 0.5, 0.9]):
        assert torch.allclose(q[i], marginal.icdf(torch.tensor(p)), atol=1e-6)


@pytest.mark.parametrize("noise", ["independent", "correlated"])
def test_pyro_module_model(noise):
    model = BNN()
    x, y = linear_data()
    guide = AutoVariationalDropout(model, noise=noise)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for _ in range(3):
        assert math.isfinite(svi.step(x, y))
    assert set(guide.median()) == {"fc.weight", "fc.bias"}
    shapes = {k: tuple(v.shape) for k, v in pyro.get_param_store().items()}
    if noise == "correlated":
        # nn.Linear weight (out, in): one noise per input unit (column); a bias vector: one per element
        assert shapes["AutoVariationalDropout.log_alphas.fc.weight"] == (1, 4)
        assert shapes["AutoVariationalDropout.log_alphas.fc.bias"] == (3,)
        q = poutine.trace(guide).get_trace(x, y).nodes["fc.weight"]["fn"].base_dist
        assert q.noise_shape == (1, 4)


def test_init_from_pretrained_state_dict():
    pretrained = nn.Linear(4, 3)
    model = BNN()
    values = {f"fc.{k}": v.detach() for k, v in pretrained.state_dict().items()}
    guide = AutoVariationalDropout(model, init_loc_fn=init_to_value(values=values, fallback=init_to_fan_in))
    x, y = linear_data()
    guide(x, y)
    median = guide.median()
    assert torch.equal(median["fc.weight"], pretrained.weight.detach())
    assert torch.equal(median["fc.bias"], pretrained.bias.detach())


def test_conv_weight_input_axis():
    def conv_model(x):
        w = pyro.sample("w", ImproperLogUniform().expand([5, 2, 3, 3]).to_event(4))
        return torch.nn.functional.conv2d(x, w)

    x = torch.randn(2, 2, 6, 6)
    guide = AutoVariationalDropout(conv_model, noise="correlated")
    q = poutine.trace(guide).get_trace(x).nodes["w"]["fn"].base_dist
    assert q.noise_shape == (1, 2, 1, 1)
    assert pyro.param("AutoVariationalDropout.log_alphas.w").shape == (1, 2, 1, 1)
    pyro.clear_param_store()
    guide = AutoVariationalDropout(conv_model, noise="correlated", input_dim=0)  # one noise per output channel
    q = poutine.trace(guide).get_trace(x).nodes["w"]["fn"].base_dist
    assert q.noise_shape == (5, 1, 1, 1)


def test_sites_inside_plates():
    def model(x, y=None):
        with pyro.plate("features", x.shape[-1]):
            w = pyro.sample("w", ImproperLogUniform())
        with pyro.plate("groups", 6, subsample_size=2) as idx:
            v = pyro.sample("v", ImproperLogUniform().expand([3, 2]).to_event(2))
            assert v.shape == (2, 3, 2)
            assert idx.shape == (2,)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w + v.sum(), 0.5), obs=y)

    x, y = torch.randn(20, 4), torch.randn(20)
    guide = AutoVariationalDropout(model, noise="correlated", granularity="layer")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for _ in range(3):
        assert math.isfinite(svi.step(x, y))
    shapes = {k: tuple(v.shape) for k, v in pyro.get_param_store().items()}
    assert shapes["AutoVariationalDropout.locs.w"] == (4,)
    assert shapes["AutoVariationalDropout.locs.v"] == (6, 3, 2)  # full size, not the subsample
    assert shapes["AutoVariationalDropout.log_alphas.v"] == (1, 1, 1)
    trace = poutine.trace(guide).get_trace(x, y)
    q = trace.nodes["v"]["fn"]
    assert q.batch_shape == (2,) and q.event_shape == (3, 2)
    # plate dims always get independent noise; within the weight, one noise per input unit (dim 1)
    assert q.base_dist.noise_shape == (2, 1, 2)
    assert trace.nodes["w"]["fn"].noise_shape == (4,)  # event_dim 0: no Independent wrapper


@pytest.mark.parametrize("variant", ["B", "A", "sparse", "gaussian-dropout"])
def test_dtype_and_device(variant, device):
    x, y = linear_data(dtype=torch.float64, device=device)
    guide = AutoVariationalDropout(linear_model, **VARIANTS[variant])
    svi = SVI(linear_model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for _ in range(2):
        assert math.isfinite(svi.step(x, y))
    for value in pyro.get_param_store().values():
        assert value.dtype == torch.float64 and value.device.type == device.type
    for result in (guide.median(), guide.log_alpha(), guide.quantiles([0.5])):
        assert result["w"].dtype == torch.float64 and result["w"].device.type == device.type
    assert guide.sparsity()["total"]["num_weights"] == 12


def test_refuses_other_sites_and_combines_through_autoguidelist():
    def model(x, y=None):
        w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)

    x, y = torch.randn(30, 3), torch.randn(30)
    with pytest.raises(ValueError, match="(?s)'sigma'.*AutoGuideList"):
        AutoVariationalDropout(model)(x, y)

    pyro.clear_param_store()
    # ImproperLogUniform cannot be sampled: give its sites initial values where other guides trace the model
    model_init = InitMessenger(init_to_fan_in)(model)
    guide = AutoGuideList(model_init)
    guide.append(AutoVariationalDropout(poutine.block(model, expose=["w"]), parameterization="additive"))
    guide.append(AutoNormal(poutine.block(model_init, hide=["w"])))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for _ in range(3):
        assert math.isfinite(svi.step(x, y))
    trace = poutine.trace(guide).get_trace(x, y)
    assert type(trace.nodes["w"]["fn"].base_dist) is VariationalDropoutNormal
    assert set(guide.median(x, y)) == {"w", "sigma"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise": "both"}, "noise"),
        ({"granularity": "neuron"}, "granularity"),
        ({"parameterization": "log"}, "parameterization"),
        ({"noise": "correlated", "granularity": "weight"}, "granularity='unit'"),
        ({"parameterization": "additive", "noise": "correlated"}, "noise='independent'"),
        ({"parameterization": "additive", "granularity": "layer"}, "granularity must be 'weight'"),
        ({"parameterization": "additive", "max_log_alpha": 0.0}, "max_log_alpha"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"dropout_rate": 0.5, "parameterization": "additive"}, "dropout_rate"),
        ({"dropout_rate": 0.5, "granularity": "unit"}, "granularity"),
        ({"kl_scale": -0.5}, "kl_scale"),
        ({"kl_approx": "exact"}, "kl_approx"),
        ({"log_alpha_clip": (8.0, -8.0)}, "log_alpha_clip"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoVariationalDropout(linear_model, **kwargs)


def test_bad_input_dim_names_the_site():
    x, y = linear_data()
    with pytest.raises(ValueError, match="input_dim=2 .*'w'"):
        AutoVariationalDropout(linear_model, noise="correlated", input_dim=2)(x, y)


def test_input_dim_dict_names_real_sites():
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, noise="correlated", input_dim={"w": 0})
    guide(x, y)
    assert pyro.param("AutoVariationalDropout.log_alphas.w").shape == (3, 1)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="input_dim names sites .*'weights'"):
        AutoVariationalDropout(linear_model, noise="correlated", input_dim={"weights": 0})(x, y)


def test_summaries_before_first_call():
    with pytest.raises(RuntimeError, match="call it once"):
        AutoVariationalDropout(linear_model).log_alpha()


@pytest.mark.parametrize("variant", ["B", "sparse"])
def test_trains_with_trace_elbo(variant):
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, **VARIANTS[variant])
    svi = SVI(linear_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        assert math.isfinite(svi.step(x, y))


def test_predictive_draws_from_the_guide():
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, noise="correlated")
    guide(x, y)
    # Predictive first runs the model with init_to_sample, which the improper prior cannot serve
    model = InitMessenger(init_to_fan_in)(linear_model)
    samples = pyro.infer.Predictive(model, guide=guide, num_samples=5)(x)
    assert samples["w"].shape == (5, 1, 3, 4)
    assert samples["y"].shape == (5, 40, 3)
    # correlated noise: w / θ is the same along each column (input unit), different across columns
    ratio = samples["w"].reshape(5, 3, 4) / guide.median()["w"]
    assert torch.allclose(ratio[:, 0], ratio[:, 1], rtol=1e-5) and torch.allclose(ratio[:, 0], ratio[:, 2], rtol=1e-5)
    assert not torch.allclose(ratio[:, :, 0], ratio[:, :, 1])


def test_guide_called_without_observations_says_so():
    # a bayesianized net's guide first called without y: its likelihood is a latent site in the data plate
    from pyro_vdrop.nn import bayesianize

    model = bayesianize(torch.nn.Linear(3, 2), num_data=10)
    guide = AutoVariationalDropout(model)
    with pytest.raises(ValueError, match=r"(?s)'obs' is the likelihood.*guide\(x, y\)"):
        guide(torch.randn(4, 3))
    # the failed first call left no half-made guide: with the observations it sets up
    guide(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    assert set(guide.log_alpha()) == {"weight"}


def test_sparsity_at_the_threshold_is_not_pruned():
    """
    Hand-counted: the paper's guide caps log alpha at exactly 0, so with threshold 0 every capped weight sits on
    the threshold, and "log alpha > threshold" prunes none of them (a ">=" would prune all seven).
    """
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model)  # paper's B: log alpha <= 0
    guide(x, y)
    raw = torch.tensor([[4.0, 2.0, 0.0, -1.0], [0.0, 3.1, -2.9, 8.0], [-5.0, 1.0, -1.0, -0.25]])
    pyro.get_param_store()["AutoVariationalDropout.log_alphas.w"] = raw
    log_alpha = guide.log_alpha()["w"]
    assert int((log_alpha == 0).sum()) == 7  # 4.0, 2.0, 0.0, 0.0, 3.1, 8.0, 1.0 capped to 0
    assert guide.sparsity(threshold=0.0)["total"]["num_pruned"] == 0
    assert guide.sparsity(threshold=-0.5)["total"]["num_pruned"] == 8  # the 7 zeros and -0.25
    assert guide.sparsity()["total"]["num_pruned"] == 0


def _mixed_model(weights_first):
    def model(x, y=None):
        w1 = pyro.sample("w1", ImproperLogUniform().expand([4, 3]).to_event(2))
        if weights_first:
            w2 = pyro.sample("w2", ImproperLogUniform().expand([1, 4]).to_event(2))
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        if not weights_first:
            w2 = pyro.sample("w2", ImproperLogUniform().expand([1, 4]).to_event(2))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            mean = F.linear(torch.tanh(F.linear(x, w1)), w2).squeeze(-1) + shift
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)

    return model


def test_readme_autoguide_list_recipe_and_the_mean_field_warning():
    """
    The README's AutoGuideList recipe: when the model's sites interleave weights and other latents,
    TraceMeanField_ELBO warns that it cannot verify the mean-field order. The warning checks the order only:
    the parts of the list are independent, and the same model with its sites in the guide's order (no warning)
    gives exactly the same loss, so the README's filter is safe.
    """
    from pyro_vdrop.poutine import local_reparam

    x, y = torch.randn(20, 3), torch.randn(20)
    losses, state = {}, None
    for weights_first in (True, False):
        pyro.clear_param_store()
        model = _mixed_model(weights_first)
        weight_sites = ["w1", "w2"]
        init = InitMessenger(init_to_fan_in)(model)
        guide = AutoGuideList(init)
        guide.append(AutoVariationalDropout(poutine.block(model, expose=weight_sites)))
        guide.append(AutoNormal(poutine.block(init, hide=weight_sites)))
        with local_reparam():
            guide(x, y)
            if state is None:
                state = pyro.get_param_store().get_state()
            pyro.get_param_store().set_state(state)  # the same parameters for both models
            pyro.set_rng_seed(3)
            if weights_first:
                losses[weights_first] = TraceMeanField_ELBO().loss(model, guide, x, y)
                continue
            with pytest.warns(UserWarning, match="Failed to verify mean field restriction"):
                TraceMeanField_ELBO().loss(model, guide, x, y)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")  # the README's
                pyro.set_rng_seed(3)
                losses[weights_first] = TraceMeanField_ELBO().loss(model, guide, x, y)
    assert losses[False] == losses[True]


@pytest.mark.parametrize("variant", ["B", "A", "sparse"])
def test_posteriors_are_not_revalidated_but_user_input_is(variant):
    """The guide builds its posteriors from its own parameters: Pyro's validation (on by default) skips them."""
    x, y = linear_data()
    guide = AutoVariationalDropout(linear_model, **VARIANTS[variant])
    guide(x, y)
    with pyro.validation_enabled(True):
        posterior = guide.posterior("w")
        assert posterior.base_dist._validate_args is False
        with pytest.raises(ValueError, match="loc"):
            VariationalDropoutNormal(torch.tensor([float("nan")]), torch.zeros(1))
        with pytest.raises(ValueError, match="probs|logits"):
            TraceMeanField_ELBO().loss(lambda: pyro.sample("y", dist.Bernoulli(probs=torch.tensor(2.0))), lambda: None)
