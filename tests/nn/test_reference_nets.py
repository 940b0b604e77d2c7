# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from pyro_vdrop.nn import lenet5_caffe, lenet_300_100, mnist_mlp


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts():
    # the counts published for these nets (Molchanov et al. 2017, Table 1)
    assert num_params(lenet_300_100()) == 266_610
    assert num_params(lenet5_caffe()) == 431_080
    width = 100
    assert num_params(mnist_mlp(width)) == (784 + 1) * width + 2 * (width + 1) * width + (width + 1) * 10


@pytest.mark.parametrize(
    "factory, linear_names",
    [
        (lambda **kw: mnist_mlp(50, **kw), ["fc1", "fc2", "fc3", "fc4"]),
        (lenet_300_100, ["fc1", "fc2", "fc3"]),
        (lenet5_caffe, ["conv1", "conv2", "fc1", "fc2"]),
    ],
)
def test_shapes_names_dtype_device(factory, linear_names, device):
    net = factory(dtype=torch.float64, device=device)
    weighted = [n for n, m in net.named_modules() if hasattr(m, "weight")]
    assert weighted == linear_names
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, device=device)
    inputs = [x] if linear_names[0] == "conv1" else [x, x.reshape(3, 784)]  # fully connected nets take both
    for inp in inputs:
        out = net(inp)
        assert out.shape == (3, 10) and out.dtype == torch.float64 and out.device.type == device.type


def test_mlp_depth_and_bad_width():
    net = mnist_mlp(20, depth=5)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 6
    with pytest.raises(ValueError, match="width and depth must be positive"):
        mnist_mlp(0)
