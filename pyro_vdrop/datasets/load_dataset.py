# SPDX-License-Identifier: Apache-2.0
"""Loading a data set by name, as the command line does."""

import os

import torch

from .embedded_mnist import load_embedded_mnist
from .mnist import load_mnist

DATASETS = ("embedded", "mnist")


def load_dataset(
    name: str = "embedded",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    flatten: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Loads a data set by name: ``"embedded"`` (the MNIST subset shipped with the package,
    :func:`~pyro_vdrop.datasets.load_embedded_mnist`) or ``"mnist"`` (the full data set,
    :func:`~pyro_vdrop.datasets.load_mnist`).

    :param str name: ``"embedded"`` or ``"mnist"``.
    :param str split: ``"train"`` or ``"test"``.
    :param data_dir: Folder of the MNIST IDX files (``"mnist"`` only).
    :param bool download: Download missing MNIST files (``"mnist"`` only).
    :param bool flatten: Return images as ``N × 784`` instead of ``N × 1 × 28 × 28``.
    :param torch.dtype dtype: Floating dtype of the images.
    :param device: Device of the tensors.
    :returns: ``(images, labels)``: images in :math:`[0, 1]`, labels int64.
    """
    if name == "embedded":
        if data_dir is not None or download:
            raise ValueError(
                "data_dir and download apply to name='mnist' only; the embedded subset ships with the package"
            )
        return load_embedded_mnist(split, flatten=flatten, dtype=dtype, device=device)
    if name == "mnist":
        return load_mnist(split, data_dir=data_dir, download=download, flatten=flatten, dtype=dtype, device=device)
    raise ValueError(f"unknown data set name {name!r}; choose one of {DATASETS}")


__all__ = ["DATASETS", "load_dataset"]
