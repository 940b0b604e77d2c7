# SPDX-License-Identifier: Apache-2.0
"""
Sparse variational dropout on LeNet-300-100 / full MNIST, Molchanov et al.'s recipe [1]: additive
parameterization, local reparameterization, Adam 1e-3 decayed linearly to 0, batch 100, KL weight annealed
from 0 to 1; the paper reports 1.92% test error with 68× fewer weights after 200 epochs.

    python benchmarks/sparse_lenet300.py --epochs 200                     # the paper's length (hours on a CPU)
    python benchmarks/sparse_lenet300.py --epochs 20 --pretrain-epochs 2 --kl-warmup-start 1 --kl-warmup 5

Prints a table and writes a JSON record (command, versions, machine, configuration, per-epoch metrics and the
final figures) to ``benchmarks/results/sparse_lenet300-<epochs>ep.json``. Needs the MNIST files
(``--data-dir`` or ``$PYRO_VDROP_MNIST_DIR``).

[1] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from pyro_vdrop.train import TrainConfig, environment, evaluate, fit, read_metrics

#: Molchanov et al. (2017), Table 1: LeNet-300-100 on MNIST after 200 epochs.
PAPER = {"test_error": 0.0192, "compression": 68.0, "epochs": 200}
RESULTS = Path(__file__).parent / "results"


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        model="lenet300",
        dataset="mnist",
        data_dir=args.data_dir,
        guide="sparse",
        estimator=args.estimator,
        epochs=args.epochs,
        batch_size=100,
        lr=args.lr,
        lr_decay="linear",
        kl_warmup=args.kl_warmup,
        kl_warmup_start=args.kl_warmup_start,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
        device=args.device,
    )
    out = Path(args.out or f"runs/benchmarks/sparse_lenet300-{args.epochs}ep")
    t0 = time.perf_counter()
    summary = fit(config, out, overwrite=True, progress=not args.no_progress, command=shlex.join(sys.argv))
    result = evaluate(out, num_samples=args.num_samples)
    wall = time.perf_counter() - t0

    rows = [
        ("test error, θ", f"{100 * result['test_error']:.2f} %", "—"),
        ("test error, pruned (log α > 3)", f"{100 * result['test_error_pruned']:.2f} %", "1.92 %"),
        (f"test error, MC predictive (S={args.num_samples})", f"{100 * result['test_error_mc']:.2f} %", "—"),
        ("compression", f"{result['compression']:.1f}×", "68×"),
        ("sparsity", f"{100 * result['sparsity']:.2f} %", "98.5 %"),
        ("epochs", f"{args.epochs}", "200"),
        ("training time", f"{summary['time']:.0f} s", "—"),
    ]
    print(f"\nsparse VD, LeNet-300-100, MNIST ({args.epochs} epochs; paper: 200)")
    print(f"| {'figure':<36} | {'this run':>10} | {'paper':>8} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 10}|")
    for name, ours, paper in rows:
        print(f"| {name:<36} | {ours:>10} | {paper:>8} |")

    record = {
        "benchmark": "sparse_lenet300",
        "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "config": config.to_dict(),
        "run_dir": str(out),
        "figures": {k: v for k, v in result.items() if k not in ("run", "layers")},
        "layers": result["layers"],
        "training_time_s": summary["time"],
        "wall_time_s": wall,
        "paper": PAPER,
        "meets_paper_target": result["test_error_pruned"] <= PAPER["test_error"]
        and result["compression"] >= PAPER["compression"],
        "metrics": read_metrics(out),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"sparse_lenet300-{args.epochs}ep.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200, help="epochs (paper: 200)")
    parser.add_argument("--pretrain-epochs", type=int, default=0, help="plain training epochs before VD")
    parser.add_argument("--kl-warmup-start", type=float, default=5.0, help="epoch where the KL warm-up starts")
    parser.add_argument("--kl-warmup", type=float, default=15.0, help="epochs of KL warm-up (paper: epochs 5-20)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--estimator", default="lrt", choices=("lrt", "flipout", "single-sample"))
    parser.add_argument("--num-samples", type=int, default=10, help="draws of the MC predictive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PYRO_VDROP_MNIST_DIR)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/benchmarks/...)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    main(parser.parse_args())
