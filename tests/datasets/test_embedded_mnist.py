# SPDX-License-Identifier: Apache-2.0
from importlib import resources

import numpy as np
import pytest
import torch

from pyro_vdrop.datasets import load_dataset, load_embedded_mnist, load_mnist

SIZES = {"train": 5000, "test": 1000}
MAX_BYTES = 3_000_000


def test_embedded_file_size_and_licence():
    data = resources.files("pyro_vdrop.datasets") / "data"
    with resources.as_file(data / "embedded_mnist.npz") as path:
        assert path.stat().st_size <= MAX_BYTES
    licence = (data / "MNIST-LICENSE.txt").read_text()
    for needle in ["Yann LeCun", "Corinna Cortes", "Christopher J.C. Burges", "Attribution-Share Alike 3.0"]:
        assert needle in licence


@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_shapes_balance_range(split, device):
    x, y, idx = load_embedded_mnist(split, dtype=torch.float64, device=device, return_indices=True)
    n = SIZES[split]
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float64 and x.device.type == device.type
    assert y.shape == (n,) and y.dtype == torch.int64 and y.device.type == device.type
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10  # stratified
    assert x.min() == 0.0 and x.max() == 1.0
    # values are k/255: the uint8 pixels, unchanged
    k = x * 255
    assert torch.equal(k, k.round())
    # indices: distinct, sorted, inside the original split; classes mixed (not one class after another)
    assert idx.unique().numel() == n and torch.all(idx[1:] > idx[:-1])
    assert 0 <= idx.min() and idx.max() < {"train": 60000, "test": 10000}[split]
    assert (y[1:] != y[:-1]).float().mean() > 0.5
    # each image is a digit, not blank noise: mean ink like MNIST's (~0.13), most pixels background
    assert 0.08 < x.mean() < 0.2 and (x == 0).double().mean() > 0.7


def test_embedded_flatten_matches_and_load_dataset():
    x, y = load_embedded_mnist("test")
    xf, yf = load_dataset("embedded", "test", flatten=True)
    assert xf.shape == (1000, 784) and xf.dtype == torch.get_default_dtype()
    assert torch.equal(xf, x.reshape(1000, -1)) and torch.equal(y, yf)


def test_embedded_bad_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_embedded_mnist("val")


@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_is_a_subset_of_real_mnist(mnist_dir, split):
    x_sub, y_sub, idx = load_embedded_mnist(split, return_indices=True)
    x, y = load_dataset("mnist", split, data_dir=mnist_dir)
    assert torch.equal(x[idx], x_sub) and torch.equal(y[idx], y_sub)


def test_real_mnist(mnist_dir):
    x, y = load_mnist("test", data_dir=mnist_dir, flatten=True)
    assert x.shape == (10000, 784) and y.shape == (10000,)
    # published class counts of the MNIST test set
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = load_mnist("train", data_dir=mnist_dir, dtype=torch.float64)
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,) and x.dtype == torch.float64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.isclose(x.mean().item(), 0.1307, atol=1e-3)  # the well-known MNIST pixel mean
