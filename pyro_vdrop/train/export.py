# SPDX-License-Identifier: Apache-2.0
"""
``pyro-vdrop export``: the pruned network of a run, with its dead units removed (:func:`~pyro_vdrop.nn.compress`),
written as a plain-data file (:func:`~pyro_vdrop.nn.save_compressed`), with its size, speed and test error against
the dense network.
"""

import os
import statistics
import time
from pathlib import Path

import torch

from pyro_vdrop.nn import compress, compressed_bytes, count_parameters, layer_widths, load_compressed, prune
from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.evaluation import check_threshold, error_rate, guide_threshold, open_run
from pyro_vdrop.train.run_dir import atomic_write, run_in_progress

#: The layers whose output widths :func:`~pyro_vdrop.nn.layer_widths` lists.
_WEIGHTED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)

#: The batch sizes of the latency figures of :func:`export_run`.
LATENCY_BATCHES = (1, 100)

#: Timed forward passes per network and batch size (the median is reported), after one untimed warm-up pass.
LATENCY_REPEATS = 30


def latency(net: torch.nn.Module, x: torch.Tensor, *, repeats: int = LATENCY_REPEATS) -> float:
    """The median wall-clock seconds of ``net(x)`` over ``repeats`` calls under :func:`torch.no_grad`, after one
    warm-up call."""
    with torch.no_grad():
        net(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """The first ``size`` test inputs (repeated when there are fewer)."""
    reps = -(-size // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:size] if reps > 1 else x[:size]


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sparse: bool = False,
    threshold: float | None = None,
    repeats: int = LATENCY_REPEATS,
) -> dict:
    r"""
    Exports the pruned network of a run: the network with the posterior means :math:`\theta` and the weights of
    :math:`\log\alpha >` ``threshold`` set to zero (:func:`~pyro_vdrop.nn.prune`), with every unit that no kept
    weight connects removed (:func:`~pyro_vdrop.nn.compress`), written to ``out`` by
    :func:`~pyro_vdrop.nn.save_compressed` (with packed sparse weights if ``sparse``) and checked by loading it back
    with :func:`~pyro_vdrop.nn.load_compressed`.

    A run that :func:`~pyro_vdrop.train.fit` is still training is exported at its last checkpoint
    (``in_progress`` names the training process).

    :param run_dir: A directory written by :func:`~pyro_vdrop.train.fit`.
    :param out: The file to write (atomically).
    :param bool sparse: Store the kept weights only (compressed sparse rows), where that is smaller.
    :param float threshold: The pruning threshold on :math:`\log\alpha`; default: the guide's ``prune_threshold``
        (3, or 0 for structured Bayesian pruning).
    :param int repeats: Timed forward passes per network and batch size.
    :returns: ``widths`` and ``exported_widths`` (:func:`~pyro_vdrop.nn.layer_widths`), ``layers`` (the weighted
        layers' names), ``parameters`` / ``exported_parameters``, ``dense_bytes`` (the dense network in the same
        format) / ``exported_bytes`` (the file), ``latency`` (``{batch: {"dense", "exported"}}`` seconds, medians
        of ``repeats``), ``test_error_pruned`` / ``test_error_exported`` and ``max_abs_difference`` (of the two
        networks' logits on the test set), ``num_test``, ``out``, ``in_progress``.
    :rtype: dict
    """
    if threshold is not None:
        check_threshold(threshold)
    run_dir, out = Path(run_dir), Path(out)
    if not out.parent.is_dir():
        raise RunError(f"--out {out}: the folder {out.parent} does not exist")
    in_progress = run_in_progress(run_dir)
    session, _ = open_run(run_dir, device="cpu")
    threshold = guide_threshold(session.guide, threshold)
    dense = prune(session.model, session.guide, threshold=threshold).eval()
    try:
        small = compress(dense)
    except TypeError as e:
        raise RunError(f"the network of {run_dir} cannot be compressed: {e}") from e
    exported_bytes = len(data := compressed_bytes(small, sparse=sparse))
    atomic_write(out, lambda f: f.write(data), binary=True)
    exported = load_compressed(out)
    x, y = session.x_test, session.y_test
    with torch.no_grad():
        logits_dense, logits_exported = dense(x), exported(x)
    timings = {
        size: {
            name: latency(net, _batch(x, size), repeats=repeats)
            for name, net in (("dense", dense), ("exported", exported))
        }
        for size in LATENCY_BATCHES
    }
    return {
        "out": str(out),
        "layers": [name for name, m in dense.named_children() if isinstance(m, _WEIGHTED)],
        "widths": layer_widths(dense),
        "exported_widths": layer_widths(exported),
        "parameters": count_parameters(dense),
        "exported_parameters": count_parameters(exported),
        "dense_bytes": len(compressed_bytes(dense)),
        "exported_bytes": exported_bytes,
        "sparse": sparse,
        "latency": timings,
        "repeats": repeats,
        "num_test": int(x.shape[0]),
        "test_error_pruned": error_rate(logits_dense, y),
        "test_error_exported": error_rate(logits_exported, y),
        "max_abs_difference": float((logits_dense - logits_exported).abs().max()),
        "threshold": threshold,
        "in_progress": in_progress,
    }


__all__ = ["LATENCY_BATCHES", "LATENCY_REPEATS", "export_run", "latency"]
