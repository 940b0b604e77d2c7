# SPDX-License-Identifier: Apache-2.0
"""
Shared pieces of the paper-reproduction scripts (``table1.py``, ``fig1a.py``, ``sparse_lenet300.py``,
``reproduce.py``): atomic JSON records, weights-only training checkpoints, and the CPU-time estimate of a
``pyro_vdrop.train.fit`` run from the timing of its first steps.
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyro_vdrop.train.run_dir import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def write_record(path, record) -> None:
    """Writes the JSON ``record`` to ``path`` atomically (a temporary file, then :func:`os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def resolve_mnist_dir(parser, args) -> None:
    """
    Sets ``args.data_dir`` for ``args.dataset``: the MNIST folder from ``--data-dir`` or ``$PYRO_VDROP_MNIST_DIR``
    (a usage error naming both when neither is given), None for the embedded set.
    """
    if args.dataset != "mnist":
        args.data_dir = None
    elif args.data_dir is None:
        args.data_dir = os.environ.get("PYRO_VDROP_MNIST_DIR")
        if not args.data_dir:
            parser.error("give --data-dir or set PYRO_VDROP_MNIST_DIR (or --dataset embedded)")


def read_record(path) -> dict | None:
    """The JSON record at ``path``, or None if there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def save_state(path, state: dict) -> None:
    """``torch.save`` of a dict of tensors and plain values, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path) -> dict:
    """The state written by :func:`save_state` (``torch.load(weights_only=True)``: nothing is unpickled)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(device: torch.device) -> dict:
    """The random number generators' state for a checkpoint: the CPU's, and CUDA's when ``device`` is CUDA."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """
    Restores what :func:`rng_state` saved. Raises when the checkpoint was written on another kind of device: the
    noise would come from another generator, so the resumed run would not continue the interrupted one exactly.
    """
    written = "cuda" if "cuda_rng" in state else "cpu"
    if written != device.type:
        raise ValueError(
            f"the checkpoint was written on {written!r}; resume it with --device {written} or use --restart"
        )
    torch.set_rng_state(state["rng"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def fit_resumable(config, out, *, restart: bool = False, callback=None, command: str | None = None) -> tuple:
    """
    ``pyro_vdrop.train.fit(config, out)`` that continues the run in ``out`` when it holds a checkpoint (unless
    ``restart``), and starts it over otherwise. Returns ``(summary, resumed)``.
    """
    from pyro_vdrop.train import fit

    out = Path(out)
    resume = (out / "checkpoint.pt").is_file() and not restart
    summary = fit(config, out, resume=resume, overwrite=not resume, progress=False, callback=callback, command=command)
    return summary, resume


class _Stop(Exception):
    pass


def estimate_fit_seconds(config, *, steps: int = 12, skip: int = 2) -> dict:
    """
    Times the first ``steps`` SVI steps of ``pyro_vdrop.train.fit(config)`` (without pretraining, in a temporary
    folder) and extrapolates to the run: ``seconds_per_step`` (median after ``skip`` warm-up steps) times the
    steps of ``config.epochs`` epochs, plus the pretraining epochs counted at a third of a step each (a plain
    network's step; rough). Evaluation is not counted.

    :returns: ``{"seconds_per_step", "steps", "seconds"}``.
    """
    import dataclasses

    from pyro_vdrop.train import fit
    from pyro_vdrop.train.components import load_data

    stamps = []

    def callback(info):
        stamps.append(time.perf_counter())
        if len(stamps) > steps:
            raise _Stop

    quick = dataclasses.replace(config, pretrain_epochs=0, epochs=max(config.epochs, steps + 1))  # >= steps steps
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fit(quick, Path(tmp) / "run", progress=False, callback=callback)
        except _Stop:
            pass
    if len(stamps) < skip + 2:
        raise RuntimeError(f"estimate_fit_seconds: the run stopped after {len(stamps)} steps; give more data")
    per_step = statistics.median(b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :]))
    n = load_data(config)[0].shape[0]
    steps_per_epoch = -(-n // config.batch_size)
    total = steps_per_epoch * (config.epochs + config.pretrain_epochs / 3)
    return {"seconds_per_step": per_step, "steps": int(total), "seconds": per_step * total}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def epoch_logger(name: str):
    """A ``fit`` callback that prints one progress line (to stdout, flushed) when an epoch starts."""
    state = {"epoch": None, "t0": time.perf_counter()}

    def callback(info):
        if info["epoch"] != state["epoch"]:
            state["epoch"] = info["epoch"]
            elapsed = time.perf_counter() - state["t0"]
            print(f"{name}: epoch {info['epoch'] + 1} started, loss {info['loss']:.4g}, {elapsed:.0f} s", flush=True)

    return callback
