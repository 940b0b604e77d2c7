# SPDX-License-Identifier: Apache-2.0
"""
Data sets: the MNIST IDX loader (checksums, ``--data-dir``, download) and the small embedded MNIST subset, which
share the IDX reading and conversion to tensors of :mod:`pyro_vdrop.datasets.idx`.
"""

from .embedded_mnist import load_embedded_mnist
from .load_dataset import DATASETS, load_dataset
from .mnist import (
    MNIST_FILES,
    MNIST_MD5,
    MNIST_MIRRORS,
    MNISTFileError,
    default_cache_dir,
    download_mnist,
    load_mnist,
    read_mnist_file,
)

__all__ = [
    "DATASETS",
    "MNISTFileError",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "default_cache_dir",
    "download_mnist",
    "load_dataset",
    "load_embedded_mnist",
    "load_mnist",
    "read_mnist_file",
]
