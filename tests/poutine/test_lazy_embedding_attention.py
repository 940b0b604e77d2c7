# SPDX-License-Identifier: Apache-2.0
"""
Statistical tests of the lazy weight in embeddings, slices of a weight, transposed convolutions and multi-head
attention: moments against closed forms and Monte Carlo over explicit weight draws.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyro_vdrop.distributions import CorrelatedVariationalDropoutNormal, VariationalDropoutNormal
from pyro_vdrop.poutine import LazyWeight, LazyWeightError

S = 20000
# Monte Carlo tolerances (fixed seed 0 from conftest): means within Z standard errors; a variance of S normal draws
# has relative standard error sqrt(2 / S) ~ 1%; a sample correlation has standard error <= 1 / sqrt(S).
Z = 4.5


def _lazy(fn, estimator, site="w"):
    return LazyWeight.from_distribution(fn.to_event(len(fn.batch_shape)), site=site, estimator=estimator)


def _vd(shape, dtype=torch.float32):
    return VariationalDropoutNormal(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) - 1)


def _compare(draws, reference):
    """
    Two-sample comparison of i.i.d. draws (leading dim) of the same shape: the means and the covariance of every
    pair of entries (the joint law's first and second moments), each within Z standard errors estimated from the
    draws themselves (so also for the heavier tails of products of Gaussians).
    """
    a, b = draws.reshape(draws.shape[0], -1), reference.reshape(reference.shape[0], -1)
    n, m = a.shape[0], b.shape[0]
    assert ((a.mean(0) - b.mean(0)).abs() <= Z * (a.var(0) / n + b.var(0) / m).sqrt()).all()
    ca, cb = a - a.mean(0), b - b.mean(0)
    pa, pb = ca[:, :, None] * ca[:, None, :], cb[:, :, None] * cb[:, None, :]
    diff = (pa.mean(0) - pb.mean(0)).abs()
    assert (diff <= Z * (pa.var(0) / n + pb.var(0) / m).sqrt() + 1e-12).all(), diff.max()


# ----- embedding -----

# two examples (dim 0) with a row looked up twice by the same example and a row shared between examples
INDICES = torch.tensor([[1, 3, 1, 0], [3, 2, 2, 4]])


def _explicit_embedding(fn, indices, draws):
    """``draws`` runs of F.embedding with one explicit weight sample per example (dim 0 of ``indices``)."""
    ws = fn.rsample((draws, indices.shape[0]))  # (draws, examples, rows, dim)
    rows = indices.reshape(1, *indices.shape, 1).expand(draws, *indices.shape, ws.shape[-1])
    return torch.gather(ws, 2, rows)


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
def test_embedding_matches_a_weight_per_example(estimator):
    """
    Each example's looked-up rows are its own draw: the joint law of all lookups (a row looked up twice by one
    example is the same value, correlation 1; other pairs are uncorrelated) matches explicit weight draws.
    """
    fn = _vd((5, 3))
    w = _lazy(fn, estimator)
    if estimator == "flipout":  # one perturbation per call: calls are the i.i.d. draws
        out = torch.stack([F.embedding(INDICES, w) for _ in range(S)])
    else:  # examples are independent: S copies of the batch in one call
        out = F.embedding(INDICES.repeat(S, 1), w).reshape(S, *INDICES.shape, 3)
    assert out.shape == (S, 2, 4, 3) and type(out) is torch.Tensor
    assert torch.equal(out[:, 0, 0], out[:, 0, 2]) and torch.equal(out[:, 1, 1], out[:, 1, 2])
    reference = _explicit_embedding(fn, INDICES, S)
    _compare(out, reference)
    # the reference is not blind to the point: independent draws per lookup lose the correlation of 1
    assert torch.corrcoef(torch.stack([reference[:, 0, 0, 0], reference[:, 0, 2, 0]]))[0, 1] > 0.999
    # closed form of the marginals
    mean, var = F.embedding(INDICES, fn.loc), F.embedding(INDICES, fn.variance)
    assert ((out.mean(0) - mean).abs() <= Z * (var / S).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() <= Z * (2 / S) ** 0.5).all()


@pytest.mark.parametrize("noise", ["row", "column", "layer"])
def test_correlated_embedding_matches_a_weight_per_example(noise):
    loc = torch.randn(5, 3)
    shape = {"row": (5, 1), "column": (1, 3), "layer": (1, 1)}[noise]
    fn = CorrelatedVariationalDropoutNormal(loc, torch.rand(shape) - 1.5)
    w = _lazy(fn, "lrt")
    out = F.embedding(INDICES.repeat(S, 1), w).reshape(S, *INDICES.shape, 3)
    _compare(out, _explicit_embedding(fn, INDICES, S))


@pytest.mark.parametrize("shape", [(6,), (), (2, 2, 3)])
def test_embedding_examples_are_dim_0(shape):
    """A 1-dim index tensor is a batch of single lookups (independent even for the same row); dim 0 otherwise."""
    fn = _vd((4, 2))
    w = _lazy(fn, "lrt")
    indices = torch.zeros(shape, dtype=torch.long)
    out = F.embedding(indices, w)
    assert out.shape == shape + (2,)
    flat = out.reshape(-1, 2) if len(shape) < 2 else out.reshape(shape[0], -1, 2)
    if len(shape) == 1:
        assert not torch.equal(flat[0], flat[1])
    elif len(shape) > 1:  # one example looks up row 0 everywhere: one draw
        assert all(torch.equal(flat[n, 0], flat[n, i]) for n in range(shape[0]) for i in range(flat.shape[1]))
        assert not torch.equal(flat[0, 0], flat[1, 0])


def test_embedding_mean_padding_and_errors():
    loc = torch.randn(5, 3, requires_grad=True)
    fn = VariationalDropoutNormal(loc, torch.full((5, 3), -1.0))
    w = _lazy(fn, "mean")
    assert torch.equal(F.embedding(INDICES, w), F.embedding(INDICES, loc.detach()))
    assert torch.equal(nn.functional.embedding(INDICES.int(), w), F.embedding(INDICES, loc.detach()))
    w = _lazy(fn, "lrt")
    F.embedding(INDICES, w, padding_idx=3).sum().backward()
    assert (loc.grad[3] == 0).all() and (loc.grad[1] != 0).all()  # no gradient from the padding row, as in torch
    for kwargs, message in [
        (dict(max_norm=1.0), "max_norm"),
        (dict(scale_grad_by_freq=True), "scale_grad_by_freq"),
        (dict(sparse=True), "sparse"),
    ]:
        with pytest.raises(LazyWeightError, match=rf"site 'w'.*'embedding'.*{message}"):
            F.embedding(INDICES, w, **kwargs)
    with pytest.raises(LazyWeightError, match="embedding_bag"):
        F.embedding_bag(INDICES, w)


def test_embedding_tied_use_raises():
    w = _lazy(_vd((5, 3)), "lrt")
    w.start_run()
    F.embedding(INDICES, w)
    with pytest.raises(LazyWeightError, match=r"used twice in one model run, by 'embedding' and then 'linear'"):
        F.linear(torch.randn(2, 3), w)  # an output layer tied to the embedding


# ----- slices of a weight -----

VIEWS = {
    "columns": lambda w: w[:, :3],
    "rows": lambda w: w[2:5],
    "step": lambda w: w[::2, 1:],
    "chunk": lambda w: w.chunk(3)[1],
    "torch.chunk": lambda w: torch.chunk(w, 2, dim=1)[0],
    "split": lambda w: w.split([2, 4])[1],
    "torch.split": lambda w: torch.split(w, 2)[2],
    "narrow": lambda w: w.narrow(1, 1, 3),
    "index_select": lambda w: w.index_select(0, torch.tensor([4, 0, 2])),
    "advanced": lambda w: w[[5, 1]],
    "mask": lambda w: w[torch.tensor([True, False, True, True, False, False])],
    "slice_of_transpose": lambda w: w.t()[:3],
    "unbind": lambda w: w.unbind(0)[2][None],
}


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
@pytest.mark.parametrize("view", sorted(VIEWS))
def test_linear_of_a_view_matches_monte_carlo(view, estimator):
    fn = _vd((6, 5), torch.float64)
    w = _lazy(fn, estimator)
    v = VIEWS[view](w)
    assert isinstance(v, LazyWeight) and v.shape == VIEWS[view](fn.loc).shape
    x = torch.randn(v.shape[1], dtype=torch.float64)
    if estimator == "flipout":
        out = torch.stack([F.linear(x.expand(4, -1), v)[0] for _ in range(S // 4)])
    else:
        out = F.linear(x.expand(S, -1), v)
    ws = fn.rsample((S,))
    reference = torch.stack([F.linear(x, VIEWS[view](ws[s])) for s in range(0, S, 4)])
    _compare(out, reference)
    # closed form
    mean, var = F.linear(x, VIEWS[view](fn.loc)), F.linear(x**2, VIEWS[view](fn.variance))
    n = out.shape[0]
    assert ((out.mean(0) - mean).abs() <= Z * (var / n).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() <= Z * (2 / n) ** 0.5).all()


def test_views_that_repeat_elements_or_share_correlated_noise_raise():
    w = _lazy(_vd((6, 5)), "lrt")
    with pytest.raises(LazyWeightError, match="picks an element twice"):
        w[[0, 0]]
    with pytest.raises(LazyWeightError, match="picks a slice twice"):
        w.index_select(1, torch.tensor([1, 1]))
    wc = _lazy(CorrelatedVariationalDropoutNormal(torch.randn(6, 5), torch.full((1, 5), -1.0)), "lrt")
    with pytest.raises(LazyWeightError, match="correlated noise"):
        wc[:3]


def test_disjoint_slices_in_one_run_are_independent_and_overlaps_raise():
    fn = _vd((6, 5))
    w = _lazy(fn, "lrt")
    x = torch.randn(5).expand(S, 5)  # one input: any correlation would come from the weights
    w.start_run()
    a, b = F.linear(x, w[:3]), F.linear(x, w[3:])  # disjoint: no error
    assert abs(torch.corrcoef(torch.stack([a[:, 0], b[:, 0]]))[0, 1]) < Z / S**0.5
    w.start_run()
    F.linear(x, w[:4])
    with pytest.raises(LazyWeightError, match=r"by 'linear' and then 'linear'.*partly overlapping"):
        F.linear(x, w[2:])


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
def test_a_slice_used_twice_is_one_weight(estimator):
    """A slice used by two ops in one model run (here w[:3] and its transpose) shares the slice's noise."""
    fn = VariationalDropoutNormal(torch.randn(6, 4) / 2, torch.zeros(6, 4))  # alpha = 1: tying matters
    w = _lazy(fn, estimator)
    x = torch.randn(4)
    calls, per_call = (S // 10, 10) if estimator == "flipout" else (1, S)
    outs = []
    for _ in range(calls):
        w.start_run()
        h = F.linear(x.expand(per_call, 4), w[:3])
        outs.append(F.linear(h, w[:3].t()))
    out = torch.cat(outs)
    ws = fn.rsample((S,))[:, :3]
    reference = torch.einsum("soi,so->si", ws, torch.einsum("soi,i->so", ws, x))
    var = reference.var(0)
    assert ((out.mean(0) - reference.mean(0)).abs() <= Z * (2 * var / S).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() <= 0.1).all()  # heavy fourth moments: 10%, as for tied weights


# ----- transposed convolutions -----

CONV_T_CASES = [
    # nd, in_channels, out_channels, kernel, options
    (1, 3, 4, 3, dict()),
    (1, 4, 6, 2, dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1)),
    (2, 3, 2, 3, dict(stride=2, output_padding=1)),
    (2, 4, 4, (2, 3), dict(stride=(2, 1), padding=(1, 0), groups=4, dilation=2)),
    (3, 2, 4, 2, dict(stride=1, padding=1, groups=2)),
]


def _conv_t(nd):
    return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]


def _explicit_conv_t(nd, x, ws, groups=1, **kw):
    """Transposed convolutions of ``x`` (C, *spatial) with ``n`` separate weights ``ws`` (n, C, O/g, *k)."""
    n, cin = ws.shape[:2]
    inp = x.expand(n, *x.shape).reshape(1, n * cin, *x.shape[1:])
    out = _conv_t(nd)(inp, ws.reshape(n * cin, *ws.shape[2:]), None, groups=n * groups, **kw)
    return out.reshape(n, -1, *out.shape[2:])


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
@pytest.mark.parametrize("case", CONV_T_CASES, ids=str)
def test_conv_transpose_moments(case, estimator):
    nd, cin, cout, k, kw = case
    k = (k,) * nd if isinstance(k, int) else k
    groups = kw.get("groups", 1)
    x = torch.randn((cin,) + ((4,) * nd if nd < 3 else (2, 2, 2)), dtype=torch.float64)
    fn = _vd((cin, cout // groups) + k, torch.float64)
    w = _lazy(fn, estimator)
    bias = torch.randn(cout, dtype=torch.float64)
    n = S // 4
    if estimator == "flipout":
        out = torch.stack([_conv_t(nd)(x.expand(2, *x.shape), w, bias, **kw)[0] for _ in range(n)])
    else:
        out = _conv_t(nd)(x.expand(n, *x.shape), w, bias, **kw)
    mean = _conv_t(nd)(x[None], fn.loc, bias, **kw)[0]
    var = _conv_t(nd)(x[None] ** 2, fn.variance, None, **kw)[0]
    assert out.shape == (n,) + mean.shape
    # explicit weight draws reproduce the closed form (checks the stride/padding/groups/dilation maths)
    explicit = _explicit_conv_t(nd, x, fn.rsample((n,)), **kw) + bias.reshape((cout,) + (1,) * nd)
    noisy = var > 0  # output_padding adds positions that only the bias reaches
    for draws in (out, explicit):
        assert ((draws.mean(0) - mean).abs() <= Z * (var / n).sqrt() + 1e-9).all()
        assert ((draws.var(0)[noisy] / var[noisy] - 1).abs() <= Z * (2 / n) ** 0.5).all()
        assert (draws.var(0)[~noisy] < 1e-20).all()


@pytest.mark.parametrize("noise", ["input", "output", "layer"])
def test_correlated_conv_transpose_matches_explicit_sampling(noise):
    x = torch.randn(4, 3, 3)
    loc = torch.randn(4, 3, 2, 2)  # groups=2: 4 in, 6 out
    shape = {"input": (4, 1, 1, 1), "output": (1, 3, 1, 1), "layer": (1, 1, 1, 1)}[noise]
    fn = CorrelatedVariationalDropoutNormal(loc, torch.rand(shape) - 1.5)
    w = _lazy(fn, "lrt")
    n = S // 4
    kw = dict(stride=2, groups=2)
    out = F.conv_transpose2d(x.expand(n, *x.shape), w, None, **kw)
    explicit = _explicit_conv_t(2, x, fn.rsample((n,)), **kw)
    _compare(out[:, :, :2, :2], explicit[:, :, :2, :2])


def test_conv_transpose_unbatched_positional_and_mean():
    fn = _vd((3, 2, 3))
    x = torch.randn(3, 5)
    w = _lazy(fn, "mean")
    out = F.conv_transpose1d(x, w, None, 2, 1, 1, 1, 1)  # the positional form nn.ConvTranspose1d uses
    torch.testing.assert_close(out, F.conv_transpose1d(x, fn.loc, None, 2, 1, 1, 1, 1))


# ----- multi-head attention -----


def _mha(kdim=None, vdim=None, **kwargs):
    torch.manual_seed(1)
    return nn.MultiheadAttention(8, 2, kdim=kdim, vdim=vdim, **kwargs).double()


def _lazy_weights(m, estimator, log_alpha=-1.0):
    """Lazy weights for the projections of ``m`` (its own weights as the means) and their distributions."""
    names = [
        n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight") if getattr(m, n) is not None
    ]
    fns = {
        n: VariationalDropoutNormal(getattr(m, n).detach(), torch.full_like(getattr(m, n), log_alpha)) for n in names
    }
    fns["out_proj.weight"] = VariationalDropoutNormal(
        m.out_proj.weight.detach(), torch.full((8, 8), log_alpha).double()
    )
    return {n: _lazy(fn, estimator, site=n) for n, fn in fns.items()}, fns


def _call(m, weights, q, k, v, **kwargs):
    """``F.multi_head_attention_forward`` as ``nn.MultiheadAttention`` calls it, with the given weights."""
    separate = not m._qkv_same_embed_dim
    return F.multi_head_attention_forward(
        q,
        k,
        v,
        8,
        2,
        weights.get("in_proj_weight"),
        m.in_proj_bias,
        m.bias_k,
        m.bias_v,
        m.add_zero_attn,
        0.0,
        weights["out_proj.weight"],
        m.out_proj.bias,
        training=True,
        use_separate_proj_weight=separate,
        q_proj_weight=weights.get("q_proj_weight"),
        k_proj_weight=weights.get("k_proj_weight"),
        v_proj_weight=weights.get("v_proj_weight"),
        **kwargs,
    )


ATTENTION_CASES = {
    # name: (module options, inputs (query, key, value) from a source x (L, N, 8) and a target y (T, N, 8))
    "self": (dict(), lambda x, y: (x, x, x)),
    "cross_kv_shared": (dict(), lambda x, y: (y, x, x)),
    "cross_all_different": (dict(), lambda x, y: (y, x, x + 1)),
    "separate_kdim_vdim": (dict(kdim=3, vdim=5), lambda x, y: (y, x[..., :3], x[..., 3:])),
    "bias_kv_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), lambda x, y: (x, x, x)),
    "unbatched": (dict(), lambda x, y: (x[:, 0], x[:, 0], x[:, 0])),
}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_with_the_mean_estimator_is_torch_attention(case, need_weights):
    """Wiring: with no noise, attention with lazy projections is nn.MultiheadAttention with the means."""
    options, inputs = ATTENTION_CASES[case]
    m = _mha(**options)
    x, y = torch.randn(4, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    q, k, v = inputs(x, y)
    mask = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    mask[0, -1] = True
    weights, _ = _lazy_weights(m, "mean")
    for kwargs in (dict(), dict(attn_mask=mask)):
        out, attn = _call(m, weights, q, k, v, need_weights=need_weights, **kwargs)
        ref, ref_attn = m(q, k, v, need_weights=need_weights, **kwargs)
        torch.testing.assert_close(out, ref)
        assert (attn is None) == (ref_attn is None)
        if attn is not None:
            torch.testing.assert_close(attn, ref_attn)


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
@pytest.mark.parametrize("case", ["self", "cross_kv_shared", "separate_kdim_vdim"])
def test_attention_moments_match_monte_carlo(case, estimator):
    """
    With one token per sequence (source and target length 1: the attention weight is 1, so per-token noise and
    a weight per sequence are the same model) the output of attention with lazy weights has the law of
    nn.MultiheadAttention with explicitly sampled weights: out = W_o (W_v v + b_v) + b_o, a product of Gaussians.
    """
    options, inputs = ATTENTION_CASES[case]
    m = _mha(**options)
    x, y = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)
    q, k, v = inputs(x, y)
    weights, fns = _lazy_weights(m, estimator)
    n = S // 10
    if estimator == "flipout":  # one perturbation per call
        out = torch.cat([_call(m, weights, *(t.expand(1, 4, -1) for t in (q, k, v)))[0][0, :1] for _ in range(n)])
    else:
        out = _call(m, weights, *(t.expand(1, n, -1) for t in (q, k, v)))[0][0]
    reference = []
    for _ in range(n):
        params = {name: fn.rsample() for name, fn in fns.items()}
        reference.append(_call(m, params, q, k, v)[0][0, 0])
    _compare(out, torch.stack(reference))


def test_attention_rejects_lazy_inputs():
    m = _mha()
    weights, _ = _lazy_weights(m, "lrt")
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    lazy_key = _lazy(_vd((4, 3, 8)), "lrt", site="k")
    with pytest.raises(LazyWeightError, match="a lazy key"):
        _call(m, weights, x, lazy_key, x)
