# SPDX-License-Identifier: Apache-2.0
"""
Checkpoints of a run: plain data only, so that ``torch.load(weights_only=True)`` reads them and a file from a
stranger cannot run code; the random-number-generator states; the explicit conversion of older checkpoints.
"""

import io
import os
import pickle
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from pyro_vdrop.train.config import TrainConfig
from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.run_dir import CHECKPOINT_FILE, atomic_write, check_config_file, lock_run

#: Checkpoint format 2 holds plain data only (``torch.load(weights_only=True)``); format 1 pickled objects.
CHECKPOINT_VERSION = 2


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


def load_checkpoint(path: str | os.PathLike, *, map_location=None) -> dict:
    """
    Loads a checkpoint with ``torch.load(weights_only=True)``, which reads tensors, numbers, strings, lists and dicts
    and nothing else, so a file from a stranger cannot run code. The result has the in-memory format of
    :func:`save_checkpoint` (constraint objects, numpy and python generator states).

    Checkpoints of format 1 (earlier versions of pyro-vdrop) pickled a few objects: Pyro's constraint objects and
    numpy arrays. They load too, still with ``weights_only=True``, allowing exactly those classes
    (:func:`torch.serialization.safe_globals`) and nothing else; :func:`convert_checkpoint` rewrites them in format 2.

    :raises RunError: if the file is missing, unreadable, holds anything but plain data (and, for format 1, those
        classes), or is not a complete pyro-vdrop checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no checkpoint here; is this the --out directory of a 'pyro-vdrop fit' run?")
    try:
        state = _load_plain_data(path, map_location)
    except pickle.UnpicklingError as e:
        raise RunError(
            f"{path}: refused to load: the file holds Python objects other than tensors, numbers, strings, lists "
            f"and dicts{_unsafe_global(e)}, and loading those could run code hidden in the file. pyro-vdrop never "
            "writes such a checkpoint: do not use this run folder"
        ) from None
    except Exception as e:  # torch.load raises many types for a corrupt file
        raise RunError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(state, dict) or state.get("version") not in (1, CHECKPOINT_VERSION):
        raise RunError(f"{path}: not a pyro-vdrop checkpoint (format {CHECKPOINT_VERSION})")
    _check_checkpoint_keys(state, path)
    try:
        return decode_checkpoint(state)
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{path}: not a valid pyro-vdrop checkpoint ({e})") from e


def _load_plain_data(path: Path, map_location):
    with warnings.catch_warnings():  # torch warns about pickles it did not write; they fail anyway
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5
                raise
        with torch.serialization.safe_globals(_format1_classes()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("version") != 1:  # those classes are for format 1 only
        raise pickle.UnpicklingError("a file that is not a format-1 checkpoint holds numpy arrays or constraints")
    return state


def _format1_classes() -> list:
    """Exactly the classes a format-1 checkpoint pickled: the constraints of ``pyro-vdrop fit``'s parameters
    (``real``; ``positive`` for a likelihood scale) and the numpy array of numpy's generator state."""
    from torch.distributions import constraints

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    classes = [type(constraints.real), type(constraints.positive), np.ndarray, np.dtype]
    classes += [(reconstruct, f"numpy.{core}.multiarray._reconstruct") for core in ("_core", "core")]
    if hasattr(np, "dtypes"):
        classes.append(np.dtypes.UInt32DType)
    return classes


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _unsafe_global(error: BaseException) -> str:
    """The global that ``torch.load(weights_only=True)`` refused, as ``" (it names os.system)"``, if it says."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f" (it names {found.group(1)})" if found else ""


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

    if not isinstance(name, str):  # format 1: the (allow-listed) object itself
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
    """The inverse of :func:`encode_checkpoint`; format 1 passes through."""
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


def convert_checkpoint(run_dir: str | os.PathLike) -> Path:
    """
    Rewrites the checkpoint of ``run_dir`` in the current format 2 (see :func:`save_checkpoint`), which plain
    ``torch.load(weights_only=True)`` reads without any allowed classes. A format-1 checkpoint (earlier versions)
    is kept beside it as ``checkpoint.pt.format1``. pyro-vdrop itself reads both formats
    (:func:`load_checkpoint`), and ``fit --resume`` writes format 2 from its next epoch on.

    :returns: The path of the rewritten checkpoint.
    :raises RunError: if another process writes the run, or the file is not a pyro-vdrop checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"--run {run_dir}: no such directory")
    path = run_dir / CHECKPOINT_FILE
    with lock_run(run_dir, command="pyro-vdrop convert"):
        state = load_checkpoint(path, map_location="cpu")
        checkpoint_config(state, path)
        check_config_file(run_dir, state["config"], path)
        if state["version"] != CHECKPOINT_VERSION:
            backup = path.with_name(f"{CHECKPOINT_FILE}.format{state['version']}")
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


def checkpoint_config(state: dict, path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: its configuration is invalid: {e}") from e


__all__ = [
    "CHECKPOINT_VERSION",
    "checkpoint_config",
    "convert_checkpoint",
    "decode_checkpoint",
    "encode_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
