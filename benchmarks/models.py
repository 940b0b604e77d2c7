# SPDX-License-Identifier: Apache-2.0
"""The networks of the benchmark suite, as plain torch modules, and MNIST-shaped random minibatches for them."""

from collections import OrderedDict

import torch
from torch import nn

import pyro_vdrop.nn

#: The training-set size N of the ELBO's N / M scaling (MNIST's 60,000 images).
NUM_DATA = 60000

#: name -> one-line description; ``linear<W>`` (any width W) is also accepted.
MODELS = {
    "mlp": "MNIST MLP 784-300-100-10 (ReLU)",
    "lenet5": "LeNet-5-Caffe (pyro_vdrop.nn.lenet5_caffe): conv 20, conv 50, fc 800-500-10",
    "linear512": "one 512->512 linear layer (512-way softmax)",
}


def linear_width(name):
    """The width of a ``linear<W>`` model name, or None for other names."""
    if name.startswith("linear") and name[len("linear") :].isdigit():
        return int(name[len("linear") :])
    return None


def check_model(name):
    if name not in MODELS and linear_width(name) is None:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)} or linear<W> (e.g. linear1024)")


def make_net(name, *, device="cpu", dtype=torch.float32):
    """A fresh plain torch network (seeded by the caller)."""
    check_model(name)
    kw = {"device": device, "dtype": dtype}
    if name == "mlp":
        return pyro_vdrop.nn.lenet_300_100(**kw)
    if name == "lenet5":
        return pyro_vdrop.nn.lenet5_caffe(**kw)
    width = linear_width(name)
    return nn.Sequential(OrderedDict(fc=nn.Linear(width, width, **kw)))


def make_batch(name, batch_size, *, device="cpu", dtype=torch.float32, seed=0):
    """Random inputs and labels of the model's shapes (step times do not depend on the values)."""
    check_model(name)
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        x, classes = torch.rand(batch_size, 784, generator=g), 10
    elif name == "lenet5":
        x, classes = torch.rand(batch_size, 1, 28, 28, generator=g), 10
    else:
        width = linear_width(name)
        x, classes = torch.randn(batch_size, width, generator=g), width
    y = torch.randint(0, classes, (batch_size,), generator=g)
    return x.to(device=device, dtype=dtype), y.to(device)
