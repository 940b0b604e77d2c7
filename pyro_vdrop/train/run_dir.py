# SPDX-License-Identifier: Apache-2.0
"""
The files of a run directory: their names, atomic writes, metrics, the run lock, and the check of a checkpoint
against ``config.json`` (the checkpoints themselves: :mod:`pyro_vdrop.train.checkpoint`).
"""

import contextlib
import csv
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyro_vdrop.train.config import RUNTIME_FIELDS
from pyro_vdrop.train.errors import RunError

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.md"
REPORT_FIGURES = (
    "log_alpha_hist.png",
    "curves.png",
    "first_layer_masks.png",
    "reliability.png",
    "entropy.png",
    "input_mask.png",
)
#: Every file a run directory may hold; ``--overwrite`` removes these and nothing else.
RUN_FILES = (
    CONFIG_FILE,
    CHECKPOINT_FILE,
    METRICS_CSV,
    METRICS_JSONL,
    SUMMARY_FILE,
    EVALUATION_FILE,
    REPORT_FILE,
    *REPORT_FIGURES,
)

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
        if isinstance(e, OSError):  # a full disk, say: name the file
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=False, default=str), binary=False)


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


__all__ = [
    "CHECKPOINT_FILE",
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
    "lock_run",
    "read_metrics",
    "remove_stale_temp_files",
    "run_in_progress",
    "write_json",
    "write_metrics",
]
