# SPDX-License-Identifier: Apache-2.0
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vdrop.datasets import (
    MNIST_FILES,
    MNIST_MD5,
    MNISTFileError,
    default_cache_dir,
    download_mnist,
    load_dataset,
    load_mnist,
    read_mnist_file,
)
from pyro_vdrop.datasets import mnist as mnist_module

# Small synthetic IDX files: the loader's checks do not depend on the real data, only on the recorded md5s,
# which the fixture below points at the synthetic files.
SIZES = {"train": 30, "test": 20}


def idx_bytes(array: np.ndarray) -> bytes:
    magic = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


def make_split_arrays(split, seed):
    rng = np.random.default_rng(seed)
    n = SIZES[split]
    labels = np.arange(n) % 10
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, labels


@pytest.fixture
def fake_mnist(monkeypatch):
    """Synthetic content for all four files, with MNIST_MD5 patched to their md5s; returns {name: bytes}."""
    contents = {}
    for seed, (split, (image_name, label_name)) in enumerate(MNIST_FILES.items()):
        images, labels = make_split_arrays(split, seed)
        contents[image_name] = idx_bytes(images)
        contents[label_name] = idx_bytes(labels)
    for name, data in contents.items():
        monkeypatch.setitem(MNIST_MD5, name, hashlib.md5(data).hexdigest())
    return contents


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the user's cache or PYRO_VDROP_MNIST_DIR, and none may touch the network."""
    monkeypatch.delenv("PYRO_VDROP_MNIST_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    def no_network(url):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(mnist_module, "_fetch", no_network)


def write_files(folder: Path, contents, *, gz=True, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or contents:
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(contents[name])
        else:
            (folder / name).write_bytes(contents[name])
    return folder


def test_md5_constants_match_shared_reference():
    # the canonical values, as published next to the files (MD5SUMS.raw); a typo here would reject real MNIST
    expected = {
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    }
    assert MNIST_MD5 == expected


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("flatten", [False, True])
def test_load_synthetic(tmp_path, fake_mnist, gz, split, flatten, device):
    folder = write_files(tmp_path / "mnist", fake_mnist, gz=gz)
    x, y = load_mnist(split, data_dir=folder, flatten=flatten, dtype=torch.float64, device=device)
    images, labels = make_split_arrays(split, list(MNIST_FILES).index(split))
    n = SIZES[split]
    assert x.shape == ((n, 784) if flatten else (n, 1, 28, 28))
    assert x.dtype == torch.float64 and x.device.type == device.type
    assert y.dtype == torch.int64 and y.device.type == device.type
    np.testing.assert_allclose(x.cpu().numpy().reshape(n, 28, 28), images / 255.0)
    np.testing.assert_array_equal(y.cpu().numpy(), labels)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_checksum_mismatch(tmp_path, fake_mnist):
    bad = np.frombuffer(fake_mnist["train-images-idx3-ubyte"], dtype=np.uint8).copy()
    bad[-1] ^= 0xFF  # one pixel changed: header intact, size intact, content wrong
    contents = dict(fake_mnist, **{"train-images-idx3-ubyte": bad.tobytes()})
    folder = write_files(tmp_path, contents)
    with pytest.raises(MNISTFileError, match=r"train-images-idx3-ubyte\.gz: md5 .* expected .*download") as info:
        load_mnist("train", data_dir=folder)
    assert MNIST_MD5["train-images-idx3-ubyte"] in str(info.value)
    # the unchanged test split still loads
    load_mnist("test", data_dir=folder)


def test_missing_file(tmp_path, fake_mnist):
    folder = write_files(tmp_path, fake_mnist, names=["train-images-idx3-ubyte"])
    with pytest.raises(MNISTFileError, match=r"train-labels-idx1-ubyte .*not found in .*data_dir.*--data-dir"):
        load_mnist("train", data_dir=folder)


def test_truncated_gz(tmp_path, fake_mnist):
    folder = write_files(tmp_path, fake_mnist)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(MNISTFileError, match=r"t10k-images-idx3-ubyte\.gz: not a valid gzip file.*truncated"):
        load_mnist("test", data_dir=folder)


def test_truncated_raw(tmp_path, fake_mnist):
    folder = write_files(tmp_path, fake_mnist, gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MNISTFileError, match=r"t10k-images-idx3-ubyte: the IDX header announces shape \(20, 28, 28\)"):
        load_mnist("test", data_dir=folder)


def test_corrupt_gzip_bytes(tmp_path, fake_mnist):
    folder = write_files(tmp_path, fake_mnist)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    for i in range(12, len(data) - 8):  # scramble the deflate stream, keep the gzip header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(MNISTFileError, match=r"t10k-labels-idx1-ubyte\.gz: not a valid gzip file"):
        load_mnist("test", data_dir=folder)


def test_wrong_magic_number(tmp_path, fake_mnist):
    # images and labels swapped: both headers are valid IDX, but the wrong kind
    contents = dict(fake_mnist)
    contents["t10k-images-idx3-ubyte"], contents["t10k-labels-idx1-ubyte"] = (
        fake_mnist["t10k-labels-idx1-ubyte"],
        fake_mnist["t10k-images-idx3-ubyte"],
    )
    folder = write_files(tmp_path, contents)
    with pytest.raises(MNISTFileError, match=r"wrong IDX magic number 0x00000801, expected 0x00000803"):
        load_mnist("test", data_dir=folder)


def test_read_mnist_file_without_verification(tmp_path, fake_mnist, monkeypatch):
    folder = write_files(tmp_path, fake_mnist)
    monkeypatch.setitem(MNIST_MD5, "t10k-labels-idx1-ubyte", "0" * 32)
    with pytest.raises(MNISTFileError, match="md5"):
        read_mnist_file(folder / "t10k-labels-idx1-ubyte.gz", kind="labels")
    labels = read_mnist_file(folder / "t10k-labels-idx1-ubyte.gz", kind="labels", verify=False)
    np.testing.assert_array_equal(labels, np.arange(SIZES["test"]) % 10)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_mnist("validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="kind must be"):
        read_mnist_file(tmp_path / "x", kind="pixels")
    with pytest.raises(ValueError, match="unknown data set name 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="name='mnist' only"):
        load_dataset("embedded", data_dir=tmp_path)


# --- sources: data_dir > $PYRO_VDROP_MNIST_DIR > cache > download -----------------------------------------


def distinct_sources(tmp_path, fake_mnist, monkeypatch):
    """Three folders whose test labels differ (by a label permutation that keeps the md5 patched)."""
    folders = {}
    for shift, source in enumerate(["arg", "env", "cache"]):
        contents = dict(fake_mnist)
        labels = (np.arange(SIZES["test"]) + shift) % 10
        contents["t10k-labels-idx1-ubyte"] = idx_bytes(labels)
        folders[source] = (contents, labels)
    return folders


def test_source_order(tmp_path, fake_mnist, monkeypatch):
    variants = distinct_sources(tmp_path, fake_mnist, monkeypatch)
    cache = default_cache_dir()
    assert cache == tmp_path / "xdg-cache" / "pyro-vdrop" / "mnist"
    paths = {"arg": tmp_path / "arg", "env": tmp_path / "env", "cache": cache}
    digests = {}
    for source, (contents, _) in variants.items():
        write_files(paths[source], contents)
        digests[source] = hashlib.md5(contents["t10k-labels-idx1-ubyte"]).hexdigest()

    def labels_from(expected_source, **kwargs):
        monkeypatch.setitem(MNIST_MD5, "t10k-labels-idx1-ubyte", digests[expected_source])
        return load_mnist("test", **kwargs)[1].numpy()

    monkeypatch.setenv("PYRO_VDROP_MNIST_DIR", str(paths["env"]))
    np.testing.assert_array_equal(labels_from("arg", data_dir=paths["arg"]), variants["arg"][1])
    np.testing.assert_array_equal(labels_from("env"), variants["env"][1])
    monkeypatch.delenv("PYRO_VDROP_MNIST_DIR")
    np.testing.assert_array_equal(labels_from("cache"), variants["cache"][1])


def test_env_dir_without_files_is_an_error_not_a_fallback(tmp_path, fake_mnist, monkeypatch):
    write_files(default_cache_dir(), fake_mnist)
    monkeypatch.setenv("PYRO_VDROP_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(MNISTFileError, match=r"not found in .*empty \(\$PYRO_VDROP_MNIST_DIR\)"):
        load_mnist("test")


def mock_fetch(monkeypatch, fake_mnist, calls, *, corrupt=(), fail_after=None):
    """Replaces the network: serves gzipped synthetic files in 100-byte chunks and records the URLs."""

    def fetch(url):
        calls.append(url)
        name = url.rsplit("/", 1)[-1][: -len(".gz")]
        data = gzip.compress(fake_mnist[name])
        if name in corrupt:
            data = gzip.compress(fake_mnist[name][:-1] + b"\x00")
        for i in range(0, len(data), 100):
            if fail_after is not None and i >= fail_after:
                raise ConnectionResetError("connection dropped (mock)")
            yield data[i : i + 100]

    monkeypatch.setattr(mnist_module, "_fetch", fetch)


def test_download_only_when_asked_and_missing(tmp_path, fake_mnist, monkeypatch):
    calls = []
    mock_fetch(monkeypatch, fake_mnist, calls)
    with pytest.raises(MNISTFileError, match="download=True"):
        load_mnist("test")
    assert calls == []
    x, y = load_mnist("test", download=True)
    assert sorted(url.rsplit("/", 1)[-1] for url in calls) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert all(url.startswith(mnist_module.MNIST_MIRRORS[0]) for url in calls)
    assert sorted(p.name for p in default_cache_dir().iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    np.testing.assert_array_equal(y.numpy(), np.arange(SIZES["test"]) % 10)
    # now cached: no second download, even with download=True
    load_mnist("test", download=True)
    assert len(calls) == 2
    # an explicit folder is downloaded into, not the cache
    load_mnist("train", data_dir=tmp_path / "explicit", download=True)
    assert (tmp_path / "explicit" / "train-images-idx3-ubyte.gz").is_file()
    assert not (default_cache_dir() / "train-images-idx3-ubyte.gz").exists()


@pytest.mark.parametrize("failure", ["corrupt", "dropped"])
def test_download_is_atomic(tmp_path, fake_mnist, monkeypatch, failure):
    calls = []
    kwargs = {"corrupt": ["t10k-labels-idx1-ubyte"]} if failure == "corrupt" else {"fail_after": 200}
    mock_fetch(monkeypatch, fake_mnist, calls, **kwargs)
    folder = tmp_path / "dl"
    with pytest.raises(MNISTFileError, match=r"(?s)could not download t10k-.*(expected|connection dropped)"):
        download_mnist(folder, split="test")
    assert len(calls) >= len(mnist_module.MNIST_MIRRORS)  # every mirror was tried
    names = sorted(p.name for p in folder.iterdir())
    # no partial or corrupt file under the final name, and no temp file left behind
    assert not any(n.endswith(".part") for n in names)
    if failure == "corrupt":
        assert names == ["t10k-images-idx3-ubyte.gz"]
    else:
        assert names == []


def test_download_verifies_before_rename(tmp_path, fake_mnist, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy_replace(src, dst):
        # when the rename happens, the temp file is complete and the target does not yet exist
        seen.append((Path(src).name, Path(dst).name, Path(dst).exists()))
        assert gzip.decompress(Path(src).read_bytes()) == fake_mnist[Path(dst).name[: -len(".gz")]]
        return real_replace(src, dst)

    mock_fetch(monkeypatch, fake_mnist, [])
    monkeypatch.setattr(mnist_module.os, "replace", spy_replace)
    download_mnist(tmp_path, split="train")
    assert [dst for _, dst, _ in seen] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert all(src.endswith(".part") and not existed for src, _, existed in seen)
