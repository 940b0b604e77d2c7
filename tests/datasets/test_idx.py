# SPDX-License-Identifier: Apache-2.0
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vdrop.datasets
from pyro_vdrop.datasets.idx import IDX_UBYTE, IDXFormatError, check_images_and_labels, read_idx, to_tensors


def idx_bytes(array: np.ndarray, *, type_code: int = IDX_UBYTE) -> bytes:
    magic = bytes([0, 0, type_code, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 5), (4, 28, 28), (0, 28, 28)])
def test_read_idx_round_trip(shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = read_idx(idx_bytes(array), ndim=len(shape))
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # a copy, writable (np.frombuffer alone gives a read-only view of the bytes)


def test_read_idx_errors_name_the_data():
    images = np.zeros((2, 3, 3), dtype=np.uint8)
    data = idx_bytes(images)
    with pytest.raises(IDXFormatError, match=r"^t10k: 6 bytes, shorter than the 16-byte IDX header"):
        read_idx(data[:6], ndim=3, name="t10k")
    with pytest.raises(IDXFormatError, match=r"^t10k: wrong IDX magic number 0x00000803, expected 0x00000801"):
        read_idx(data, ndim=1, name="t10k")
    with pytest.raises(IDXFormatError, match=r"wrong IDX magic number 0x00000d03, expected 0x00000803"):
        read_idx(idx_bytes(images, type_code=0x0D), ndim=3)  # floats, not unsigned bytes
    for bad in (data[:-1], data + b"\x00"):
        with pytest.raises(IDXFormatError, match=r"announces shape \(2, 3, 3\) \(34 bytes\) but .* have 3[35] bytes"):
            read_idx(bad, ndim=3)
    assert issubclass(IDXFormatError, ValueError)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_to_tensors(flatten, dtype, device):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    x, y = to_tensors(images, labels, flatten=flatten, dtype=dtype, device=device)
    assert x.shape == ((5, 12) if flatten else (5, 1, 4, 3))
    assert x.dtype == (dtype or torch.get_default_dtype()) and x.device.type == device.type
    assert y.dtype == torch.int64 and y.device.type == device.type
    np.testing.assert_allclose(x.cpu().numpy().reshape(5, 4, 3), images / 255.0)
    np.testing.assert_array_equal(y.cpu().numpy(), labels)
    with pytest.raises(ValueError, match="dtype must be a floating point dtype"):
        to_tensors(images, labels, dtype=torch.int32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_images_are_rejected_by_name(bad, dtype):
    images = np.full((4, 3, 3), 128.0, dtype=dtype)
    images[2, 1, 0] = images[3, 0, 0] = bad
    labels = np.arange(4)
    message = r"^images: 2 of its 36 values are NaN or infinite \(the first at index \(2, 1, 0\)\)"
    with pytest.raises(ValueError, match=message):
        to_tensors(images, labels)
    with pytest.raises(ValueError, match=message):
        check_images_and_labels(torch.from_numpy(images), torch.from_numpy(labels))  # CPU tensors too


def test_labels_are_checked_by_name():
    images = np.zeros((3, 2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"^labels: 1 of its 3 values are NaN or infinite"):
        to_tensors(images, np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"^labels: expected integer class indices, got dtype float64"):
        to_tensors(images, np.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"^labels: 2 of them lie outside the classes 0..9 \(e.g. 10\)"):
        to_tensors(images, np.array([10, 1, 12]))
    with pytest.raises(ValueError, match=r"^labels: 1 of them lie outside the classes 0..9 \(e.g. -1\)"):
        to_tensors(images, np.array([0, -1, 9]))
    with pytest.raises(ValueError, match=r"^labels: 1 of them lie outside the classes 0..2 \(e.g. 3\)"):
        to_tensors(images, np.array([0, 3, 2]), num_classes=3)
    with pytest.raises(ValueError, match=r"^labels: expected one label per image, shape \(3,\), got shape \(2,\)"):
        to_tensors(images, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"^images: expected an array N × H × W \(or N × D\), got shape \(3,\)"):
        to_tensors(np.zeros(3), np.array([0, 1, 2]))
    # finite floats and integer labels of any width pass; the labels come back as int64
    x, y = to_tensors(np.full((3, 2, 2), 255.0), np.array([9, 0, 1], dtype=np.uint8), flatten=True)
    assert torch.equal(x, torch.ones(3, 4)) and torch.equal(y, torch.tensor([9, 0, 1]))
    x, y = to_tensors(np.zeros((0, 2, 2)), np.zeros(0, dtype=np.int64))
    assert x.shape == (0, 1, 2, 2) and y.shape == (0,)


def test_datasets_modules_import_no_private_names_from_each_other():
    # the shared IDX code is public in pyro_vdrop.datasets.idx; no module reaches into another's private names
    folder = Path(pyro_vdrop.datasets.__file__).parent
    offenders = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("pyro_vdrop")):
                offenders += [f"{path.name}: {alias.name}" for alias in node.names if alias.name.startswith("_")]
    assert offenders == []
