# SPDX-License-Identifier: Apache-2.0
"""
``report.md`` of a run: one function per figure, then the markdown page.
"""

import io
import json
import math
import os
from pathlib import Path

import torch

from pyro_vdrop.train.config import PRUNE_THRESHOLD
from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.evaluation import check_threshold, open_run, posterior, sparsity_stats
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
    holder or None) and ``mask_caption`` (None when there is no mask figure).
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
    text.write("\n## Figures\n\n")
    text.write(f"![log alpha per layer]({REPORT_FIGURES[0]})\n\n![curves]({REPORT_FIGURES[1]})\n\n")
    if extra.get("mask_caption") is not None:
        text.write(f"![first-layer masks]({REPORT_FIGURES[2]})\n\n{extra['mask_caption']}.\n\n")
    text.write("## Configuration\n\n```json\n" + json.dumps(config.to_dict(), indent=2) + "\n```\n")
    return text.getvalue()


def write_report(run_dir: str | os.PathLike, *, max_units: int = 100, threshold: float = PRUNE_THRESHOLD) -> Path:
    r"""
    Writes ``report.md`` and its figures into ``run_dir``: a histogram of :math:`\log\alpha` per layer, the curves of
    test error, sparsity and ELBO over the epochs, and the kept-weight masks of the first layer (for a 784-input
    layer, one 28 × 28 image per hidden unit, the ``max_units`` units with the most kept weights). Every file is
    written atomically (a symlink in its place is replaced, not followed).

    :returns: The path of ``report.md``.
    :raises RunError: if matplotlib is not installed or ``run_dir`` is not a run.
    """
    check_threshold(threshold)
    plt = _import_pyplot()
    run_dir = Path(run_dir)
    in_progress = run_in_progress(run_dir)
    session, state = open_run(run_dir, device="cpu")
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
    text = report_markdown(
        session,
        state,
        stats,
        run_name=run_dir.name,
        threshold=threshold,
        evaluation=_read_evaluation(run_dir),
        in_progress=in_progress,
        mask_caption=caption,
    )
    atomic_write(run_dir / REPORT_FILE, lambda f: f.write(text), binary=False)
    return run_dir / REPORT_FILE


__all__ = [
    "plot_curves",
    "plot_log_alpha",
    "plot_masks",
    "report_markdown",
    "write_report",
]
