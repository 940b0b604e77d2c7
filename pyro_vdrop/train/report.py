# SPDX-License-Identifier: Apache-2.0
"""
``report.md`` of a run: one function per figure, then the markdown page.
"""

import io
import json
import math
import os
import re
from pathlib import Path

import torch

from pyro_vdrop.nn import SelectInputs, compress, layer_widths, prune
from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.evaluation import check_threshold, guide_threshold, open_run, posterior, sparsity_stats
from pyro_vdrop.train.run_dir import EVALUATION_FILE, REPORT_FIGURES, REPORT_FILE, atomic_write, run_in_progress


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
    """Saves a figure as PNG through :func:`atomic_write` (a symlink at ``path`` is replaced, never followed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)


def _mask_images(theta: torch.Tensor, log_alpha: torch.Tensor, threshold: float):
    """Per unit of the first layer, its kept-weight mask as an image, or None when there is no image shape."""
    keep = (log_alpha.expand(theta.shape) <= threshold).cpu()
    if theta.dim() == 2 and theta.shape[1] == 28 * 28:  # Linear(784, H): weight is H × 784
        return keep.reshape(-1, 28, 28), "28 × 28 input mask of each hidden unit"
    if theta.dim() == 4:  # Conv2d: out × in × kh × kw; show the first input channel of each filter
        return keep[:, 0], f"{theta.shape[2]} × {theta.shape[3]} kernel mask of each filter (input channel 0)"
    return None, None


def plot_log_alpha(plt, theta: dict, log_alpha: dict, stats: dict, threshold: float):
    r"""Figure 1: a histogram of :math:`\log\alpha` per weight site, the pruning threshold marked."""
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
    return fig


def plot_curves(plt, history: list[dict], threshold: float):
    """Figure 2: test error (θ and pruned), sparsity and ELBO over the epochs."""
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
    return fig


def plot_masks(plt, name: str, theta: torch.Tensor, log_alpha: torch.Tensor, threshold: float, max_units: int):
    """Figure 3: the kept-weight masks of the first layer's ``max_units`` units with the most kept weights, as
    ``(figure, caption)``; ``(None, None)`` when the layer's weights have no image shape."""
    masks, caption = _mask_images(theta, log_alpha, threshold)
    if masks is None:
        return None, None
    order = masks.flatten(1).sum(-1).argsort(descending=True)[:max_units]
    n = len(order)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(masks[order[i]].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    fig.suptitle(f"{name}: kept weights (white), {n} units with most kept", fontsize=9)
    return fig, caption


def unit_table(model, guide, threshold: float) -> dict | None:
    """
    The units kept per layer: the pruned network (:func:`~pyro_vdrop.nn.prune`) with its dead units removed
    (:func:`~pyro_vdrop.nn.compress`), as ``{"layers": [names of the weighted layers], "widths": [...],
    "kept": [...], "input_mask": bool tensor of the inputs the first layer still reads}``; None when the network
    is not one that :func:`~pyro_vdrop.nn.compress` handles.
    """
    dense = prune(model, guide, threshold=threshold).eval()
    try:
        small = compress(dense)
    except TypeError:
        return None
    widths = layer_widths(dense)
    mask = torch.ones(widths[0], dtype=torch.bool)
    select = next((m for m in small.children() if isinstance(m, SelectInputs)), None)
    if select is not None:
        mask = torch.zeros(widths[0], dtype=torch.bool)
        mask[select.index.cpu()] = True
    layers = [
        n for n, m in dense.named_children() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
    ]
    return {"layers": layers, "widths": widths, "kept": layer_widths(small), "input_mask": mask}


def plot_input_mask(plt, mask: torch.Tensor):
    """Figure 6: the inputs that the exported network's first layer still reads (white), as a square image (28 × 28
    for MNIST pixels); None when the number of inputs is not a square."""
    side = math.isqrt(mask.numel())
    if side * side != mask.numel() or side < 2:
        return None
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(mask.reshape(side, side).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"inputs read: {int(mask.sum())} of {mask.numel()}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


#: The variants of a reliability diagram in ``evaluation.json`` and their labels.
_RELIABILITY_VARIANTS = {"theta": "θ network", "pruned": "pruned", "mc": "MC predictive"}

#: The most bins and sets the report reads from ``evaluation.json`` (which may come from anyone: see
#: :func:`_read_evaluation`); more is malformed.
_MAX_BINS = 1000
_MAX_SETS = 20

#: Names of the out-of-distribution sets the report shows (plain words: they reach figures and markdown).
_SET_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, *, length: int | None = None, optional: bool = False, low=None, high=None) -> bool:
    """Whether ``value`` is a list of at most :data:`_MAX_BINS` finite numbers in [low, high] (None allowed when
    ``optional``), of ``length`` when given."""
    if not isinstance(value, list) or not 0 < len(value) <= _MAX_BINS or (length is not None and len(value) != length):
        return False
    for v in value:
        if v is None and optional:
            continue
        if not _is_number(v) or (low is not None and v < low) or (high is not None and v > high):
            return False
    return True


def reliability_data(evaluation: dict | None) -> dict | None:
    """
    The reliability diagrams of ``evaluation.json`` (``{variant: {lower, upper, count, confidence, accuracy}}``) if
    they are well formed, else None: every list of one length, counts non-negative integers, confidences,
    accuracies and bin ends in [0, 1] (None for an empty bin). Variants other than ``theta``, ``pruned``, ``mc``
    are ignored.
    """
    record = evaluation.get("reliability") if isinstance(evaluation, dict) else None
    if not isinstance(record, dict):
        return None
    data = {}
    for name in _RELIABILITY_VARIANTS:
        bins = record.get(name)
        if bins is None:
            continue
        if not isinstance(bins, dict) or not isinstance(bins.get("count"), list):
            return None
        n = len(bins["count"])
        ok = _numbers(bins["count"], length=n, low=0) and all(isinstance(c, int) for c in bins["count"])
        ok = ok and all(
            _numbers(bins.get(k), length=n, optional=True, low=0, high=1) for k in ("confidence", "accuracy")
        )
        ok = ok and all(_numbers(bins.get(k), length=n, optional=True, low=0, high=1) for k in ("lower", "upper"))
        if not ok:
            return None
        data[name] = {k: bins[k] for k in ("lower", "upper", "count", "confidence", "accuracy")}
    return data or None


def _histogram_data(value) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("counts"), dict):
        return None
    edges, counts = value.get("edges"), value["counts"]
    if not _numbers(edges, low=0) or len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        return None
    if not 0 < len(counts) <= _MAX_SETS:
        return None
    for name, c in counts.items():
        if not _SET_NAME.fullmatch(name) or not _numbers(c, length=len(edges) - 1, low=0):
            return None
        if not all(isinstance(v, int) for v in c):
            return None
    return {"edges": edges, "counts": counts}


def entropy_data(evaluation: dict | None) -> dict | None:
    """
    The out-of-distribution histograms of ``evaluation.json`` (``{"entropy": ..., "mutual_information": ...}``,
    each ``{"edges": [...], "counts": {set: [...]}}``) if well formed, else None: increasing non-negative edges,
    one non-negative integer count per bin, at most :data:`_MAX_SETS` sets with plain names.
    """
    ood = evaluation.get("ood") if isinstance(evaluation, dict) else None
    if not isinstance(ood, dict):
        return None
    data = {
        "entropy": _histogram_data(ood.get("entropy_histogram")),
        "mutual_information": _histogram_data(ood.get("mutual_information_histogram")),
    }
    return None if None in data.values() else data


def ood_rows(evaluation: dict | None) -> dict | None:
    """The out-of-distribution table of ``evaluation.json`` (``{set: row}``) with only well-formed rows and numbers;
    None when there is none."""
    ood = evaluation.get("ood") if isinstance(evaluation, dict) else None
    shifts = ood.get("shifts") if isinstance(ood, dict) else None
    if not isinstance(shifts, dict):
        return None
    rows = {}
    keys = ("accuracy", "entropy", "mutual_information", "auroc_mutual_information", "auroc_entropy")
    for name, row in list(shifts.items())[:_MAX_SETS]:
        if not isinstance(name, str) or not _SET_NAME.fullmatch(name) or not isinstance(row, dict):
            continue
        rows[name] = {k: row[k] if _is_number(row.get(k)) else None for k in keys}
    return rows or None


def plot_reliability(plt, reliability: dict):
    """Figure 4: the reliability diagram (accuracy against confidence per bin) of the θ network, the pruned network
    and the MC predictive, and how many test images fall into each bin."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([0, 1], [0, 1], color="gray", linestyle=":", label="calibrated")
    for name, bins in reliability.items():
        points = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None and a is not None]
        if points:
            axes[0].plot(*zip(*points), marker="o", markersize=4, label=_RELIABILITY_VARIANTS[name])
    axes[0].set_xlabel("confidence (top-class probability)")
    axes[0].set_ylabel("accuracy")
    axes[0].set_xlim(0, 1)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    name = "mc" if "mc" in reliability else next(iter(reliability))
    bins = reliability[name]
    spans = [(lo, hi) for lo, hi in zip(bins["lower"], bins["upper"])]
    shown = [(lo, hi, c) for (lo, hi), c in zip(spans, bins["count"]) if lo is not None and hi is not None and c > 0]
    if shown:
        axes[1].bar(
            [lo for lo, _, _ in shown],
            [c for *_, c in shown],
            width=[hi - lo for lo, hi, _ in shown],
            align="edge",
            color="tab:green",
            edgecolor="white",
        )
    axes[1].set_title(_RELIABILITY_VARIANTS[name], fontsize=9)
    axes[1].set_xlim(0, 1)
    axes[1].set_yscale("log")
    axes[1].set_ylim(bottom=0.8)
    axes[1].set_xlabel("confidence (top-class probability)")
    axes[1].set_ylabel("test images in the bin")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_entropy(plt, histograms: dict):
    """Figure 5: histograms of the MC predictive's entropy and mutual information on the test images and on each
    out-of-distribution set."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (key, label) in zip(
        axes, (("entropy", "predictive entropy (nats)"), ("mutual_information", "mutual information (nats)"))
    ):
        hist = histograms[key]
        for name, counts in hist["counts"].items():
            total = sum(counts) or 1
            ax.stairs([c / total for c in counts], hist["edges"], label=name, linewidth=2 if name == "test" else 1.2)
        ax.set_xlabel(label)
        ax.set_ylabel("share of images")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _read_evaluation(run_dir: Path) -> dict | None:
    """``evaluation.json`` if it holds the figures the report shows; None otherwise (it is optional)."""
    try:
        with open(run_dir / EVALUATION_FILE, encoding="utf-8") as f:
            evaluation = json.load(f)
    except (OSError, ValueError):
        return None
    numbers = ("num_samples", "test_error_mc")
    if not isinstance(evaluation, dict) or not all(isinstance(evaluation.get(k), (int, float)) for k in numbers):
        return None
    return evaluation


def report_markdown(session, state: dict, stats: dict, *, run_name: str, threshold: float, **extra) -> str:
    """
    The text of ``report.md``: the run in one sentence, a table of its figures, one row per layer, the figures and
    the configuration. ``extra`` holds ``evaluation`` (``evaluation.json`` or None), ``in_progress`` (the lock's
    holder or None), ``mask_caption`` (None when there is no mask figure), ``units`` (:func:`unit_table`
    or None), ``input_mask_figure`` (whether that figure was drawn), and ``reliability_figure`` /
    ``entropy_figure`` (whether those figures were drawn).
    """
    config, history = session.config, state["history"]
    last = history[-1] if history else {}
    evaluation = extra.get("evaluation")
    text = io.StringIO()
    text.write(f"# pyro-vdrop run report: {run_name}\n\n")
    text.write(
        f"{config.model} ({config.guide} guide, {config.estimator} estimator) on {config.dataset}: "
        f"{session.num_data} training and {session.x_test.shape[0]} test images, "
        f"{state['epoch']} of {config.epochs} epochs in {last.get('time', 0.0):.1f} s.\n\n"
    )
    if extra.get("in_progress") is not None:
        text.write(
            f"**The run is still being trained** ({extra['in_progress']}): the figures of its last checkpoint.\n\n"
        )
    rows = [
        ("test error (θ)", f"{100 * last.get('test_error', float('nan')):.2f} %"),
        (f"test error (pruned, log α > {threshold:g})", f"{100 * last.get('test_error_pruned', float('nan')):.2f} %"),
    ]
    if evaluation is not None:
        samples = evaluation["num_samples"]
        rows.append((f"test error (MC predictive, {samples} samples)", f"{100 * evaluation['test_error_mc']:.2f} %"))
    rows += [
        ("weights kept", f"{stats['kept']:,} of {stats['weights']:,}"),
        ("sparsity", f"{100 * stats['sparsity']:.2f} %"),
        ("compression", f"{stats['compression']:.1f}×"),
        ("ELBO (last epoch)", f"{last.get('elbo', float('nan')):.1f}"),
    ]
    text.write("| figure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows) + "\n")
    text.write("## Layers\n\n| site | weights | kept | pruned |\n|---|---|---|---|\n")
    for name, layer in stats["layers"].items():
        text.write(f"| `{name}` | {layer['weights']:,} | {layer['kept']:,} | {100 * layer['sparsity']:.2f} % |\n")
    units = extra.get("units")
    if units is not None:
        text.write(
            "\n## Units kept\n\nThe pruned network with every unit that no kept weight connects removed (what "
            "`pyro-vdrop export` writes); the first row counts the inputs the first layer reads.\n\n"
            "| layer | units | kept |\n|---|---|---|\n"
        )
        for name, width, kept in zip(["input", *units["layers"]], units["widths"], units["kept"]):
            text.write(f"| `{name}` | {width:,} | {kept:,} |\n")
        text.write(f"\n{'-'.join(map(str, units['widths']))} → {'-'.join(map(str, units['kept']))}.\n")
        if extra.get("input_mask_figure"):
            text.write(f"\n![input mask]({REPORT_FIGURES[5]})\n\nThe inputs (pixels) the first layer still reads.\n")
    text.write("\n## Figures\n\n")
    text.write(f"![log alpha per layer]({REPORT_FIGURES[0]})\n\n![curves]({REPORT_FIGURES[1]})\n\n")
    if extra.get("mask_caption") is not None:
        text.write(f"![first-layer masks]({REPORT_FIGURES[2]})\n\n{extra['mask_caption']}.\n\n")
    _write_uncertainty(
        text,
        evaluation,
        threshold=threshold,
        reliability_figure=extra.get("reliability_figure", False),
        entropy_figure=extra.get("entropy_figure", False),
    )
    text.write("## Configuration\n\n```json\n" + json.dumps(config.to_dict(), indent=2) + "\n```\n")
    return text.getvalue()


def _write_uncertainty(
    text, evaluation: dict | None, *, threshold: float, reliability_figure: bool, entropy_figure: bool
) -> None:
    """The calibration table, the out-of-distribution table and their figures, from what of them
    ``evaluation.json`` holds in good form."""
    if evaluation is None:
        return
    variants = (("θ network", ""), (f"pruned (log α > {threshold:g})", "_pruned"), ("MC predictive", "_mc"))
    figures = ("error", "nll", "brier", "ece")
    rows = [
        (label, [evaluation.get(f"test_{k}{suffix}") for k in figures])
        for label, suffix in variants
        if all(_is_number(evaluation.get(f"test_{k}{suffix}")) for k in figures)
    ]
    if rows:
        bins = evaluation.get("ece_bins")
        bins = f"{bins} equal-width bins" if isinstance(bins, int) and not isinstance(bins, bool) else "binned"
        text.write(f"## Calibration\n\nOn the test images (ECE: {bins}; lower is better for all four).\n\n")
        text.write("| predictor | error | NLL | Brier | ECE |\n|---|---|---|---|---|\n")
        for label, (error, nll, brier, ece) in rows:
            text.write(f"| {label} | {100 * error:.2f} % | {nll:.4f} | {brier:.4f} | {ece:.4f} |\n")
        text.write("\n")
    if reliability_figure:
        text.write(f"![reliability diagram]({REPORT_FIGURES[3]})\n\n")
    ood = ood_rows(evaluation)
    if ood is not None:
        text.write(
            "## Out of distribution\n\nThe MC predictive on the test images and on shifted ones: mean predictive "
            "entropy H and mutual information MI (nats), and the AUROC of telling each set from the test images by "
            "MI and by H (0.5: chance, 1: perfect).\n\n"
        )
        text.write("| set | accuracy | H | MI | AUROC (MI) | AUROC (H) |\n|---|---|---|---|---|---|\n")

        def cell(value, form):
            return "—" if value is None else form.format(value)

        for name, row in ood.items():
            accuracy = None if row["accuracy"] is None else 100 * row["accuracy"]
            text.write(
                f"| {name} | {cell(accuracy, '{:.2f} %')} "
                f"| {cell(row['entropy'], '{:.4f}')} | {cell(row['mutual_information'], '{:.4f}')} "
                f"| {cell(row['auroc_mutual_information'], '{:.3f}')} | {cell(row['auroc_entropy'], '{:.3f}')} |\n"
            )
        text.write("\n")
    if entropy_figure:
        text.write(f"![entropy histograms]({REPORT_FIGURES[4]})\n\n")


def write_report(run_dir: str | os.PathLike, *, max_units: int = 100, threshold: float | None = None) -> Path:
    r"""
    Writes ``report.md`` and its figures into ``run_dir``: a histogram of :math:`\log\alpha` per layer, the curves of
    test error, sparsity and ELBO over the epochs, and the kept-weight masks of the first layer (for a 784-input
    layer, one 28 × 28 image per hidden unit, the ``max_units`` units with the most kept weights), a table of the
    units kept per layer once the dead ones are removed (:func:`unit_table`) and the inputs the first layer still
    reads as an image (``input_mask.png``, 28 × 28 for MNIST); when
    ``evaluation.json`` (of :func:`~pyro_vdrop.train.evaluate`) holds them, the calibration and out-of-distribution
    tables, the reliability diagram and the entropy histograms. ``evaluation.json`` is read as untrusted: what is
    malformed in it is left out of the report. Every file is written atomically (a symlink in its place is replaced,
    not followed).

    :param float threshold: The pruning threshold on :math:`\log\alpha`; default: the guide's ``prune_threshold``.
    :returns: The path of ``report.md``.
    :raises RunError: if matplotlib is not installed or ``run_dir`` is not a run.
    """
    if threshold is not None:
        check_threshold(threshold)
    plt = _import_pyplot()
    run_dir = Path(run_dir)
    in_progress = run_in_progress(run_dir)
    session, state = open_run(run_dir, device="cpu")
    threshold = guide_threshold(session.guide, threshold)
    theta, log_alpha = posterior(session.guide)
    stats = sparsity_stats(session.guide, threshold=threshold)

    def save(fig, name):
        _save_figure(fig, run_dir / name)
        plt.close(fig)

    save(plot_log_alpha(plt, theta, log_alpha, stats, threshold), REPORT_FIGURES[0])
    save(plot_curves(plt, state["history"], threshold), REPORT_FIGURES[1])
    first = next(iter(log_alpha), None)
    fig, caption = (
        (None, None) if first is None else plot_masks(plt, first, theta[first], log_alpha[first], threshold, max_units)
    )
    if fig is not None:
        save(fig, REPORT_FIGURES[2])
    else:
        (run_dir / REPORT_FIGURES[2]).unlink(missing_ok=True)
    units = unit_table(session.model, session.guide, threshold)
    fig = None if units is None else plot_input_mask(plt, units["input_mask"])
    if fig is not None:
        save(fig, REPORT_FIGURES[5])
    else:
        (run_dir / REPORT_FIGURES[5]).unlink(missing_ok=True)
    evaluation = _read_evaluation(run_dir)
    drawn = {"units": units, "input_mask_figure": fig is not None}
    for key, index, data, plot in (
        ("reliability_figure", 3, reliability_data(evaluation), plot_reliability),
        ("entropy_figure", 4, entropy_data(evaluation), plot_entropy),
    ):
        drawn[key] = data is not None
        if data is not None:
            save(plot(plt, data), REPORT_FIGURES[index])
        else:  # a figure of an earlier evaluation must not pass for this one's
            (run_dir / REPORT_FIGURES[index]).unlink(missing_ok=True)
    text = report_markdown(
        session,
        state,
        stats,
        run_name=run_dir.name,
        threshold=threshold,
        evaluation=evaluation,
        in_progress=in_progress,
        mask_caption=caption,
        **drawn,
    )
    atomic_write(run_dir / REPORT_FILE, lambda f: f.write(text), binary=False)
    return run_dir / REPORT_FILE


__all__ = [
    "entropy_data",
    "ood_rows",
    "plot_curves",
    "plot_entropy",
    "plot_input_mask",
    "plot_log_alpha",
    "plot_masks",
    "plot_reliability",
    "reliability_data",
    "report_markdown",
    "unit_table",
    "write_report",
]
