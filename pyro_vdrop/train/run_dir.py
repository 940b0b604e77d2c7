# SPDX-License-Identifier: Apache-2.0
"""
The files of a run directory: atomic writes, checkpoints (plain data only), metrics, the run lock.
"""

import contextlib
import csv
import io
import json
import os
import pickle
import random
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vdrop.train.config import RUNTIME_FIELDS, TrainConfig
from pyro_vdrop.train.errors import RunError

CONFIG_FILE = "config.json"


CHECKPOINT_FILE = "checkpoint.pt"


METRICS_CSV = "metrics.csv"


METRICS_JSONL = "metrics.jsonl"


SUMMARY_FILE = "summary.json"


EVALUATION_FILE = "evaluation.json"


REPORT_FILE = "report.md"


REPORT_FIGURES = ("log_alpha_hist.png", "curves.png", "first_layer_masks.png")


#: Every file a run directory may hold; ``--overwrite`` removes these and nothing else.
RUN_FILES = (CONFIG_FILE, CHECKPOINT_FILE, METRICS_CSV, METRICS_JSONL, SUMMARY_FILE, EVALUATION_FILE, REPORT_FILE)


RUN_FILES = (*RUN_FILES, *REPORT_FIGURES)


#: Checkpoint format 2 holds plain data only (``torch.load(weights_only=True)``); format 1 pickled objects.
CHECKPOINT_VERSION = 2


#: Columns of ``metrics.csv`` / keys of ``metrics.jsonl``, in order.
METRIC_KEYS = (
    "epoch",
    "step",
    "loss",
    "elbo",
    "expected_log_lik",
    "kl",
    "train_acc",
    "test_error",
    "test_error_pruned",
    "sparsity",
    "compression",
    "kl_weight",
    "lr",
    "epoch_time",
    "time",
)


def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool) -> None:
    """Writes ``path`` through a temporary file in the same folder, fsync and :func:`os.replace`."""
    path = Path(path)
    try:
        # mkstemp creates the file with O_EXCL (mode 0600): it never opens an existing file or follows a link, and
        # os.replace swaps the directory entry, so a symlink at ``path`` is replaced, not written through
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not str(e).startswith("cannot write"):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=False, default=str), binary=False)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """
    Saves a checkpoint atomically: a temporary file in the same folder, ``fsync``, then :func:`os.replace`, so a
    crash never leaves a truncated checkpoint.

    A training checkpoint holds ``version``, ``config``, ``epoch`` (completed epochs), ``step``, ``param_store``
    (:meth:`~pyro.params.param_store.ParamStoreDict.get_state`: the model's and the guide's parameters),
    ``optim`` (:meth:`~pyro_vdrop.optim.JointLRScheduler.get_state`, the format of
    :meth:`~pyro.optim.PyroOptim.get_state` for ``pyro.optim.LambdaLR``: Adam's moments and the learning-rate
    schedule), ``rng`` (torch, CUDA, numpy and python states; with several
    processes a list of them, one per rank), ``world_size`` (the number of processes; absent means 1), ``history``
    (the metric rows) and ``elapsed`` (training seconds).

    The file holds only tensors, numbers, strings, lists and dicts, so that ``torch.load(path, weights_only=True)``
    reads it without running any code: the param store's constraints are stored by their name in
    :mod:`pyro.distributions.constraints` and the numpy and python generator states as tensors and lists
    (:func:`load_checkpoint` turns them back).

    :raises ValueError: if the state holds a constraint that has no name in :mod:`pyro.distributions.constraints`.
    """
    buffer = io.BytesIO()  # serialised in memory: torch's zip writer reports a failed write (a full disk) vaguely
    torch.save(encode_checkpoint(state), buffer)
    atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()), binary=True)


def load_checkpoint(path: str | os.PathLike, *, map_location=None, trust: bool = False) -> dict:
    """
    Loads a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``, which reads
    tensors, numbers, strings, lists and dicts and nothing else, so a file from a stranger cannot run code. The
    result has the in-memory format of :func:`save_checkpoint` (constraint objects, numpy and python generator
    states).

    :param bool trust: Also read checkpoints of format 1 (pyro-vdrop 0.1.0.dev0 before this change), which pickle
        Python objects, with ``torch.load(weights_only=False)``. That **can run arbitrary code** hidden in the
        file: pass it only for files you wrote yourself (``--trust-checkpoint`` on the command line).
    :raises RunError: if the file is missing, unreadable, holds anything but plain data (without ``trust``), or is
        not a pyro-vdrop checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no checkpoint here; is this the --out directory of a 'pyro-vdrop fit' run?")
    try:
        with warnings.catch_warnings():  # torch warns about pickles it did not write; they fail below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise RunError(
                f"{path}: refused to load: the file holds Python objects other than tensors, numbers, strings, lists "
                f"and dicts{_unsafe_global(e)}, and loading those can run code hidden in the file. A checkpoint "
                f"written by pyro-vdrop before checkpoint format {CHECKPOINT_VERSION} holds such objects: if you "
                "wrote this file yourself, convert it once with 'pyro-vdrop convert --run DIR --trust-checkpoint'. "
                "Never trust a run folder from someone else"
            ) from None
        state = _load_trusted(path, map_location)
    except Exception as e:  # torch.load raises many types for a corrupt file
        raise RunError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(state, dict) or state.get("version") not in (1, CHECKPOINT_VERSION):
        raise RunError(f"{path}: not a pyro-vdrop checkpoint (format {CHECKPOINT_VERSION})")
    if state["version"] == 1 and not trust:
        raise RunError(
            f"{path}: a checkpoint of format 1; convert it with 'pyro-vdrop convert --run DIR --trust-checkpoint' "
            "if you wrote it yourself"
        )
    _check_checkpoint_keys(state, path)
    try:
        return decode_checkpoint(state)
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{path}: not a valid pyro-vdrop checkpoint ({e})") from e


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _unsafe_global(error: BaseException) -> str:
    """The global that ``torch.load(weights_only=True)`` refused, as ``" (it names os.system)"``, if it says."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f" (it names {found.group(1)})" if found else ""


def _load_trusted(path: Path, map_location) -> dict:
    """``torch.load(weights_only=False)``: only behind the user's explicit ``trust``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RunError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {_first_line(e)})") from e


#: The keys of a training checkpoint and their types (``world_size`` may be absent: one process).
_CHECKPOINT_KEYS = {
    "config": dict,
    "epoch": int,
    "step": int,
    "param_store": dict,
    "optim": dict,
    "rng": (dict, list),
    "history": list,
    "elapsed": (int, float),
}


def _check_checkpoint_keys(state: dict, path: Path) -> None:
    missing = sorted(set(_CHECKPOINT_KEYS) - set(state))
    if missing:
        raise RunError(f"{path}: not a complete pyro-vdrop checkpoint: it lacks {', '.join(missing)}")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise RunError(f"{path}: not a valid pyro-vdrop checkpoint: {key!r} is a {type(state[key]).__name__}")
    params = state["param_store"].get("params")
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise RunError(f"{path}: not a valid pyro-vdrop checkpoint: its param_store holds no tensors")


def _encode_constraint(constraint, name: str) -> str:
    """The name of ``constraint`` in :mod:`pyro.distributions.constraints` (an unpickled copy of a named constraint
    object, as format 1 holds, has the same type and attributes)."""
    from pyro.distributions import constraints

    for candidate in sorted(dir(constraints)):
        value = getattr(constraints, candidate)
        if candidate.startswith("_") or not isinstance(value, constraints.Constraint):
            continue
        if value is constraint or (type(value) is type(constraint) and vars(value) == vars(constraint)):
            return candidate
    raise ValueError(
        f"parameter {name!r} has the constraint {constraint!r}, which has no name in pyro.distributions.constraints; "
        "a checkpoint stores constraints by name"
    )


def _decode_constraint(name):
    from pyro.distributions import constraints

    if not isinstance(name, str):  # format 1 (trusted): the object itself
        return name
    value = getattr(constraints, name, None) if not name.startswith("_") else None
    if not isinstance(value, constraints.Constraint):
        raise ValueError(f"unknown constraint {name!r}")
    return value


def _encode_rng(state: dict) -> dict:
    kind, key, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {
        "torch": state["torch"],
        "cuda": state["cuda"],
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def _decode_rng(state: dict) -> dict:
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        key = np.asarray(numpy_state["key"].numpy(), dtype=np.uint32)
        numpy_state = (
            numpy_state["kind"],
            key,
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["state"]), python_state["gauss_next"])
    return {**state, "numpy": numpy_state, "python": python_state}


def encode_checkpoint(state: dict) -> dict:
    """The in-memory checkpoint as plain data for ``torch.load(weights_only=True)``."""
    store = state["param_store"]
    rng = state["rng"]
    return {
        **state,
        "version": CHECKPOINT_VERSION,
        "param_store": {
            "params": {name: value.detach() for name, value in store["params"].items()},
            "constraints": {name: _encode_constraint(c, name) for name, c in store["constraints"].items()},
        },
        "rng": [_encode_rng(r) for r in rng] if isinstance(rng, list) else _encode_rng(rng),
    }


def decode_checkpoint(state: dict) -> dict:
    """The inverse of :func:`encode_checkpoint`; format 1 (trusted) passes through."""
    store = state["param_store"]
    rng = state["rng"]
    return {
        **state,
        "param_store": {
            "params": store["params"],
            "constraints": {name: _decode_constraint(c) for name, c in store.get("constraints", {}).items()},
        },
        "rng": [_decode_rng(r) for r in rng] if isinstance(rng, list) else _decode_rng(rng),
    }


def convert_checkpoint(run_dir: str | os.PathLike, *, trust_checkpoint: bool = False) -> Path:
    """
    Rewrites the checkpoint of ``run_dir`` in the current, plain-data format (see :func:`save_checkpoint`), so that
    it loads without ``weights_only=False``. The old file is kept beside it as ``checkpoint.pt.format<N>``.

    Reading a format-1 checkpoint unpickles it, which **can run arbitrary code hidden in the file**: do this only
    for run directories you wrote yourself, and say so with ``trust_checkpoint=True``
    (``pyro-vdrop convert --run DIR --trust-checkpoint``).

    :returns: The path of the rewritten checkpoint.
    :raises RunError: without ``trust_checkpoint``, if another process writes the run, or if the file is not a
        pyro-vdrop checkpoint.
    """
    run_dir = Path(run_dir)
    if not trust_checkpoint:
        raise RunError(
            "converting reads the old checkpoint with pickle, which can run code hidden in the file: pass "
            "--trust-checkpoint (trust_checkpoint=True) if, and only if, you wrote this run yourself"
        )
    if not run_dir.is_dir():
        raise RunError(f"--run {run_dir}: no such directory")
    path = run_dir / CHECKPOINT_FILE
    with lock_run(run_dir, command="pyro-vdrop convert"):
        state = load_checkpoint(path, map_location="cpu", trust=True)
        checkpoint_config(state, path)
        check_config_file(run_dir, state["config"], path)
        backup = path.with_name(f"{CHECKPOINT_FILE}.format{state['version']}")
        if state["version"] != CHECKPOINT_VERSION:
            if backup.exists() or backup.is_symlink():
                raise RunError(f"{backup} exists: move it away first, it may be the only copy of an older checkpoint")
            data = path.read_bytes()  # keep the user's file
            atomic_write(backup, lambda f: f.write(data), binary=True)
        save_checkpoint(path, state)
    return path


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def write_metrics(run_dir: str | os.PathLike, history: list[dict]) -> None:
    """(Re)writes ``metrics.csv`` and ``metrics.jsonl`` of ``run_dir`` atomically from the metric rows."""
    run_dir = Path(run_dir)

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=METRIC_KEYS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)

    atomic_write(run_dir / METRICS_CSV, write_csv, binary=False)
    atomic_write(
        run_dir / METRICS_JSONL, lambda f: f.writelines(json.dumps(row) + "\n" for row in history), binary=False
    )


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The metric rows of ``run_dir`` (from ``metrics.jsonl``)."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        raise RunError(f"{path}: no metrics here; is {run_dir} the --out directory of a 'pyro-vdrop fit' run?")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


#: The lock file of a run directory: :func:`lock_run` holds an exclusive lock on it while a process writes the run.
LOCK_FILE = ".pyro-vdrop.lock"


def _try_lock(fd: int, *, exclusive: bool) -> bool:
    """A non-blocking lock on the open file ``fd``, released by the OS when the process dies; False if held."""
    try:
        import fcntl
    except ImportError:  # Windows: a byte-range lock on the first byte (exclusive only)
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_lock_file(path: Path, flags: int) -> int:
    # O_NOFOLLOW: a lock file planted as a symlink must not make us write into the file it points at
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)


def _lock_holder(path: Path) -> str:
    try:
        with open(_open_lock_file(path, os.O_RDONLY), encoding="utf-8", errors="replace") as f:
            holder = f.read(500).strip()
    except OSError:
        holder = ""
    return holder or "a process that has not yet written its name"


@contextlib.contextmanager
def lock_run(run_dir: str | os.PathLike, *, command: str | None = None) -> Iterator[None]:
    """
    Holds an exclusive lock on the run directory ``run_dir`` (an existing folder) for the ``with`` block, so that
    two processes never write one run. The lock is :func:`fcntl.flock` on ``run_dir/.pyro-vdrop.lock``, which
    records the holder (process id, host, command); the OS releases it when the process ends, however it ends,
    so a killed run never leaves a stale lock.

    :raises RunError: if another process holds the lock (the message names it), or the lock file cannot be
        opened.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise RunError(f"cannot open the lock file {path}: {e.strerror}; is {run_dir} writable?") from e
    try:
        if not _try_lock(fd, exclusive=True):
            raise RunError(
                f"{run_dir} is being written by another pyro-vdrop process ({_lock_holder(path)}): wait for it to "
                "finish or stop it, or choose another --out"
            )
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.write(fd, (holder + (f": {command}" if command else "") + "\n").encode("utf-8"))
        yield
    finally:
        os.close(fd)  # releases the lock


def run_in_progress(run_dir: str | os.PathLike) -> str | None:
    """The holder of ``run_dir``'s lock (see :func:`lock_run`) while a process trains the run, else None."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = _open_lock_file(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, exclusive=False):
            return None
    finally:
        os.close(fd)
    return _lock_holder(path)


def remove_stale_temp_files(run_dir: Path) -> list[str]:
    """Removes the temporary files that an interrupted atomic write of this package left in ``run_dir`` (by their
    name pattern, ``.<run file>.<random>.tmp``); call it only while holding the run's lock."""
    pattern = re.compile(r"\.(" + "|".join(re.escape(name) for name in RUN_FILES) + r")\.[A-Za-z0-9_]+\.tmp")
    removed = []
    for entry in os.scandir(run_dir):
        if pattern.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def check_config_file(run_dir: Path, config: dict, checkpoint: Path) -> None:
    """Raises a :class:`RunError` unless ``config.json`` in ``run_dir`` records the checkpoint's configuration
    (``data_dir`` and ``device`` may differ: a resumed run may move)."""
    path = run_dir / CONFIG_FILE
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise RunError(
            f"{path} is missing: a run directory of 'pyro-vdrop fit' holds it beside {CHECKPOINT_FILE}"
        ) from None
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot read the run's configuration ({e})") from e
    saved = record.get("config") if isinstance(record, dict) else None
    if not isinstance(saved, dict):
        raise RunError(f"{path}: no 'config' entry; is {run_dir} a run directory of 'pyro-vdrop fit'?")
    differ = [
        f"{name}={config.get(name)!r} in the checkpoint but {saved.get(name)!r} in {CONFIG_FILE}"
        for name in sorted(set(saved) | set(config))
        if name not in RUNTIME_FIELDS and saved.get(name) != config.get(name)
    ]
    if differ:
        raise RunError(
            f"{checkpoint} contradicts {path}: {'; '.join(differ)}. The run directory was mixed up or altered; "
            "restore the run's own files or start a new run"
        )


def checkpoint_config(state: dict, path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: its configuration is invalid: {e}") from e


__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_VERSION",
    "CONFIG_FILE",
    "EVALUATION_FILE",
    "LOCK_FILE",
    "METRICS_CSV",
    "METRICS_JSONL",
    "METRIC_KEYS",
    "REPORT_FIGURES",
    "REPORT_FILE",
    "RUN_FILES",
    "SUMMARY_FILE",
    "atomic_write",
    "check_config_file",
    "checkpoint_config",
    "convert_checkpoint",
    "decode_checkpoint",
    "encode_checkpoint",
    "load_checkpoint",
    "lock_run",
    "read_metrics",
    "remove_stale_temp_files",
    "rng_state",
    "run_in_progress",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
    "write_metrics",
]
