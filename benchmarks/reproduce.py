# SPDX-License-Identifier: Apache-2.0
"""
Runs the paper-reproduction experiments one at a time, under ``nice``, each resumable, and keeps the
"Reproducing the paper" table of ``benchmarks/README.md`` current after each:

    nohup python -m benchmarks.reproduce --data-dir ../shared/data/mnist > runs/reproduce/driver.log 2>&1 &
    python -m benchmarks.reproduce --estimate-only          # each experiment's CPU-time estimate, nothing run
    python -m benchmarks.reproduce --only table1 sparse_lenet5 --dry-run
    python -m benchmarks.reproduce --data-dir ../shared/data/mnist --device cuda --fig1a-jobs 8   # a GPU machine

Experiments (in this order): ``sparse_lenet300`` (Molchanov et al.'s LeNet-300-100), ``table1`` ([1, Table 1] at
M = 1000 and 100, width ``--table1-width``), ``sparse_lenet5`` (LeNet-5-Caffe from a pretrained start) and
``fig1a`` (the width × method grid). Before each, the driver prints the experiment's estimate, from the timing of
its first steps (``--estimate`` of its script); then it runs the script with its output appended to
``<log-dir>/<name>.log`` (a line per epoch or measurement point). Every script checkpoints its training and
writes its records as it goes, so rerunning the driver continues where it stopped; an experiment whose record is
complete is skipped. A failed experiment is reported and the next one runs; the exit status says whether all
succeeded.

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import paper_table
from benchmarks.fig1a import METHODS, WIDTHS, record_path
from benchmarks.paper import RESULTS
from benchmarks.sparse_lenet300 import record_name

EXPERIMENTS = ("sparse_lenet300", "table1", "sparse_lenet5", "fig1a")
ROOT = Path(__file__).resolve().parent.parent


def plan(args) -> list[dict]:
    """Per experiment: its name, the module's arguments, and whether its record is complete."""
    data = ["--dataset", "embedded"] if args.quick else ["--data-dir", args.data_dir]
    results = Path(args.results)
    runs = Path(args.run_root)
    threads = ["--threads", str(args.threads), "--device", args.device]
    q = args.quick
    suffix = "-embedded" if q else ""
    sparse_small = ["--train-subset", "200", "--test-subset", "100", "--num-samples", "2"] if q else []
    out = []
    # LeNet-300-100 with fit's MNIST recipe; LeNet-5-Caffe as in Molchanov et al.'s code: pretrained, linear decay
    for model, epochs, pretrain, decay in (("lenet300", 200, 5, "hold-linear"), ("lenet5", 200, 10, "linear")):
        epochs, pretrain = (2, 1) if q else (epochs, pretrain)
        name = record_name(model, epochs, "embedded" if q else "mnist")
        argv = ["benchmarks.sparse_lenet300", "--model", model, "--epochs", str(epochs), "--lr-decay", decay]
        argv += ["--pretrain-epochs", str(pretrain), "--kl-warmup-start", "0" if q else "5"]
        argv += ["--kl-warmup", "1" if q else "15", "--results", str(results), "--out", str(runs / name)]
        out.append(
            {
                "name": f"sparse_{model}",
                "argv": argv + data + threads + sparse_small,
                "complete": (results / f"{name}.json").is_file(),
            }
        )
    width = 16 if q else args.table1_width
    t1 = results / f"table1-w{width}{suffix}.json"
    argv = ["benchmarks.table1", "--width", str(width), "--out", str(t1), "--run-dir", str(runs / f"table1-w{width}")]
    argv += ["--epochs", "1", "2", "--measure-batch", "50", "20", "--chunk", "20", "--draws", "3"] if q else []
    argv += ["--train-size", "200"] if q else []
    complete = t1.is_file() and json.loads(t1.read_text()).get("complete", False)
    out.insert(1, {"name": "table1", "argv": argv + data + threads, "complete": complete})
    widths = [8, 16] if q else list(args.fig1a_widths)
    epochs = 2 if q else args.fig1a_epochs
    argv = ["benchmarks.fig1a", "--widths", *map(str, widths), "--epochs", str(epochs)]
    argv += ["--results", str(results), "--run-root", str(runs), "--jobs", str(args.fig1a_jobs)]
    argv += ["--train-subset", "300", "--test-subset", "200"] if q else []
    complete = all(
        record_path(results, w, m, epochs).with_name(f"w{w}-{m}-{epochs}ep{suffix}.json").is_file()
        for w in widths
        for m in METHODS
    )
    out.append({"name": "fig1a", "argv": argv + data + threads, "complete": complete})
    return [e for e in out if e["name"] in args.only]


def run_logged(cmd, log: Path, env) -> int:
    """Runs ``cmd`` with stdout and stderr appended to ``log``; returns its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_VDROP_MNIST_DIR"))
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per experiment")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the experiments")
    parser.add_argument("--table1-width", type=int, default=500)
    parser.add_argument("--fig1a-widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--fig1a-epochs", type=int, default=100)
    parser.add_argument("--fig1a-jobs", type=int, default=1, help="Fig. 1a cells trained at once")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where every experiment runs")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--run-root", default="runs/benchmarks", help="parent of the run folders")
    parser.add_argument("--log-dir", default="runs/reproduce", help="folder of the progress logs")
    parser.add_argument("--readme", default=str(paper_table.README), help="README of the paper table")
    parser.add_argument("--no-readme", action="store_true", help="do not update the README's paper table")
    parser.add_argument("--estimate-only", action="store_true", help="print the estimates, run nothing")
    parser.add_argument("--no-estimate", action="store_true", help="skip the estimates")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--quick", action="store_true", help="tiny settings on the embedded data (a smoke test)")
    args = parser.parse_args(argv)
    if not args.quick and not args.data_dir:
        parser.error("give --data-dir or set PYRO_VDROP_MNIST_DIR (the MNIST IDX folder)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    failed = []
    for e in plan(args):
        cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", *e["argv"]]
        stamp = time.strftime("%H:%M:%S")
        if e["complete"]:
            print(f"[{stamp}] {e['name']}: record complete, skipped", flush=True)
            continue
        print(f"[{stamp}] {e['name']}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        if not args.no_estimate:
            est = subprocess.run(cmd + ["--estimate"], cwd=ROOT, env=env, capture_output=True, text=True)
            text = est.stdout.strip() if est.returncode == 0 else f"estimate failed: {est.stderr.strip()[-500:]}"
            print(f"  estimate: {text}", flush=True)
        if args.estimate_only:
            continue
        log = Path(args.log_dir) / f"{e['name']}.log"
        t0 = time.perf_counter()
        code = run_logged(cmd, log, env)
        hours = (time.perf_counter() - t0) / 3600
        status = "done" if code == 0 else f"FAILED (exit {code}; see {log})"
        print(f"[{time.strftime('%H:%M:%S')}] {e['name']}: {status} after {hours:.2f} h", flush=True)
        if code:
            failed.append(e["name"])
        if not args.no_readme:
            paper_table.main(["--results", args.results, "--readme", args.readme, "--write-readme"])
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
