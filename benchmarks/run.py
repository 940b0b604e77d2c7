# SPDX-License-Identifier: Apache-2.0
"""
The benchmark suite against the peers: step time and peak memory of one training step (forward + backward +
optimizer step) for each variant (with its step memory over the deterministic step's), and how the step time
scales with the batch size and the width.

1. **Step time and memory** at batch 32 / 100 / 1000 for the MNIST MLP 784-300-100-10, LeNet-5-Caffe and one
   512 -> 512 linear layer; variants: the deterministic net, the hand-written torch VD-LRT (``torch_lrt``, the
   reference of the ratios), pyro-vdrop LRT and Flipout, Pyro weight sampling, and the peers bayesian-torch
   and TyXe where installed (skipped with the reason otherwise).
2. **Scaling**: step time of deterministic, torch_lrt, pyro_vdrop_lrt and per-example weights vs batch size
   (width 512) and vs width (a width -> width layer, batch 100), with growth factors.

Each comparison (model, batch size) runs in a process of its own, variants interleaved (see
``benchmarks/measure.py`` for the timing and memory methods). Pyro validation is off in all Pyro variants but the
``*_validated`` ones (Pyro's default, on).
Results go to ``--out`` (default ``benchmarks/results/``) as ``suite_step-<device>.json`` and
``suite_scaling-<device>.json`` (``-quick`` / ``-partial`` for quick or filtered runs); the tables are printed
and ``--write-readme`` puts them into ``benchmarks/README.md``.

Usage::

    python -m benchmarks.run                                   # all, CPU, 1 thread (~10 min on 2 cores)
    /work/bench-venv/bin/python -m benchmarks.run              # the same with the peers installed there
    python -m benchmarks.run --quick --only linear512,deterministic,torch_lrt   # smoke check
    python -m benchmarks.run --device cuda                     # on a GPU
    python -m benchmarks.run --table-only [--write-readme]     # render the tables of the saved records
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import measure
from .models import MODELS, check_model
from .variants import SCALING_VARIANTS, STEP_VARIANTS, VARIANTS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("step", "scaling")
STEP_MODELS = ("mlp", "lenet5", "linear512")
STEP_BATCH_SIZES = (32, 100, 1000)
QUICK_BATCH_SIZES = (32,)
REFERENCE = "torch_lrt"

#: the scaling scans: a width -> width linear layer; per-example weights (B x W^2 noise) capped to stay affordable
SCANS = {
    "batch": {"fixed": {"width": 512}, "values": (16, 64, 256, 1024, 4096), "per_example_max": 256},
    "width": {"fixed": {"batch_size": 100}, "values": (128, 256, 512, 1024, 2048), "per_example_max": 512},
}
QUICK_SCANS = {
    "batch": {"fixed": {"width": 128}, "values": (16, 64), "per_example_max": 16},
    "width": {"fixed": {"batch_size": 16}, "values": (64, 128), "per_example_max": 64},
}
TIMING = {"warmup": 3, "rounds": 8, "target_s": 2.5, "max_steps_per_round": 40}
QUICK_TIMING = {"warmup": 1, "rounds": 2, "target_s": 0.0, "max_steps_per_round": 1}
MEMORY = {"warmup": 1, "steps": 2}
QUICK_MEMORY = {"warmup": 1, "steps": 1}

NOTES = [
    "Pyro validation is off (pyro.enable_validation(False)) in every Pyro-based variant, ours and TyXe's, except "
    "pyro_vdrop_lrt_validated and pyro_vdrop_sparse_validated (Pyro's default, on).",
    "memory_ratio_to_deterministic: the step's peak memory above the state (activations, gradients, temporaries) "
    "over the deterministic step's.",
    "Inputs are random MNIST-shaped minibatches (step times do not depend on the values); N = 60,000.",
    "torch_lrt: the same maths as pyro-vdrop's default: Molchanov KL, log alpha capped at 0 (a plain clamp), "
    "one torch.optim.Adam. pyro_vdrop_lrt trains with pyro_vdrop.optim.JointOptim(torch.optim.Adam) (one torch "
    "optimizer; pyro.optim.Adam keeps one per parameter, 1.0-1.8 ms more per MLP step: benchmarks/step_time.py).",
    "bayesian-torch: N(0, 1) prior, N(mu, softplus(rho)^2) posterior, Bayesian biases, KL = mean over weights / "
    "batch size (not the ELBO's sum); it has no LRT layer: its Reparameterization layers draw one weight sample "
    "per minibatch.",
    "TyXe: pyro-vdrop's log-uniform prior on weights, N(0, 1) on biases (its handlers need random biases), "
    "tyxe.guides.AutoNormal (free loc and scale) initialised by pyro_vdrop.infer.init_to_fan_in; its guide still "
    "samples every weight under its handlers.",
]


def _parse_list(text, kind=str):
    return [kind(t) for t in text.replace(" ", "").split(",") if t]


def classify_only(terms):
    """Splits ``--only`` terms into sections, models and variants; unknown terms raise a ValueError."""
    sections, models, variants = [], [], []
    for term in terms:
        if term in SECTIONS:
            sections.append(term)
        elif term in VARIANTS:
            variants.append(term)
        elif term in MODELS:
            models.append(term)
        else:
            raise ValueError(
                f"--only: unknown term {term!r}; use sections {list(SECTIONS)}, models {list(MODELS)} or variants "
                f"{list(VARIANTS)}"
            )
    if not sections:
        sections = ["step"] if models else list(SECTIONS)
    return sections, models or list(STEP_MODELS), variants


def step_plan(models, batch_sizes, variants):
    names = [n for n in STEP_VARIANTS if not variants or n in variants]
    return [{"points": [{"model": m, "batch_size": b, "variants": names}]} for m in models for b in batch_sizes]


def scaling_plan(scans, variants):
    names = [n for n in SCALING_VARIANTS if not variants or n in variants]
    plan = {}
    for scan, cfg in scans.items():
        points = []
        for value in cfg["values"]:
            width = cfg["fixed"].get("width", value)
            batch_size = cfg["fixed"].get("batch_size", value)
            point = {"model": f"linear{width}", "batch_size": batch_size, "variants": list(names)}
            if value > cfg["per_example_max"] and "pyro_vdrop_per_example" in names:
                point["variants"].remove("pyro_vdrop_per_example")
                point["capped"] = {
                    "pyro_vdrop_per_example": f"capped at {scan} {cfg['per_example_max']}: per-example weights need "
                    "batch x width^2 noise"
                }
            points.append(point)
        plan[scan] = points
    return plan


def run_worker(spec, *, threads):
    """Runs one comparison in a fresh process (``python -m benchmarks.worker``) and returns its result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)], cwd=ROOT, env=env
        )
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}) for {spec['points']}")
        return json.loads(result_path.read_text())


def _point_rows(point, capped=None):
    """The result rows of one point, with ratios to torch_lrt (and to deterministic)."""
    results = point["results"]
    ref = results.get(REFERENCE, {}).get("median_ms")
    det = results.get("deterministic", {}).get("median_ms")
    det_mib = results.get("deterministic", {}).get("step_peak_mib")
    rows = []
    for name, r in results.items():
        row = {"variant": name, **r}
        if "median_ms" in r:
            row["ratio_to_torch_lrt"] = r["median_ms"] / ref if ref else None
            row["ratio_to_deterministic"] = r["median_ms"] / det if det else None
        if "step_peak_mib" in r:  # step memory (activations and gradients) over the deterministic step's
            row["memory_ratio_to_deterministic"] = r["step_peak_mib"] / det_mib if det_mib else None
        rows.append(row)
    skipped = dict(point["skipped"])
    skipped.update(capped or {})
    return rows, skipped


def _git_state():
    """The commit and the uncommitted changes of the checkout (the package under test may be edited)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "uncommitted": [line[3:] for line in status.stdout.splitlines()]}


def _record(benchmark, description, args, settings, start_load, workers):
    shim = any(w.get("tyxe_deep_getattr_shim") for w in workers)
    machine = dict(workers[0]["machine_start"]) if workers else measure.machine(args.device)
    machine["load_average"] = start_load
    machine["load_average_end"] = list(os.getloadavg())
    notes = list(NOTES)
    if shim:
        notes.append("TyXe shim: pyro.util.deep_getattr (gone in Pyro 1.9) added back for TyXe 0.0.2.")
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
        "python_executable": sys.executable,
        "description": description,
        "settings": settings,
        "versions": measure.versions(),
        "git": _git_state(),
        "machine": machine,
        "notes": notes,
        "variants": {name: VARIANTS[name] for name in VARIANTS},
    }


def growth(points, variants):
    """
    Per variant: the figure (step time or memory) at the largest point over the smallest, over the variant's own
    range and over the range common to all variants, and the log-log slope (1: linear growth, 2: quadratic).
    ``points``: ``[{"x": value, "y": {variant: figure}}]``.
    """
    times = {n: [(p["x"], p["y"][n]) for p in points if p["y"].get(n)] for n in variants}
    times = {n: t for n, t in times.items() if len(t) >= 2}
    if not times:
        return {}
    common_hi = min(t[-1][0] for t in times.values())
    common_lo = max(t[0][0] for t in times.values())
    out = {}
    for n, t in times.items():
        entry = {"range": [t[0][0], t[-1][0]], "factor": t[-1][1] / t[0][1]}
        entry["loglog_slope"] = math.log(t[-1][1] / t[0][1]) / math.log(t[-1][0] / t[0][0])
        common = [(x, ms) for x, ms in t if common_lo <= x <= common_hi]
        if len(common) >= 2:
            entry["common_range"] = [common[0][0], common[-1][0]]
            entry["common_factor"] = common[-1][1] / common[0][1]
        out[n] = entry
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP stalls on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="a few steps and small scans: a smoke check, not numbers")
    parser.add_argument("--only", default="", help="comma-separated sections (step, scaling), models, variants")
    parser.add_argument(
        "--batch-sizes", default=None, help="of the step section (default 32,100,1000; with --quick 32)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON records")
    parser.add_argument("--table-only", action="store_true", help="print the tables of the records in --out")
    parser.add_argument("--write-readme", action="store_true", help="also put the tables into benchmarks/README.md")
    args = parser.parse_args(argv)

    from . import table

    out = Path(args.out)
    if args.table_only:
        return table.main(["--results", str(out), "--device", args.device] + (["--write-readme"] * args.write_readme))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        sections, models, variants = classify_only(_parse_list(args.only))
        batch_sizes = _parse_list(args.batch_sizes, int) if args.batch_sizes else None
        for m in models:
            check_model(m)
    except ValueError as e:
        parser.error(str(e))
    if batch_sizes is None:
        batch_sizes = list(QUICK_BATCH_SIZES if args.quick else STEP_BATCH_SIZES)
    elif not batch_sizes or min(batch_sizes) < 1:
        parser.error("--batch-sizes must be positive integers")
    partial = bool(args.only) or args.batch_sizes is not None
    suffix = f"-{args.device}" + ("-quick" if args.quick else "") + ("-partial" if partial else "")
    timing = QUICK_TIMING if args.quick else TIMING
    memory = None if args.no_memory else (QUICK_MEMORY if args.quick else MEMORY)
    base_spec = {"device": args.device, "threads": args.threads, "timing": timing, "memory": memory, "seed": 0}
    settings = {
        "device": args.device,
        "threads": args.threads,
        "quick": args.quick,
        "only": args.only,
        "timing": timing,
        "memory": memory,
    }
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    errors = 0
    written = []

    if "step" in sections:
        start_load = list(os.getloadavg())
        workers, comparisons = [], []
        for comp in step_plan(models, batch_sizes, variants):
            point = comp["points"][0]
            print(f"== step: {point['model']}, batch {point['batch_size']} ==", flush=True)
            t0 = time.perf_counter()
            w = run_worker({**base_spec, **comp}, threads=args.threads)
            w["seconds"] = time.perf_counter() - t0
            workers.append(w)
            p = w["points"][0]
            rows, skipped = _point_rows(p)
            errors += sum("error" in r or "memory_error" in r for r in rows)
            comparisons.append(
                {
                    "model": p["model"],
                    "batch_size": p["batch_size"],
                    "results": rows,
                    "skipped": skipped,
                    "load_average_start": w["machine_start"]["load_average"],
                    "load_average_end": w["machine_end"]["load_average"],
                    "seconds": w["seconds"],
                }
            )
            print(table.point_text(comparisons[-1]), flush=True)
        record = _record(
            "suite_step",
            "one training step (forward + backward + optimizer step) per variant: median step time over interleaved "
            "rounds and peak memory of the step",
            args,
            {**settings, "batch_sizes": batch_sizes, "models": models},
            start_load,
            workers,
        )
        record["models"] = {m: MODELS[m] for m in models}
        record["comparisons"] = comparisons
        record["seconds"] = time.perf_counter() - started
        path = out / f"suite_step{suffix}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        written.append(path)
        print(table.step_markdown(record))

    if "scaling" in sections:
        start_load = list(os.getloadavg())
        scans = QUICK_SCANS if args.quick else SCANS
        workers, results = [], {}
        for scan, points in scaling_plan(scans, variants).items():
            print(f"== scaling vs {scan} ==", flush=True)
            t0 = time.perf_counter()
            w = run_worker({**base_spec, "points": points}, threads=args.threads)
            seconds = time.perf_counter() - t0
            workers.append(w)
            rows_out = []
            for plan_point, p in zip(points, w["points"]):
                rows, skipped = _point_rows(p, plan_point.get("capped"))
                errors += sum("error" in r or "memory_error" in r for r in rows)
                rows_out.append(
                    {
                        "model": p["model"],
                        "batch_size": p["batch_size"],
                        "width": int(p["model"][len("linear") :]),
                        "results": rows,
                        "skipped": skipped,
                    }
                )
                print(f"-- {p['model']}, batch {p['batch_size']}\n{table.point_text(rows_out[-1])}", flush=True)
            key = "batch_size" if scan == "batch" else "width"
            g = {
                figure: growth(
                    [{"x": r[key], "y": {row["variant"]: row.get(figure) for row in r["results"]}} for r in rows_out],
                    SCALING_VARIANTS,
                )
                for figure in ("median_ms", "step_peak_mib")
            }
            results[scan] = {
                "fixed": scans[scan]["fixed"],
                "points": rows_out,
                "growth": g,
                "load_average_start": w["machine_start"]["load_average"],
                "load_average_end": w["machine_end"]["load_average"],
                "seconds": seconds,
            }
        record = _record(
            "suite_scaling",
            "step time (forward + backward + Adam) of a width -> width linear layer vs batch size and vs width",
            args,
            settings,
            start_load,
            workers,
        )
        record["scans"] = results
        record["seconds"] = sum(r["seconds"] for r in results.values())
        path = out / f"suite_scaling{suffix}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        written.append(path)
        print(table.scaling_markdown(record))

    for path in written:
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if errors:
        print(f"{errors} variant(s) failed; see the 'error' entries of the records", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
