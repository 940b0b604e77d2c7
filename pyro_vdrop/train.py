# SPDX-License-Identifier: Apache-2.0
"""
The training loop behind the ``pyro-vdrop`` command: variational dropout on MNIST with
:class:`~pyro.infer.SVI`, a progress bar, per-epoch metrics, atomic checkpoints and exact resume.

A *run directory* holds everything about one training run:

====================  =====================================================================
``config.json``       the :class:`TrainConfig`, the command, versions and machine
``checkpoint.pt``     the latest end-of-epoch checkpoint (see :func:`save_checkpoint`)
``metrics.csv``       one row per epoch (also as ``metrics.jsonl``)
``summary.json``      the final figures, written when training completes
``evaluation.json``   written by :func:`evaluate`
``report.md``         written by :func:`write_report`, with its PNG figures
``.pyro-vdrop.lock``  locked by the process that trains the run (see :func:`lock_run`)
====================  =====================================================================

Example::

    from pyro_vdrop.train import TrainConfig, fit, evaluate

    summary = fit(TrainConfig(epochs=5), "runs/demo")
    print(summary["test_error_pruned"], summary["compression"])
    print(evaluate("runs/demo", num_samples=10))

    # the same in 2 local processes with torch.distributed (the global batch stays 100)
    summary = launch(fit, TrainConfig(epochs=5), "runs/demo-2", nproc=2)

Under ``torchrun`` (or any launcher that initialises the default :mod:`torch.distributed` process group),
:func:`fit` trains data-parallel by itself; see its docstring.

**References**

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local
    Reparameterization Trick." NeurIPS 2015.
[2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural
    Networks." ICML 2017.
"""

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import pickle
import platform
import random
import re
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

# ---------------------------------------------------------------------------------------------------------------------
# Constants (the papers' numbers live here, next to their reference)
# ---------------------------------------------------------------------------------------------------------------------

MODELS = ("mlp", "lenet300", "lenet5")
GUIDES = ("sparse", "A", "A2", "B", "gaussian-dropout")
ESTIMATORS = ("lrt", "flipout", "single-sample", "mean")
DEVICES = ("auto", "cpu", "cuda")
LR_DECAYS = ("linear", "none")

#: Weights with :math:`\log\alpha` above this are pruned (Molchanov et al. [2], §4.3).
PRUNE_THRESHOLD = 3.0
#: "A2" is variant A with the KL term scaled down by a factor of 3 (Kingma et al. [1], §5).
A2_KL_SCALE = 1.0 / 3.0
#: Sparse VD clips :math:`\log\alpha` to this interval inside the KL (Molchanov et al. [2], §4.1).
SPARSE_LOG_ALPHA_CLIP = (-8.0, 8.0)

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
RUN_FILES += REPORT_FIGURES
#: Checkpoint format 2 holds plain data only (``torch.load(weights_only=True)``); format 1 pickled objects.
CHECKPOINT_VERSION = 2
#: How long a process waits for the others in a collective (e.g. while process 0 evaluates) before it gives up.
DISTRIBUTED_TIMEOUT = timedelta(minutes=5)

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

#: Options that may differ when a run is resumed or evaluated (where the data is, where to compute).
_RUNTIME_FIELDS = ("data_dir", "device")
_EVAL_BATCH = 1000


class RunError(Exception):
    """A problem with a run directory, its checkpoint, its data or the options given for it; the message says what
    to do. The command line prints it and exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    r"""
    Everything that determines a training run. The defaults train LeNet-300-100 with sparse variational
    dropout [2] and the local reparameterization trick [1] on the embedded MNIST subset in about a minute
    on two CPU cores: 5 epochs of plain pretraining, then 30 epochs with Adam at 3e-3 decayed linearly to 0 and the
    KL weight annealed over the first 10. Molchanov et al.'s full recipe [2] (200 epochs, lr 1e-3, warm-up over
    epochs 5-20) needs ``epochs=200, lr=1e-3, kl_warmup_start=5, kl_warmup=15``; the larger default learning rate
    makes up for the short run.

    :param str model: ``"mlp"`` (the paper's 3-hidden-layer ReLU net, ``width`` units per layer),
        ``"lenet300"`` (LeNet-300-100) or ``"lenet5"`` (LeNet-5-Caffe).
    :param int width: Hidden units per layer of ``"mlp"``.
    :param str dataset: ``"embedded"`` (5,000/1,000 images shipped with the package) or ``"mnist"``.
    :param str data_dir: Folder of the MNIST IDX files (``dataset="mnist"``; default ``$PYRO_VDROP_MNIST_DIR``).
    :param int train_subset: Train on a seeded random subset of this many training images.
    :param int test_subset: Evaluate on a seeded random subset of this many test images.
    :param str guide: ``"sparse"`` (additive parameterization, α per weight, unbounded [2]), ``"A"``
        (correlated noise [1]), ``"A2"`` (A with the KL scaled by 1/3 [1]), ``"B"`` (independent noise [1]) or
        ``"gaussian-dropout"`` (fixed :math:`\alpha = p/(1-p)`, the Bernoulli-equivalent Gaussian dropout).
    :param float dropout_p: The Bernoulli-equivalent dropout rate of ``"gaussian-dropout"``.
    :param str estimator: ``"lrt"`` (local reparameterization), ``"flipout"``, ``"single-sample"``
        (one weight sample per minibatch) or ``"mean"``: a noise-free diagnostic that uses the posterior means θ
        in the data term (:func:`~pyro_vdrop.poutine.local_reparam` with ``estimator="mean"``), so training is
        deterministic given the data order; it does not learn α from the data, so it is not variational dropout.
    :param int epochs: Passes over the training data.
    :param int batch_size: Minibatch size :math:`M` (the data term is scaled by :math:`N/M`); the global
        minibatch when training in several processes, each of which takes :math:`M/P` examples per step.
    :param float lr: Adam's learning rate.
    :param str lr_decay: ``"linear"`` (to 0 at the end of training, as in [2]) or ``"none"``.
    :param float kl_warmup: Epochs over which the KL weight rises linearly from 0 to 1 (0: no warm-up).
    :param float kl_warmup_start: Epoch at which the warm-up starts (the KL weight is 0 before).
    :param int pretrain_epochs: Epochs of plain (deterministic) training of the network before variational
        training; its weights initialise the posterior means :math:`\theta` [2].
    :param int seed: Seed of every random number generator (initialisation, shuffling, noise).
    :param str device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
    """

    model: str = "lenet300"
    width: int = 1024
    dataset: str = "embedded"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    guide: str = "sparse"
    dropout_p: float = 0.5
    estimator: str = "lrt"
    epochs: int = 30
    batch_size: int = 100
    lr: float = 3e-3
    lr_decay: str = "linear"
    kl_warmup: float = 10.0
    kl_warmup_start: float = 0.0
    pretrain_epochs: int = 5
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        choices = {
            "model": MODELS,
            "guide": GUIDES,
            "estimator": ESTIMATORS,
            "device": DEVICES,
            "lr_decay": LR_DECAYS,
            "dataset": ("embedded", "mnist"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        positive = ("width", "epochs", "batch_size", "train_subset", "test_subset")
        for name in positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name in ("pretrain_epochs", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number; got {self.lr!r}")
        if not 0 < self.dropout_p < 1:
            raise ValueError(f"dropout_p must lie strictly between 0 and 1; got {self.dropout_p!r}")
        for name in ("kl_warmup", "kl_warmup_start"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number of epochs; got {value!r}")
        if self.data_dir is not None and self.dataset != "mnist":
            raise ValueError(f"data_dir applies to dataset='mnist' only; got dataset={self.dataset!r}")

    def to_dict(self) -> dict:
        """The configuration as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def kl_weight(config: TrainConfig, epoch_progress: float) -> float:
    r"""
    The KL weight :math:`\beta` at a (fractional) epoch: 0 before ``kl_warmup_start``, rising linearly to 1 over
    ``kl_warmup`` epochs, then 1 [2]. Only the KL term is weighted; the data term keeps its :math:`N/M` scale.

    :param TrainConfig config: The run's configuration.
    :param float epoch_progress: Completed epochs, e.g. ``step / steps_per_epoch``.
    :rtype: float
    """
    if config.kl_warmup == 0:
        return 0.0 if epoch_progress < config.kl_warmup_start else 1.0
    return min(max((epoch_progress - config.kl_warmup_start) / config.kl_warmup, 0.0), 1.0)


class _LinearDecay:
    """``lr_lambda`` for :class:`torch.optim.lr_scheduler.LambdaLR`: 1 at step 0, 0 after ``total`` steps."""

    def __init__(self, total: int, decay: str):
        self.total = total
        self.decay = decay

    def __call__(self, step: int) -> float:
        if self.decay == "none":
            return 1.0
        return max(1.0 - step / self.total, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Effect handlers used by the loop
# ---------------------------------------------------------------------------------------------------------------------


def _likelihood_dist(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


class _ObservedLogits(Messenger):
    """Records the logits and the scaled log-likelihood of the model's Categorical observation site."""

    def __init__(self):
        super().__init__()
        self.logits = None
        self.log_lik = None
        self.name = None

    def _pyro_post_sample(self, msg):
        fn = _likelihood_dist(msg["fn"])
        if not (msg["is_observed"] and isinstance(fn, torch.distributions.Categorical)):
            return
        if self.name is not None and self.name != msg["name"]:
            raise RunError(
                f"the model has two Categorical observation sites, {self.name!r} and {msg['name']!r}; "
                "the training loop needs exactly one"
            )
        self.name = msg["name"]
        self.logits = fn.logits.detach()
        log_prob = fn.log_prob(msg["value"]).detach()
        if msg["mask"] is not None:
            log_prob = log_prob * msg["mask"]
        self.log_lik = float((log_prob * msg["scale"]).sum())


class _DataWeight(Messenger):
    """
    Scales the observed sites by ``factor`` and masks them with ``mask``: in a multi-process epoch whose last
    steps carry padding (examples repeated so that every process has as many), the padding is masked out and the
    real examples are scaled so that each counts exactly once.
    """

    def __init__(self, mask: torch.Tensor, factor: float):
        super().__init__()
        self.mask = mask
        self.factor = factor

    def _pyro_sample(self, msg):
        if msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.factor
            msg["mask"] = self.mask if msg["mask"] is None else msg["mask"] & self.mask


# ---------------------------------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------------------------------


def select_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) as a :class:`torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but torch sees no CUDA device; use --device cpu or auto")
    if name not in DEVICES:
        raise RunError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    return torch.device(name)


def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _seeded_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(*keys))


def load_data(config: TrainConfig, *, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """
    The training and test tensors of a run, as ``(x_train, y_train, x_test, y_test)``, flattened for the
    fully connected models, with the seeded subsets of ``train_subset`` / ``test_subset`` applied.

    :raises RunError: if the data cannot be loaded (the message says where it was looked for).
    """
    from pyro_vdrop.datasets import load_dataset

    flatten = config.model != "lenet5"
    tensors = []
    for split, subset in (("train", config.train_subset), ("test", config.test_subset)):
        try:
            x, y = load_dataset(config.dataset, split, data_dir=config.data_dir, flatten=flatten)
        except (OSError, ValueError) as e:
            raise RunError(f"cannot load the {config.dataset!r} {split} data: {e}") from e
        if subset is not None:
            if subset > x.shape[0]:
                raise RunError(f"{split}_subset={subset} exceeds the {x.shape[0]} {split} images of {config.dataset}")
            keep = torch.randperm(x.shape[0], generator=_seeded_generator(config.seed, 1 if split == "train" else 2))
            x, y = x[keep[:subset]], y[keep[:subset]]
        tensors += [x.to(device), y.to(device)]
    return tuple(tensors)


def build_network(config: TrainConfig) -> torch.nn.Module:
    """The deterministic torch network named by ``config.model``."""
    from pyro_vdrop import nn as vnn

    if config.model == "mlp":
        return vnn.mnist_mlp(config.width)
    if config.model == "lenet300":
        return vnn.lenet_300_100()
    return vnn.lenet5_caffe()


def build_model(network: torch.nn.Module, *, num_data: int):
    """The Bayesian model of ``network`` (log-uniform weight priors, Categorical likelihood over ``num_data``)."""
    from pyro_vdrop import nn as vnn

    return vnn.bayesianize(network, num_data=num_data)


def build_guide(model, config: TrainConfig, *, init_values: dict | None = None):
    """
    The :class:`~pyro_vdrop.infer.AutoVariationalDropout` variant named by ``config.guide``: ``"sparse"``
    (additive parameterization, α per weight [2]), ``"B"`` (independent noise, α per weight, α ≤ 1 [1]),
    ``"A"`` / ``"A2"`` (correlated noise, α per input unit, α ≤ 1, A2 with the KL scaled by 1/3 [1]) or
    ``"gaussian-dropout"`` (correlated noise with α = p/(1-p) fixed [1, §3]). The paper's variants use its own
    KL fit (``kl_approx="kingma"``), sparse VD Molchanov's.

    :param dict init_values: Initial θ per site (e.g. a pretrained network's weights); default fan-in init.
    """
    from pyro_vdrop.infer import AutoVariationalDropout

    options: dict[str, Any] = {}
    if init_values is not None:
        options["init_loc_fn"] = _init_to_values(init_values)
    if config.guide == "sparse":
        options.update(noise="independent", parameterization="additive", log_alpha_clip=SPARSE_LOG_ALPHA_CLIP)
    elif config.guide == "B":
        options.update(noise="independent", kl_approx="kingma")
    elif config.guide in ("A", "A2"):
        options.update(noise="correlated", kl_approx="kingma")
        if config.guide == "A2":
            options["kl_scale"] = A2_KL_SCALE
    else:
        options.update(noise="correlated", dropout_rate=config.dropout_p, kl_approx="kingma")
    return AutoVariationalDropout(model, **options)


def _init_to_values(values: dict):
    from pyro.infer.autoguide.initialization import init_to_value

    from pyro_vdrop.infer import init_to_fan_in

    return init_to_value(values=values, fallback=init_to_fan_in)


def estimator_handler(estimator: str):
    """A context manager for the estimator: :func:`~pyro_vdrop.poutine.local_reparam` or nothing."""
    if estimator == "single-sample":
        return contextlib.nullcontext()
    from pyro_vdrop.poutine import local_reparam

    return local_reparam(estimator=estimator)


# ---------------------------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, metrics
# ---------------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool) -> None:
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


def _write_json(path: Path, data) -> None:
    _atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=False, default=str), binary=False)


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
    torch.save(_encode_checkpoint(state), buffer)
    _atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()), binary=True)


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
        return _decode_checkpoint(state)
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


def _encode_checkpoint(state: dict) -> dict:
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


def _decode_checkpoint(state: dict) -> dict:
    """The inverse of :func:`_encode_checkpoint`; format 1 (trusted) passes through."""
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
        _checkpoint_config(state, path)
        _check_config_file(run_dir, state["config"], path)
        backup = path.with_name(f"{CHECKPOINT_FILE}.format{state['version']}")
        if state["version"] != CHECKPOINT_VERSION:
            if backup.exists() or backup.is_symlink():
                raise RunError(f"{backup} exists: move it away first, it may be the only copy of an older checkpoint")
            data = path.read_bytes()  # keep the user's file
            _atomic_write(backup, lambda f: f.write(data), binary=True)
        save_checkpoint(path, state)
    return path


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
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

    _atomic_write(run_dir / METRICS_CSV, write_csv, binary=False)
    _atomic_write(
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


def _remove_stale_temp_files(run_dir: Path) -> list[str]:
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


def _check_config_file(run_dir: Path, config: dict, checkpoint: Path) -> None:
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
        if name not in _RUNTIME_FIELDS and saved.get(name) != config.get(name)
    ]
    if differ:
        raise RunError(
            f"{checkpoint} contradicts {path}: {'; '.join(differ)}. The run directory was mixed up or altered; "
            "restore the run's own files or start a new run"
        )


def environment() -> dict:
    """Versions and machine, recorded with every run and benchmark."""
    import pyro_vdrop

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "pyro_vdrop": pyro_vdrop.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------------------------------


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def predict_logits(
    model, x: torch.Tensor, y: torch.Tensor, *, params: dict, batch_size: int = _EVAL_BATCH
) -> torch.Tensor:
    """The model's logits on ``x`` with its weight sites fixed to ``params`` (e.g. the posterior means θ), computed
    ``batch_size`` examples at a time (at most the model's ``num_data``: its plate holds no more)."""
    with torch.no_grad():
        return torch.cat([poutine.condition(model, data=params)(x[s], y[s]) for s in _batches(len(x), batch_size)])


def predictive_probs(
    model,
    guide,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_samples: int,
    estimator: str,
    batch_size: int = _EVAL_BATCH,
):
    r"""
    The Monte Carlo posterior predictive :math:`\frac1S\sum_s p(y|x, w_s)` with ``num_samples`` draws from the
    guide, under the training ``estimator`` (with local reparameterization every test point gets its own noise,
    which leaves each point's predictive distribution unchanged). ``y`` is observed, not sampled.
    """
    out = []
    with torch.no_grad():
        for s in _batches(len(x), batch_size):
            probs = 0.0
            for _ in range(num_samples):
                with estimator_handler(estimator):
                    guide_trace = poutine.trace(guide).get_trace(x[s], y[s])
                    logits = poutine.replay(model, trace=guide_trace)(x[s], y[s])
                probs = probs + logits.softmax(-1)
            out.append(probs / num_samples)
    return torch.cat(out)


def _check_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise RunError(f"--threshold must be a finite number (a log α); got {threshold!r}")


def _error(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) != y).double().mean())


def sparsity_stats(guide, *, threshold: float = PRUNE_THRESHOLD) -> dict:
    r"""
    :meth:`~pyro_vdrop.infer.AutoVariationalDropout.sparsity` in the run's terms: ``weights``, ``kept``
    (:math:`\log\alpha \le` ``threshold``), ``sparsity`` (pruned share), ``compression`` (weights / kept, as in
    [2]) and ``layers`` (the same per weight site).
    """
    stats = guide.sparsity(threshold)

    def convert(s):
        return {
            "weights": s["num_weights"],
            "kept": s["num_kept"],
            "sparsity": s["fraction_pruned"],
            "compression": s["compression"],
        }

    return {**convert(stats["total"]), "layers": {name: convert(s) for name, s in stats["sites"].items()}}


def pruned_params(theta: dict, log_alpha: dict, *, threshold: float = PRUNE_THRESHOLD) -> dict:
    r"""θ with the weights of :math:`\log\alpha >` ``threshold`` set to 0 [2]."""
    out = dict(theta)
    for name, la in log_alpha.items():
        out[name] = torch.where(la.expand(theta[name].shape) > threshold, torch.zeros_like(theta[name]), theta[name])
    return out


def _posterior(guide) -> tuple[dict, dict]:
    with torch.no_grad():
        theta = {k: v.detach() for k, v in guide.median().items()}
        log_alpha = {k: v.detach() for k, v in guide.log_alpha().items()}
    return theta, log_alpha


# ---------------------------------------------------------------------------------------------------------------------
# Several processes: torch.distributed
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _World:
    """This process's place in a run: its rank, the number of processes and its rank on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _world() -> _World:
    """The default process group as this process sees it; a single process when none (or one of size 1) exists."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _World()
    rank = dist.get_rank()
    return _World(rank=rank, size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", rank)))


class Rank0Error(RunError):
    """Process 0's :class:`RunError`, raised again in the other processes, which leave reporting it to process 0."""


def _from_rank0(world: _World, fn: Callable[[], Any]) -> Any:
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


def _sum_over_processes(world: _World, values: list[float], device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def _process_device(device: torch.device, world: _World) -> torch.device:
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


def _cpu_count() -> int:
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


_RESULT_FILE = "result.pkl"
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
            _atomic_write(Path(folder) / f"error-{rank}.txt", lambda f: f.write(message), binary=False)
            raise SystemExit(_EXIT_RUN_ERROR) from None
    if rank == 0:
        _atomic_write(Path(folder) / _RESULT_FILE, lambda f: pickle.dump(result, f), binary=True)


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
def _private_folder() -> Iterator[str]:
    """A new temporary folder that only this user can enter or write (mode 0700, owned by us), removed at the end:
    where :func:`launch`'s processes leave their result, which it unpickles."""
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
    ``pyro-vdrop fit --nproc N`` does with :func:`fit`. ``fn``, its arguments and its result must be picklable
    (e.g. a module-level function).

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
    threads = max(1, _cpu_count() // nproc) if threads is None else threads
    with _private_folder() as folder:
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
        # process 0 wrote it into a folder only this user can write (see _private_folder): not a stranger's pickle
        fd = os.open(Path(folder) / _RESULT_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            return pickle.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


class _Session:
    """The live objects of one run (in one process of a run): data, model, guide, optimizer and SVI."""

    def __init__(
        self, config: TrainConfig, *, device: torch.device, restoring: bool = False, world: _World | None = None
    ):
        self.config = config
        self.device = device
        self.world = world = world or _World()
        self.x_train, self.y_train, self.x_test, self.y_test = load_data(config, device=device)
        self.num_data = self.x_train.shape[0]
        # Each process takes its share of the global batch, and ceil(N / P) examples per epoch (DistributedSampler);
        # the padding that makes the shares equal is masked out of the data term (see padding)
        self.batch_size = config.batch_size // world.size
        self.num_local = math.ceil(self.num_data / world.size)
        self.steps_per_epoch = math.ceil(self.num_local / self.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        pyro.clear_param_store()
        pyro.set_rng_seed(config.seed)
        self.network = build_network(config).to(device)
        self.pretrain_time = 0.0
        pretrain = config.pretrain_epochs > 0 and not restoring  # a restored checkpoint overwrites every weight
        if pretrain:
            t0 = time.perf_counter()
            self._pretrain()
            self.pretrain_time = time.perf_counter() - t0
        self.model = build_model(self.network, num_data=self.num_data)
        init_values = self.model.initial_weights() if pretrain else None
        self.guide = build_guide(self.model, config, init_values=init_values)
        # The guide creates its parameters on its first call: make them now, on the first minibatch.
        self.guide(self.x_train[: self.batch_size], self.y_train[: self.batch_size])
        self.kl_scale = self.guide.kl_scale  # the variant's own KL factor (A2: 1/3); warm-up multiplies it
        self.recorder = _ObservedLogits()
        from pyro_vdrop.optim import JointLRScheduler

        # one torch Adam and one LambdaLR for all parameters; the checkpoint format is pyro.optim.LambdaLR's
        self.optim = JointLRScheduler(
            torch.optim.lr_scheduler.LambdaLR,
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": config.lr},
                "lr_lambda": _LinearDecay(self.total_steps, config.lr_decay),
            },
        )
        if world.distributed:
            from pyro_vdrop.optim import DistributedOptimizer

            # as DistributedDataParallel does: start every process from process 0's parameters, then average the
            # gradients; each process draws its own noise
            self._broadcast_parameters()
            self.optim = DistributedOptimizer(self.optim)
            pyro.set_rng_seed(_derived_seed(config.seed, 4, world.rank) % 2**32)  # numpy takes 32-bit seeds
        self.svi = SVI(self.recorder(self.model), self.guide, self.optim, TraceMeanField_ELBO())

    def _broadcast_parameters(self) -> None:
        with torch.no_grad():
            for _, value in sorted(pyro.get_param_store().named_parameters(), key=lambda item: item[0]):
                dist.broadcast(value, src=0)

    def _pretrain(self) -> None:
        """Plain maximum-likelihood training of the network, whose weights then initialise θ [2]."""
        net, config = self.network, self.config
        optim = torch.optim.Adam(net.parameters(), lr=config.lr)
        for epoch in range(config.pretrain_epochs):
            order = torch.randperm(self.num_data, generator=_seeded_generator(config.seed, 3, epoch))
            for s in _batches(self.num_data, config.batch_size):
                idx = order[s].to(self.device)
                loss = torch.nn.functional.cross_entropy(net(self.x_train[idx]), self.y_train[idx])
                optim.zero_grad()
                loss.backward()
                optim.step()
            if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
                raise RunError(
                    f"pretraining diverged: the network's weights are not finite after pretraining epoch {epoch + 1} "
                    f"(last loss {float(loss.detach()):.4g}); lower --lr, which pretraining uses too, or pass "
                    "--pretrain-epochs 0"
                )

    def state(self, *, epoch: int, step: int, history: list, elapsed: float) -> dict:
        """The checkpoint; a collective operation when several processes train (each contributes its RNG state)."""
        rng = _rng_state()
        if self.world.distributed:
            states = [None] * self.world.size
            dist.all_gather_object(states, rng)
            rng = states
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "step": step,
            "param_store": pyro.get_param_store().get_state(),
            "optim": self.optim.get_state(),
            "rng": rng,
            "world_size": self.world.size,
            "history": history,
            "elapsed": elapsed,
        }

    def restore(self, state: dict, *, path: Path) -> None:
        unconstrained = dict(pyro.get_param_store().named_parameters())
        names = sorted(unconstrained)
        saved = sorted(state["param_store"]["params"])
        if saved != names:
            missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
            raise RunError(
                f"{path} does not fit the model built from its configuration (model={self.config.model!r}, "
                f"guide={self.config.guide!r}): parameters missing from the checkpoint {missing[:5]}, unexpected "
                f"{extra[:5]}. Was it written by another version of pyro-vdrop?"
            )
        for name, value in state["param_store"]["params"].items():
            current = unconstrained[name]
            if value.shape != current.shape:
                raise RunError(
                    f"{path} does not fit the model built from its configuration (model={self.config.model!r}): "
                    f"parameter {name!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(current.shape)} "
                    "in the model"
                )
        # Copy in place: the model's deterministic nn.Parameters (biases) are the very tensors in the param store,
        # and a PyroModule keeps using its own tensor even after the store's entry is replaced (set_state).
        with torch.no_grad():
            for name, value in state["param_store"]["params"].items():
                unconstrained[name].copy_(value)
        self.optim.set_state(state["optim"])

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """
        The shuffled order of epoch ``epoch``: a generator seeded by (seed, epoch), so resume repeats it. Process
        ``r`` of ``P`` takes ``order[r::P]``, padded to ``ceil(N / P)`` examples by wrapping around
        (:class:`~torch.utils.data.DistributedSampler` over the order), so that when ``P`` divides ``M`` and ``M``
        divides ``N`` the ``k``-th steps of all processes together see the ``k``-th minibatch of one process.
        """
        order = torch.randperm(self.num_data, generator=_seeded_generator(self.config.seed, 0, epoch))
        if self.world.distributed:
            from torch.utils.data import DistributedSampler

            shard = DistributedSampler(
                range(self.num_data), num_replicas=self.world.size, rank=self.world.rank, shuffle=False
            )
            order = order[list(shard)]
        return order

    def padding(self, s: slice) -> tuple[torch.Tensor | None, float]:
        r"""
        Which examples of this process's slice ``s`` of its shard are real, and the factor their data term needs.

        The epoch's order is padded to :math:`P\lceil N/P\rceil` examples by wrapping around
        (``epoch_order``); process :math:`r` takes positions :math:`r, r + P, \dots`, so position
        :math:`r + Pj` is real when it is below :math:`N`. A step whose :math:`P` slices hold :math:`M'` real
        examples must weight each by :math:`N/M'`; the plate weights this process's :math:`b` examples by
        :math:`N/b` and the gradients are averaged over the processes, hence the factor :math:`Pb/M'` on the real
        examples and a mask on the padding. Returns ``(None, 1.0)`` for a step without padding.
        """
        world = self.world
        if not world.distributed:
            return None, 1.0
        positions = torch.arange(s.start, s.stop) * world.size + world.rank
        real = positions < self.num_data
        num_real = min(self.num_data, world.size * s.stop) - world.size * s.start  # over all processes
        if num_real == world.size * (s.stop - s.start):
            return None, 1.0
        return real.to(self.device), world.size * (s.stop - s.start) / num_real

    @property
    def eval_batch_size(self) -> int:
        """Test examples per model run: the model's plate holds at most ``num_data``."""
        return min(_EVAL_BATCH, self.num_data)

    def predict_logits(self, x: torch.Tensor, y: torch.Tensor, *, params: dict) -> torch.Tensor:
        return predict_logits(self.model, x, y, params=params, batch_size=self.eval_batch_size)

    def posterior_figures(self) -> dict:
        theta, log_alpha = _posterior(self.guide)
        stats = sparsity_stats(self.guide)
        error = _error(self.predict_logits(self.x_test, self.y_test, params=theta), self.y_test)
        pruned = pruned_params(theta, log_alpha)
        error_pruned = _error(self.predict_logits(self.x_test, self.y_test, params=pruned), self.y_test)
        return {"test_error": error, "test_error_pruned": error_pruned, **stats}

    def kl(self) -> float:
        """The KL term :math:`\\mathrm{KL}(q\\|p)`, without the guide's ``kl_scale`` (analytic; a minibatch only sets
        up the traces)."""
        x, y = self.x_train[: self.config.batch_size], self.y_train[: self.config.batch_size]
        with torch.no_grad():
            guide_trace = poutine.trace(self.guide).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(x, y)
        total = 0.0
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or name not in model_trace.nodes:
                continue
            # the site's scale is the guide's kl_scale (warm-up, A2): leave it out, this is the KL itself
            total += float(torch.distributions.kl_divergence(site["fn"], model_trace.nodes[name]["fn"]).sum())
        return total


def _train_epoch(session: _Session, epoch: int, step: int, bar, callback, sparsity: float) -> tuple[int, dict]:
    """One pass over (this process's share of) the shuffled training data; returns the global step and the epoch's
    training metrics, reduced over the processes."""
    config, world = session.config, session.world
    order = session.epoch_order(epoch).to(session.device)
    losses, log_liks, correct, seen, beta = [], [], 0, 0, 1.0
    for s in _batches(len(order), session.batch_size):
        x, y = session.x_train[order[s]], session.y_train[order[s]]
        beta = kl_weight(config, step / session.steps_per_epoch)
        session.guide.kl_scale = session.kl_scale * beta
        real, factor = session.padding(s)
        weight = contextlib.nullcontext() if real is None else _DataWeight(real, factor)
        with estimator_handler(config.estimator), weight:
            loss = session.svi.step(x, y)
        session.optim.step()  # the learning-rate schedule: lr for the next step
        step += 1
        if not math.isfinite(loss):
            raise RunError(
                f"the loss became {loss} at epoch {epoch + 1}, step {step}; lower --lr or lengthen --kl-warmup"
            )
        losses.append(loss)
        log_liks.append(session.recorder.log_lik)
        hits = session.recorder.logits.argmax(-1) == y
        correct += int((hits if real is None else hits & real).sum())
        seen += y.shape[0] if real is None else int(real.sum())
        bar.update(1)
        if bar.n % 10 == 0 or s.stop == len(order):
            postfix = {"epoch": epoch + 1, "loss": f"{loss / session.num_data:.3f}", "acc": f"{correct / seen:.3f}"}
            bar.set_postfix(postfix | {"sparsity": f"{sparsity:.3f}"}, refresh=False)
        if callback is not None:
            callback({"epoch": epoch, "step": step, "loss": loss, "rank": world.rank})
    kl = session.kl()
    # the epoch's figures over all processes: each step's loss of the global batch is the mean of the processes'
    loss_sum, log_lik_sum, num_losses, correct, seen = _sum_over_processes(
        world, [math.fsum(losses), math.fsum(log_liks), len(losses), correct, seen], session.device
    )
    expected_log_lik = log_lik_sum / num_losses
    row = {
        "epoch": epoch + 1,
        "step": step,
        "loss": loss_sum / num_losses,
        "elbo": expected_log_lik - kl,
        "expected_log_lik": expected_log_lik,
        "kl": kl,
        "train_acc": correct / seen,
        "kl_weight": beta,
        "lr": config.lr * _LinearDecay(session.total_steps, config.lr_decay)(step - 1),
    }
    return step, row


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Checks ``out`` for :func:`fit` without touching it; returns the run files that ``overwrite`` replaces."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    existing = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    no_checkpoint = not (out / CHECKPOINT_FILE).is_file()
    if resume:
        if no_checkpoint and (out / CONFIG_FILE).is_file():
            raise RunError(
                f"--resume: {out} holds a run that stopped before its first epoch ended ({CONFIG_FILE} but no "
                f"{CHECKPOINT_FILE}): there is nothing to resume; start it again with --overwrite instead of --resume"
            )
        if no_checkpoint:
            raise RunError(f"--resume: {out} holds no {CHECKPOINT_FILE}; start a new run without --resume")
        return []
    if existing and not overwrite:
        if no_checkpoint:
            raise RunError(
                f"--out {out} holds a run that stopped before its first epoch ended ({', '.join(existing)}; no "
                f"{CHECKPOINT_FILE} to resume): pass --overwrite to start it again, or choose another --out"
            )
        raise RunError(
            f"--out {out} already holds a run ({', '.join(existing)}); pass --resume to continue it or --overwrite "
            "to replace it, or choose another --out"
        )
    return existing


def _claim(out: Path, stack: contextlib.ExitStack, command: str | None) -> None:
    """Creates ``out`` if needed and takes its lock for the rest of ``stack``; a folder created here and left
    holding nothing but the lock file (the run failed before writing anything) is removed again."""
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create the run directory ({e.strerror or e})") from e

    def remove_if_unused():
        with contextlib.suppress(OSError):
            if {entry.name for entry in os.scandir(out)} <= {LOCK_FILE}:
                (out / LOCK_FILE).unlink(missing_ok=True)
                for folder in created:
                    folder.rmdir()  # fails, and stops, at a folder that is not empty

    if created:
        stack.callback(remove_if_unused)  # runs after the lock is released (the stack unwinds in reverse)
    stack.enter_context(lock_run(out, command=command))
    _remove_stale_temp_files(out)


def _prepare(
    config: TrainConfig | None,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    overrides: dict | None,
    world: _World,
    stack: contextlib.ExitStack,
    command: str | None,
) -> tuple[TrainConfig, dict | None, list[str]]:
    """
    Checks the options and ``out`` for :func:`fit`, then takes the run directory's lock (creating ``out``) and
    checks it again under the lock; returns the configuration, the checkpoint to resume from (or None) and the run
    files that ``overwrite`` replaces. Nothing in ``out`` is changed but the lock file and stale temporary files.
    """
    holder = run_in_progress(out)
    if holder is not None:
        raise RunError(
            f"{out} is being written by another pyro-vdrop process ({holder}): wait for it to finish or stop it, "
            "or choose another --out"
        )
    _check_out(out, resume=resume, overwrite=overwrite)  # fail fast, before creating anything
    if config is not None:
        check_batch_size(config.batch_size, world.size)
    _claim(out, stack, command)
    replaced = _check_out(out, resume=resume, overwrite=overwrite)  # again, now that no other writer can interfere
    state = None
    if resume:
        path = out / CHECKPOINT_FILE
        state = load_checkpoint(path, map_location="cpu")
        saved = _checkpoint_config(state, path)
        _check_config_file(out, state["config"], path)
        config = _check_resume_config(saved, overrides or {}, out)
        nproc = state.get("world_size", 1)
        if nproc != world.size:
            raise RunError(
                f"{path} was written by a run in {nproc} process(es), and this one has {world.size}: resume it with "
                f"--nproc {nproc} (torchrun: {nproc} processes in all), since its checkpoint continues the random "
                "number generators of each process"
            )
    check_batch_size(config.batch_size, world.size)
    return config, state, replaced


def _checkpoint_config(state: dict, path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: its configuration is invalid: {e}") from e


def check_batch_size(batch_size: int, nproc: int) -> None:
    """Raises a :class:`RunError` unless the global ``batch_size`` splits equally over ``nproc`` processes."""
    if batch_size % nproc:
        raise RunError(
            f"--batch-size {batch_size} is the global minibatch, which the {nproc} processes (--nproc {nproc}) share "
            f"equally: choose a --batch-size divisible by {nproc}"
        )


def _check_resume_config(saved: TrainConfig, given: dict, path: Path) -> TrainConfig:
    conflicts = [
        f"{name}={given[name]!r} (run has {getattr(saved, name)!r})"
        for name in given
        if name not in _RUNTIME_FIELDS and given[name] != getattr(saved, name)
    ]
    if conflicts:
        raise RunError(
            f"{path} was trained with another configuration: {'; '.join(conflicts)}. Resume with the run's own "
            "options (drop these), or start a new run in another --out"
        )
    return _replace(saved, {k: v for k, v in given.items() if k in _RUNTIME_FIELDS})


def _replace(config: TrainConfig, changes: dict) -> TrainConfig:
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:
        raise RunError(str(e)) from e


def fit(
    config: TrainConfig | None,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    validate: bool = False,
    command: str | None = None,
    overrides: dict | None = None,
) -> dict:
    r"""
    Trains a variational-dropout network with :class:`~pyro.infer.SVI` and
    :class:`~pyro.infer.TraceMeanField_ELBO` (analytic KL), writing a checkpoint, ``metrics.csv`` and
    ``metrics.jsonl`` into ``out`` after every epoch.

    The objective per step is :math:`\frac{N}{M}\sum_{i\in\text{batch}} \log p(y_i|x_i,w) - \beta\,\mathrm{KL}`
    with :math:`\beta` from :func:`kl_weight`; Adam's learning rate decays linearly to 0 over training [2].
    The data are shuffled with a generator seeded by ``(seed, epoch)``, and checkpoints hold every random number
    generator, so ``resume=True`` continues an interrupted run exactly where its last checkpoint left off.

    **Several processes.** When the default :mod:`torch.distributed` process group holds :math:`P > 1` processes
    (``torchrun``, :func:`process_group`, :func:`launch`, ``pyro-vdrop fit --nproc P``), every process calls
    ``fit`` with the same arguments and they train with the semantics of
    :class:`~torch.nn.parallel.DistributedDataParallel`. ``config.batch_size`` stays the global minibatch :math:`M`
    (it must be divisible by :math:`P`); process :math:`r` takes :math:`M/P` examples of its shard of the epoch's
    order (see ``epoch_order``), so its plate scales its data term by :math:`N/(M/P)` and its loss is

    .. math::

        \mathcal L_r = \frac{N}{M/P}\sum_{i\in B_r}\log p(y_i|x_i,w) - \beta\,\mathrm{KL}.

    :class:`~pyro_vdrop.optim.DistributedOptimizer` averages the gradients over the processes, and
    :math:`\frac1P\sum_r \nabla\mathcal L_r = \nabla\big(\frac NM \sum_{i\in B}\log p(y_i|x_i,w) -
    \beta\,\mathrm{KL}\big)`, the gradient of the global minibatch :math:`B = \bigcup_r B_r`. Every process
    builds the same initialisation (same seed; pretraining runs in each), takes process 0's parameters (as DDP
    does), then draws its noise from its own seed ``(seed, rank)``. The epoch's loss, log-likelihood and training
    accuracy are reduced over the processes; process 0 alone checks and writes ``out`` (checkpoints hold every
    process's random number generators, so a run resumes exactly with the same number of processes, and with no
    other) and computes the test figures, while the others wait. Every process returns the same summary.

    :param TrainConfig config: The configuration; with ``resume=True`` pass None to take the run's own.
    :param out: The run directory.
    :param bool resume: Continue the run in ``out`` from its checkpoint.
    :param bool overwrite: Replace a run already in ``out`` (only the run's own files are removed).
    :param bool progress: Show a tqdm progress bar (on stderr).
    :param callable callback: Called after every step with a dict (``epoch``, ``step``, ``loss``, and ``rank``:
        the process); it may raise to stop training (the last checkpoint stays valid). In several processes it is
        called in each, with that process's loss.
    :param bool validate: Keep Pyro's argument validation on during the training steps; off by default
        (``pyro.validation_enabled(False)``, restored afterwards) because it costs a third of a step.
    :param str command: The command line to record in ``config.json``.
    :param dict overrides: With ``resume=True``, options given again on the command line: ``data_dir`` and
        ``device`` may change, any other value must equal the run's.
    :returns: The final figures (also written to ``summary.json``).
    :rtype: dict
    :raises RunError: for a bad ``out``, a run directory that another process is writing (see :func:`lock_run`),
        a checkpoint that does not fit, or missing data.
    :raises OSError: if a file of the run cannot be written (e.g. the disk is full); the previous checkpoint stays.
    """
    if config is None and not resume:
        raise ValueError("config is required unless resume=True")
    world = _world()
    out = Path(out)
    with contextlib.ExitStack() as stack:  # process 0 holds the run directory's lock until the run ends
        # process 0 alone checks the options, claims the directory and reads the checkpoint
        prepared = _from_rank0(
            world,
            lambda: _prepare(
                config,
                out,
                resume=resume,
                overwrite=overwrite,
                overrides=overrides,
                world=world,
                stack=stack,
                command=command,
            ),
        )
        return _fit(
            *prepared, out, world=world, progress=progress, callback=callback, validate=validate, command=command
        )


def _fit(
    config: TrainConfig,
    state: dict | None,
    replaced: list[str],
    out: Path,
    *,
    world: _World,
    progress: bool,
    callback: Callable[[dict], None] | None,
    validate: bool,
    command: str | None,
) -> dict:
    """The body of :func:`fit`, once the run directory is checked and (in process 0) locked."""
    from tqdm.auto import tqdm

    device = _process_device(select_device(config.device), world)
    session = _Session(config, device=device, restoring=state is not None, world=world)
    history, elapsed, start_epoch, step = [], session.pretrain_time, 0, 0
    if state is not None:
        session.restore(state, path=out / CHECKPOINT_FILE)
        history, elapsed, start_epoch, step = state["history"], state["elapsed"], state["epoch"], state["step"]
        if world.rank == 0:  # the checkpoint holds the history: repair metrics files a crash left a row short
            write_metrics(out, history)
    elif world.rank == 0:  # only now, with the options and the data known to be good, replace an old run's files
        for name in replaced:
            (out / name).unlink()
        record = {"config": config.to_dict(), "command": command, "nproc": world.size, "environment": environment()}
        _write_json(out / CONFIG_FILE, record)
    if state is not None:  # last: building the session above consumed random numbers
        _set_rng_state(state["rng"][world.rank] if world.distributed else state["rng"])

    bar = tqdm(
        total=session.total_steps,
        initial=step,
        disable=not progress or world.rank != 0,
        desc="fit",
        unit="step",
        dynamic_ncols=True,
    )
    with bar, pyro.validation_enabled(validate):
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            step, row = _train_epoch(session, epoch, step, bar, callback, history[-1]["sparsity"] if history else 0.0)

            def test_figures(t0=t0):
                return session.posterior_figures(), time.perf_counter() - t0

            figures, epoch_time = _from_rank0(world, test_figures)  # process 0's figures and epoch time
            elapsed += epoch_time
            row.update(
                test_error=figures["test_error"],
                test_error_pruned=figures["test_error_pruned"],
                sparsity=figures["sparsity"],
                compression=figures["compression"],
                epoch_time=epoch_time,
                time=elapsed,
            )
            history.append({key: row[key] for key in METRIC_KEYS})
            state = session.state(epoch=epoch + 1, step=step, history=history, elapsed=elapsed)
            if world.rank == 0:
                save_checkpoint(out / CHECKPOINT_FILE, state)
                write_metrics(out, history)

    last = history[-1]
    stats = sparsity_stats(session.guide)
    summary = {
        "run": str(out),
        "model": config.model,
        "guide": config.guide,
        "estimator": config.estimator,
        "dataset": config.dataset,
        "num_train": session.num_data,
        "num_test": session.x_test.shape[0],
        "epochs": config.epochs,
        "test_error": last["test_error"],
        "test_error_pruned": last["test_error_pruned"],
        "sparsity": last["sparsity"],
        "compression": last["compression"],
        "weights": stats["weights"],
        "kept": stats["kept"],
        "elbo": last["elbo"],
        "time": last["time"],
        "nproc": world.size,
    }
    if world.rank == 0:
        _write_json(out / SUMMARY_FILE, summary)
    if world.distributed:
        dist.barrier()  # the run directory is complete when fit returns in any process
    return summary


def open_run(run_dir: str | os.PathLike, *, device: str | None = None, data_dir: str | None = None):
    """
    Rebuilds the model and guide of a run directory from its checkpoint, with the parameters of its last epoch.

    :param run_dir: A directory written by :func:`fit`.
    :param str device: Where to compute (default: the run's ``device`` option).
    :param str data_dir: Where the MNIST files are now (default: the run's).
    :returns: ``(session, state)``: the live objects (``.model``, ``.guide``, ``.x_test``, ...) and the checkpoint.
    :raises RunError: if ``run_dir`` is not a run, its checkpoint is not plain data (see :func:`load_checkpoint`),
        contradicts its ``config.json``, or does not fit the model of its configuration.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"--run {run_dir}: no such directory")
    path = run_dir / CHECKPOINT_FILE
    state = load_checkpoint(path, map_location="cpu")
    config = _checkpoint_config(state, path)
    _check_config_file(run_dir, state["config"], path)
    changes = {k: v for k, v in {"device": device, "data_dir": data_dir}.items() if v is not None}
    config = _replace(config, changes)
    session = _Session(config, device=select_device(config.device), restoring=True)
    session.restore(state, path=run_dir / CHECKPOINT_FILE)
    return session, state


def evaluate(
    run_dir: str | os.PathLike,
    *,
    num_samples: int = 10,
    threshold: float = PRUNE_THRESHOLD,
    device: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
) -> dict:
    r"""
    Test error of a trained run three ways, written to ``evaluation.json`` in ``run_dir``:

    - ``test_error``: the network with the posterior means θ;
    - ``test_error_pruned``: θ with the weights of :math:`\log\alpha >` ``threshold`` removed [2];
    - ``test_error_mc``: the Monte Carlo posterior predictive with ``num_samples`` draws, under the run's estimator.

    A run that :func:`fit` is still training is evaluated at its last checkpoint (checkpoints are replaced
    atomically); ``in_progress`` then names the training process, else it is None.

    :param run_dir: A directory written by :func:`fit`.
    :param int num_samples: Posterior draws for the predictive.
    :param float threshold: The pruning threshold on :math:`\log\alpha`.
    :param str device: Where to compute (default: the run's).
    :param str data_dir: Where the MNIST files are now (default: the run's).
    :param int seed: Seed of the Monte Carlo draws.
    :rtype: dict
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise RunError(f"--num-samples must be a positive integer; got {num_samples!r}")
    _check_threshold(threshold)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    in_progress = run_in_progress(run_dir)
    session, state = open_run(run_dir, device=device, data_dir=data_dir)
    theta, log_alpha = _posterior(session.guide)
    x, y = session.x_test, session.y_test
    stats = sparsity_stats(session.guide, threshold=threshold)
    pyro.set_rng_seed(seed)
    probs = predictive_probs(
        session.model,
        session.guide,
        x,
        y,
        num_samples=num_samples,
        estimator=session.config.estimator,
        batch_size=session.eval_batch_size,
    )
    result = {
        "run": str(run_dir),
        "epoch": state["epoch"],
        "epochs": session.config.epochs,
        "num_test": int(x.shape[0]),
        "test_error": _error(session.predict_logits(x, y, params=theta), y),
        "test_error_pruned": _error(
            session.predict_logits(x, y, params=pruned_params(theta, log_alpha, threshold=threshold)), y
        ),
        "test_error_mc": _error(probs.log(), y),
        "test_nll_mc": float(-probs.gather(-1, y.unsqueeze(-1)).clamp(min=1e-12).log().mean()),
        "num_samples": num_samples,
        "threshold": threshold,
        "weights": stats["weights"],
        "kept": stats["kept"],
        "sparsity": stats["sparsity"],
        "compression": stats["compression"],
        "layers": stats["layers"],
        "in_progress": in_progress,
        "time": time.perf_counter() - t0,
    }
    _write_json(run_dir / EVALUATION_FILE, result)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise RunError(
            "the report needs matplotlib, which is not installed: pip install 'pyro-vdrop[plot]' (or matplotlib)"
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    """Saves a figure as PNG through :func:`_atomic_write` (a symlink at ``path`` is replaced, never followed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)


def _mask_images(theta: torch.Tensor, log_alpha: torch.Tensor, threshold: float):
    """Per unit of the first layer, its kept-weight mask as an image, or None when there is no image shape."""
    keep = (log_alpha.expand(theta.shape) <= threshold).cpu()
    if theta.dim() == 2 and theta.shape[1] == 28 * 28:  # Linear(784, H): weight is H × 784
        return keep.reshape(-1, 28, 28), "28 × 28 input mask of each hidden unit"
    if theta.dim() == 4:  # Conv2d: out × in × kh × kw; show the first input channel of each filter
        return keep[:, 0], f"{theta.shape[2]} × {theta.shape[3]} kernel mask of each filter (input channel 0)"
    return None, None


def write_report(run_dir: str | os.PathLike, *, max_units: int = 100, threshold: float = PRUNE_THRESHOLD) -> Path:
    r"""
    Writes ``report.md`` and its figures into ``run_dir``: a histogram of :math:`\log\alpha` per layer, the curves of
    test error, sparsity and ELBO over the epochs, and the kept-weight masks of the first layer (for a 784-input
    layer, one 28 × 28 image per hidden unit, the ``max_units`` units with the most kept weights).

    :returns: The path of ``report.md``.
    :raises RunError: if matplotlib is not installed or ``run_dir`` is not a run.
    """
    _check_threshold(threshold)
    plt = _import_pyplot()
    run_dir = Path(run_dir)
    in_progress = run_in_progress(run_dir)
    session, state = open_run(run_dir, device="cpu")
    theta, log_alpha = _posterior(session.guide)
    stats = sparsity_stats(session.guide, threshold=threshold)
    history = state["history"]
    config = session.config

    # 1. log α histograms
    names = list(log_alpha)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = log_alpha[name].expand(theta[name].shape).flatten().cpu().numpy()
        ax.hist(values, bins=60, color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"log α = {threshold:g}")
        ax.set_title(f"{name}\n{stats['layers'][name]['sparsity']:.1%} pruned", fontsize=9)
        ax.set_xlabel("log α")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, run_dir / REPORT_FIGURES[0])
    plt.close(fig)

    # 2. curves
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(epochs, [100 * r["test_error"] for r in history], label="θ")
    axes[0].plot(epochs, [100 * r["test_error_pruned"] for r in history], label=f"pruned (log α > {threshold:g})")
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(fontsize=8)
    axes[1].plot(epochs, [100 * r["sparsity"] for r in history], color="tab:green")
    axes[1].set_ylabel("sparsity (%)")
    axes[2].plot(epochs, [r["elbo"] for r in history], color="tab:purple", label="ELBO")
    axes[2].set_ylabel("ELBO (nats, full data)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, run_dir / REPORT_FIGURES[1])
    plt.close(fig)

    # 3. first-layer masks
    first = names[0] if names else None
    masks, caption = _mask_images(theta[first], log_alpha[first], threshold) if first else (None, None)
    figures = list(REPORT_FIGURES[:2])
    if masks is not None:
        order = masks.flatten(1).sum(-1).argsort(descending=True)[:max_units]
        n = len(order)
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(masks[order[i]].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        fig.suptitle(f"{first}: kept weights (white), {n} units with most kept", fontsize=9)
        _save_figure(fig, run_dir / REPORT_FIGURES[2])
        plt.close(fig)
        figures.append(REPORT_FIGURES[2])
    else:
        stale = run_dir / REPORT_FIGURES[2]
        stale.unlink(missing_ok=True)

    # 4. markdown
    evaluation = None
    if (run_dir / EVALUATION_FILE).is_file():
        with open(run_dir / EVALUATION_FILE, encoding="utf-8") as f:
            evaluation = json.load(f)
    last = history[-1] if history else {}
    text = io.StringIO()
    text.write(f"# pyro-vdrop run report: {run_dir.name}\n\n")
    text.write(
        f"{config.model} ({config.guide} guide, {config.estimator} estimator) on {config.dataset}: "
        f"{session.num_data} training and {session.x_test.shape[0]} test images, "
        f"{state['epoch']} of {config.epochs} epochs in {last.get('time', 0.0):.1f} s.\n\n"
    )
    if in_progress is not None:
        text.write(f"**The run is still being trained** ({in_progress}): the figures of its last checkpoint.\n\n")
    text.write("| figure | value |\n|---|---|\n")
    text.write(f"| test error (θ) | {100 * last.get('test_error', float('nan')):.2f} % |\n")
    text.write(
        f"| test error (pruned, log α > {threshold:g}) | {100 * last.get('test_error_pruned', float('nan')):.2f} % |\n"
    )
    if evaluation is not None:
        text.write(
            f"| test error (MC predictive, {evaluation['num_samples']} samples) | "
            f"{100 * evaluation['test_error_mc']:.2f} % |\n"
        )
    text.write(f"| weights kept | {stats['kept']:,} of {stats['weights']:,} |\n")
    text.write(f"| sparsity | {100 * stats['sparsity']:.2f} % |\n")
    text.write(f"| compression | {stats['compression']:.1f}× |\n")
    text.write(f"| ELBO (last epoch) | {last.get('elbo', float('nan')):.1f} |\n\n")
    text.write("## Layers\n\n| site | weights | kept | pruned |\n|---|---|---|---|\n")
    for name, layer in stats["layers"].items():
        text.write(f"| `{name}` | {layer['weights']:,} | {layer['kept']:,} | {100 * layer['sparsity']:.2f} % |\n")
    text.write("\n## Figures\n\n")
    text.write(f"![log alpha per layer]({REPORT_FIGURES[0]})\n\n![curves]({REPORT_FIGURES[1]})\n\n")
    if masks is not None:
        text.write(f"![first-layer masks]({REPORT_FIGURES[2]})\n\n{caption}.\n\n")
    text.write("## Configuration\n\n```json\n" + json.dumps(config.to_dict(), indent=2) + "\n```\n")
    _atomic_write(run_dir / REPORT_FILE, lambda f: f.write(text.getvalue()), binary=False)
    return run_dir / REPORT_FILE


__all__ = [
    "DEVICES",
    "DISTRIBUTED_TIMEOUT",
    "ESTIMATORS",
    "GUIDES",
    "METRIC_KEYS",
    "MODELS",
    "LOCK_FILE",
    "PRUNE_THRESHOLD",
    "RunError",
    "TrainConfig",
    "build_guide",
    "build_model",
    "build_network",
    "convert_checkpoint",
    "environment",
    "estimator_handler",
    "evaluate",
    "fit",
    "kl_weight",
    "launch",
    "load_checkpoint",
    "load_data",
    "lock_run",
    "open_run",
    "predict_logits",
    "predictive_probs",
    "process_group",
    "pruned_params",
    "read_metrics",
    "run_in_progress",
    "save_checkpoint",
    "select_device",
    "sparsity_stats",
    "write_metrics",
    "write_report",
]
