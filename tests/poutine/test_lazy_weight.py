# SPDX-License-Identifier: Apache-2.0
"""Statistical tests of the lazy weight: LRT and Flipout outputs against the closed form and explicit sampling."""

import pytest
import torch
import torch.nn.functional as F

from pyro_vdrop.distributions import CorrelatedVariationalDropoutNormal, VariationalDropoutNormal
from pyro_vdrop.poutine import LazyWeight, LazyWeightError

NUM_SAMPLES = 20000
# Monte Carlo tolerances, in standard errors (fixed seed 0 from conftest): z = 4.5 for the means;
# the sample variance of S normals has relative standard error sqrt(2 / S) ~ 1%: allow 5.5%.
Z = 4.5


def _lazy(loc, log_alpha, estimator, site="w"):
    fn = VariationalDropoutNormal(loc, log_alpha)
    return fn, LazyWeight.from_distribution(fn.to_event(loc.dim()), site=site, estimator=estimator)


def _check_moments(samples, mean, var):
    """Compare i.i.d. ``samples`` (leading dim: draws) with the closed-form ``mean`` and ``var``."""
    S = samples.shape[0]
    assert ((samples.mean(0) - mean).abs() <= Z * (var / S).sqrt() + 1e-12).all()
    # the sample variance of S normals has relative standard error sqrt(2 / S)
    assert ((samples.var(0) / var - 1).abs() <= Z * (2 / S) ** 0.5).all()


def _check_draws(draws, mean, var):
    """
    Compare ``draws`` of shape (calls, examples per call, ...) with the closed-form moments, using
    batch means: the calls are i.i.d., the examples within one call need not be (Flipout shares one
    weight perturbation per call), so the standard errors are estimated from the spread across calls.
    """
    calls = draws.shape[0]
    call_means = draws.mean(1)
    call_vars = (draws - mean).pow(2).mean(1)
    se_mean = call_means.std(0) / calls**0.5
    se_var = call_vars.std(0) / calls**0.5
    assert (se_var <= 0.1 * var).all(), "too few draws for a meaningful test"
    assert ((call_means.mean(0) - mean).abs() <= Z * se_mean + 1e-12).all()
    assert ((call_vars.mean(0) - var).abs() <= Z * se_var).all()


def _draw(op, x, estimator, calls, per_call):
    """``calls`` independent calls of ``op`` on a batch of ``per_call`` copies of ``x``, stacked."""
    if estimator != "flipout":  # examples are independent: one big call, split into chunks
        out = op(x.expand(calls * per_call, *x.shape))
        return out.reshape(calls, per_call, *out.shape[1:])
    return torch.stack([op(x.expand(per_call, *x.shape)) for _ in range(calls)])


LINEAR_FORMS = {
    "linear_positional": lambda x, w, b: F.linear(x, w, b),
    "linear_keyword": lambda x, w, b: F.linear(input=x, weight=w, bias=b),
    "linear_no_bias": lambda x, w, b: F.linear(x, w) + b,
    "matmul_T": lambda x, w, b: x @ w.T + b,
    "matmul_t": lambda x, w, b: torch.matmul(x, w.t()) + b,
    "matmul_transpose": lambda x, w, b: x.matmul(w.transpose(0, 1)) + b,
    "weight_left": lambda x, w, b: (w @ x.transpose(-1, -2)).transpose(-1, -2) + b,
    "reshape": lambda x, w, b: F.linear(x, w.reshape(-1).reshape(w.shape), b),
    "view": lambda x, w, b: F.linear(x, w.view(w.shape[0], -1), b),
}


@pytest.mark.parametrize(
    "estimator,form,dtype",
    [(e, f, torch.float32) for e in ("lrt", "flipout", "per-example") for f in sorted(LINEAR_FORMS)]
    + [(e, "linear_positional", torch.float64) for e in ("lrt", "flipout", "per-example")],
)
def test_linear_moments(form, estimator, dtype, device):
    x = torch.randn(2, 3, 5, dtype=dtype, device=device)  # two leading batch dims
    loc = torch.randn(4, 5, dtype=dtype, device=device)
    log_alpha = torch.randn(4, 5, dtype=dtype, device=device) - 1
    bias = torch.randn(4, dtype=dtype, device=device)
    fn, w = _lazy(loc, log_alpha, estimator)
    # every copy of x is a separate example
    calls, per_call = (2000, 10) if estimator == "flipout" else (200, 100)
    out = _draw(lambda xs: LINEAR_FORMS[form](xs, w, bias), x, estimator, calls, per_call)
    assert out.shape == (calls, per_call, 2, 3, 4) and out.dtype == dtype and out.device == x.device
    assert type(out) is torch.Tensor
    mean = F.linear(x, loc, bias)
    var = F.linear(x**2, fn.variance)
    _check_draws(out, mean, var)
    # explicit per-example weight sampling (S x out x in) agrees with the same closed form
    ws = fn.rsample((NUM_SAMPLES,))
    explicit = torch.einsum("abi,soi->sabo", x, ws) + bias
    _check_moments(explicit, mean, var)


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_lazy_bias_moments(estimator):
    x = torch.randn(3, 5)
    loc, log_alpha = torch.randn(4, 5), torch.randn(4, 5) - 1
    b_fn = VariationalDropoutNormal(torch.randn(4), torch.randn(4) - 1)
    _, w = _lazy(loc, log_alpha, estimator)
    b = LazyWeight.from_distribution(b_fn.to_event(1), site="b", estimator=estimator)
    mean = F.linear(x, loc, b_fn.loc)
    var = F.linear(x**2, VariationalDropoutNormal(loc, log_alpha).variance) + b_fn.variance
    calls, per_call = (2000, 10) if estimator == "flipout" else (200, 100)
    _check_draws(_draw(lambda xs: F.linear(xs, w, b), x, estimator, calls, per_call), mean, var)
    # a lazy bias added to the pre-activations afterwards
    _check_draws(_draw(lambda xs: F.linear(xs, w) + b, x, estimator, calls, per_call), mean, var)


CONV_CASES = [
    # nd, in_channels, out_channels, kernel, options
    (1, 3, 4, 3, dict()),
    (1, 4, 6, 2, dict(stride=2, padding=1, dilation=2, groups=2)),
    (2, 3, 4, 3, dict(padding="same")),
    (2, 4, 4, (2, 3), dict(stride=(2, 1), padding=(1, 0), groups=4)),
    (2, 2, 3, 3, dict(dilation=2, padding="valid")),
    (3, 2, 4, 2, dict(stride=1, padding=1, groups=2)),
]


def _conv(nd):
    return (F.conv1d, F.conv2d, F.conv3d)[nd - 1]


def _explicit_conv(nd, x, ws, bias, groups=1, **kw):
    """Convolve ``x`` (C, *spatial) with S separate weights ``ws`` (S, O, C/g, *k) in one grouped conv."""
    S, cout = ws.shape[:2]
    inp = x.expand(S, *x.shape).reshape(1, S * x.shape[0], *x.shape[1:])
    out = _conv(nd)(inp, ws.reshape(S * cout, *ws.shape[2:]), None, groups=S * groups, **kw)
    return out.reshape(S, cout, *out.shape[2:]) + bias.reshape((cout,) + (1,) * nd)


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_moments(case, estimator):
    nd, cin, cout, k, kw = case
    k = (k,) * nd if isinstance(k, int) else k
    groups = kw.get("groups", 1)
    x = torch.randn((cin,) + ((6,) * nd if nd < 3 else (3, 3, 3)))
    loc = torch.randn((cout, cin // groups) + k)
    log_alpha = torch.randn(loc.shape) - 1
    bias = torch.randn(cout)
    fn, w = _lazy(loc, log_alpha, estimator)
    calls, per_call = (400, 10) if estimator == "flipout" else (100, 40)
    out = _draw(lambda xs: _conv(nd)(xs, w, bias, **kw), x, estimator, calls, per_call)
    mean = _conv(nd)(x[None], loc, bias, **kw)[0]
    var = _conv(nd)(x[None] ** 2, fn.variance, None, **kw)[0]
    assert out.shape == (calls, per_call) + mean.shape
    _check_draws(out, mean, var)
    if estimator == "lrt":
        # explicit per-example weights reproduce the closed form (checks stride/padding/dilation/groups maths)
        S = NUM_SAMPLES // 4
        _check_moments(_explicit_conv(nd, x, fn.rsample((S,)), bias, **kw), mean, var)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_mean_estimator_is_deterministic(op):
    loc = torch.randn(3, 2, 3, 3) if op == "conv2d" else torch.randn(3, 5)
    fn, w = _lazy(loc, torch.zeros(loc.shape), "mean")
    x = torch.randn(4, 2, 6, 6) if op == "conv2d" else torch.randn(4, 5)
    b = torch.randn(3)
    f = F.conv2d if op == "conv2d" else F.linear
    assert torch.allclose(f(x, w, b), f(x, loc, b), atol=1e-6)


def test_conv_unbatched_and_positional():
    x = torch.randn(3, 7)
    fn, w = _lazy(torch.randn(2, 3, 3), torch.full((2, 3, 3), -1.0), "lrt")
    out = F.conv1d(x, w, None, 2, 1, 1, 1)  # the positional form nn.Conv1d uses
    assert out.shape == F.conv1d(x, fn.loc, None, 2, 1, 1, 1).shape


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_independence_across_examples(estimator):
    """Two examples with the same input: LRT/Flipout outputs are uncorrelated, a shared weight gives correlation 1."""
    x = torch.randn(1, 5).expand(2, 5)
    fn, w = _lazy(torch.randn(3, 5), torch.full((3, 5), -0.5), estimator)
    S = NUM_SAMPLES
    if estimator == "lrt":
        out = F.linear(x.expand(S, 2, 5), w)  # (S, 2 examples, 3)
    else:  # one call per minibatch of the 2 examples
        S = S // 4
        out = torch.stack([F.linear(x, w) for _ in range(S)])
    corr = torch.stack([torch.corrcoef(out[:, :, j].T)[0, 1] for j in range(3)])
    assert (corr.abs() < Z / S**0.5).all()
    shared = torch.einsum("mi,soi->smo", x, fn.rsample((S,)))  # one weight sample per minibatch
    corr_shared = torch.stack([torch.corrcoef(shared[:, :, j].T)[0, 1] for j in range(3)])
    assert (corr_shared > 0.999).all()


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
@pytest.mark.parametrize("noise", ["input", "output", "layer"])
def test_correlated_linear_matches_explicit_sampling(noise, estimator):
    """Dropout "A": one noise per input unit (per output unit, per layer), exact per example."""
    x = torch.randn(3, 5)
    loc = torch.randn(4, 5)
    la_shape = {"input": (1, 5), "output": (4, 1), "layer": (1, 1)}[noise]
    fn = CorrelatedVariationalDropoutNormal(loc, torch.rand(la_shape) - 1.5)
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator=estimator)
    S = NUM_SAMPLES
    out = F.linear(x.expand(S, 3, 5), w)  # correlated noise is independent per example for both estimators
    explicit = torch.einsum("mi,soi->smo", x, fn.rsample((S,)))
    # closed form: shared noise on the inputs adds independent terms; on the outputs it scales the mean
    if noise == "input":
        var = F.linear(x**2, fn.variance)
    else:
        var = fn.alpha[:, 0] * F.linear(x, loc) ** 2
    _check_moments(out, F.linear(x, loc), var)
    _check_moments(explicit, F.linear(x, loc), var)
    # the covariance between two output units of one example (shared noise) matches explicit sampling
    for samples in (out, explicit):
        c = samples[:, 0, :2] - samples[:, 0, :2].mean(0)
        cov = (c[:, 0] * c[:, 1]).mean()
        if noise == "input":
            expected = (x[0] ** 2 * fn.alpha[0] * loc[0] * loc[1]).sum()
        elif noise == "layer":
            expected = fn.alpha[0, 0] * (x[0] @ loc[0]) * (x[0] @ loc[1])
        else:
            expected = torch.tensor(0.0)
        scale = (fn.variance[:2] * x[0] ** 2).sum(-1).prod().sqrt()
        assert (cov - expected).abs() <= Z * scale / S**0.5


@pytest.mark.parametrize("noise", ["input", "output"])
def test_correlated_conv_matches_explicit_sampling(noise):
    x = torch.randn(4, 6, 6)
    loc = torch.randn(6, 2, 3, 3)  # groups=2
    la_shape = {"input": (1, 2, 1, 1), "output": (6, 1, 1, 1)}[noise]
    fn = CorrelatedVariationalDropoutNormal(loc, torch.rand(la_shape) - 1.5)
    w = LazyWeight.from_distribution(fn.to_event(4), site="w", estimator="lrt")
    S = NUM_SAMPLES // 4
    kw = dict(padding=1, groups=2)
    out = F.conv2d(x.expand(S, *x.shape), w, torch.zeros(6), **kw)
    explicit = _explicit_conv(2, x, fn.rsample((S,)), torch.zeros(6), **kw)
    # two-sample comparison of the per-example moments
    var = explicit.var(0)
    assert ((out.mean(0) - explicit.mean(0)).abs() <= Z * (2 * var / S).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() <= 5.5 * (4 / S) ** 0.5).all()
    # shared noise within an example: two spatial positions of one output channel are correlated alike
    a, b = out[:, 0, 2, 2], out[:, 0, 2, 3]
    ea, eb = explicit[:, 0, 2, 2], explicit[:, 0, 2, 3]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1] - torch.corrcoef(torch.stack([ea, eb]))[0, 1]) < 0.05


def test_gradients_flow_to_parameters():
    loc = torch.randn(3, 4, requires_grad=True)
    log_alpha = torch.full((3, 4), -1.0, requires_grad=True)
    w = LazyWeight.from_distribution(VariationalDropoutNormal(loc, log_alpha), site="w", estimator="lrt")
    F.linear(torch.randn(8, 4), w).pow(2).sum().backward()
    assert loc.grad is not None and loc.grad.abs().sum() > 0
    assert log_alpha.grad is not None and torch.isfinite(log_alpha.grad).all()
    # an all-zero input row keeps gradients finite
    loc.grad = log_alpha.grad = None
    w = LazyWeight.from_distribution(VariationalDropoutNormal(loc, log_alpha), site="w", estimator="lrt")
    F.linear(torch.zeros(2, 4), w).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_alpha.grad).all()


@pytest.mark.parametrize(
    "estimator,uses", [("lrt", {"variance"}), ("flipout", {"scale"}), ("per-example", {"scale"}), ("mean", set())]
)
def test_moments_are_computed_only_when_the_estimator_needs_them(estimator, uses):
    # LRT needs σ² only, which VariationalDropoutNormal computes as α θ² (no square of a floored σ); the
    # others draw weight noise from σ. A transposed weight derives its moments from the root's.
    loc = torch.tensor([[0.5, 0.0, -1.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    log_alpha = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.5, 0.0]], dtype=torch.float64)
    fn = VariationalDropoutNormal(loc, log_alpha)
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator=estimator)
    x = torch.randn(5, 3, dtype=torch.float64)
    x @ w.T
    assert {"scale"} & uses == ({"scale"} if fn._scale is not None else set())
    assert {"variance"} & uses == ({"variance"} if fn._variance is not None else set())
    wt = w.T
    assert torch.equal(wt.variance, (log_alpha.exp() * loc**2).T)
    assert torch.equal(wt.scale, fn.scale.T)


UNSUPPORTED = {
    "mul": lambda w: w * 2,
    "repeated_index": lambda w: w[[0, 0]],  # slices without repeats are lazy weights (test_lazy_embedding_attention)
    "abs": lambda w: w.abs(),
    "numpy": lambda w: w.numpy(),
    "sigmoid": lambda w: torch.sigmoid(w),
    "sum": lambda w: w.sum(),
    "times_two": lambda w: w * 2,
    "slice_of_sum": lambda w: (w + w)[:, :3],
    "add_same_shape": lambda w: w + torch.ones(3, 4),
    "eq": lambda w: w == 0,
    "conv_wrong_dims": lambda w: F.conv1d(torch.randn(1, 4, 5), w),
}


@pytest.mark.parametrize("use", sorted(UNSUPPORTED))
def test_unsupported_use_raises(use):
    fn = VariationalDropoutNormal(torch.randn(3, 4), torch.zeros(3, 4))
    w = LazyWeight.from_distribution(fn, site="layer.weight", estimator="lrt")
    with pytest.raises(LazyWeightError, match=r"site 'layer\.weight'.*local_reparam\(sites=") as e:
        UNSUPPORTED[use](w)
    assert "fallback=True" in str(e.value)
    # an op the handler does not support is "not supported", never "not linear" (W * 2, W.sum(), W[:, :3] are)
    assert "is not supported" in str(e.value) and "not linear" not in str(e.value)


def test_fallback_draws_one_sample():
    fn = VariationalDropoutNormal(torch.randn(3, 4), torch.zeros(3, 4))
    w = LazyWeight.from_distribution(fn, site="w", estimator="lrt", fallback=True)
    a = w.abs()
    b = w.t().abs().t()
    assert type(a) is torch.Tensor and torch.equal(a, b)  # one cached sample for every use and view
    assert not torch.equal(a, fn.loc.abs())


# ----- weight tying: one weight used by several ops in one model run -----

TIED_FORMS = {
    # an autoencoder with a tied decoder: h = W x, out = W^T h
    "linear_then_transpose": lambda x, w: (lambda h: (h, F.linear(h, w.t())))(F.linear(x, w)),
    "matmul_then_matmul": lambda x, w: (lambda h: (h, h @ w))(x @ w.T),
    # the same layer applied twice (a recurrent or weight-shared block): h = W x, out = W h
    "same_layer_twice": lambda x, w: (lambda h: (h, F.linear(h, w)))(F.linear(x, w)),
}
# the same with one explicit weight sample ws[s] per draw s
TIED_REFERENCE = {
    "linear_then_transpose": lambda x, ws: (lambda h: (h, torch.einsum("soi,so->si", ws, h)))(ws @ x),
    "matmul_then_matmul": lambda x, ws: (lambda h: (h, torch.einsum("soi,so->si", ws, h)))(ws @ x),
    "same_layer_twice": lambda x, ws: (lambda h: (h, torch.einsum("soi,si->so", ws, h)))(ws @ x),
}


def _untied(form, x, fn, S):
    """The bug: independent weight samples for the two uses."""
    h = fn.rsample((S,)) @ x
    ws = fn.rsample((S,))
    return torch.einsum("soi,si->so", ws, h) if form == "same_layer_twice" else torch.einsum("soi,so->si", ws, h)


def _tied_draws(form, w, x, estimator, calls, per_call):
    """Runs the tied ``form`` as ``calls`` model runs (``start_run``) of ``per_call`` copies of ``x``."""
    hs, outs = [], []
    for _ in range(calls):
        w.start_run()
        h, out = TIED_FORMS[form](x.expand(per_call, *x.shape), w)
        hs.append(h)
        outs.append(out)
    return torch.cat(hs), torch.cat(outs)


@pytest.mark.parametrize("form", sorted(TIED_FORMS))
@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
def test_tied_weight_matches_explicit_weight_draws(estimator, form):
    """
    A weight used twice in one model run is one weight: the joint law of both outputs matches Monte Carlo over
    ordinary weight draws (W ~ q, then both ops with that W). Independent noise per use would shift the mean of
    W^T W x by sum_j sigma_j^2 x and lose the covariance between the two outputs: both are checked.
    """
    x = torch.randn(5)
    loc = torch.randn(5, 5) / 2
    fn = VariationalDropoutNormal(loc, torch.full((5, 5), 0.0))  # alpha = 1: the tying effect is large
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator=estimator)
    S = NUM_SAMPLES
    # Flipout shares one perturbation per model run: many runs of few examples
    calls, per_call = (S // 10, 10) if estimator == "flipout" else (1, S)
    h, out = _tied_draws(form, w, x, estimator, calls, per_call)
    ws = fn.rsample((S,))
    h_ref, out_ref = TIED_REFERENCE[form](x, ws)
    # two-sample comparisons (fixed seed): means within Z standard errors, variances within 10% (the fourth
    # moments of these products of Gaussians are heavy), the covariance of h and out within Z standard errors
    var = out_ref.var(0)
    assert ((out.mean(0) - out_ref.mean(0)).abs() <= Z * (2 * var / S).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() <= 0.1).all()
    prod = (h[:, 0] - h[:, 0].mean()) * (out - out.mean(0)).T
    prod_ref = (h_ref[:, 0] - h_ref[:, 0].mean()) * (out_ref - out_ref.mean(0)).T
    se = (prod.var(1) / S + prod_ref.var(1) / S).sqrt()
    assert ((prod.mean(1) - prod_ref.mean(1)).abs() <= Z * se).all()
    # the reference is not blind to the bug: independent weights per use give another mean
    untied = _untied(form, x, fn, S)
    assert ((untied.mean(0) - out_ref.mean(0)).abs() > Z * (2 * var / S).sqrt()).any() or (
        (untied.var(0) / var - 1).abs() > 0.1
    ).any()


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
@pytest.mark.parametrize("noise", ["input", "output", "layer"])
def test_tied_correlated_weight_matches_explicit_weight_draws(noise, estimator):
    """Correlated noise (dropout "A") is shared by both uses of a tied weight, per example."""
    x = torch.randn(4)
    loc = torch.randn(4, 4) / 2
    la_shape = {"input": (1, 4), "output": (4, 1), "layer": (1, 1)}[noise]
    fn = CorrelatedVariationalDropoutNormal(loc, torch.full(la_shape, -0.5))
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator=estimator)
    S = NUM_SAMPLES
    _, out = _tied_draws("linear_then_transpose", w, x, estimator, 1, S)
    _, out_ref = TIED_REFERENCE["linear_then_transpose"](x, fn.rsample((S,)))
    var = out_ref.var(0)
    assert ((out.mean(0) - out_ref.mean(0)).abs() <= Z * (2 * var / S).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() <= 0.1).all()


def test_tied_lrt_weights_agree_with_the_first_output():
    """Matheron's rule: the per-example weights of a tied LRT weight reproduce the first use's output exactly."""
    from pyro_vdrop.poutine.lazy_ops import linear_lrt, linear_lrt_weights

    x = torch.randn(7, 5, dtype=torch.float64)
    loc = torch.randn(3, 5, dtype=torch.float64)
    scale = torch.rand(3, 5, dtype=torch.float64)
    noise = torch.randn(7, 3, dtype=torch.float64)
    out = linear_lrt(x, loc, scale**2, None, noise)
    ws = linear_lrt_weights(x, loc, scale, scale**2, noise)
    assert ws.shape == (7, 3, 5)
    assert torch.allclose(torch.einsum("ni,noi->no", x, ws), out, atol=1e-10)


TIED_ERRORS = {
    "conv_then_linear": (
        lambda w, x: F.linear(F.conv1d(torch.randn(4, 1, 12), w.reshape(1, 1, 9)).flatten(1)[:, :3], w),
        r"site 'w' is used twice in one model run, by 'conv1d' and then 'linear'",
    ),
    "other_batch_shape": (
        lambda w, x: F.linear(F.linear(x, w)[:2], w.t()),
        r"site 'w' is used twice in one model run, by 'linear' and then 'linear'.*batch shapes differ: \(4,\) and "
        r"\(2,\)",
    ),
    "reshaped": (
        lambda w, x: (F.linear(x.repeat(1, 3), w.reshape(1, 9)), F.linear(x, w)),
        r"site 'w' is used twice.*reshaped",
    ),
}


@pytest.mark.parametrize("case", ["conv_then_linear", "other_batch_shape"])
@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
def test_tied_weight_that_cannot_share_its_noise_raises(case, estimator):
    fn = VariationalDropoutNormal(torch.randn(3, 3), torch.full((3, 3), -1.0))
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator=estimator)
    w.start_run()
    use, message = TIED_ERRORS[case]
    with pytest.raises(LazyWeightError, match=message) as e:
        use(w, torch.randn(4, 3))
    assert "own site" in str(e.value) and "local_reparam(sites=[...])" in str(e.value)


def test_tied_weight_errors_for_reshapes_and_a_sample_after_noise():
    fn = VariationalDropoutNormal(torch.randn(3, 3), torch.full((3, 3), -1.0))
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator="lrt", fallback=True)
    w.start_run()
    with pytest.raises(LazyWeightError, match=TIED_ERRORS["reshaped"][1]):
        TIED_ERRORS["reshaped"][0](w, torch.randn(4, 3))
    # fallback=True: an ordinary sample after a noisy use could not agree with that use
    w.start_run()
    F.linear(torch.randn(4, 3), w)
    with pytest.raises(LazyWeightError, match=r"by 'linear' and then 'abs'.*ordinary weight sample"):
        w.abs()
    # the other order is consistent: once sampled, every use sees that sample
    w.start_run()
    a = w.abs()
    x = torch.randn(4, 3)
    assert torch.equal(F.linear(x, w), F.linear(x, w.materialize()))
    assert torch.equal(a, w.materialize().abs())


def test_uses_outside_a_model_run_stay_independent():
    """Without ``start_run`` (a weight used outside the handler's model run) every call draws afresh."""
    fn = VariationalDropoutNormal(torch.randn(3, 3), torch.full((3, 3), -1.0))
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator="lrt")
    x = torch.randn(4, 3)
    assert not torch.equal(F.linear(x, w), F.linear(x, w))
    F.linear(torch.randn(2, 4, 3), w)  # another batch shape: no error


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_flipout_variance_of_a_minibatch_mean_falls_as_one_over_m(op):
    """
    Flipout's point: with per-example signs the outputs of M examples are uncorrelated, so the variance of
    their mean is 1/M of one output's, even for M copies of one input (one shared perturbation without the
    signs would give correlation 1 and no reduction). Checked for linear layers and convolutions.
    """
    M, calls = 8, 2000
    if op == "linear":
        x, loc = torch.randn(1, 5).expand(M, 5), torch.randn(3, 5)
        f = F.linear
    else:
        x, loc = torch.randn(1, 2, 5, 5).expand(M, 2, 5, 5), torch.randn(3, 2, 3, 3)
        f = F.conv2d
    fn, w = _lazy(loc, torch.full(loc.shape, -0.5), "flipout")
    out = torch.stack([f(x, w) for _ in range(calls)])  # (calls, M, ...)
    ratio = out.mean(1).var(0) * M / out.var((0, 1))  # 1 for uncorrelated examples, M for a shared perturbation
    # the sample variance of `calls` draws has relative standard error sqrt(2 / calls) ~ 3.2%
    assert (ratio - 1).abs().max() < Z * (2 / calls) ** 0.5 * 1.5
