# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.infer import init_to_fan_in


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("event_shape", [(), (4,)])
def test_shapes_and_log_prob(batch_shape, event_shape):
    d = ImproperLogUniform(batch_shape, event_shape)
    assert d.batch_shape == batch_shape and d.event_shape == event_shape
    value = torch.randn(batch_shape + event_shape)
    expected = -value.abs().log()
    if event_shape:
        expected = expected.sum(-1)
    torch.testing.assert_close(d.log_prob(value), expected)


def test_expand_and_to_event():
    d = ImproperLogUniform(kl_approx="kingma").expand([2, 5]).to_event(1)
    assert d.batch_shape == (2,) and d.event_shape == (5,)
    assert d.base_dist.kl_approx == "kingma"
    value = torch.randn(7, 2, 5)
    assert d.log_prob(value).shape == (7, 2)
    torch.testing.assert_close(d.log_prob(value), -value.abs().log().sum(-1))
    # broadcasting a batch of values against the distribution's batch shape
    assert ImproperLogUniform().expand([3]).log_prob(torch.randn(4, 1)).shape == (4, 3)


def test_log_prob_dtype_follows_value():
    value = torch.randn(3, dtype=torch.float64)
    assert ImproperLogUniform().expand([3]).log_prob(value).dtype == torch.float64


@pytest.mark.parametrize("method", ["sample", "rsample"])
def test_sampling_raises_with_advice(method):
    with pytest.raises(NotImplementedError, match="improper.*AutoVariationalDropout") as e:
        getattr(ImproperLogUniform().expand([3]), method)()
    # the advice names the Predictive that works on this prior, not Pyro's, which fails on it
    message = str(e.value)
    assert "pyro_vdrop.infer.Predictive(model, guide=guide" in message
    assert "pyro.infer.Predictive first samples the model from its prior" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_at_zero_is_large_but_finite(dtype):
    # An exactly-zero float32 weight sample happens in large layers; it must not crash training.
    d = ImproperLogUniform().expand([2])
    log_p = d.log_prob(torch.tensor([1.0, 0.0], dtype=dtype))
    assert torch.isfinite(log_p).all()
    assert log_p[1] == pytest.approx(-math.log(torch.finfo(dtype).tiny))
    assert log_p[1] > d.log_prob(torch.tensor([1.0, 1e-30], dtype=dtype))[1]


def test_log_prob_validates_support():
    with pytest.raises(ValueError, match="support"):
        ImproperLogUniform().expand([2]).log_prob(torch.tensor([1.0, float("nan")]))


def test_bad_kl_approx():
    with pytest.raises(ValueError, match="kl_approx must be one of"):
        ImproperLogUniform(kl_approx="exact")


def test_as_pyro_sample_prior_in_pyro_module():
    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = PyroModule[nn.Linear](3, 1)
            self.fc.weight = PyroSample(ImproperLogUniform().expand([1, 3]).to_event(2))

        def forward(self, x, y=None):
            mean = self.fc(x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", dist.Normal(mean, 0.1), obs=y)

    model = Model()
    x = torch.randn(50, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    losses = [svi.step(x, y) for _ in range(300)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    loc = guide.median()["fc.weight"]
    torch.testing.assert_close(loc, torch.tensor([[1.0, -2.0, 0.5]]), atol=0.15, rtol=0)


def test_default_autonormal_init_explains_the_problem():
    def model():
        pyro.sample("w", ImproperLogUniform().expand([3]).to_event(1))

    with pytest.raises(NotImplementedError, match="improper"):
        AutoNormal(model)()
