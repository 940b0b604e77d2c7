# SPDX-License-Identifier: Apache-2.0
"""
Kingma et al.'s Fig. 1a [1] for one width: test error of the 3-hidden-layer ReLU network on MNIST with
Bernoulli-equivalent Gaussian dropout (α = p/(1-p) fixed) against variational dropout A (correlated noise),
A2 (A with the KL scaled by 1/3) and B (independent noise), all trained with the local reparameterization trick.

    python benchmarks/fig1a.py --width 100 --epochs 5          # a short run
    python benchmarks/fig1a.py --width 1024 --epochs 100       # nearer the paper's setting

Prints a table and writes a JSON record (command, versions, machine, per-variant configuration, metrics and
final errors) to ``benchmarks/results/fig1a-w<width>-<epochs>ep.json``. Needs the MNIST files (``--data-dir`` or
``$PYRO_VDROP_MNIST_DIR``).

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from pyro_vdrop.train import TrainConfig, environment, evaluate, fit, read_metrics

VARIANTS = ("gaussian-dropout", "A", "A2", "B")
#: Read off Kingma et al. (2015), Fig. 1a (approximate): variational dropout A about 1.4% at 100 hidden units,
#: A2 under 1% at 1250 units.
PAPER_NOTE = "Fig. 1a of Kingma et al. (2015), read off the plot: A ≈ 1.4% at 100 units; A2 < 1% at 1250 units"
RESULTS = Path(__file__).parent / "results"


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    records = {}
    for variant in args.variants:
        config = TrainConfig(
            model="mlp",
            width=args.width,
            dataset="mnist",
            data_dir=args.data_dir,
            guide=variant,
            dropout_p=args.p,
            estimator="lrt",
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            kl_warmup=args.kl_warmup,
            seed=args.seed,
            device=args.device,
        )
        out = Path(args.out) / f"fig1a-w{args.width}-{variant}"
        summary = fit(config, out, overwrite=True, progress=not args.no_progress, command=shlex.join(sys.argv))
        result = evaluate(out, num_samples=args.num_samples)
        records[variant] = {
            "config": config.to_dict(),
            "test_error": result["test_error"],
            "test_error_mc": result["test_error_mc"],
            "test_nll_mc": result["test_nll_mc"],
            "training_time_s": summary["time"],
            "metrics": read_metrics(out),
        }

    print(f"\nFig. 1a, width {args.width}, {args.epochs} epochs, MNIST, LRT")
    print(f"| {'variant':<18} | {'error (θ)':>10} | {f'error (MC, S={args.num_samples})':>16} | {'time':>7} |")
    print(f"|{'-' * 20}|{'-' * 12}|{'-' * 18}|{'-' * 9}|")
    for variant, r in records.items():
        name = f"gaussian p={args.p:g}" if variant == "gaussian-dropout" else variant
        print(
            f"| {name:<18} | {100 * r['test_error']:>8.2f} % | {100 * r['test_error_mc']:>14.2f} % | "
            f"{r['training_time_s']:>5.0f} s |"
        )

    record = {
        "benchmark": "fig1a",
        "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "width": args.width,
        "epochs": args.epochs,
        "paper": PAPER_NOTE,
        "variants": records,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fig1a-w{args.width}-{args.epochs}ep.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=100, help="hidden units per layer (paper: 100 to 1250)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--p", type=float, default=0.5, help="Bernoulli-equivalent rate of Gaussian dropout")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-warmup", type=float, default=0.0, help="epochs of KL warm-up (paper: none)")
    parser.add_argument("--num-samples", type=int, default=10, help="draws of the MC predictive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PYRO_VDROP_MNIST_DIR)")
    parser.add_argument("--out", default="runs/benchmarks", help="parent of the run directories")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    main(parser.parse_args())
