# SPDX-License-Identifier: Apache-2.0
"""Group noise under the local reparameterization: structured Bayesian pruning's log-normal noise and group VD."""

import pytest
import torch
import torch.nn.functional as F

from pyro_vdrop.distributions import GroupVariationalDropoutNormal, TruncatedLogNormalDropout
from pyro_vdrop.poutine import LazyWeight

from .test_lazy_weight import _explicit_conv

NUM_SAMPLES = 20000
Z = 4.5  # Monte Carlo tolerance in standard errors (seed 0 from conftest)


def _check_moments(samples, mean, var):
    """i.i.d. ``samples`` (leading dim: draws) against closed-form moments; the variance's standard error from the
    samples' fourth moment (log-normal noise is far from Gaussian)."""
    S = samples.shape[0]
    assert ((samples.mean(0) - mean).abs() <= Z * (var / S).sqrt()).all()
    fourth = ((samples - samples.mean(0)) ** 4).mean(0)
    se_var = ((fourth - samples.var(0) ** 2).clamp(min=0) / S).sqrt()
    assert ((samples.var(0) - var).abs() <= Z * se_var + 1e-12).all()


def _sbp(loc, shape):
    torch.manual_seed(1)
    noise_loc = -0.3 - torch.rand(shape, dtype=loc.dtype)
    noise_scale = 0.2 + 0.6 * torch.rand(shape, dtype=loc.dtype)
    return TruncatedLogNormalDropout(loc, noise_loc, noise_scale, -20.0, 0.0)


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
@pytest.mark.parametrize("noise", ["input", "output"])
def test_sbp_linear_matches_closed_form_and_explicit_sampling(noise, estimator):
    x = torch.randn(3, 5, dtype=torch.float64)
    loc = torch.randn(4, 5, dtype=torch.float64)
    fn = _sbp(loc, {"input": (1, 5), "output": (4, 1)}[noise])
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator=estimator)
    assert w.is_correlated
    S = NUM_SAMPLES
    out = F.linear(x.expand(S, 3, 5), w)  # the noise is drawn per example
    explicit = torch.einsum("mi,soi->smo", x, fn.rsample((S,)))
    mean_s, var_s = fn.noise.mean, fn.noise.variance
    if noise == "input":  # y_o = Σ_i θ_oi x_i s_i: independent terms
        mean, var = F.linear(x * mean_s, loc), F.linear(x**2 * var_s, loc**2)
    else:  # y_o = s_o Σ_i θ_oi x_i
        mean, var = mean_s[:, 0] * F.linear(x, loc), var_s[:, 0] * F.linear(x, loc) ** 2
    _check_moments(out, mean, var)
    _check_moments(explicit, mean, var)
    # two outputs of one example share the input noise
    for samples in (out, explicit):
        c = samples[:, 0, :2] - samples[:, 0, :2].mean(0)
        cov = (c[:, 0] * c[:, 1]).mean()
        expected = (x[0] ** 2 * var_s[0] * loc[0] * loc[1]).sum() if noise == "input" else torch.tensor(0.0)
        scale = (c[:, 0] ** 2 * c[:, 1] ** 2).mean().sqrt()
        assert (cov - expected).abs() <= Z * scale / S**0.5


def test_sbp_tied_weight_shares_its_noise():
    # a weight used twice in one model run (W, then W.t()) is one weight per example: the same noise s in both
    x = torch.randn(6, 5, dtype=torch.float64)
    loc = torch.randn(4, 5, dtype=torch.float64)
    fn = _sbp(loc, (1, 5))
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator="lrt")
    w.start_run()
    first = F.linear(x, w)  # (x ⊙ s) θᵀ
    second = F.linear(first, w.t())  # first (θ ⊙ s) = (first θ) ⊙ s
    s = second / (first @ loc)  # the noise of the second use, per example and input unit
    assert ((s > 0) & (s <= 1)).all()
    assert torch.allclose(first, F.linear(x * s, loc), rtol=1e-9, atol=1e-9)  # the first use had the same noise
    assert not torch.allclose(s[0], s[1])  # and it differs between examples


@pytest.mark.parametrize("noise", ["input", "output"])
def test_sbp_conv_matches_explicit_sampling(noise):
    x = torch.randn(4, 6, 6, dtype=torch.float64)
    loc = torch.randn(6, 2, 3, 3, dtype=torch.float64)  # groups=2
    fn = _sbp(loc, {"input": (1, 2, 1, 1), "output": (6, 1, 1, 1)}[noise])
    w = LazyWeight.from_distribution(fn.to_event(4), site="w", estimator="lrt")
    S = NUM_SAMPLES // 4
    kw = dict(padding=1, groups=2)
    bias = torch.zeros(6, dtype=torch.float64)
    out = F.conv2d(x.expand(S, *x.shape), w, bias, **kw)
    explicit = _explicit_conv(2, x, fn.rsample((S,)), bias, **kw)
    var = explicit.var(0)
    assert ((out.mean(0) - explicit.mean(0)).abs() <= Z * (2 * var / S).sqrt() + 1e-12).all()
    # the means against the closed form: the conv of x with θ E[s]
    mean = F.conv2d(x, loc * fn.noise.mean, bias, **kw)
    assert ((out.mean(0) - mean).abs() <= Z * (var / S).sqrt() + 1e-12).all()
    a, b = out[:, 0, 2, 2], out[:, 0, 2, 3]
    ea, eb = explicit[:, 0, 2, 2], explicit[:, 0, 2, 3]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1] - torch.corrcoef(torch.stack([ea, eb]))[0, 1]) < 0.05


def test_group_vd_is_gaussian_dropout_on_the_units():
    # group VD samples like variational dropout A: N(1, α_g) on the input units, per example
    x = torch.randn(3, 5, dtype=torch.float64)
    loc = torch.randn(4, 5, dtype=torch.float64)
    log_alpha = torch.linspace(-2, 1, 5, dtype=torch.float64).reshape(1, 5)
    fn = GroupVariationalDropoutNormal(loc, log_alpha)
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator="lrt")
    S = NUM_SAMPLES
    out = F.linear(x.expand(S, 3, 5), w)
    _check_moments(out, F.linear(x, loc), F.linear(x**2 * log_alpha.exp(), loc**2))


@pytest.mark.parametrize("noise", ["input", "output"])
def test_sbp_conv_transpose_matches_closed_form(noise):
    # conv_transpose1d: weight (in, out, k); the noise per input channel multiplies x, per output channel the output
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    loc = torch.randn(4, 2, 3, dtype=torch.float64)
    fn = _sbp(loc, {"input": (4, 1, 1), "output": (1, 2, 1)}[noise])
    w = LazyWeight.from_distribution(fn.to_event(3), site="w", estimator="lrt")
    S = NUM_SAMPLES
    out = F.conv_transpose1d(x.expand(S, 3, 4, 5).reshape(S * 3, 4, 5), w).reshape(S, 3, 2, -1)
    mean_s, var_s = fn.noise.mean, fn.noise.variance
    if noise == "input":  # y = Σ_i s_i convᵀ(x_i, θ_i): one noise per input channel, independent terms
        per_channel = torch.stack([F.conv_transpose1d(x[:, i : i + 1], loc[i : i + 1]) for i in range(4)])
        mean = (per_channel * mean_s[:, 0, :, None, None]).sum(0)
        var = (per_channel**2 * var_s[:, 0, :, None, None]).sum(0)
    else:
        mean = F.conv_transpose1d(x, loc) * mean_s[0]
        var = F.conv_transpose1d(x, loc) ** 2 * var_s[0]
    _check_moments(out, mean, var)


def test_sbp_embedding_per_column_matches_closed_form_and_per_row_raises():
    from pyro_vdrop.poutine import LazyWeightError

    idx = torch.tensor([[0, 2, 2], [1, 3, 0]])
    loc = torch.randn(4, 3, dtype=torch.float64)
    fn = _sbp(loc, (1, 3))  # one noise per column (embedding dimension), per example
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator="lrt")
    S = NUM_SAMPLES
    out = torch.stack([F.embedding(idx, w) for _ in range(2000)])
    mean, var = F.embedding(idx, loc) * fn.noise.mean[0], F.embedding(idx, loc) ** 2 * fn.noise.variance[0]
    _check_moments(out, mean, var)
    assert torch.equal(out[:, 0, 1], out[:, 0, 2])  # a row looked up twice by an example is one draw
    del S
    rows = LazyWeight.from_distribution(_sbp(loc, (4, 1)).to_event(2), site="w", estimator="lrt")
    with pytest.raises((LazyWeightError, NotImplementedError), match="row"):
        F.embedding(idx, rows)


def test_sbp_noise_in_the_recurrent_loop_is_log_normal_and_shared_over_time():
    from pyro_vdrop.poutine import PerSequenceWeight

    loc = torch.randn(4, 5, dtype=torch.float64)
    fn = _sbp(loc, (1, 5))
    x = torch.randn(5, dtype=torch.float64).expand(NUM_SAMPLES, 2, 5)  # (sequences, time, in): same input twice
    w = LazyWeight.from_distribution(fn.to_event(2), site="w", estimator="flipout")
    out = PerSequenceWeight(w, (NUM_SAMPLES,)).linear(x)
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=1e-12, atol=1e-12)  # one noise per sequence, all steps
    mean = F.linear(x[0, 0] * fn.noise.mean[0], loc)
    var = F.linear(x[0, 0] ** 2 * fn.noise.variance[0], loc**2)
    _check_moments(out[:, 0], mean, var)
