# SPDX-License-Identifier: Apache-2.0
"""
Test figures of a trained run: the θ network, the pruned network and the Monte Carlo predictive; their calibration;
and their uncertainty on shifted inputs (out of distribution).

**References**

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
[2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
[3] Guo, Pleiss, Sun, Weinberger. "On Calibration of Modern Neural Networks." ICML 2017.
[4] Hendrycks, Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
    Networks." ICLR 2017.
"""

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine

from pyro_vdrop import metrics
from pyro_vdrop.infer.predictive import trace_guide_then_model
from pyro_vdrop.infer.sparsity import prune_params
from pyro_vdrop.train.checkpoint import checkpoint_config, load_checkpoint
from pyro_vdrop.train.components import batches, derived_seed, estimator_handler, select_device
from pyro_vdrop.train.config import PRUNE_THRESHOLD, VALUE_KINDS, replace_config
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


def predictive_draws(
    model,
    guide,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_samples: int,
    estimator: str,
    batch_size: int = EVAL_BATCH,
) -> torch.Tensor:
    r"""
    Monte Carlo draws of the class probabilities :math:`p(y|x, w_s)`, :math:`w_s \sim q(w)`, shape
    ``(num_samples, N, C)``, under the training ``estimator`` (with local reparameterization every test point gets
    its own noise, which leaves each point's predictive distribution unchanged). ``y`` is observed, not sampled; the
    probabilities do not depend on it (None: labels 0 are passed, e.g. for inputs without labels).
    """
    if y is None:
        y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    out = []
    with torch.no_grad():
        for s in batches(len(x), batch_size):
            draws = []
            for _ in range(num_samples):
                with estimator_handler(estimator):
                    _, model_trace = trace_guide_then_model(model, guide, (x[s], y[s]))
                draws.append(model_trace.nodes["_RETURN"]["value"].softmax(-1))
            out.append(torch.stack(draws))
    return torch.cat(out, dim=1)


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
    The Monte Carlo posterior predictive :math:`\frac1S\sum_s p(y|x, w_s)`: the mean of
    :func:`predictive_draws`.
    """
    draws = predictive_draws(model, guide, x, y, num_samples=num_samples, estimator=estimator, batch_size=batch_size)
    return draws.mean(0)


def check_threshold(threshold) -> None:
    """The check of ``--threshold`` on the command line (a ``"finite_number"`` of :data:`VALUE_KINDS`), for callers
    of the Python API."""
    is_finite_number, _ = VALUE_KINDS["finite_number"]
    if not is_finite_number(threshold):
        raise RunError(f"--threshold must be a finite number (a log α); got {threshold!r}")


def error_rate(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) != y).double().mean())


def guide_threshold(guide, threshold: float | None = None) -> float:
    """``threshold``, or if None the guide's pruning threshold (``guide.prune_threshold``: 3, or 0 for structured
    Bayesian pruning, whose rule SNR < 1 is log α > 0)."""
    return getattr(guide, "prune_threshold", PRUNE_THRESHOLD) if threshold is None else threshold


def sparsity_stats(guide, *, threshold: float | None = None) -> dict:
    r"""
    :meth:`~pyro_vdrop.infer.AutoVariationalDropout.sparsity` (:func:`~pyro_vdrop.infer.sparsity.sparsity_summary`)
    in the terms of the run's files (``metrics.csv``, ``summary.json``, ``evaluation.json``): ``weights``, ``kept``
    (:math:`\log\alpha \le` ``threshold``), ``sparsity`` (pruned share), ``compression`` (weights / kept, as in
    [2]), ``layers`` (the same per weight site) and ``units`` (per weight site: its input and output units or
    channels that keep a weight, and, for the group noises, its groups kept; see
    :func:`~pyro_vdrop.infer.sparsity.unit_summary`).

    :param float threshold: The pruning threshold on :math:`\log\alpha`; default: the guide's ``prune_threshold``
        (3, or 0 for structured Bayesian pruning), or 3 for a guide without one.
    """
    threshold = guide_threshold(guide, threshold)
    stats = guide.sparsity(threshold)

    def convert(s):
        return {
            "weights": s["num_weights"],
            "kept": s["num_kept"],
            "sparsity": s["fraction_pruned"],
            "compression": s["compression"],
        }

    units = {name: dict(counts) for name, counts in stats.get("units", {}).items()}
    for name, counts in stats.get("groups", {}).items():
        units.setdefault(name, {}).update(counts)
    return {
        **convert(stats["total"]),
        "layers": {name: convert(s) for name, s in stats["sites"].items()},
        "units": units,
        "threshold": threshold,
    }


def pruned_params(theta: dict, log_alpha: dict, *, threshold: float = PRUNE_THRESHOLD) -> dict:
    r"""θ with the weights of :math:`\log\alpha >` ``threshold`` set to 0 [2]."""
    return prune_params(theta, log_alpha, threshold)


def posterior(guide) -> tuple[dict, dict]:
    with torch.no_grad():
        theta = {k: v.detach() for k, v in guide.median().items()}
        log_alpha = {k: v.detach() for k, v in guide.log_alpha().items()}
    return theta, log_alpha


def held_out_figures(session: Session, *, threshold: float | None = None) -> dict:
    """
    The test error of the θ network and of the pruned network, and the sparsity, of a session's guide now; the
    threshold defaults to the guide's ``prune_threshold``.
    """
    threshold = guide_threshold(session.guide, threshold)
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


#: Bins of the calibration error and reliability diagram in ``evaluation.json`` (Guo et al.'s 15 [3]).
ECE_BINS = metrics.DEFAULT_NUM_BINS

#: The shifted inputs of the out-of-distribution check, made from the test images without any download.
OOD_SHIFTS = ("rotated-90", "pixel-noise", "uniform-noise")

#: Test images per shift (the first of a seeded permutation of the test set): enough for an AUROC to about ±0.02.
OOD_EXAMPLES = 1000

#: Standard deviation of the Gaussian pixel noise of ``"pixel-noise"``, as a share of the pixel range.
PIXEL_NOISE_STD = 0.5

#: Bins of the entropy and mutual-information histograms in ``evaluation.json``.
HISTOGRAM_BINS = 30


def classification_figures(probs: torch.Tensor, y: torch.Tensor, *, num_bins: int = ECE_BINS) -> dict:
    """Test error, NLL, Brier score and ECE (equal-width and equal-mass bins) of predicted probabilities, as floats
    (see :mod:`pyro_vdrop.metrics`)."""
    return {
        "error": error_rate(probs, y),
        "nll": float(metrics.negative_log_likelihood(probs, y)),
        "brier": float(metrics.brier_score(probs, y)),
        "ece": float(metrics.expected_calibration_error(probs, y, num_bins=num_bins)),
        "ece_equal_mass": float(metrics.expected_calibration_error(probs, y, num_bins=num_bins, binning="equal-mass")),
    }


def reliability_record(probs: torch.Tensor, y: torch.Tensor, *, num_bins: int = ECE_BINS) -> dict:
    """:func:`~pyro_vdrop.metrics.reliability_diagram` (equal-width bins) as JSON lists, None for empty bins."""
    bins = metrics.reliability_diagram(probs, y, num_bins=num_bins)
    return {
        field: [None if math.isnan(v) else v for v in getattr(bins, field).tolist()]
        if field != "count"
        else bins.count.tolist()
        for field in bins._fields
    }


def _image_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``(N, ..., H, W)`` square images: flat inputs of a square number of pixels, or image batches."""
    if x.dim() >= 3:
        return x
    side = math.isqrt(x.shape[-1])
    return x.reshape(x.shape[0], side, side) if x.dim() == 2 and side * side == x.shape[-1] else None


def shifted_inputs(
    x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, num_examples: int = OOD_EXAMPLES
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """
    The out-of-distribution inputs of :func:`evaluate`, made from ``num_examples`` test images (the first of a
    permutation seeded by ``seed``), no download needed:

    - ``"rotated-90"``: the images rotated by 90° (:func:`torch.rot90`); their labels are kept, so the accuracy says
      how much of the digit survives the rotation (a 6 may read as a 9);
    - ``"pixel-noise"``: Gaussian noise of standard deviation :data:`PIXEL_NOISE_STD` of the pixel range added to
      every pixel, clipped to the range; labels kept;
    - ``"uniform-noise"``: pixels drawn uniformly from the range; no labels.

    :returns: ``(x_in, y_in, shifts)``: the in-distribution subset and ``{name: (inputs, labels or None)}``.
    """
    n = min(num_examples, x.shape[0])
    generator = torch.Generator().manual_seed(derived_seed(seed, 5))
    keep = torch.randperm(x.shape[0], generator=generator)[:n].to(x.device)
    x_in, y_in = x[keep], y[keep]
    low, high = float(x.min()), float(x.max())

    def noise(kind):
        draw = torch.randn if kind == "normal" else torch.rand
        return draw(x_in.shape, generator=generator, dtype=x_in.dtype).to(x_in.device)

    shifts = {}
    images = _image_view(x_in)
    if images is not None:
        shifts["rotated-90"] = (torch.rot90(images, 1, dims=(-2, -1)).reshape(x_in.shape), y_in)
    pixel_noise = x_in + PIXEL_NOISE_STD * (high - low) * noise("normal")
    shifts["pixel-noise"] = (pixel_noise.clamp(low, high), y_in)
    shifts["uniform-noise"] = (low + (high - low) * noise("uniform"), None)
    return x_in, y_in, shifts


def _histogram(values: dict, high: float, bins: int = HISTOGRAM_BINS) -> dict:
    high = high if high > 0 else 1.0
    edges = torch.linspace(0.0, high, bins + 1, dtype=torch.float64)
    counts = {
        name: torch.histc(v.double().clamp(0, high), bins=bins, min=0.0, max=high).long().tolist()
        for name, v in values.items()
    }
    return {"edges": edges.tolist(), "counts": counts}


def ood_figures(
    draws: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int = 0,
    num_examples: int = OOD_EXAMPLES,
) -> dict:
    r"""
    The out-of-distribution check: per set (``"test"``, then each of :func:`shifted_inputs`) the accuracy of the
    predictive mean (None without labels), the means of the predictive entropy, of the expected data entropy
    (aleatoric) and of the mutual information (epistemic) (:func:`~pyro_vdrop.metrics.decompose_uncertainty`), and
    for each shift the AUROC of telling its inputs from the test inputs by the mutual information and by the
    entropy (:func:`~pyro_vdrop.metrics.auroc`, 0.5: chance [4]); plus histograms of the entropy and the mutual
    information per set, for :func:`~pyro_vdrop.train.report.plot_entropy`.

    :param callable draws: Inputs ``(N, ...)`` to class probabilities of ``S`` draws, ``(S, N, C)`` (``S = 1`` for a
        deterministic network: its mutual information is 0, its AUROC by it 0.5).
    :param x: The test inputs. :param y: Their labels.
    :rtype: dict
    """
    x_in, y_in, shifts = shifted_inputs(x, y, seed=seed, num_examples=num_examples)
    sets = {"test": (x_in, y_in), **shifts}
    rows, parts = {}, {}
    for name, (inputs, labels) in sets.items():
        sample_probs = draws(inputs)
        parts[name] = d = metrics.decompose_uncertainty(sample_probs)
        rows[name] = {
            "num_examples": int(inputs.shape[0]),
            "accuracy": None if labels is None else 1.0 - error_rate(sample_probs.mean(0), labels),
            "entropy": float(d.total.mean()),
            "aleatoric": float(d.aleatoric.mean()),
            "mutual_information": float(d.epistemic.mean()),
        }
    num_classes = sample_probs.shape[-1]
    for name in shifts:
        is_out = torch.cat([torch.zeros(len(x_in), dtype=torch.bool), torch.ones(len(sets[name][0]), dtype=torch.bool)])
        for key, part in (("mutual_information", "epistemic"), ("entropy", "total")):
            scores = torch.cat([getattr(parts["test"], part), getattr(parts[name], part)])
            rows[name][f"auroc_{key}"] = float(metrics.auroc(scores, is_out.to(scores.device)))
    largest_mi = max(float(d.epistemic.max()) for d in parts.values())
    return {
        "shifts": rows,
        "entropy_histogram": _histogram({k: d.total for k, d in parts.items()}, math.log(num_classes)),
        "mutual_information_histogram": _histogram({k: d.epistemic for k, d in parts.items()}, largest_mi),
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
    threshold: float | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
) -> dict:
    r"""
    Test figures of a trained run three ways, written to ``evaluation.json`` in ``run_dir``:

    - ``test_error``: the network with the posterior means θ;
    - ``test_error_pruned``: θ with the weights of :math:`\log\alpha >` ``threshold`` removed [2];
    - ``test_error_mc``: the Monte Carlo posterior predictive with ``num_samples`` draws, under the run's estimator.

    For each of the three (suffixes none, ``_pruned``, ``_mc``) also the negative log-likelihood ``test_nll``, the
    Brier score ``test_brier`` and the expected calibration error ``test_ece`` (``ece_bins`` equal-width bins [3])
    and ``test_ece_equal_mass`` (see :mod:`pyro_vdrop.metrics`); ``reliability`` holds the data of their reliability
    diagrams (``theta``, ``pruned``, ``mc``). ``ood`` is the out-of-distribution check of the MC predictive
    (:func:`ood_figures`): rotated, pixel-noised and uniform-noise images made from the test set.

    A run that :func:`fit` is still training is evaluated at its last checkpoint (checkpoints are replaced
    atomically); ``in_progress`` then names the training process, else it is None.

    :param run_dir: A directory written by :func:`fit`.
    :param int num_samples: Posterior draws for the predictive.
    :param float threshold: The pruning threshold on :math:`\log\alpha`; default: the guide's ``prune_threshold``
        (3, or 0 for structured Bayesian pruning: SNR < 1).
    :param str device: Where to compute (default: the run's).
    :param str data_dir: Where the MNIST files are now (default: the run's).
    :param int seed: Seed of the Monte Carlo draws and of the shifted images.
    :rtype: dict
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise RunError(f"--num-samples must be a positive integer; got {num_samples!r}")
    if threshold is not None:
        check_threshold(threshold)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    in_progress = run_in_progress(run_dir)
    session, state = open_run(run_dir, device=device, data_dir=data_dir)
    threshold = guide_threshold(session.guide, threshold)
    x, y = session.x_test, session.y_test
    batch_size = session.eval_batch_size
    theta, log_alpha = posterior(session.guide)
    pruned = pruned_params(theta, log_alpha, threshold=threshold)
    probs = {
        "theta": predict_logits(session.model, x, y, params=theta, batch_size=batch_size).softmax(-1),
        "pruned": predict_logits(session.model, x, y, params=pruned, batch_size=batch_size).softmax(-1),
    }
    stats = sparsity_stats(session.guide, threshold=threshold)
    pyro.set_rng_seed(seed)

    def draws(inputs, labels=None):
        return predictive_draws(
            session.model,
            session.guide,
            inputs,
            labels,
            num_samples=num_samples,
            estimator=session.config.estimator,
            batch_size=batch_size,
        )

    probs["mc"] = draws(x, y).mean(0)
    figures = {name: classification_figures(p, y) for name, p in probs.items()}
    result = {
        "run": str(run_dir),
        "epoch": state["epoch"],
        "epochs": session.config.epochs,
        "num_test": int(x.shape[0]),
        "test_error": figures["theta"]["error"],
        "test_error_pruned": figures["pruned"]["error"],
        "test_error_mc": figures["mc"]["error"],
        "test_nll_mc": figures["mc"]["nll"],
        "num_samples": num_samples,
        "threshold": threshold,
        "weights": stats["weights"],
        "kept": stats["kept"],
        "sparsity": stats["sparsity"],
        "compression": stats["compression"],
        "layers": stats["layers"],
        "in_progress": in_progress,
    }
    for name, suffix in (("theta", ""), ("pruned", "_pruned"), ("mc", "_mc")):
        for figure in ("nll", "brier", "ece", "ece_equal_mass"):
            result.setdefault(f"test_{figure}{suffix}", figures[name][figure])
    result["ece_bins"] = ECE_BINS
    result["reliability"] = {name: reliability_record(p, y) for name, p in probs.items()}
    result["ood"] = ood_figures(draws, x, y, seed=seed)
    result["time"] = time.perf_counter() - t0
    write_json(run_dir / EVALUATION_FILE, result)
    return result


__all__ = [
    "ECE_BINS",
    "HISTOGRAM_BINS",
    "OOD_EXAMPLES",
    "OOD_SHIFTS",
    "PIXEL_NOISE_STD",
    "check_threshold",
    "guide_threshold",
    "classification_figures",
    "error_rate",
    "evaluate",
    "ood_figures",
    "open_run",
    "posterior",
    "predict_logits",
    "predictive_draws",
    "predictive_probs",
    "pruned_params",
    "reliability_record",
    "shifted_inputs",
    "sparsity_stats",
]
