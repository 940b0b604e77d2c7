# SPDX-License-Identifier: Apache-2.0
"""``train_clip``: the means of the weights pruning will remove are 0 in the guide's distribution (Molchanov et al.'s
reference code), while log α and the KL stay those of θ."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine import trace

from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.infer.autoguide import VariationalDropoutOptions, preset
from pyro_vdrop.nn import bayesianize
from pyro_vdrop.poutine import local_reparam
from pyro_vdrop.train import TrainConfig


def _fixture(train_clip):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = bayesianize(torch.nn.Linear(20, 5), num_data=100)
    guide = AutoVariationalDropout(model, options=preset("sparse", train_clip=train_clip))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    guide(x, y)
    with torch.no_grad():  # a third of the weights far above the threshold, the rest far below
        theta = guide.locs.weight
        log_sigma2 = (theta**2).log() + torch.where(torch.rand_like(theta) < 1 / 3, 6.0, -6.0)
        guide.log_sigma2s.weight.copy_(log_sigma2)
    return model, guide, x, y


def test_options_and_config_validate_train_clip():
    assert VariationalDropoutOptions(parameterization="additive", train_clip=3).train_clip == 3.0
    with pytest.raises(ValueError, match="parameterization='additive' with noise='independent'"):
        VariationalDropoutOptions(train_clip=3.0)
    for bad in (True, float("nan"), "3"):
        with pytest.raises(ValueError, match="train_clip must be a finite log α threshold"):
            VariationalDropoutOptions(parameterization="additive", train_clip=bad)
    with pytest.raises(ValueError, match="train_clip applies to guide='sparse'"):
        TrainConfig(guide="B", train_clip=3.0)


def test_posterior_zeroes_the_means_above_the_threshold_and_keeps_variance_and_kl():
    guide = _fixture(3.0)[1]
    plain = _fixture(None)[1]
    theta, log_alpha = guide.locs.weight.detach(), guide.log_alpha()["weight"]
    keep = log_alpha < 3.0
    assert 0 < keep.float().mean() < 1
    q, q_plain = guide._base_posterior("weight"), plain._base_posterior("weight")
    assert torch.equal(q.loc.detach(), torch.where(keep, theta, torch.zeros_like(theta)))
    assert torch.equal(q.variance.detach(), q_plain.variance.detach())  # σ², for every weight
    assert torch.equal(q.log_alpha.detach(), q_plain.log_alpha.detach())  # of the unmasked θ
    assert torch.equal(guide.median()["weight"], q.loc.detach())


def test_mean_path_sees_the_masked_weights_and_masked_theta_gets_only_the_kl_gradient():
    model, guide, x, y = _fixture(3.0)
    keep = guide.log_alpha()["weight"] < 3.0
    theta = guide.locs.weight
    with local_reparam(estimator="mean"):
        tr = trace(pyro.poutine.replay(model, trace=trace(guide).get_trace(x, y))).get_trace(x, y)
    out, bias = tr.nodes["_RETURN"]["value"], tr.nodes["bias"]["value"]
    expected = torch.nn.functional.linear(x, theta.detach() * keep, bias.detach())
    assert torch.allclose(out.detach(), expected, atol=1e-6)
    # the data term (no KL: the model's output only) gives no gradient to the masked means
    (grad,) = torch.autograd.grad(out.square().sum(), theta)
    assert torch.all(grad[~keep] == 0) and torch.any(grad[keep] != 0)
    # the ELBO's KL still reaches them, through log α = log σ² - log θ²
    with local_reparam():
        loss = Trace_ELBO().differentiable_loss(model, guide, x, y)
    (grad,) = torch.autograd.grad(loss, theta)
    assert torch.all(grad[~keep] != 0)
