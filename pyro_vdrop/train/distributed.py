# SPDX-License-Identifier: Apache-2.0
"""
Several processes: the :mod:`torch.distributed` world, process 0's work shared, :func:`process_group`, :func:`launch`.
"""

import contextlib
import dataclasses
import os
import pickle
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.run_dir import atomic_write

#: How long a process waits for the others in a collective (e.g. while process 0 evaluates) before it gives up.
DISTRIBUTED_TIMEOUT = timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in a run: its rank, the number of processes and its rank on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The default process group as this process sees it; a single process when none (or one of size 1) exists."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    rank = dist.get_rank()
    return World(rank=rank, size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", rank)))


class Rank0Error(RunError):
    """Process 0's :class:`RunError`, raised again in the other processes, which leave reporting it to process 0."""


def from_rank0(world: World, fn: Callable[[], Any]) -> Any:
    """``fn()`` run by process 0 alone; its result, or its :class:`RunError`, is shared with every process."""
    if not world.distributed:
        return fn()
    outcome, error = [None], None
    if world.rank == 0:
        try:
            outcome = [(True, fn())]
        except RunError as e:
            outcome, error = [(False, str(e))], e
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    ok, value = outcome[0]
    if not ok:
        raise Rank0Error(value)
    return value


def sum_over_processes(world: World, values: list[float], device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def process_device(device: torch.device, world: World) -> torch.device:
    """With CUDA and several processes, process ``LOCAL_RANK`` computes on ``cuda:LOCAL_RANK``."""
    if device.type != "cuda" or not world.distributed:
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise RunError(
            f"process {world.rank} (local rank {world.local_rank}) computes on cuda:{world.local_rank}, but this "
            f"machine has {count} CUDA device(s): start at most {count} process(es) per machine with --device cuda, "
            "or use --device cpu"
        )
    return torch.device("cuda", world.local_rank)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def process_group(*, timeout: timedelta = DISTRIBUTED_TIMEOUT) -> Iterator[None]:
    r"""
    Joins this process to the default :mod:`torch.distributed` process group described by the environment
    variables that ``torchrun`` sets (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
    for the ``with`` block, and destroys the group when the block ends. The backend is gloo for CPU tensors and,
    where CUDA is available, nccl for CUDA tensors (``"cpu:gloo,cuda:nccl"``; process ``LOCAL_RANK`` then computes on
    ``cuda:LOCAL_RANK``). Inside the block :func:`fit` trains data-parallel.

    Example (``torchrun --nproc_per_node 2 train.py``)::

        with process_group():
            fit(TrainConfig(epochs=5), "runs/demo")

    :param timedelta timeout: How long a collective operation waits for the other processes before it fails, so
        that a process that died or hangs does not leave the others waiting for ever.
    :raises RunError: if torch has no torch.distributed, a group is already initialised, or a variable is missing.
    """
    if not dist.is_available():
        raise RunError("this torch build has no torch.distributed: train in a single process")
    if dist.is_initialized():
        raise RunError("a torch.distributed process group is already initialised in this process")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if name not in os.environ]
    if missing:
        raise RunError(
            f"the environment variables {', '.join(missing)} are not set: start the processes with torchrun or "
            "'pyro-vdrop fit --nproc N'"
        )
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
    try:
        yield
        # every process is done communicating before any tears the group down (a gloo peer torn down mid-exchange
        # can abort the other process); not after an error, when the others may never arrive
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULT_FILE = "result.pt"
_EXIT_RUN_ERROR = 2


def _launched(rank, fn, args, kwargs, nproc, port, threads, timeout, folder):
    """The body of a process started by :func:`launch`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    torch.set_num_threads(threads)
    with process_group(timeout=timeout):
        try:
            result = fn(*args, **kwargs)
        except RunError as e:
            # written before leaving the group: the others may fail as soon as this process is gone
            message = str(e)
            atomic_write(Path(folder) / f"error-{rank}.txt", lambda f: f.write(message), binary=False)
            raise SystemExit(_EXIT_RUN_ERROR) from None
    if rank == 0:
        atomic_write(Path(folder) / _RESULT_FILE, lambda f: torch.save(result, f), binary=True)


def _stop(processes, *, grace: float = 3.0) -> None:
    """Stops the processes of :func:`launch` after this one was interrupted: Ctrl-C interrupted them as well, so let
    them unwind; else interrupt them; terminate those that still run."""
    for stop in (None, signal.SIGINT, signal.SIGTERM):
        alive = [p for p in processes if p.is_alive()]
        for p in alive if stop is not None else ():
            os.kill(p.pid, stop)
        deadline = time.monotonic() + grace
        for p in alive:
            p.join(timeout=max(deadline - time.monotonic(), 0.0))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


@contextlib.contextmanager
def private_folder() -> Iterator[str]:
    """A new temporary folder that only this user can enter or write (mode 0700, owned by us), removed at the end:
    where :func:`launch`'s processes leave their errors and process 0 its result."""
    with tempfile.TemporaryDirectory(prefix="pyro-vdrop-launch-") as folder:
        info = os.lstat(folder)
        if info.st_mode & 0o077 or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            raise RunError(f"the temporary folder {folder} is not private (mode {oct(info.st_mode & 0o777)})")
        yield folder


def launch(
    fn: Callable,
    *args,
    nproc: int,
    threads: int | None = None,
    timeout: timedelta = DISTRIBUTED_TIMEOUT,
    **kwargs,
) -> Any:
    r"""
    Runs ``fn(*args, **kwargs)`` in ``nproc`` new local processes (:func:`torch.multiprocessing.spawn`) joined in a
    :mod:`torch.distributed` process group (:func:`process_group`, on 127.0.0.1 at a free port), as
    ``pyro-vdrop fit --nproc N`` does with :func:`fit`. ``fn`` (e.g. a module-level function) and its arguments must
    be picklable, and its result plain data (tensors, numbers, strings, lists, tuples, dicts): it comes back through
    ``torch.load(weights_only=True)``.

    If a process fails, the others are stopped: a :class:`RunError` is raised again here (that of the process of
    the lowest rank that raised one), any other exception as :class:`torch.multiprocessing.ProcessRaisedException`
    with the failed process's traceback.

    :param callable fn: The function, e.g. :func:`fit`.
    :param int nproc: The number of processes.
    :param int threads: torch CPU threads per process (default: the CPUs available divided by ``nproc``, at
        least 1).
    :param timedelta timeout: See :func:`process_group`.
    :returns: Process 0's return value.
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer; got {nproc!r}")
    if not dist.is_available():
        raise RunError("this torch build has no torch.distributed: train in a single process")
    threads = max(1, cpu_count() // nproc) if threads is None else threads
    with private_folder() as folder:
        spawn_args = (fn, args, kwargs, nproc, _free_port(), threads, timeout, folder)
        context = torch.multiprocessing.start_processes(
            _launched, args=spawn_args, nprocs=nproc, join=False, start_method="spawn"
        )
        try:
            while not context.join():  # raises when a process fails, after stopping the others
                pass
        except (torch.multiprocessing.ProcessExitedException, torch.multiprocessing.ProcessRaisedException):
            errors = sorted(Path(folder).glob("error-*.txt"), key=lambda path: int(path.stem.split("-")[1]))
            if errors:
                raise RunError(errors[0].read_text(encoding="utf-8")) from None
            raise
        except KeyboardInterrupt:
            _stop(context.processes)
            raise
        # plain data only, even from our own process in our own private folder: nothing here unpickles objects
        fd = os.open(Path(folder) / _RESULT_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            try:
                return torch.load(f, weights_only=True)
            except pickle.UnpicklingError as e:
                raise TypeError(
                    f"launch: the result of {getattr(fn, '__name__', fn)!r} in process 0 is not plain data (tensors, "
                    "numbers, strings, lists, tuples, dicts), so it cannot come back to this process; return such a "
                    "summary instead"
                ) from e


__all__ = [
    "DISTRIBUTED_TIMEOUT",
    "Rank0Error",
    "World",
    "cpu_count",
    "current_world",
    "from_rank0",
    "launch",
    "private_folder",
    "process_device",
    "process_group",
    "sum_over_processes",
]
