# SPDX-License-Identifier: Apache-2.0
"""
The MNIST handwritten digits [1], read from the original IDX files and checked against their known checksums.

Where the files come from, in order:

1. the ``data_dir`` argument (the command line's ``--data-dir``),
2. the environment variable ``PYRO_VDROP_MNIST_DIR``,
3. the cache folder ``$XDG_CACHE_HOME/pyro-vdrop/mnist`` (``~/.cache/pyro-vdrop/mnist``),
4. a download from :data:`MNIST_MIRRORS` into the first of these folders, only with ``download=True``.

A folder named by 1. or 2. is used as is: when the files are not there the loader raises an error
(or downloads into it with ``download=True``); it never falls back silently to another source.

**References**

[1] Y. LeCun, C. Cortes, C. J. C. Burges. "The MNIST database of handwritten digits."
    http://yann.lecun.com/exdb/mnist/ (Creative Commons Attribution-Share Alike 3.0).
"""

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .idx import NUM_CLASSES, IDXFormatError, read_idx, to_tensors

ENV_VAR = "PYRO_VDROP_MNIST_DIR"

#: The four IDX files of each split, (images, labels), without the ``.gz`` suffix.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: md5 of each original file [1] *after* gunzip (the values of the ``MD5SUMS.raw`` list kept with the
#: project's reference copy of MNIST); a file with another digest is corrupt or not MNIST. Note that
#: torchvision's MNIST checks the md5 of the ``.gz`` files instead, which differ.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Download locations of the gzipped files, tried in order (the first is the mirror torchvision uses).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# the number of dimensions of each kind of MNIST IDX file (see pyro_vdrop.datasets.idx)
_IDX_NDIM = {"images": 3, "labels": 1}
_DOWNLOAD_CHUNK = 1 << 16

_HELP = (
    "Point the loader at a folder with the four MNIST IDX files (gzipped or not) with data_dir=... / --data-dir "
    f"or the environment variable {ENV_VAR}, or pass download=True to fetch them."
)


class MNISTFileError(OSError):
    """A missing, truncated or corrupt MNIST file; the message names the file and says what to do."""


def default_cache_dir() -> Path:
    """
    The cache folder for downloaded MNIST files: ``$XDG_CACHE_HOME/pyro-vdrop/mnist``, or
    ``~/.cache/pyro-vdrop/mnist`` when ``XDG_CACHE_HOME`` is not set.

    :returns: the folder (which need not exist).
    :rtype: pathlib.Path
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro-vdrop" / "mnist"


def _check_split(split: str) -> str:
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _find(folder: Path, name: str) -> Path | None:
    """The raw or gzipped file ``name`` in ``folder``, raw first; None if neither exists."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path, *, gz: bool | None = None) -> bytes:
    if not (path.suffix == ".gz" if gz is None else gz):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise MNISTFileError(
            f"{path}: not a valid gzip file ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Delete it and download it again (download=True), or replace it with an intact copy."
        ) from e


def _check_md5(data: bytes, path: Path, name: str) -> None:
    digest = hashlib.md5(data).hexdigest()
    expected = MNIST_MD5[name]
    if digest != expected:
        raise MNISTFileError(
            f"{path}: md5 of the uncompressed content is {digest}, expected {expected} for {name}; the file is "
            "corrupt or not the original MNIST file. Delete it and download it again (download=True), or replace "
            "it with an intact copy."
        )


def read_mnist_file(path: str | os.PathLike, *, kind: str, verify: bool = True) -> np.ndarray:
    """
    Reads one MNIST IDX file (raw or gzipped) into a uint8 array, checking its header and, with
    ``verify=True``, the md5 of its uncompressed content against :data:`MNIST_MD5`.

    :param path: The file; its name without ``.gz`` must be one of the four MNIST file names when verifying.
    :param str kind: ``"images"`` (an ``N × 28 × 28`` array) or ``"labels"`` (an ``N`` array).
    :param bool verify: Whether to check the md5 checksum.
    :returns: the uint8 array.
    :raises MNISTFileError: if the file is missing, truncated, corrupt or not an MNIST ``kind`` file.
    """
    if kind not in _IDX_NDIM:
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise MNISTFileError(f"{path}: no such file. {_HELP}")
    data = _read_bytes(path)
    try:
        array = read_idx(data, ndim=_IDX_NDIM[kind], name=str(path))
    except IDXFormatError as e:
        raise MNISTFileError(
            f"{e}. This is not an intact MNIST {kind} file (or the images and labels files were swapped): delete it "
            "and download it again (download=True), or replace it with an intact copy."
        ) from e
    if verify:
        name = path.name[: -len(".gz")] if path.suffix == ".gz" else path.name
        if name not in MNIST_MD5:
            raise ValueError(
                f"{path}: cannot verify a file whose name is not one of {sorted(MNIST_MD5)} (optionally + '.gz'); "
                "rename it or pass verify=False"
            )
        _check_md5(data, path, name)
    return array


def _fetch(url: str) -> Iterator[bytes]:
    """Yields the bytes at ``url`` in chunks, with a tqdm progress bar (the only network access here)."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            while chunk := response.read(_DOWNLOAD_CHUNK):
                bar.update(len(chunk))
                yield chunk


def _download_file(name: str, folder: Path, mirrors: tuple[str, ...]) -> Path:
    """Downloads ``name + '.gz'`` into ``folder`` atomically: temp file, md5 check, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name + ".gz")
    errors = []
    for mirror in mirrors:
        url = mirror + name + ".gz"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in _fetch(url):
                    f.write(chunk)
            digest = hashlib.md5(_read_bytes(tmp, gz=True)).hexdigest()
            if digest != MNIST_MD5[name]:
                raise MNISTFileError(f"downloaded content has md5 {digest}, expected {MNIST_MD5[name]}")
            os.replace(tmp, target)
            return target
        except (OSError, ValueError) as e:  # network errors are OSErrors (URLError), bad content MNISTFileError
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise MNISTFileError(
        f"could not download {name}.gz into {folder}:\n  " + "\n  ".join(errors) + "\n"
        "Check the network, or download the four files by hand and pass their folder with data_dir=... / --data-dir."
    )


def download_mnist(
    data_dir: str | os.PathLike | None = None, *, split: str | None = None, mirrors: tuple[str, ...] = MNIST_MIRRORS
) -> Path:
    """
    Downloads the gzipped MNIST files that are missing from ``data_dir`` (default: :func:`default_cache_dir`).

    Each file is written to a temporary file in ``data_dir``, its md5 checked, and only then renamed into
    place, so an interrupted or corrupt download never leaves a file that looks complete.

    :param data_dir: The folder to download into (created if needed).
    :param str split: ``"train"``, ``"test"`` or None for both.
    :param tuple mirrors: Base URLs tried in order.
    :returns: the folder.
    :rtype: pathlib.Path
    """
    folder = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    splits = [_check_split(split)] if split is not None else list(MNIST_FILES)
    for s in splits:
        for name in MNIST_FILES[s]:
            if _find(folder, name) is None:
                _download_file(name, folder, mirrors)
    return folder


def _resolve_dir(data_dir, split: str, download: bool) -> Path:
    """The folder to read ``split`` from, following the documented order of sources."""
    if data_dir is not None:
        folder, source = Path(data_dir).expanduser(), "data_dir"
    elif os.environ.get(ENV_VAR):
        folder, source = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        folder, source = default_cache_dir(), "the cache folder"
    missing = [name for name in MNIST_FILES[split] if _find(folder, name) is None]
    if missing:
        if download:
            download_mnist(folder, split=split)
        else:
            raise MNISTFileError(
                f"MNIST {split} file(s) {', '.join(missing)} (or .gz) not found in {folder} ({source}). {_HELP}"
            )
    return folder


def load_mnist_arrays(
    split: str = "train", *, data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """
    The verified uint8 MNIST arrays of one split, found as described in :mod:`pyro_vdrop.datasets.mnist`.

    :returns: ``(images, labels)``, shapes ``N × 28 × 28`` and ``N``, dtype uint8.
    """
    folder = _resolve_dir(data_dir, _check_split(split), download)
    image_name, label_name = MNIST_FILES[split]
    image_path, label_path = _find(folder, image_name), _find(folder, label_name)
    images = read_mnist_file(image_path, kind="images")
    labels = read_mnist_file(label_path, kind="labels")
    if images.shape[0] != labels.shape[0]:
        raise MNISTFileError(f"{image_path} holds {images.shape[0]} images but {label_path} {labels.shape[0]} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise MNISTFileError(f"{label_path}: label {labels.max()} is not a digit 0-9; the file is corrupt")
    return images, labels


def load_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    flatten: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Loads the full MNIST training (60,000) or test (10,000) set [1], checking the md5 of every file.

    Example::

        x, y = load_mnist("train", data_dir="~/data/mnist")   # x: 60000 × 1 × 28 × 28 in [0, 1], y: int64

    :param str split: ``"train"`` or ``"test"``.
    :param data_dir: A folder with the IDX files (raw or ``.gz``); default: ``$PYRO_VDROP_MNIST_DIR``, then
        the cache folder (:func:`default_cache_dir`).
    :param bool download: Download missing files into that folder (with a progress bar).
    :param bool flatten: Return images as ``N × 784`` instead of ``N × 1 × 28 × 28``.
    :param torch.dtype dtype: Floating dtype of the images (default: torch's default dtype).
    :param device: Device of both tensors.
    :returns: ``(images, labels)``: images scaled to :math:`[0, 1]`, labels int64 in ``0..9``.
    :raises MNISTFileError: naming the file, if one is missing (and ``download=False``), truncated or corrupt.
    """
    images, labels = load_mnist_arrays(split, data_dir=data_dir, download=download)
    return to_tensors(images, labels, flatten=flatten, dtype=dtype, device=device)


__all__ = [
    "MNISTFileError",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "default_cache_dir",
    "download_mnist",
    "load_mnist",
    "load_mnist_arrays",
    "read_mnist_file",
]
