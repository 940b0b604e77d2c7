# SPDX-License-Identifier: Apache-2.0
"""
The networks of the variational-dropout papers' MNIST experiments, as plain torch modules (no Pyro) that
:func:`~pyro_vdrop.nn.bayesianize` turns into models. Layers are named so that sites read ``"fc1.weight"``.

Inputs are MNIST images, ``N × 1 × 28 × 28`` (the fully connected nets also take ``N × 784``); outputs are
the logits of the 10 classes.
"""

from collections import OrderedDict

import torch
from torch import nn

_MNIST_PIXELS = 28 * 28
_MNIST_CLASSES = 10


def _fc_net(sizes, dtype, device) -> nn.Sequential:
    layers = [("flatten", nn.Flatten())]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers.append((f"fc{i}", nn.Linear(n_in, n_out, dtype=dtype, device=device)))
        if i < len(sizes) - 1:
            layers.append((f"relu{i}", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def mnist_mlp(
    width: int = 1024, *, depth: int = 3, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Sequential:
    """
    The fully connected ReLU network of the paper's MNIST experiment [1, §6, Fig. 1a] (the setup of
    Srivastava et al. 2014): ``784 → width → width → width → 10``, layers ``fc1`` … ``fc4``.

    :param int width: Units per hidden layer (the paper varies it from 100 to 1250).
    :param int depth: Number of hidden layers (3 in the paper).
    :param torch.dtype dtype: Parameter dtype.
    :param device: Parameter device.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be positive, got width={width}, depth={depth}")
    return _fc_net([_MNIST_PIXELS] + [width] * depth + [_MNIST_CLASSES], dtype, device)


def lenet_300_100(*, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Sequential:
    """
    LeNet-300-100 (LeCun et al. 1998), ``784 → 300 → 100 → 10`` with ReLU, layers ``fc1`` … ``fc3``;
    266,610 parameters. Sparse variational dropout prunes it 68× at 1.92% error [2].

    **References**

    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
    """
    return _fc_net([_MNIST_PIXELS, 300, 100, _MNIST_CLASSES], dtype, device)


def lenet5_caffe(*, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Sequential:
    """
    LeNet-5-Caffe, the Caffe version of LeNet-5 used in [2]: ``conv1`` 20 5×5, 2×2 max-pool, ``conv2`` 50 5×5,
    2×2 max-pool, ``fc1`` 800 → 500 with ReLU, ``fc2`` 500 → 10; 431,080 parameters. Input ``N × 1 × 28 × 28``.

    **References**

    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
    """
    kw = {"dtype": dtype, "device": device}
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 20, 5, **kw)),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(20, 50, 5, **kw)),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(50 * 4 * 4, 500, **kw)),
                ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(500, _MNIST_CLASSES, **kw)),
            ]
        )
    )


__all__ = ["lenet5_caffe", "lenet_300_100", "mnist_mlp"]
