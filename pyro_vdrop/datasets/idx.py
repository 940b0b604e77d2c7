# SPDX-License-Identifier: Apache-2.0
"""
The IDX format of the MNIST files [1], shared by the MNIST loader (:mod:`pyro_vdrop.datasets.mnist`) and the
embedded subset (:mod:`pyro_vdrop.datasets.embedded_mnist`): :func:`read_idx` parses the bytes of an IDX file,
:func:`to_tensors` turns its images and labels into the tensors the package trains on, after
:func:`check_images_and_labels` has rejected non-finite images and labels that are not class indices.

An IDX file is a magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian int32 sizes, then the data
in row-major order. The MNIST files hold unsigned bytes (type ``0x08``): images ``N × 28 × 28`` and labels ``N``.

**References**

[1] Y. LeCun, C. Cortes, C. J. C. Burges. "The MNIST database of handwritten digits."
    http://yann.lecun.com/exdb/mnist/ (the section "File formats for the MNIST database").
"""

import math

import numpy as np
import torch
from numpy.typing import ArrayLike

#: The IDX type code of unsigned bytes, the element type of the MNIST files [1].
IDX_UBYTE = 0x08

#: The largest value of an unsigned byte: pixels are divided by it to lie in [0, 1].
PIXEL_MAX = 255.0

#: The number of classes of MNIST (the digits 0-9) [1].
NUM_CLASSES = 10


class IDXFormatError(ValueError):
    """IDX bytes whose header is not the one expected, or whose length disagrees with the shape it announces."""


def read_idx(data: bytes, *, ndim: int, name: str = "IDX data") -> np.ndarray:
    """
    Parses the bytes of an IDX file of unsigned bytes with ``ndim`` dimensions, checking its header.

    :param bytes data: The (uncompressed) content of the file.
    :param int ndim: The number of dimensions expected (3 for MNIST images, 1 for labels).
    :param str name: How error messages name the data (e.g. the file's path).
    :returns: a writable uint8 array of the shape announced by the header.
    :raises IDXFormatError: if the data are shorter than the header, the magic number is not that of
        ``ndim``-dimensional unsigned bytes, or the length is not the one the header announces.
    """
    expected_magic = (IDX_UBYTE << 8) | ndim
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(
            f"{name}: {len(data)} bytes, shorter than the {header}-byte IDX header of {ndim}-dimensional data; "
            "it is truncated"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise IDXFormatError(
            f"{name}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({ndim}-dimensional unsigned bytes)"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(shape)
    if len(data) != header + size:
        raise IDXFormatError(
            f"{name}: the IDX header announces shape {shape} ({header + size} bytes) but the (uncompressed) data "
            f"have {len(data)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def _check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(
                f"{name}: {array.size - int(finite.sum())} of its {array.size} values are NaN or infinite (the first "
                f"at index {first}); training on them makes the loss NaN. Remove or replace them before training."
            )


def check_images_and_labels(
    images: ArrayLike, labels: ArrayLike, *, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """
    Checks images and labels before they become training data, so that bad values are reported by name before
    any training step rather than as a NaN loss: ``images`` must be an ``N × ...`` array of finite numbers,
    ``labels`` ``N`` integers in ``0 .. num_classes - 1``.

    :param images: The images, a NumPy array or anything :func:`numpy.asarray` takes (e.g. a CPU tensor).
    :param labels: The labels, likewise.
    :param int num_classes: The number of classes.
    :returns: ``(images, labels)`` as NumPy arrays.
    :raises ValueError: naming ``images`` or ``labels`` and what is wrong with it.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype.kind not in "biuf":
        raise ValueError(f"images: expected an array of numbers, got dtype {images.dtype}")
    if images.ndim < 2:
        raise ValueError(f"images: expected an array N × H × W (or N × D), got shape {images.shape}")
    _check_finite(images, "images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels: expected one label per image, shape ({images.shape[0]},), got shape {labels.shape}")
    _check_finite(labels, "labels")
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels: expected integer class indices, got dtype {labels.dtype}; convert them, e.g. "
            "labels.astype(np.int64)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"labels: {bad.size} of them lie outside the classes 0..{num_classes - 1} (e.g. {bad[0]}); each label "
            "must be the index of its image's class"
        )
    return images, labels


def to_tensors(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    flatten: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    num_classes: int = NUM_CLASSES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Converts images ``N × H × W`` of pixel values in ``0..255`` (the uint8 arrays of IDX files) and their
    labels to tensors: images divided by 255, shaped ``N × 1 × H × W`` (or ``N × HW`` with ``flatten=True``),
    labels int64. Both are checked first with :func:`check_images_and_labels`.

    :param images: The images, a NumPy array or anything :func:`numpy.asarray` takes (e.g. a CPU tensor).
    :param labels: The labels, one per image, integers in ``0 .. num_classes - 1``.
    :param bool flatten: Return images as ``N × HW`` instead of ``N × 1 × H × W``.
    :param torch.dtype dtype: Floating dtype of the images (default: torch's default dtype).
    :param device: Device of both tensors.
    :param int num_classes: The number of classes (default: the 10 MNIST digits).
    :returns: ``(images, labels)``.
    :raises ValueError: if an image value is NaN or infinite, or a label is not a class index (the message
        names the argument).
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype for the images, got {dtype}")
    images, labels = check_images_and_labels(images, labels, num_classes=num_classes)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device)
    x = x.to(dtype).div_(PIXEL_MAX)
    x = x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64)).to(device=device)
    return x, y


__all__ = [
    "IDX_UBYTE",
    "IDXFormatError",
    "NUM_CLASSES",
    "PIXEL_MAX",
    "check_images_and_labels",
    "read_idx",
    "to_tensors",
]
