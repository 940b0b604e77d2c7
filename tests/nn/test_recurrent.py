# SPDX-License-Identifier: Apache-2.0
import copy
import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroSample
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import pyro_vdrop as vd
from pyro_vdrop.distributions import CorrelatedVariationalDropoutNormal, ImproperLogUniform, VariationalDropoutNormal
from pyro_vdrop.poutine import LazyWeightError

TORCH = {vd.nn.LSTM: nn.LSTM, vd.nn.GRU: nn.GRU, vd.nn.RNN: nn.RNN}


def _random_sites(rnn, random_bias=False):
    """Gives the recurrent layer ``rnn`` log-uniform priors on its weights (and biases); returns the site names."""
    names = [n for n in rnn._flat_weights_names if n.startswith("weight_") or (random_bias and n.startswith("bias_"))]
    for name in names:
        value = getattr(rnn, name)
        setattr(rnn, name, PyroSample(ImproperLogUniform().expand(value.shape).to_event(value.dim())))
    return names


def _posterior(loc, log_alpha, noise):
    if noise == "correlated" and loc.dim() == 2:  # noise per input unit (Gaussian dropout on the gate inputs)
        return CorrelatedVariationalDropoutNormal(loc, torch.full((1, loc.shape[1]), log_alpha))
    return VariationalDropoutNormal(loc, torch.full_like(loc, log_alpha))


def _guide_for(values, log_alpha, noise):
    def guide(*args):
        for name, loc in values.items():
            pyro.sample(name, _posterior(loc, log_alpha, noise).to_event(loc.dim()))

    return guide


def _run(model, guide, x, estimator, *args):
    with vd.poutine.local_reparam(estimator=estimator):
        guide_trace = poutine.trace(guide).get_trace()
        return poutine.replay(model, trace=guide_trace)(x, *args)


def _states(hidden):
    return hidden if isinstance(hidden, tuple) else (hidden,)


@pytest.mark.parametrize("cls", [vd.nn.LSTM, vd.nn.GRU, vd.nn.RNN])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_loop_under_mean_estimator_matches_torch(cls, num_layers, bidirectional, batch_first, bias):
    # the Python recurrence (under local_reparam) against torch's fused kernel, with the same weights
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    torch_rnn = TORCH[cls](3, 4, **kwargs)
    rnn = cls(3, 4, **kwargs)
    rnn.load_state_dict(torch_rnn.state_dict())
    names = _random_sites(rnn)
    guide = _guide_for({n: torch_rnn.get_parameter(n).detach() for n in names}, -1.0, "independent")
    x = torch.randn(5, 6, 3)
    D = 2 if bidirectional else 1
    hx = torch.randn(num_layers * D, 6 if not batch_first else 5, 4)
    hx = (hx, torch.randn_like(hx)) if cls is vd.nn.LSTM else hx
    for args in [(x,), (x, hx), (x[0],)]:  # default state, given state, unbatched
        expected = torch_rnn(*args)
        actual = _run(rnn, guide, *args, "mean") if len(args) == 1 else _run(rnn, guide, args[0], "mean", args[1])
        assert actual[0].shape == expected[0].shape and torch.allclose(actual[0], expected[0], atol=1e-6)
        for a, e in zip(_states(actual[1]), _states(expected[1])):
            assert a.shape == e.shape and torch.allclose(a, e, atol=1e-6)


def test_fused_kernel_with_plain_weights_and_sampled_weights():
    # no handler: one weight sample shared by the batch, run by torch's kernel
    rnn = vd.nn.GRU(3, 4, batch_first=True)
    rnn.weight_ih_l0 = PyroSample(dist.Normal(0.0, 1.0).expand([12, 3]).to_event(2))
    x = torch.randn(1, 5, 3).expand(8, 5, 3)
    trace = poutine.trace(rnn).get_trace(x)
    out = trace.nodes["_RETURN"]["value"][0]
    assert torch.allclose(out, out[:1].expand_as(out))  # identical sequences, one weight: identical outputs
    torch_rnn = nn.GRU(3, 4, batch_first=True)
    state = {k: v for k, v in rnn.state_dict().items()}
    state["weight_ih_l0"] = trace.nodes["weight_ih_l0"]["value"]
    torch_rnn.load_state_dict(state)
    assert torch.allclose(out, torch_rnn(x)[0], atol=1e-6)


# ----- Pyro's PyroSample idiom with the improper prior -----


class _GRUClassifier(PyroModule):
    def __init__(self, gru):
        super().__init__()
        self.gru = gru
        for name, p in list(self.gru.named_parameters()):
            if name.startswith("weight"):
                setattr(self.gru, name, PyroSample(ImproperLogUniform().expand(p.shape).to_event(2)))
        self.out = PyroModule[nn.Linear](4, 2)

    def forward(self, x, y=None):
        logits = self.out(self.gru(x)[0][:, -1])
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


@pytest.mark.parametrize("make", ["class", "convert"])
def test_pyro_sample_gru_idiom_builds_and_trains(make):
    if make == "class":
        gru = vd.nn.GRU(3, 4, num_layers=2, batch_first=True)
    else:
        gru = vd.nn.to_bayesian_recurrent_(PyroModule[nn.GRU](3, 4, num_layers=2, batch_first=True))
    model = _GRUClassifier(gru)
    assert sorted(model.gru._pyro_samples) == ["weight_hh_l0", "weight_hh_l1", "weight_ih_l0", "weight_ih_l1"]
    model.double().float()  # moving the module reads no weight
    model = copy.deepcopy(model)
    assert type(model.gru) is vd.nn.GRU
    x = torch.randn(16, 5, 3)
    y = (x[:, :, 0].sum(1) > 0).long()
    guide = vd.infer.AutoVariationalDropout(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for estimator in [None, "flipout"]:
        with vd.poutine.estimator_handler(estimator or "single-sample"):
            loss = svi.step(x, y)
        assert torch.isfinite(torch.tensor(loss))
    assert set(guide.log_alpha()) == {f"gru.{n}" for n in model.gru._pyro_samples}


def test_pyro_module_gru_with_improper_prior_says_what_to_use():
    # Pyro's PyroModule[nn.GRU] samples every weight's prior when the next one is set: the error points to vd.nn.GRU
    with pytest.raises(NotImplementedError, match=r"pyro_vdrop\.nn\.LSTM/GRU/RNN"):
        _GRUClassifier(PyroModule[nn.GRU](3, 4, batch_first=True))


def test_recurrent_layer_pickles_as_its_class():
    rnn = vd.nn.LSTM(3, 4)
    _random_sites(rnn)
    buffer = io.BytesIO()
    torch.save(rnn.state_dict(), buffer)
    clone = copy.deepcopy(rnn)
    assert type(clone) is vd.nn.LSTM and sorted(clone._pyro_samples) == sorted(rnn._pyro_samples)


# ----- per-sequence noise: Monte Carlo over explicit weight draws -----

T, IN, H = 4, 2, 3
NUM_DRAWS = 4000
BATCH = 40


def _reference_outputs(torch_rnn, x0, draws):
    """The outputs of torch's kernel on the one sequence ``x0`` for every explicit weight draw (one per sequence)."""
    outs = []
    state = torch_rnn.state_dict()
    for k in range(NUM_DRAWS):
        torch_rnn.load_state_dict({**state, **{n: v[k] for n, v in draws.items()}})
        outs.append(torch_rnn(x0)[0][0])
    torch_rnn.load_state_dict(state)
    return torch.stack(outs)


def _per_step_reference(torch_rnn, x0, values, log_alpha, noise):
    """The outputs when a new weight is drawn at every time step: a different model (the test's control)."""
    torch_rnn = copy.deepcopy(torch_rnn)
    state = torch_rnn.state_dict()
    h = torch.zeros(NUM_DRAWS, 1, 1, H)
    c = torch.zeros_like(h)
    outs = []
    for t in range(T):
        draw = {n: _posterior(v, log_alpha, noise).sample((NUM_DRAWS,)) for n, v in values.items()}
        step = []
        for k in range(NUM_DRAWS):
            torch_rnn.load_state_dict({**state, **{n: v[k] for n, v in draw.items()}})
            hx = (h[k], c[k]) if isinstance(torch_rnn, nn.LSTM) else h[k]  # (layers=1, batch=1, H)
            out, hidden = torch_rnn(x0[:, t : t + 1], hx)
            step.append((out[0, 0], _states(hidden)))
        outs.append(torch.stack([s[0] for s in step]))
        h = torch.stack([s[1][0] for s in step])
        if isinstance(torch_rnn, nn.LSTM):
            c = torch.stack([s[1][1] for s in step])
    return torch.stack(outs, 1)


def _statistics(out):
    """Per output unit and time step: the outputs, and their sum over time (which sees the correlation in time)."""
    return torch.cat([out.reshape(len(out), -1), out.sum(1)], -1)


def _moments(s, groups):
    """The column means and variances of ``s`` and their standard errors, from ``groups`` equal blocks of rows
    (the blocks are independent, the rows of one block need not be: Flipout's share a perturbation)."""
    mean = s.mean(0)
    sq = (s - mean).pow(2)
    var = sq.mean(0)
    block_means = s.reshape(groups, -1, s.shape[-1]).mean(1)
    block_vars = sq.reshape(groups, -1, s.shape[-1]).mean(1)
    return mean, block_means.var(0) / groups, var, block_vars.var(0) / groups


def _max_z(a, b, groups_a=None):
    """The largest two-sample z-score of the column means and of the column variances of ``a`` and ``b`` (whose
    rows are independent; ``a``'s are independent by blocks of ``len(a) // groups_a``)."""
    ma, se2_ma, va, se2_va = _moments(a, groups_a or len(a))
    mb, se2_mb, vb, se2_vb = _moments(b, len(b))
    z_mean = (ma - mb).abs() / (se2_ma + se2_mb).sqrt()
    z_var = (va - vb).abs() / (se2_va + se2_vb).sqrt()
    return z_mean.max().item(), z_var.max().item()


# z-scores of 4000 draws over 15 statistics (a block's z-score from 100 blocks is near-normal): |z| > 4.5 has a
# probability below 1e-4 per statistic under the null
Z_TOLERANCE = 4.5

CASES = [
    ("flipout", "independent", False),
    ("flipout", "independent", True),
    ("per-example", "independent", False),
    ("lrt", "correlated", False),
    ("flipout", "correlated", False),
]


@pytest.mark.parametrize("cls", [vd.nn.LSTM, vd.nn.GRU])
@pytest.mark.parametrize("estimator,noise,random_bias", CASES)
def test_outputs_match_monte_carlo_over_per_sequence_weights(cls, estimator, noise, random_bias):
    torch_rnn = TORCH[cls](IN, H, batch_first=True)
    with torch.no_grad():
        for p in torch_rnn.parameters():
            p.mul_(3.0)  # larger weights than torch's init: the gates' non-linearities matter
    rnn = cls(IN, H, batch_first=True)
    rnn.load_state_dict(torch_rnn.state_dict())
    names = _random_sites(rnn, random_bias)
    values = {n: torch_rnn.get_parameter(n).detach().clone() for n in names}
    log_alpha = -0.5
    x0 = torch.randn(1, T, IN)
    with torch.no_grad():
        # Flipout's perturbation is shared by a minibatch (its signs are per sequence): the marginal of every
        # sequence's weight is exact, so pool many minibatches, each with its own perturbation
        guide = _guide_for(values, log_alpha, noise)
        out = torch.cat([_run(rnn, guide, x0.expand(BATCH, T, IN), estimator)[0] for _ in range(NUM_DRAWS // BATCH)])
        draws = {n: _posterior(v, log_alpha, noise).sample((NUM_DRAWS,)) for n, v in values.items()}
        reference = _reference_outputs(torch_rnn, x0, draws)
    z_mean, z_var = _max_z(_statistics(out), _statistics(reference), groups_a=NUM_DRAWS // BATCH)
    assert z_mean < Z_TOLERANCE and z_var < Z_TOLERANCE, (z_mean, z_var)


@pytest.mark.parametrize("cls", [vd.nn.LSTM, vd.nn.GRU])
def test_monte_carlo_test_rejects_a_new_weight_per_time_step(cls):
    # the control: the same statistics tell per-sequence weights from per-step weights (the test can fail)
    torch_rnn = TORCH[cls](IN, H, batch_first=True)
    with torch.no_grad():
        for p in torch_rnn.parameters():
            p.mul_(3.0)
    names = [n for n in torch_rnn._flat_weights_names if n.startswith("weight_")]
    values = {n: torch_rnn.get_parameter(n).detach().clone() for n in names}
    x0 = torch.randn(1, T, IN)
    with torch.no_grad():
        draws = {n: _posterior(v, -0.5, "independent").sample((NUM_DRAWS,)) for n, v in values.items()}
        per_sequence = _reference_outputs(torch_rnn, x0, draws)
        per_step = _per_step_reference(torch_rnn, x0, values, -0.5, "independent")
    z_mean, z_var = _max_z(_statistics(per_sequence), _statistics(per_step))
    assert max(z_mean, z_var) > Z_TOLERANCE, (z_mean, z_var)


# ----- what is not exact raises -----


def test_lrt_with_independent_noise_raises_naming_the_site():
    rnn = vd.nn.LSTM(IN, H, batch_first=True)
    names = _random_sites(rnn)
    guide = _guide_for({n: torch.randn(4 * H, IN if "ih" in n else H) for n in names}, -1.0, "independent")
    with pytest.raises(LazyWeightError, match=r"site 'weight_ih_l0'.*'lrt'.*\('flipout', 'per-example', 'mean'\)"):
        _run(rnn, guide, torch.randn(5, T, IN), "lrt")


def test_lrt_with_fallback_draws_one_weight_for_the_batch():
    rnn = vd.nn.GRU(IN, H, batch_first=True)
    names = _random_sites(rnn)
    guide = _guide_for({n: torch.randn(3 * H, IN if "ih" in n else H) for n in names}, -1.0, "independent")
    x = torch.randn(1, T, IN).expand(6, T, IN)
    with vd.poutine.local_reparam(estimator="lrt", fallback=True):
        out = poutine.replay(rnn, trace=poutine.trace(guide).get_trace(x))(x)[0]
    assert torch.allclose(out, out[:1].expand_as(out))  # one weight sample: identical sequences agree
    flipout = _run(rnn, guide, x, "flipout")[0]
    assert not torch.allclose(flipout, flipout[:1].expand_as(flipout))  # one weight per sequence: they differ


def test_packed_sequence_under_local_reparam_raises():
    rnn = vd.nn.LSTM(IN, H, batch_first=True)
    names = _random_sites(rnn)
    guide = _guide_for({n: torch.randn(4 * H, IN if "ih" in n else H) for n in names}, -1.0, "independent")
    packed = pack_padded_sequence(torch.randn(3, T, IN), [4, 3, 2], batch_first=True)
    with vd.poutine.local_reparam(estimator="flipout"):
        guide_trace = poutine.trace(guide).get_trace()
        with pytest.raises(TypeError, match="PackedSequence.*'weight_"):
            poutine.replay(rnn, trace=guide_trace)(packed)


def test_second_use_of_a_recurrent_weight_raises():
    rnn = vd.nn.RNN(IN, H, batch_first=True)
    _random_sites(rnn)

    class Tied(PyroModule):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            out = self.rnn(x)[0]
            return torch.nn.functional.linear(out, self.rnn.weight_hh_l0)  # the same weight again, in one run

    tied = Tied()
    guide = _guide_for(
        {"rnn.weight_ih_l0": torch.randn(H, IN), "rnn.weight_hh_l0": torch.randn(H, H)}, -1.0, "independent"
    )
    with pytest.raises(LazyWeightError, match="rnn.weight_hh_l0.*used twice"):
        _run(tied, guide, torch.randn(5, T, IN), "flipout")


def test_literal_pyro_module_rnn_with_lazy_weight_points_to_the_recurrent_classes():
    gru = PyroModule[nn.GRU](IN, H, batch_first=True)
    gru.weight_ih_l0 = PyroSample(dist.Normal(0.0, 1.0).expand([3 * H, IN]).to_event(2))
    guide = _guide_for({"weight_ih_l0": torch.randn(3 * H, IN)}, -1.0, "independent")
    with pytest.raises(LazyWeightError, match=r"'weight_ih_l0'.*'gru'.*pyro_vdrop\.nn\.LSTM/GRU/RNN"):
        _run(gru, guide, torch.randn(5, T, IN), "flipout")


# ----- bayesianize, sparse VD on the gates, training -----


class _SequenceNet(nn.Module):
    def __init__(self, cls=nn.LSTM, **kwargs):
        super().__init__()
        self.rnn = cls(IN, 8, batch_first=True, **kwargs)
        self.fc = nn.Linear(8 * (2 if kwargs.get("bidirectional") else 1), 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def test_bayesianize_makes_every_recurrent_weight_random():
    model = vd.nn.bayesianize(_SequenceNet(num_layers=2, bidirectional=True), random_bias=True)
    assert type(model.rnn) is vd.nn.LSTM
    expected = [
        f"rnn.{kind}_{m}_l{layer}{suffix}"
        for layer in range(2)
        for suffix in ("", "_reverse")
        for kind, m in [("weight", "ih"), ("weight", "hh"), ("bias", "ih"), ("bias", "hh")]
    ]
    assert sorted(model.random_sites) == sorted(expected + ["fc.weight", "fc.bias"])
    assert model.initial_weights()["rnn.weight_hh_l1_reverse"].shape == (32, 8)
    net = vd.nn.prune(
        model,
        params={s: torch.ones_like(v) for s, v in model.initial_weights().items()},
        log_alpha={s: torch.zeros_like(v) for s, v in model.initial_weights().items()},
    )
    assert type(net.rnn) is nn.LSTM and torch.equal(net.rnn.weight_ih_l0, torch.ones(32, IN))


def test_bayesianize_rejects_what_it_cannot_do():
    with pytest.raises(TypeError, match="wrap it"):
        vd.nn.bayesianize(nn.LSTM(3, 4))
    with pytest.raises(NotImplementedError, match="proj_size"):
        vd.nn.bayesianize(_SequenceNet(proj_size=2))


def test_gate_sparsity_splits_the_gate_blocks():
    model = vd.nn.bayesianize(_SequenceNet(nn.GRU))
    log_alpha = {s: torch.zeros_like(v) for s, v in model.initial_weights().items()}
    log_alpha["rnn.weight_hh_l0"][8:16] = 5.0  # the update gate's rows (GRU: reset, update, new)
    log_alpha["rnn.weight_ih_l0"][0, 0] = 5.0
    result = vd.nn.gate_sparsity(log_alpha, model)
    assert set(result) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    assert result["rnn.weight_hh_l0"] == {"reset": 0.0, "update": 1.0, "new": 0.0}
    assert result["rnn.weight_ih_l0"] == {"reset": 1 / (8 * IN), "update": 0.0, "new": 0.0}


@pytest.mark.parametrize("estimator,noise", [("flipout", "independent"), ("lrt", "correlated")])
def test_sparse_vd_lstm_learns_a_sequence_task(estimator, noise):
    x = torch.randn(256, T, IN)
    y = (x[:, :, 0].sum(1) > 0).long()  # the sign of the sum of the first input over time
    model = vd.nn.bayesianize(_SequenceNet())
    kwargs = dict(parameterization="additive") if noise == "independent" else dict(noise="correlated")
    guide = vd.infer.AutoVariationalDropout(model, **kwargs)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-2}), TraceMeanField_ELBO())
    with vd.poutine.local_reparam(estimator=estimator):
        for _ in range(150):
            svi.step(x, y)
    with vd.poutine.local_reparam(estimator="mean"):
        logits = poutine.replay(model, trace=poutine.trace(guide).get_trace(x))(x)
    assert (logits.argmax(-1) == y).double().mean() > 0.85


@pytest.mark.parametrize("estimator,noise", [("flipout", "independent"), ("lrt", "correlated")])
def test_stacked_bidirectional_lstm_matches_monte_carlo(estimator, noise):
    # every weight of a 2-layer bidirectional LSTM, one per sequence (8 sites)
    kwargs = dict(batch_first=True, num_layers=2, bidirectional=True)
    torch_rnn = nn.LSTM(IN, H, **kwargs)
    with torch.no_grad():
        for p in torch_rnn.parameters():
            p.mul_(2.0)
    rnn = vd.nn.LSTM(IN, H, **kwargs)
    rnn.load_state_dict(torch_rnn.state_dict())
    names = _random_sites(rnn)
    assert len(names) == 8
    values = {n: torch_rnn.get_parameter(n).detach().clone() for n in names}
    x0 = torch.randn(1, T, IN)
    with torch.no_grad():
        guide = _guide_for(values, -0.5, noise)
        out = torch.cat([_run(rnn, guide, x0.expand(BATCH, T, IN), estimator)[0] for _ in range(NUM_DRAWS // BATCH)])
        draws = {n: _posterior(v, -0.5, noise).sample((NUM_DRAWS,)) for n, v in values.items()}
        reference = _reference_outputs(torch_rnn, x0, draws)
    z_mean, z_var = _max_z(_statistics(out), _statistics(reference), groups_a=NUM_DRAWS // BATCH)
    assert z_mean < Z_TOLERANCE and z_var < Z_TOLERANCE, (z_mean, z_var)
