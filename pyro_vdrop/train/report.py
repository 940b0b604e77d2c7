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


def write_report(run_dir: str | os.PathLike, *, max_units: int = 100, threshold: float = PRUNE_THRESHOLD) -> Path:
    r"""
    Writes ``report.md`` and its figures into ``run_dir``: a histogram of :math:`\log\alpha` per layer, the curves of
    test error, sparsity and ELBO over the epochs, and the kept-weight masks of the first layer (for a 784-input
    layer, one 28 × 28 image per hidden unit, the ``max_units`` units with the most kept weights).

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
    atomic_write(run_dir / REPORT_FILE, lambda f: f.write(text.getvalue()), binary=False)
    return run_dir / REPORT_FILE


__all__ = [
    "write_report",
]
