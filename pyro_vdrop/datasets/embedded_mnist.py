# SPDX-License-Identifier: Apache-2.0
"""
A small MNIST subset shipped inside the package, so that examples, tests and the default training job run
without a download.
"""

import os
from importlib import resources

import numpy as np
import torch

from .idx import to_tensors
from .mnist import MNIST_FILES

_EMBEDDED_FILE = "embedded_mnist.npz"


def _load_npz(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = resources.files("pyro_vdrop.datasets") / "data" / _EMBEDDED_FILE
    with resources.as_file(source) as path:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"the embedded MNIST subset {path} is missing from the installed package; reinstall pyro-vdrop, "
                "or regenerate it with scripts/make_embedded_mnist.py"
            )
        with np.load(path) as npz:
            return npz[f"{split}_images"], npz[f"{split}_labels"], npz[f"{split}_indices"]


def load_embedded_mnist(
    split: str = "train",
    *,
    flatten: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_indices: bool = False,
):
    """
    Loads the MNIST subset embedded in the package: 5,000 training images (500 per digit) and 1,000 test
    images (100 per digit), a seeded stratified sample of the original files [1] made by
    ``scripts/make_embedded_mnist.py``.

    MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, under the Creative Commons
    Attribution-Share Alike 3.0 licence; see ``pyro_vdrop/datasets/data/MNIST-LICENSE.txt``.

    Example::

        x, y = load_embedded_mnist("train", flatten=True)   # 5000 × 784 in [0, 1], int64 labels

    :param str split: ``"train"`` or ``"test"``.
    :param bool flatten: Return images as ``N × 784`` instead of ``N × 1 × 28 × 28``.
    :param torch.dtype dtype: Floating dtype of the images (default: torch's default dtype).
    :param device: Device of the tensors.
    :param bool return_indices: Also return the int64 positions of the images in the original MNIST split.
    :returns: ``(images, labels)``, or ``(images, labels, indices)`` with ``return_indices=True``.

    **References**

    [1] Y. LeCun, C. Cortes, C. J. C. Burges. "The MNIST database of handwritten digits."
    """
    images, labels, indices = _load_npz(split)
    x, y = to_tensors(images, labels, flatten=flatten, dtype=dtype, device=device)
    if return_indices:
        return x, y, torch.from_numpy(indices.astype(np.int64)).to(device=device)
    return x, y


__all__ = ["load_embedded_mnist"]
