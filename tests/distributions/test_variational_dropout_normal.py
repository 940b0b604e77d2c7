# SPDX-License-Identifier: Apache-2.0
import math

import pyro.distributions as dist
import pytest
import torch

from pyro_vdrop.distributions import CorrelatedVariationalDropoutNormal, VariationalDropoutNormal


@pytest.mark.parametrize(
    "loc_shape,log_alpha_shape",
    [((), ()), ((3,), ()), ((2, 3), (3,)), ((2, 3), (2, 1)), ((1, 3), (4, 1))],
)
def test_broadcasting_and_moments(loc_shape, log_alpha_shape):
    loc = torch.randn(loc_shape)
    log_alpha = torch.randn(log_alpha_shape)
    d = VariationalDropoutNormal(loc, log_alpha)
    shape = torch.broadcast_shapes(loc_shape, log_alpha_shape)
    assert d.batch_shape == shape and d.event_shape == ()
    assert d.log_alpha.shape == shape
    torch.testing.assert_close(d.mean, loc.expand(shape))
    torch.testing.assert_close(d.variance, (log_alpha.exp() * loc**2).expand(shape))
    torch.testing.assert_close(d.scale, (0.5 * log_alpha).exp() * loc.abs())
    assert d.rsample([5]).shape == (5,) + shape


def test_matches_normal_log_prob_and_entropy():
    loc, log_alpha = torch.randn(4), torch.randn(4)
    d = VariationalDropoutNormal(loc, log_alpha)
    ref = dist.Normal(loc, (0.5 * log_alpha).exp() * loc.abs())
    x = torch.randn(6, 4)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(d.entropy(), ref.entropy())


def test_sample_moments_monte_carlo():
    # 200k draws: the standard error of the variance estimate is ~0.3%; allow 2%.
    torch.manual_seed(0)
    loc, log_alpha = torch.tensor([2.0, -0.5]), torch.tensor([math.log(0.25), 0.0])
    x = VariationalDropoutNormal(loc, log_alpha).sample([200_000])
    torch.testing.assert_close(x.mean(0), loc, atol=0.01, rtol=0)
    torch.testing.assert_close(x.var(0), log_alpha.exp() * loc**2, rtol=0.02, atol=0)


def test_rsample_gradients():
    loc = torch.tensor([1.5, -2.0], requires_grad=True)
    log_alpha = torch.tensor([-1.0, 0.0], requires_grad=True)
    VariationalDropoutNormal(loc, log_alpha).rsample().sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_alpha.grad).all()
    assert (log_alpha.grad != 0).all()


def test_expand_keeps_options():
    d = VariationalDropoutNormal(torch.randn(3), torch.zeros(()), kl_approx="kingma", log_alpha_clip=(-8, 8))
    e = d.expand([2, 3])
    assert e.batch_shape == (2, 3) and e.log_alpha.shape == (2, 3)
    assert e.kl_approx == "kingma" and e.log_alpha_clip == (-8, 8)
    torch.testing.assert_close(e.scale[1], d.scale)
    f = d.to_event(1)
    assert f.event_shape == (3,) and f.batch_shape == ()


def test_additive_parameterization_is_the_same_distribution():
    loc, log_alpha = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    log_sigma2 = log_alpha + 2 * loc.abs().log()
    mult = VariationalDropoutNormal(loc, log_alpha)
    add = VariationalDropoutNormal.from_additive(loc, log_sigma2)
    assert add.parameterization == "additive" and mult.parameterization == "multiplicative"
    torch.testing.assert_close(add.log_alpha, mult.log_alpha)
    torch.testing.assert_close(add.scale, mult.scale)
    x = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(add.log_prob(x), mult.log_prob(x))


def test_additive_scale_gradient_does_not_flow_through_loc():
    loc = torch.tensor([0.3], requires_grad=True)
    log_sigma2 = torch.tensor([-2.0], requires_grad=True)
    d = VariationalDropoutNormal.from_additive(loc, log_sigma2)
    d.scale.sum().backward()
    assert loc.grad is None or loc.grad.abs().sum() == 0
    assert log_sigma2.grad.abs().sum() > 0


def test_zero_loc_is_finite():
    d = VariationalDropoutNormal(torch.zeros(3), torch.zeros(3))
    assert torch.isfinite(d.log_prob(torch.zeros(3))).all()
    add = VariationalDropoutNormal.from_additive(torch.zeros(3), torch.full((3,), -10.0))
    assert torch.isfinite(add.log_alpha).all()


def test_validation_errors():
    with pytest.raises(ValueError, match="log_alpha"):
        VariationalDropoutNormal(torch.zeros(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="kl_approx"):
        VariationalDropoutNormal(torch.zeros(2), 0.0, kl_approx="nope")
    with pytest.raises(ValueError, match="log_alpha_clip"):
        VariationalDropoutNormal(torch.zeros(2), 0.0, log_alpha_clip=(8, -8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_inputs(dtype, device):
    loc = torch.randn(3, dtype=dtype, device=device)
    d = VariationalDropoutNormal(loc, torch.zeros(3, dtype=dtype, device=device))
    x = d.rsample()
    assert x.dtype == dtype and x.device == loc.device


def test_correlated_noise_is_shared_along_input_columns():
    # w = θ ⊙ s with s ~ N(1, α) per input unit: weights in one column are perfectly correlated
    # (after dividing by θ), different columns are independent. 100k draws; tolerances ~5 s.e.
    torch.manual_seed(1)
    loc = torch.randn(3, 4)
    log_alpha = torch.tensor([[-2.0, -1.0, 0.0, 0.5]])
    d = CorrelatedVariationalDropoutNormal(loc, log_alpha)
    assert d.batch_shape == (3, 4) and d.noise_shape == (1, 4)
    w = d.rsample([100_000])
    s = w / loc
    torch.testing.assert_close(s[:, 0], s[:, 2])
    torch.testing.assert_close(s.mean(0)[0], torch.ones(4), atol=0.02, rtol=0)
    torch.testing.assert_close(s.var(0)[0], log_alpha.exp()[0], rtol=0.03, atol=0)
    corr = torch.corrcoef(torch.stack([s[:, 0, 0], s[:, 0, 1]]))[0, 1]
    assert corr.abs() < 0.015
    # marginals equal the independent posterior's
    torch.testing.assert_close(d.variance, VariationalDropoutNormal(loc, log_alpha).variance)
    # expanding adds independent leading dims
    e = d.expand([2, 3, 4])
    assert e.noise_shape == (2, 1, 4)
    we = e.rsample() / loc
    assert not torch.allclose(we[0, 0], we[1, 0])


@pytest.mark.parametrize("parameterization", ["multiplicative", "additive"])
def test_variance_is_computed_directly_and_lazily(parameterization):
    loc = torch.tensor([[0.5, -2.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    other = torch.tensor([[-1.0, 0.5], [-3.0, 2.0]], dtype=torch.float64, requires_grad=True)
    if parameterization == "multiplicative":
        d = VariationalDropoutNormal(loc, other)
        expected = other.exp() * loc**2
    else:
        d = VariationalDropoutNormal.from_additive(loc, other)
        expected = other.exp().expand(2, 2)
    assert d.variance is d.variance  # computed once, on first use, then kept
    assert torch.allclose(d.variance, expected)
    # the scale agrees with the variance except where it is floored (θ = 0, multiplicative)
    floor = torch.finfo(torch.float64).tiny ** 0.5
    assert torch.allclose(d.scale, expected.sqrt().clamp(min=floor))
    (grad,) = torch.autograd.grad(d.variance.sum(), other)
    assert torch.allclose(grad, expected.detach())
    e = d.expand(torch.Size([3, 2, 2]))
    assert e.variance.shape == e.scale.shape == (3, 2, 2)
    assert torch.allclose(e.variance, expected.expand(3, 2, 2))


@pytest.mark.parametrize("log_alpha_shape", [(3, 4), (3, 1), ()])
def test_variance_gradients(log_alpha_shape):
    # the fused variance node against finite differences, first and second order, with a broadcast log α
    torch.manual_seed(0)
    loc = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    log_alpha = torch.randn(log_alpha_shape, dtype=torch.float64, requires_grad=True)

    def variance(loc, log_alpha):
        return VariationalDropoutNormal(loc, log_alpha).variance

    assert torch.autograd.gradcheck(variance, (loc, log_alpha))
    assert torch.autograd.gradgradcheck(variance, (loc, log_alpha))
    # and equal to autograd of the formula
    expected = torch.autograd.grad((log_alpha.exp() * loc * loc).pow(2).sum(), (loc, log_alpha))
    actual = torch.autograd.grad(variance(loc, log_alpha).pow(2).sum(), (loc, log_alpha))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_additive_log_alpha_gradients():
    # the fused log α = log σ² - 2 log max(|θ|, tiny) against autograd of the formula, θ = 0 included (gradient 0
    # there, from the clamp), and against finite differences to second order away from 0
    from pyro_vdrop.distributions.util import safe_log_abs

    loc = torch.tensor([[-2.0, -0.3, 0.0], [1e-3, 0.7, 5.0]], dtype=torch.float64, requires_grad=True)
    log_sigma2 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    d = VariationalDropoutNormal.from_additive(loc, log_sigma2)
    expected = log_sigma2 - 2 * safe_log_abs(loc)
    torch.testing.assert_close(d.log_alpha, expected)
    weights = torch.rand(2, 3, dtype=torch.float64)
    actual = torch.autograd.grad((d.log_alpha * weights).sum(), (loc, log_sigma2))
    reference = torch.autograd.grad((expected * weights).sum(), (loc, log_sigma2))
    for a, e in zip(actual, reference):
        torch.testing.assert_close(a, e)
    assert actual[0][0, 2] == 0

    away = torch.tensor([[-2.0, -0.3], [0.7, 5.0]], dtype=torch.float64, requires_grad=True)
    log_sigma2 = log_sigma2[:, :2].detach().requires_grad_()

    def fn(loc, log_sigma2):
        return VariationalDropoutNormal.from_additive(loc, log_sigma2).log_alpha

    assert torch.autograd.gradcheck(fn, (away, log_sigma2))
    assert torch.autograd.gradgradcheck(fn, (away, log_sigma2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_additive_log_alpha_gradient_at_the_clamp(dtype):
    # the gradient with respect to θ is -2g/θ where |θ| >= tiny and exactly 0 below (0, -0, subnormals), as a mask
    # gives it; at θ = ±inf it is 0 (not NaN)
    tiny = torch.finfo(dtype).tiny
    special = [0.0, -0.0, tiny / 4, -tiny / 2, tiny, -tiny, 2 * tiny, float("inf"), -float("inf")]
    loc = torch.cat([torch.tensor(special, dtype=dtype), torch.randn(20, dtype=dtype)]).requires_grad_()
    log_sigma2 = torch.randn(loc.shape, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(loc.shape, dtype=dtype)
    d = VariationalDropoutNormal.from_additive(loc, log_sigma2)
    grad_loc, grad_log_sigma2 = torch.autograd.grad(d.log_alpha, (loc, log_sigma2), grad_out)
    theta = loc.detach()
    expected = torch.where(theta.abs() < tiny, torch.zeros_like(theta), -2 * grad_out / theta)
    assert torch.equal(grad_loc, expected)
    assert torch.equal(grad_log_sigma2, grad_out)
    assert (grad_loc[:4] == 0).all() and (grad_loc[7:9] == 0).all() and (grad_loc[9:] != 0).all()


def _unclamped_variance(loc, log_alpha):
    # the formula before α was clamped, in the same order of operations: (exp(log α) θ) θ
    return log_alpha.exp() * loc * loc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variance_where_alpha_overflows(dtype, device):
    # exp(log α) = inf: θ = 0 gave inf * 0 = NaN in the variance and its gradients; it must be 0
    big = math.log(torch.finfo(dtype).max) + 10  # 98.7 in float32: the log α = 100
    kw = dict(dtype=dtype, device=device)
    loc = torch.tensor([0.0, 0.0, -0.0, 0.5, -2.0], **kw).requires_grad_()
    log_alpha = torch.tensor([big, 2 * big, big, big, -1.0], **kw).requires_grad_()
    for d in (VariationalDropoutNormal(loc, log_alpha), CorrelatedVariationalDropoutNormal(loc, log_alpha)):
        variance = d.variance
        assert (variance[:3] == 0).all()
        assert torch.isfinite(variance[3]) and variance[3] > 0
        for grad in torch.autograd.grad(variance.sum(), (loc, log_alpha)):
            assert (grad[:3] == 0).all() and torch.isfinite(grad).all()
        # √α overflows too (log α = 2·big): the scale is floored, not NaN, and so is log_prob
        assert torch.isfinite(d.scale).all() and (d.scale[:3] <= torch.finfo(dtype).tiny ** 0.5).all()
        assert torch.isfinite(d.log_prob(torch.zeros(5, **kw))).all()
        for grad in torch.autograd.grad(d.scale.sum(), (loc, log_alpha)):
            assert torch.isfinite(grad).all()
        w = d.rsample([100])
        assert torch.isfinite(w[:, :3]).all()
        if isinstance(d, CorrelatedVariationalDropoutNormal):  # w = θ s: exactly 0 (the other adds floor * ε)
            assert (w[:, :3] == 0).all()
    # the second-order node too: every second derivative that involves log α is αθ² or 2αθ, 0 at θ = 0
    # (∂²/∂θ² = 2α is not: it is 2 α_max = inf in either dtype)
    g_loc, g_log_alpha = torch.autograd.grad(
        VariationalDropoutNormal(loc, log_alpha).variance.sum(), (loc, log_alpha), create_graph=True
    )
    second = torch.autograd.grad(g_log_alpha.sum(), (loc, log_alpha), retain_graph=True)
    second += torch.autograd.grad(g_loc.sum(), log_alpha)
    for grad in second:
        assert (grad[:3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variance_is_unchanged_where_alpha_is_finite(dtype):
    # clamping α changes nothing, bit for bit, in values or gradients where exp(log α) does not overflow
    torch.manual_seed(0)
    limit = math.log(torch.finfo(dtype).max)
    loc = (torch.randn(1000, dtype=dtype) * 10.0 ** torch.randint(-20, 3, (1000,))).requires_grad_()
    log_alpha = (torch.rand(1000, dtype=dtype) * (limit + 30) - 30).requires_grad_()
    assert (log_alpha < limit).all()
    weights = torch.randn(1000, dtype=dtype)
    actual = VariationalDropoutNormal(loc, log_alpha).variance
    expected = _unclamped_variance(loc, log_alpha)
    assert torch.equal(actual, expected)
    grads = torch.autograd.grad((actual * weights).sum(), (loc, log_alpha))
    reference = (2 * log_alpha.exp() * loc * weights, expected * weights)
    for a, e in zip(grads, reference):
        finite = torch.isfinite(e)
        assert finite.float().mean() > 0.9
        assert torch.equal(a[finite], e[finite].detach())


def test_variance_node_keeps_only_its_inputs_and_output():
    # αθ, a tensor of the weight's size, is recomputed in the backward pass (bitwise as the forward pass made it)
    loc = torch.randn(3, 4, requires_grad=True)
    log_alpha = torch.randn(3, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        variance = VariationalDropoutNormal(loc, log_alpha).variance
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {t.untyped_storage().data_ptr() for t in (loc, log_alpha, variance)}
    grad = torch.randn(3, 4)
    actual = torch.autograd.grad(variance, (loc, log_alpha), grad)
    alpha = log_alpha.detach().exp()
    expected = (alpha * loc.detach() * grad * 2, alpha * loc.detach() * loc.detach() * grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
