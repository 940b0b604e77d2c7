# SPDX-License-Identifier: Apache-2.0
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pyro_vdrop.nn import (
    SelectInputs,
    bayesianize,
    compress,
    compressed_bytes,
    count_parameters,
    layer_widths,
    load_compressed,
    prune,
    save_compressed,
)


def _seq(*layers):
    return nn.Sequential(OrderedDict(layers))


def _mlp(sizes, *, bias=True, dtype=torch.float64):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers.append((f"fc{i}", nn.Linear(a, b, bias=bias, dtype=dtype)))
        if i < len(sizes) - 1:
            layers.append((f"relu{i}", nn.ReLU()))
    return _seq(*layers)


def _check_same(net, small, x, atol=1e-10):
    net.eval()
    with torch.no_grad():
        expected, actual = net(x), small(x)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=atol, rtol=0), (actual - expected).abs().max()


def test_group_sparse_model_exports_smaller_network_with_masked_outputs():
    # The test: a small group-sparse model (log α per unit: one per row of fc1 and of fc2, one per input
    # column of fc1), some groups forced off, pruned; the export gives the masked outputs with fewer parameters.
    torch.manual_seed(0)
    net = _mlp([12, 10, 8, 3])
    model = bayesianize(net)
    params = {site: torch.randn_like(net.get_parameter(site)) for site in model.random_sites}
    off_inputs, off_fc1, off_fc2 = [0, 5, 11], [1, 2, 7], [0, 3, 4, 6]
    la1 = torch.full((10, 12), -5.0, dtype=torch.float64)
    la1[off_fc1] = 10.0  # groups of fc1's rows: units without inputs, output relu(bias), folded into fc2's bias
    la1[:, off_inputs] = 10.0  # groups of input columns
    la2 = torch.full((8, 1), -5.0, dtype=torch.float64)
    la2[off_fc2] = 10.0  # per-unit log α of fc2, broadcast over its inputs
    log_alpha = {"fc1.weight": la1, "fc2.weight": la2, "fc3.weight": torch.tensor(-5.0, dtype=torch.float64)}
    masked = prune(model, params=params, log_alpha=log_alpha).eval()
    small = compress(masked)

    assert layer_widths(masked) == [12, 10, 8, 3]
    assert layer_widths(small) == [12 - len(off_inputs), 10 - len(off_fc1), 8 - len(off_fc2), 3]
    assert count_parameters(small) < count_parameters(masked)
    assert all(type(m) in (nn.Linear, nn.ReLU, SelectInputs) for m in small.modules() if m is not small)
    _check_same(masked, small, torch.randn(50, 12, dtype=torch.float64))


def test_constant_units_are_folded_into_next_bias_with_any_activation():
    torch.manual_seed(1)
    net = _seq(
        ("fc1", nn.Linear(6, 9, dtype=torch.float64)),
        ("act", nn.Tanh()),
        ("drop", nn.Dropout(0.3)),
        ("fc2", nn.Linear(9, 4, bias=False, dtype=torch.float64)),
    )
    with torch.no_grad():
        net.fc1.weight[[0, 4, 8]] = 0  # constant tanh(b) units; fc2 has no bias yet: it gains one
    small = compress(net)
    assert layer_widths(small) == [6, 6, 4]
    assert small.fc2.bias is not None
    assert torch.allclose(small.fc2.bias, net.fc2.weight[:, [0, 4, 8]] @ torch.tanh(net.fc1.bias[[0, 4, 8]]))
    _check_same(net, small, torch.randn(20, 6, dtype=torch.float64))
    assert small.drop.p == 0.3 and not small.training


def test_units_are_removed_to_a_fixed_point():
    # fc1's units 0-3 feed only fc2's unit 0, which no fc3 weight reads: removing it leaves them unread too
    torch.manual_seed(2)
    net = _mlp([5, 8, 6, 2])
    with torch.no_grad():
        net.fc2.weight[:, :4] = 0
        net.fc2.weight[0, :4] = 1.0
        net.fc3.weight[:, 0] = 0
    small = compress(net)
    assert layer_widths(small) == [5, 4, 5, 2]
    _check_same(net, small, torch.randn(10, 5, dtype=torch.float64))
    # compressing again changes nothing
    again = compress(small)
    assert layer_widths(again) == layer_widths(small)
    _check_same(small, again, torch.randn(10, 5, dtype=torch.float64), atol=0)


def test_unread_inputs_are_selected_and_the_network_takes_the_original_input():
    torch.manual_seed(3)
    net = _seq(("flatten", nn.Flatten()), *_mlp([16, 4, 3]).named_children())
    with torch.no_grad():
        net.fc1.weight[:, ::2] = 0
    small = compress(net)
    assert isinstance(small[1], SelectInputs) and small[1].index.tolist() == list(range(1, 16, 2))
    assert layer_widths(small) == [8, 4, 3]
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    _check_same(net, small, x)
    with torch.no_grad():  # a second compression composes with the selection already there
        small.fc1.weight[:, 0] = 0
    smaller = compress(small)
    assert sum(isinstance(m, SelectInputs) for m in smaller) == 1 and smaller[1].index.tolist() == list(range(3, 16, 2))
    _check_same(small, smaller, x)
    with pytest.raises(ValueError, match="must have size 16"):
        small(torch.randn(7, 15, dtype=torch.float64))


def _conv_net(padding=0):
    side = 3 if padding == 0 else 6  # conv2's output side for 12 × 12 inputs
    return _seq(
        ("conv1", nn.Conv2d(2, 6, 3, padding=padding, dtype=torch.float64)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 5, 3, padding=padding, dtype=torch.float64)),
        ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(5 * side**2, 7, dtype=torch.float64)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(7, 3, dtype=torch.float64)),
    )


def test_conv_flatten_linear():
    torch.manual_seed(4)
    net = _conv_net()
    block = 9  # conv2's 3 × 3 output per channel: fc1 reads channel c at columns 9c ... 9c + 8
    with torch.no_grad():
        net.conv1.weight[[1, 4]] = 0  # constant relu(b) channels, folded into conv2 (no padding)
        net.conv1.bias[1] = 0.5
        net.conv2.weight[[0]] = 0  # a constant channel through ReLU and Flatten: folded into fc1 over its block
        net.conv2.bias[0] = 0.7
        net.fc1.weight[:, 3 * block : 4 * block] = 0  # channel 3 not read by fc1
        net.fc2.weight[:, 6] = 0
    small = compress(net)
    assert layer_widths(small) == [2, 4, 3, 6, 3]
    assert small.fc1.in_features == 3 * block
    assert count_parameters(small) < count_parameters(net)
    _check_same(net, small, torch.randn(4, 2, 12, 12, dtype=torch.float64))


def test_padded_conv_keeps_constant_channels_it_cannot_fold():
    torch.manual_seed(5)
    net = _conv_net(padding=1)
    with torch.no_grad():
        net.conv1.weight[[1, 4]] = 0
        net.conv1.bias[1] = 0.5  # relu(0.5) ≠ 0 reaches conv2's padded border unevenly: the channel must stay
        net.conv1.bias[4] = -0.5  # relu(-0.5) = 0: nothing to fold, the channel goes
    small = compress(net)
    assert layer_widths(small)[:2] == [2, 5]
    _check_same(net, small, torch.randn(3, 2, 12, 12, dtype=torch.float64))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_batchnorm_is_sliced_and_its_constants_folded(conv):
    torch.manual_seed(6)
    if conv:
        net = _seq(
            ("conv1", nn.Conv2d(1, 6, 3, dtype=torch.float64)),
            ("bn", nn.BatchNorm2d(6, dtype=torch.float64)),
            ("relu", nn.ReLU()),
            ("conv2", nn.Conv2d(6, 4, 3, dtype=torch.float64)),
        )
        x = torch.randn(5, 1, 9, 9, dtype=torch.float64)
        first, second = net.conv1, net.conv2
    else:
        net = _seq(
            ("fc1", nn.Linear(5, 6, dtype=torch.float64)),
            ("bn", nn.BatchNorm1d(6, dtype=torch.float64)),
            ("relu", nn.ReLU()),
            ("fc2", nn.Linear(6, 4, dtype=torch.float64)),
        )
        x = torch.randn(5, 5, dtype=torch.float64)
        first, second = net.fc1, net.fc2
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 2)
        net.bn.bias.uniform_(-1, 1)
        first.weight[[0, 2]] = 0  # constant relu(bn(b)) units
        second.weight[:, 5] = 0  # not read
    small = compress(net)
    assert small.bn.num_features == 3 and small.bn.running_mean.shape == (3,)
    assert layer_widths(small)[1] == 3
    _check_same(net, small, x)


def test_grouped_conv_is_left_as_it_is():
    torch.manual_seed(7)
    net = _seq(
        ("conv1", nn.Conv2d(2, 4, 3, groups=2, dtype=torch.float64)),
        ("relu", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 3, 1, dtype=torch.float64)),
    )
    with torch.no_grad():
        net.conv2.weight[:, 1] = 0
    small = compress(net)
    assert layer_widths(small) == [2, 4, 3]
    _check_same(net, small, torch.randn(2, 2, 6, 6, dtype=torch.float64))


def test_unsupported_networks_are_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(TypeError, match="needs an nn.Sequential"):
        compress(Net())
    with pytest.raises(TypeError, match="'pool' is a AvgPool2d"):
        compress(_seq(("conv", nn.Conv2d(1, 2, 3)), ("pool", nn.AvgPool2d(2))))
    with pytest.raises(TypeError, match="is a Sequential"):
        compress(nn.Sequential(nn.Sequential(nn.Linear(2, 2))))


def test_follows_device_and_dtype(device):
    net = _mlp([4, 5, 2], dtype=torch.float32).to(device)
    with torch.no_grad():
        net.fc1.weight[0] = 0
    small = compress(net)
    assert small.fc1.weight.dtype == torch.float32 and small.fc1.weight.device.type == torch.device(device).type
    _check_same(net, small, torch.randn(3, 4, device=device), atol=1e-6)


def test_file_round_trip_is_plain_data(tmp_path):
    torch.manual_seed(8)
    net = _conv_net()
    with torch.no_grad():
        net.conv2.weight[[0, 2]] = 0
        net.fc1.weight[torch.rand_like(net.fc1.weight) < 0.8] = 0
    small = compress(net)
    path = tmp_path / "model.pt"
    for sparse in (False, True):
        size = save_compressed(path, small, sparse=sparse)
        assert size == path.stat().st_size
        record = torch.load(path, weights_only=True)  # plain data: no code runs
        assert record["format"] == "pyro-vdrop-compressed" and [x["type"] for x in record["layers"]][0] == "Conv2d"
        assert ("fc1.weight" in record["packed"]) == sparse
        loaded = load_compressed(path)
        x = torch.randn(3, 2, 12, 12, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(loaded(x), small(x))
        assert repr(loaded) == repr(small)


def test_sparse_file_size_falls_with_kept_weights():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    sizes = []
    for keep in (1.0, 0.3, 0.1, 0.02):
        masked = net
        with torch.no_grad():
            masked[0].weight[torch.rand_like(masked[0].weight) > keep] = 0
        sizes.append(len(compressed_bytes(masked, sparse=True)))
    dense = len(compressed_bytes(net))
    assert sizes[0] <= dense * 1.01  # all kept: stored densely, no larger
    assert sizes[1] < 0.6 * dense and sizes[2] < 0.25 * dense and sizes[3] < 0.08 * dense, (sizes, dense)


def _save_record(path, record):
    buffer = io.BytesIO()
    torch.save(record, buffer)
    path.write_bytes(buffer.getvalue())


def _edit(path, tmp_path, name, change):
    record = torch.load(path, weights_only=True)
    change(record)
    target = tmp_path / name
    _save_record(target, record)
    return target


def _fc1(record):
    return next(layer for layer in record["layers"] if layer["name"] == "fc1")


def _set_packed_col(record):
    record["packed"]["fc1.weight"]["col"][0] = 1000


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r.update(format="other"), "not a file written by pyro_vdrop.nn.save_compressed"),
        (lambda r: r.update(version=99), "format version 99"),
        (lambda r: _fc1(r).update(type="Evil"), "unknown layer type 'Evil'"),
        (lambda r: _fc1(r)["args"].update(in_features=[{}]), "argument 'in_features' must be"),
        (lambda r: _fc1(r)["args"].update(out_features=5), "fc1.weight has shape"),
        (lambda r: r["state"].pop("fc2.bias"), "missing \\['fc2.bias'\\]"),
        (lambda r: r["state"].update({"fc2.extra": torch.zeros(1)}), "unexpected \\['fc2.extra'\\]"),
        (_set_packed_col, "a column index is outside"),
        (lambda r: r["packed"]["fc1.weight"].update(crow=torch.zeros(3, dtype=torch.int32)), "row pointers"),
        (lambda r: r["state"]["select_inputs.index"].fill_(99), "select_inputs.index must be"),
        (lambda r: r.update(layers=[]), "'layers' must be a non-empty list"),
        (lambda r: _fc1(r).update(name="training"), "malformed"),
        (lambda r: r["packed"]["fc1.weight"].update(shape=[10**6, 10**6]), "max_unpacked_elements"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, change, message):
    torch.manual_seed(10)
    net = _mlp([20, 16, 3], dtype=torch.float32)
    with torch.no_grad():
        net.fc1.weight[:, 0] = 0
        net.fc1.weight[torch.rand_like(net.fc1.weight) < 0.8] = 0
    path = tmp_path / "model.pt"
    save_compressed(path, compress(net), sparse=True)
    assert "fc1.weight" in torch.load(path, weights_only=True)["packed"]
    with pytest.raises(ValueError, match=message):
        load_compressed(_edit(path, tmp_path, "bad.pt", change))


def test_pickled_module_is_not_loaded(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), path)  # a pickled object, which only an unsafe torch.load would rebuild
    with pytest.raises(ValueError, match="plain data"):
        load_compressed(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="plain data"):
        load_compressed(path)
