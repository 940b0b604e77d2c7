# SPDX-License-Identifier: Apache-2.0
"""
Makes the small MNIST subset shipped inside the package (``pyro_vdrop/datasets/data/embedded_mnist.npz``).

A stratified, seeded sample of the real MNIST files: ``--train-per-class`` training and ``--test-per-class``
test images of every digit, kept in their original order, stored as uint8 arrays in a compressed ``.npz``
together with the indices they were taken from, the seed and the md5 of the source files.

    python scripts/make_embedded_mnist.py --data-dir /path/to/mnist
"""

import argparse
import os
from pathlib import Path

import numpy as np

from pyro_vdrop.datasets.mnist import ENV_VAR, MNIST_FILES, MNIST_MD5, load_mnist_arrays

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pyro_vdrop" / "datasets" / "data" / "embedded_mnist.npz"


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of every class, drawn without replacement, returned sorted."""
    chosen = []
    for c in range(10):
        pool = np.flatnonzero(labels == c)
        if pool.size < per_class:
            raise ValueError(f"class {c} has only {pool.size} examples, fewer than --per-class {per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def main(args):
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = load_mnist_arrays(split, data_dir=args.data_dir)
        idx = stratified_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx]
        arrays[f"{split}_indices"] = idx.astype(np.int32)
        print(f"{split}: {idx.size} of {labels.size} images ({per_class} per class)")
    arrays["seed"] = np.array(args.seed, dtype=np.int64)
    arrays["source_md5"] = np.array([f"{name} {MNIST_MD5[name]}" for files in MNIST_FILES.values() for name in files])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get(ENV_VAR), help=f"MNIST IDX folder (default ${ENV_VAR})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
