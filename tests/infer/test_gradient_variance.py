# SPDX-License-Identifier: Apache-2.0

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyro_vdrop.distributions import ImproperLogUniform, VariationalDropoutNormal
from pyro_vdrop.infer.gradient_variance import GRADIENT_ESTIMATORS, gradient_variance

M, D, H = 64, 10, 8


def model(x, y):
    w1 = pyro.sample("w1", ImproperLogUniform().expand([H, D]).to_event(2))
    w2 = pyro.sample("w2", ImproperLogUniform().expand([2, H]).to_event(2))
    with pyro.plate("data", 6000, subsample_size=x.shape[0]):
        pyro.sample("obs", dist.Categorical(logits=F.linear(torch.relu(F.linear(x, w1)), w2)), obs=y)


def guide(x, y):
    for name, shape in (("w1", (H, D)), ("w2", (2, H))):
        loc = pyro.param(f"{name}_loc", lambda shape=shape: torch.randn(shape) / shape[1] ** 0.5)
        la = pyro.param(f"{name}_log_alpha", torch.full(shape, 0.0))
        pyro.sample(name, VariationalDropoutNormal(loc, la).to_event(2))


def test_ordering_of_estimators():
    """[1, Table 1]: LRT and per-example weights beat one shared weight sample; no noise has none."""
    x = torch.randn(M, D)
    y = (x[:, 0] > 0).long()
    params = ["w1_loc", "w2_loc"]
    result = {
        est: gradient_variance(model, guide, x, y, params=params, estimator=est, num_draws=60)
        for est in GRADIENT_ESTIMATORS
    }
    for name in params:
        v = {est: r[name]["variance"] for est, r in result.items()}
        assert v["no noise"] == pytest.approx(0.0, abs=1e-8 * result["lrt"][name]["mean_sq"] + 1e-10)
        # with a shared weight sample the covariance term does not shrink with M: several times larger
        assert v["single weight sample"] > 3 * v["lrt"]
        assert v["single weight sample"] > 3 * v["per-example weights"]
        assert v["single weight sample"] > 2 * v["flipout"]


def test_batches_give_data_variance_without_noise():
    x = torch.randn(4, M, D)
    batches = [(x[i], (x[i, :, 0] > 0).long()) for i in range(4)]
    r = gradient_variance(model, guide, params=["w1_loc"], estimator="no noise", num_draws=8, batches=batches)
    assert r["w1_loc"]["variance"] > 0


def test_bad_arguments():
    x, y = torch.randn(M, D), torch.zeros(M, dtype=torch.long)
    with pytest.raises(ValueError, match="estimator"):
        gradient_variance(model, guide, x, y, params=["w1_loc"], estimator="lrt2")
    with pytest.raises(ValueError, match="num_draws"):
        gradient_variance(model, guide, x, y, params=["w1_loc"], num_draws=1)
    with pytest.raises(KeyError, match="nope"):
        gradient_variance(model, guide, x, y, params=["nope"])
