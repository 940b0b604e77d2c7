# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule
from torch import nn

from pyro_vdrop.infer import init_to_fan_in
from pyro_vdrop.nn import bayesianize, lenet5_caffe, prune


class NormalGuideView:
    """A stand-in for AutoVariationalDropout over a trained AutoNormal: log α = 2 log(σ / |μ|)."""

    def __init__(self, guide):
        self.guide = guide

    def median(self):
        return self.guide.median()

    def log_alpha(self):
        out = {}
        for site in self.guide.median():
            loc, scale = self.guide._get_loc_and_scale(site)
            out[site] = 2 * (scale.log() - loc.abs().log())
        return out


def trained(device, steps=30):
    x = torch.randn(64, 5, device=device)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(device)
    model = bayesianize(net, num_data=64)
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in, init_scale=0.3)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return model, NormalGuideView(guide), x, net


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 3.0, math.inf])
def test_pruned_net_equals_conditioned_model(threshold, device):
    model, guide, x, net = trained(device)
    model.eval()
    theta, log_alpha = guide.median(), guide.log_alpha()
    masked = {site: theta[site] * (log_alpha[site] <= threshold) for site in model.random_sites}
    pruned = prune(model, guide, threshold=threshold)
    assert type(pruned) is nn.Sequential and not isinstance(pruned, PyroModule)
    assert not pruned.training
    with torch.no_grad():
        expected = poutine.condition(model, data=masked)(x)
        torch.testing.assert_close(pruned(x), expected)
    for site in model.random_sites:
        w = pruned.get_parameter(site)
        assert torch.equal(w == 0, (log_alpha[site] > threshold) | (theta[site] == 0))
        if threshold == math.inf:
            torch.testing.assert_close(w, theta[site], rtol=0, atol=0)
    # the deterministic parameters are the trained ones, not the original network's
    assert torch.equal(pruned[0].bias, model[0].bias) and torch.equal(pruned[2].bias, model[2].bias)
    assert not torch.equal(pruned[0].bias, net[0].bias)


def test_prune_copies_deterministic_parameters_and_buffers():
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm1d\)"):
        model = bayesianize(net)
    x = torch.randn(16, 5)
    values = model.initial_weights()
    with torch.no_grad():
        model[1].weight.mul_(3.0)  # as if trained
        poutine.condition(model, data=values)(x)  # train mode: updates the running statistics
    log_alpha = {s: torch.zeros_like(v) for s, v in values.items()}
    pruned = prune(model, params=values, log_alpha=log_alpha)
    for key, value in model.state_dict().items():
        assert torch.equal(pruned.state_dict()[key], value), key
    assert not torch.equal(pruned[1].running_mean, net[1].running_mean)
    assert torch.equal(pruned[1].weight, 3 * net[1].weight)


def test_thresholds_prune_some_but_not_all():
    model, guide, _, _ = trained("cpu")
    la = torch.cat([v.flatten() for v in guide.log_alpha().values()])
    tau = la.median().item()  # half of the weights are above it
    pruned = prune(model, guide, threshold=tau)
    w = torch.cat([pruned.get_parameter(s).flatten() for s in model.random_sites])
    assert (w == 0).double().mean().item() == pytest.approx((la > tau).double().mean().item())
    assert 0.3 < (w == 0).double().mean().item() < 0.7


def test_prune_with_dicts_and_broadcast_log_alpha():
    net = lenet5_caffe(dtype=torch.float64)
    model = bayesianize(net, random_bias=True)
    params = {s: torch.randn_like(v) for s, v in model.initial_weights().items()}
    # per-output-unit log α (shape (out, 1, ...)), the granularity of a per-unit guide
    log_alpha = {s: 6 * torch.rand(v.shape[:1] + (1,) * (v.dim() - 1), dtype=v.dtype) for s, v in params.items()}
    pruned = prune(model, params=params, log_alpha=log_alpha)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    masked = {s: params[s] * (log_alpha[s] <= 3.0) for s in params}
    torch.testing.assert_close(pruned(x), poutine.condition(model, data=masked)(x))
    assert pruned.fc2.bias.dtype == torch.float64
    # the original network is untouched
    assert not torch.equal(net.conv1.weight, pruned.conv1.weight)


def test_prune_errors():
    model = bayesianize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    params = model.initial_weights()
    log_alpha = {s: torch.zeros_like(v) for s, v in params.items()}
    with pytest.raises(TypeError, match="made by pyro_vdrop.nn.bayesianize"):
        prune(nn.Linear(2, 2), params=params, log_alpha=log_alpha)
    with pytest.raises(ValueError, match="pass a guide with median"):
        prune(model, params=params)
    with pytest.raises(KeyError, match="log_alpha has no entry for the random site '2.weight'"):
        prune(model, params=params, log_alpha={"0.weight": log_alpha["0.weight"]})
    with pytest.raises(ValueError, match=r"params\['0.weight'\] has shape \(3, 4\), expected \(4, 3\)"):
        prune(model, params=dict(params, **{"0.weight": params["0.weight"].T}), log_alpha=log_alpha)
    with pytest.raises(ValueError, match="does not broadcast"):
        prune(model, params=params, log_alpha=dict(log_alpha, **{"0.weight": torch.zeros(4)}))
    with pytest.raises(ValueError, match="contains NaN"):
        prune(model, params=params, log_alpha=dict(log_alpha, **{"0.weight": torch.full((4, 3), math.nan)}))

    class MedianOnly:
        def median(self):
            return params

    with pytest.raises(TypeError, match="has no log_alpha\\(\\) method; pass log_alpha="):
        prune(model, MedianOnly())
    pruned = prune(model, MedianOnly(), log_alpha=log_alpha)
    assert torch.equal(pruned[0].weight, params["0.weight"])
