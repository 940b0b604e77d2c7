# SPDX-License-Identifier: Apache-2.0
"""
The IDX format of the MNIST files [1], shared by the MNIST loader (:mod:`pyro_vdrop.datasets.mnist`) and the
embedded subset (:mod:`pyro_vdrop.datasets.embedded_mnist`): :func:`read_idx` parses the bytes of an IDX file,
:func:`to_tensors` turns its images and labels into the tensors the package trains on.

An IDX file is a magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian int32 sizes, then the data
in row-major order. The MNIST files hold unsigned bytes (type ``0x08``): images ``N × 28 × 28`` and labels ``N``.

**References**

[1] Y. LeCun, C. Cortes, C. J. C. Burges. "The MNIST database of handwritten digits."
    http://yann.lecun.com/exdb/mnist/ (the section "File formats for the MNIST database").
"""

import math

import numpy as np
import torch

#: The IDX type code of unsigned bytes, the element type of the MNIST files [1].
IDX_UBYTE = 0x08

#: The largest value of an unsigned byte: pixels are divided by it to lie in [0, 1].
PIXEL_MAX = 255.0


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


def to_tensors(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    flatten: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Converts images ``N × H × W`` of pixel values in ``0..255`` (the uint8 arrays of IDX files) and their
    labels to tensors: images divided by 255, shaped ``N × 1 × H × W`` (or ``N × HW`` with ``flatten=True``),
    labels int64.

    :param numpy.ndarray images: The images.
    :param numpy.ndarray labels: The labels, one per image.
    :param bool flatten: Return images as ``N × HW`` instead of ``N × 1 × H × W``.
    :param torch.dtype dtype: Floating dtype of the images (default: torch's default dtype).
    :param device: Device of both tensors.
    :returns: ``(images, labels)``.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype for the images, got {dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device)
    x = x.to(dtype).div_(PIXEL_MAX)
    x = x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64)).to(device=device)
    return x, y


__all__ = ["IDX_UBYTE", "IDXFormatError", "PIXEL_MAX", "read_idx", "to_tensors"]
