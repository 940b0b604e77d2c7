# SPDX-License-Identifier: Apache-2.0
"""Group variational dropout and structured Bayesian pruning as guide options (noise="group" / "sbp")."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

import pyro_vdrop as vd
from pyro_vdrop.distributions import LogUniformNoisePrior, log_uniform_kl
from pyro_vdrop.infer import AutoVariationalDropout, AutoVariationalDropoutMessenger
from pyro_vdrop.infer.autoguide import VariationalDropoutOptions, preset

from ...distributions.test_truncated_log_normal import quadrature_kl

N = 256


def _data():
    torch.manual_seed(0)
    x = torch.randn(N, 20)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # only inputs 0 and 1 matter
    return x, y


def _model(noise):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    prior = LogUniformNoisePrior() if noise == "sbp" else None
    return vd.nn.bayesianize(net, prior=prior, num_data=N)


def _elbo_loss(model, guide, x, y, seed=1):
    torch.manual_seed(seed)
    with vd.poutine.local_reparam():
        return TraceMeanField_ELBO().loss(model, guide, x, y)


@pytest.mark.parametrize("noise", ["group", "sbp"])
def test_elbo_is_the_data_term_minus_the_registered_group_kl(noise):
    x, y = _data()
    model = _model(noise)
    guide = AutoVariationalDropout(model, options=preset(noise))
    guide(x, y)
    store = pyro.get_param_store()
    with torch.no_grad():  # parameters away from their initial values
        for name, value in store.items():
            if "locs" in name or "log_s" in name:
                value.add_(0.3 * torch.randn_like(value))
    # the same noise draws (seed) with and without the KL: the difference is the KL
    with_kl = _elbo_loss(model, guide, x, y)
    guide.kl_scale = 0.0
    without_kl = _elbo_loss(model, guide, x, y)
    kl = with_kl - without_kl
    expected = 0.0
    for site in ("0.weight", "2.weight"):
        if noise == "sbp":
            mu = store[f"AutoVariationalDropout.noise_locs.{site}"].flatten().tolist()
            sd = store[f"AutoVariationalDropout.noise_log_scales.{site}"].exp().flatten().tolist()
            expected += sum(quadrature_kl(m, s, -20.0, 0.0) for m, s in zip(mu, sd))  # the exact KL, per group
        else:
            log_alpha = guide.group_log_alpha()[site].double()
            expected += log_uniform_kl(log_alpha).sum().item()  # Molchanov's fit, once per group
    assert kl == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # the KL is counted once per group (20 + 16 input units), not once per weight
    assert guide.sparsity()["groups"]["0.weight"]["groups"] == 20


@pytest.mark.parametrize("noise,min_pruned", [("sbp", 16), ("group", 5)])
def test_groups_of_irrelevant_inputs_are_pruned(noise, min_pruned):
    x, y = _data()
    model = _model(noise)
    guide = AutoVariationalDropout(model, options=preset(noise))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-2}), TraceMeanField_ELBO())
    with vd.poutine.local_reparam():
        for _ in range(1500):
            svi.step(x, y)
    groups = guide.group_log_alpha()["0.weight"].flatten()
    pruned = groups > guide.prune_threshold
    assert not pruned[:2].any(), groups  # the two informative inputs are kept
    assert int(pruned[2:].sum()) >= min_pruned, groups
    stats = guide.sparsity()
    assert stats["groups"]["0.weight"]["groups_pruned"] == int(pruned.sum())
    # a pruned group removes its whole column: the unit counts agree with the groups
    assert stats["units"]["0.weight"]["inputs_kept"] == 20 - int(pruned.sum())
    net = vd.nn.prune(model, guide)  # at the guide's threshold: SNR < 1 for SBP
    weight = net[0].weight
    assert (weight[:, pruned] == 0).all() and (weight[:, ~pruned] != 0).any(0).all()
    accuracy = (net(x).argmax(-1) == y).float().mean()
    assert accuracy > 0.95


@pytest.mark.parametrize("noise", ["group", "sbp"])
@pytest.mark.parametrize("granularity", ["unit", "output", "layer"])
def test_group_axes(noise, granularity):
    x, y = _data()
    model = _model(noise)
    guide = AutoVariationalDropout(model, options=preset(noise, granularity=granularity))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    with vd.poutine.local_reparam():
        for _ in range(3):
            loss = svi.step(x, y)
    assert math.isfinite(loss)
    expected = {"unit": (1, 20), "output": (16, 1), "layer": (1, 20)}[granularity]
    assert guide.group_log_alpha()["0.weight"].shape == expected
    assert guide.log_alpha()["0.weight"].shape == (16, 20)
    if granularity == "layer":  # one α for the layer, one noise variable per input unit
        assert (guide.group_log_alpha()["0.weight"] == guide.group_log_alpha()["0.weight"][0, 0]).all()


def test_messenger_guide_with_group_noise():
    # AutoVariationalDropoutMessenger shares the posteriors; here without local_reparam (one weight sample per step)
    x, y = _data()
    model = _model("group")
    guide = AutoVariationalDropoutMessenger(model, options=preset("group", granularity="output"))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for _ in range(3):
        assert math.isfinite(svi.step(x, y))
    assert guide.group_log_alpha()["0.weight"].shape == (16, 1)
    assert guide.sparsity()["groups"]["2.weight"]["groups"] == 3


def test_sbp_median_and_quantiles():
    x, y = _data()
    model = _model("sbp")
    guide = AutoVariationalDropout(model, noise="sbp", init_noise_log_scale=0.0)
    guide(x, y)
    median = guide.median()["0.weight"]
    quantiles = guide.quantiles([0.1, 0.5, 0.9])["0.weight"]
    assert torch.allclose(quantiles[1], median, rtol=1e-5, atol=1e-7)
    theta = pyro.get_param_store()["AutoVariationalDropout.locs.0.weight"]
    # w = θ s with 0 < s <= 1: every quantile lies between 0 and θ, and they increase with the level whatever
    # the sign of θ (for θ < 0 the q-quantile of w is θ times the (1 - q)-quantile of s)
    assert (quantiles.abs() <= theta.abs() + 1e-7).all() and (quantiles * theta.sign() >= 0).all()
    assert (quantiles[2] > quantiles[1]).all() and (quantiles[1] > quantiles[0]).all()


def test_options_and_priors_are_checked():
    with pytest.raises(ValueError, match="shares one noise"):
        VariationalDropoutOptions(noise="group", granularity="weight")
    with pytest.raises(ValueError, match="does not apply"):
        VariationalDropoutOptions(noise="sbp", kl_approx="kingma")
    with pytest.raises(ValueError, match="shared noises"):
        VariationalDropoutOptions(noise="independent", granularity="output")
    assert preset("group").max_log_alpha == 8.0 and preset("group").log_alpha_clip is None
    assert preset("group").parameterization == "additive"
    x, y = _data()
    with pytest.raises(ValueError, match="LogUniformNoisePrior"):
        AutoVariationalDropout(_model("group"), noise="sbp")(x, y)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="noise='sbp'"):
        AutoVariationalDropout(_model("sbp"), noise="group")(x, y)
    with pytest.raises(ValueError, match="no groups"):
        guide = AutoVariationalDropout(_model("group"))
        guide(x, y)
        guide.group_log_alpha()


def test_independent_guide_reports_units():
    x, y = _data()
    guide = AutoVariationalDropout(_model("group"), max_log_alpha=None)
    guide(x, y)
    log_alpha = pyro.get_param_store()["AutoVariationalDropout.log_alphas.0.weight"]
    with torch.no_grad():
        log_alpha[:, 3] = 5.0  # every weight of input unit 3 pruned
        log_alpha[:2, 4] = 5.0  # two weights of input unit 4: the unit stays
    stats = guide.sparsity()
    assert stats["units"]["0.weight"] == {"inputs": 20, "inputs_kept": 19, "outputs": 16, "outputs_kept": 16}
    assert "groups" not in stats


@pytest.mark.parametrize("granularity,axis", [("unit", 1), ("output", 0)])
def test_pruned_channel_is_zeroed_in_the_pruned_network(granularity, axis):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    model = vd.nn.bayesianize(net, num_data=10)
    guide = AutoVariationalDropout(model, options=preset("group", granularity=granularity))
    x, y = torch.randn(10, 3, 6, 6), torch.randint(0, 2, (10,))
    guide(x, y)
    with torch.no_grad():  # μ_g → 0 for channel 2 of the convolution: log α_g = log σ² - log μ² is large
        pyro.get_param_store()["AutoVariationalDropout.group_locs.0.weight"].index_fill_(axis, torch.tensor(2), 1e-6)
    assert guide.sparsity()["groups"]["0.weight"]["groups_pruned"] == 1
    weight = vd.nn.prune(model, guide)[0].weight
    assert (weight.select(axis, 2) == 0).all()
    assert (weight.select(axis, 1) != 0).all()
    units = guide.sparsity()["units"]["0.weight"]
    assert (units["inputs_kept"], units["outputs_kept"]) == ((2, 4) if axis == 1 else (3, 3))


@pytest.mark.parametrize("noise", ["group", "sbp"])
def test_messenger_guide_under_local_reparam_matches_the_autoguide(noise):
    # the effect-based guide inside local_reparam: the same ELBO as the autoguide with the same parameters and seed
    x, y = _data()
    model = _model(noise)
    options = preset(noise, granularity="output") if noise == "group" else VariationalDropoutOptions(noise="sbp")
    auto = AutoVariationalDropout(model, options=options)
    auto(x, y)
    messenger = AutoVariationalDropoutMessenger(model, options=options)
    with vd.poutine.local_reparam():
        messenger(x, y)
    store = pyro.get_param_store()
    prefix = "AutoVariationalDropout."
    for name in [n for n in store.keys() if n.startswith(prefix)]:
        value = store[name].detach()
        if ".locs." not in name:
            value = value + 0.3 * torch.randn_like(value)
        store[name] = value
        store[name[len(prefix) :]] = value.clone()
    loss_auto = _elbo_loss(model, auto, x, y)
    assert loss_auto == pytest.approx(_elbo_loss(model, messenger, x, y), rel=1e-6)
    assert loss_auto != pytest.approx(_elbo_loss(model, messenger, x, y, seed=2), rel=1e-6)
    pyro.clear_param_store()  # and it trains from a fresh start
    guide = AutoVariationalDropoutMessenger(model, options=options)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    with vd.poutine.local_reparam():
        assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
