# SPDX-License-Identifier: Apache-2.0
"""
The training loop: :func:`fit`, the epochs, and the checks of the run directory and of a resume.
"""

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch.distributed as dist

from pyro_vdrop.train.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint, set_rng_state
from pyro_vdrop.train.components import batches, estimator_handler, select_device
from pyro_vdrop.train.config import RUNTIME_FIELDS, LinearDecay, TrainConfig, kl_weight, replace_config
from pyro_vdrop.train.distributed import World, current_world, from_rank0, process_device, sum_over_processes
from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.evaluation import held_out_figures, sparsity_stats
from pyro_vdrop.train.run_dir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    METRIC_KEYS,
    RUN_FILES,
    SUMMARY_FILE,
    check_config_file,
    lock_run,
    remove_stale_temp_files,
    run_in_progress,
    write_json,
    write_metrics,
)
from pyro_vdrop.train.session import DataWeight, Session
from pyro_vdrop.util import environment


def _train_epoch(session: Session, epoch: int, step: int, bar, callback, sparsity: float) -> tuple[int, dict]:
    """One pass over (this process's share of) the shuffled training data; returns the global step and the epoch's
    training metrics, reduced over the processes."""
    config, world = session.config, session.world
    order = session.epoch_order(epoch).to(session.device)
    losses, log_liks, correct, seen, beta = [], [], 0, 0, 1.0
    for s in batches(len(order), session.batch_size):
        x, y = session.x_train[order[s]], session.y_train[order[s]]
        beta = kl_weight(config, step / session.steps_per_epoch)
        session.guide.kl_scale = session.kl_scale * beta
        real, factor = session.padding(s)
        weight = contextlib.nullcontext() if real is None else DataWeight(real, factor)
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
    loss_sum, log_lik_sum, num_losses, correct, seen = sum_over_processes(
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
        "lr": config.lr * LinearDecay(session.total_steps, config.lr_decay)(step - 1),
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

    stack.enter_context(lock_run(out, command=command))
    if created:  # only the lock's holder may remove the folder: a process that lost the lock must not
        stack.callback(remove_if_unused)  # runs first when the stack unwinds, while the lock is still held
    remove_stale_temp_files(out)


def _prepare(
    config: TrainConfig | None,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    overrides: dict | None,
    world: World,
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
        saved = checkpoint_config(state, path)
        check_config_file(out, state["config"], path)
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
        if name not in RUNTIME_FIELDS and given[name] != getattr(saved, name)
    ]
    if conflicts:
        raise RunError(
            f"{path} was trained with another configuration: {'; '.join(conflicts)}. Resume with the run's own "
            "options (drop these), or start a new run in another --out"
        )
    return replace_config(saved, {k: v for k, v in given.items() if k in RUNTIME_FIELDS})


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
    world = current_world()
    out = Path(out)
    with contextlib.ExitStack() as stack:  # process 0 holds the run directory's lock until the run ends
        # process 0 alone checks the options, claims the directory and reads the checkpoint
        prepared = from_rank0(
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
    world: World,
    progress: bool,
    callback: Callable[[dict], None] | None,
    validate: bool,
    command: str | None,
) -> dict:
    """The body of :func:`fit`, once the run directory is checked and (in process 0) locked."""
    from tqdm.auto import tqdm

    device = process_device(select_device(config.device), world)
    session = Session(config, device=device, restoring=state is not None, world=world)
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
        write_json(out / CONFIG_FILE, record)
    if state is not None:  # last: building the session above consumed random numbers
        set_rng_state(state["rng"][world.rank] if world.distributed else state["rng"])

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

            def epoch_figures(t0=t0):
                return held_out_figures(session), time.perf_counter() - t0

            figures, epoch_time = from_rank0(world, epoch_figures)  # process 0's figures and epoch time
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
        "threshold": stats["threshold"],
        "units": stats["units"],
        "elbo": last["elbo"],
        "time": last["time"],
        "nproc": world.size,
    }
    if world.rank == 0:
        write_json(out / SUMMARY_FILE, summary)
    if world.distributed:
        dist.barrier()  # the run directory is complete when fit returns in any process
    return summary


__all__ = [
    "check_batch_size",
    "fit",
]
