# SPDX-License-Identifier: Apache-2.0
"""
Test figures of a trained run: the θ network, the pruned network and the Monte Carlo predictive.
"""

import math
import os
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine

from pyro_vdrop.infer.predictive import trace_guide_then_model
from pyro_vdrop.infer.sparsity import prune_params
from pyro_vdrop.train.checkpoint import checkpoint_config, load_checkpoint
from pyro_vdrop.train.components import batches, estimator_handler, select_device
from pyro_vdrop.train.config import PRUNE_THRESHOLD, replace_config
from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.run_dir import CHECKPOINT_FILE, EVALUATION_FILE, check_config_file, run_in_progress, write_json
from pyro_vdrop.train.session import EVAL_BATCH, Session


def predict_logits(
    model, x: torch.Tensor, y: torch.Tensor, *, params: dict, batch_size: int = EVAL_BATCH
) -> torch.Tensor:
    """The model's logits on ``x`` with its weight sites fixed to ``params`` (e.g. the posterior means θ), computed
    ``batch_size`` examples at a time (at most the model's ``num_data``: its plate holds no more)."""
    with torch.no_grad():
        return torch.cat([poutine.condition(model, data=params)(x[s], y[s]) for s in batches(len(x), batch_size)])


def predictive_probs(
    model,
    guide,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_samples: int,
    estimator: str,
    batch_size: int = EVAL_BATCH,
):
    r"""
    The Monte Carlo posterior predictive :math:`\frac1S\sum_s p(y|x, w_s)` with ``num_samples`` draws from the
    guide, under the training ``estimator`` (with local reparameterization every test point gets its own noise,
    which leaves each point's predictive distribution unchanged). ``y`` is observed, not sampled.
    """
    out = []
    with torch.no_grad():
        for s in batches(len(x), batch_size):
            probs = 0.0
            for _ in range(num_samples):
                with estimator_handler(estimator):
                    _, model_trace = trace_guide_then_model(model, guide, (x[s], y[s]))
                logits = model_trace.nodes["_RETURN"]["value"]
                probs = probs + logits.softmax(-1)
            out.append(probs / num_samples)
    return torch.cat(out)


def check_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise RunError(f"--threshold must be a finite number (a log α); got {threshold!r}")


def error_rate(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) != y).double().mean())


def sparsity_stats(guide, *, threshold: float = PRUNE_THRESHOLD) -> dict:
    r"""
    :meth:`~pyro_vdrop.infer.AutoVariationalDropout.sparsity` (:func:`~pyro_vdrop.infer.sparsity.sparsity_summary`)
    in the terms of the run's files (``metrics.csv``, ``summary.json``, ``evaluation.json``): ``weights``, ``kept``
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
    return prune_params(theta, log_alpha, threshold)


def posterior(guide) -> tuple[dict, dict]:
    with torch.no_grad():
        theta = {k: v.detach() for k, v in guide.median().items()}
        log_alpha = {k: v.detach() for k, v in guide.log_alpha().items()}
    return theta, log_alpha


def held_out_figures(session: Session, *, threshold: float = PRUNE_THRESHOLD) -> dict:
    """The test error of the θ network and of the pruned network, and the sparsity, of a session's guide now."""
    theta, log_alpha = posterior(session.guide)
    x, y = session.x_test, session.y_test
    batch_size = session.eval_batch_size
    error = error_rate(predict_logits(session.model, x, y, params=theta, batch_size=batch_size), y)
    pruned = pruned_params(theta, log_alpha, threshold=threshold)
    error_pruned = error_rate(predict_logits(session.model, x, y, params=pruned, batch_size=batch_size), y)
    return {
        "test_error": error,
        "test_error_pruned": error_pruned,
        **sparsity_stats(session.guide, threshold=threshold),
    }


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
    config = checkpoint_config(state, path)
    check_config_file(run_dir, state["config"], path)
    changes = {k: v for k, v in {"device": device, "data_dir": data_dir}.items() if v is not None}
    config = replace_config(config, changes)
    session = Session(config, device=select_device(config.device), restoring=True)
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
    check_threshold(threshold)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    in_progress = run_in_progress(run_dir)
    session, state = open_run(run_dir, device=device, data_dir=data_dir)
    x, y = session.x_test, session.y_test
    figures = held_out_figures(session, threshold=threshold)
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
        "test_error": figures["test_error"],
        "test_error_pruned": figures["test_error_pruned"],
        "test_error_mc": error_rate(probs.log(), y),
        "test_nll_mc": float(-probs.gather(-1, y.unsqueeze(-1)).clamp(min=1e-12).log().mean()),
        "num_samples": num_samples,
        "threshold": threshold,
        "weights": figures["weights"],
        "kept": figures["kept"],
        "sparsity": figures["sparsity"],
        "compression": figures["compression"],
        "layers": figures["layers"],
        "in_progress": in_progress,
        "time": time.perf_counter() - t0,
    }
    write_json(run_dir / EVALUATION_FILE, result)
    return result


__all__ = [
    "check_threshold",
    "error_rate",
    "evaluate",
    "open_run",
    "posterior",
    "predict_logits",
    "predictive_probs",
    "pruned_params",
    "sparsity_stats",
]
