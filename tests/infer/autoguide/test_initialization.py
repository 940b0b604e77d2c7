# SPDX-License-Identifier: Apache-2.0
import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.infer import init_to_fan_in
from pyro_vdrop.nn import bayesianize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_to_fan_in_follows_the_prior_dtype_and_device(dtype, device):
    prior = ImproperLogUniform(dtype=dtype, device=device).expand([3, 4]).to_event(2)
    value = init_to_fan_in({"fn": prior, "name": "w"})
    assert value.dtype == dtype and value.device.type == device.type
    assert value.shape == (3, 4) and value.abs().max() <= 0.5


def test_init_to_fan_in_without_dtype_uses_torch_default():
    value = init_to_fan_in({"fn": ImproperLogUniform().expand([2, 2]), "name": "w"})
    assert value.dtype == torch.get_default_dtype()


def test_improper_log_uniform_rejects_a_non_float_dtype():
    with pytest.raises(TypeError, match="dtype"):
        ImproperLogUniform(dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autonormal_on_a_bayesianized_model_trains_in_the_layer_dtype(dtype, device):
    net = torch.nn.Linear(4, 3).to(dtype=dtype, device=device)
    model = bayesianize(net, num_data=100)
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    x = torch.randn(8, 4, dtype=dtype, device=device)
    y = torch.randint(0, 3, (8,), device=device)
    loss = svi.step(x, y)
    assert torch.isfinite(torch.tensor(loss))
    for _, p in pyro.get_param_store().named_parameters():
        assert p.dtype == dtype and p.device.type == device.type
