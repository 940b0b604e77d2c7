# SPDX-License-Identifier: Apache-2.0
"""
Why does our sparse VD LeNet-300-100 keep more weights than Molchanov et al. [1]? An ablation of the recipe's
parts on full MNIST, each at the same number of epochs: the learning-rate schedule (``linear``: Adam 1e-3 falling
linearly to 0 from the first step, ours so far; ``hold-linear``: constant for the first half, then linear to 0,
the schedule of [1]'s reference code), the start (5 epochs of plain pretraining, ours so far; or the fan-in
initialisation, as [1]'s reference code starts from a random network) and ``train_clip`` (the means of weights
with log α ≥ 3 are 0 while training, as in [1]'s reference code). ``reference`` combines the reference code's
three choices. The KL warm-up is [1]'s (weight 0 until epoch 5 of 200, rising to 1 at epoch 20), scaled to
``--epochs``.

    python -m benchmarks.sparse_ablation --epochs 40 --data-dir $PYRO_VDROP_MNIST_DIR       # ~6.5 min per variant
    python -m benchmarks.sparse_ablation --epochs 40 --only hold-linear,no-pretrain         # some variants

Every variant trains in its own run folder (``runs/benchmarks/sparse_ablation-<epochs>ep/<variant>``), resumed
when interrupted; the JSON record ``benchmarks/results/sparse_ablation-lenet300-<epochs>ep.json`` is rewritten
atomically after every variant, and variants already in it are skipped (``--restart`` redoes them).

[1] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.paper import RESULTS, epoch_logger, fit_resumable, read_record, resolve_mnist_dir, write_record
from pyro_vdrop.train import TrainConfig, environment, evaluate, read_metrics

#: The variants: their differences from the base recipe (sparse VD, LeNet-300-100, batch 100, Adam 1e-3).
VARIANTS = {
    "baseline": {"lr_decay": "linear", "pretrain_epochs": 5},
    "reference": {"lr_decay": "hold-linear", "pretrain_epochs": 0, "train_clip": 3.0},
    "hold-linear": {"lr_decay": "hold-linear", "pretrain_epochs": 5},
    "train-clip": {"lr_decay": "linear", "pretrain_epochs": 5, "train_clip": 3.0},
    "no-pretrain": {"lr_decay": "linear", "pretrain_epochs": 0},
    "hold-linear+train-clip": {"lr_decay": "hold-linear", "pretrain_epochs": 5, "train_clip": 3.0},
}
#: Molchanov et al. (2017), Table 1: LeNet-300-100 after 200 epochs.
PAPER = {"test_error": 0.0192, "compression": 68.0, "layers": {"fc1": 0.989, "fc2": 0.972, "fc3": 0.620}}


def config_of(args, variant: str) -> TrainConfig:
    return TrainConfig(
        model="lenet300",
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        guide="sparse",
        estimator="lrt",
        epochs=args.epochs,
        batch_size=100,
        lr=args.lr,
        kl_warmup_start=args.epochs * 5 / 200,
        kl_warmup=args.epochs * 15 / 200,
        seed=args.seed,
        **VARIANTS[variant],
    )


def table_text(record: dict) -> str:
    lines = [
        f"\nsparse VD LeNet-300-100 ablation, {record['epochs']} epochs each (paper: 1.92% at 68x after 200)",
        f"| {'variant':<24} | {'error, pruned':>13} | {'compression':>11} | {'fc1 / fc2 / fc3 sparsity':>26} |",
        f"|{'-' * 26}|{'-' * 15}|{'-' * 13}|{'-' * 28}|",
    ]
    for name, v in record["variants"].items():
        layers = " / ".join(f"{100 * v['layers'][k]['sparsity']:.1f}" for k in sorted(v["layers"]))
        lines.append(
            f"| {name:<24} | {100 * v['figures']['test_error_pruned']:>12.2f}% | "
            f"{v['figures']['compression']:>10.1f}x | {layers:>25}% |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", choices=("mnist", "embedded"), default="mnist")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PYRO_VDROP_MNIST_DIR)")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--run-root", default="runs/benchmarks", help="folder of the run folders")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON record")
    parser.add_argument("--restart", action="store_true", help="redo variants already in the record")
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    resolve_mnist_dir(parser, args)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "benchmarks.sparse_ablation", *(sys.argv[1:] if argv is None else argv)])
    suffix = "" if args.dataset == "mnist" else "-embedded"
    path = Path(args.results) / f"sparse_ablation-lenet300-{args.epochs}ep{suffix}.json"
    record = read_record(path) or {
        "benchmark": "sparse_ablation",
        "epochs": args.epochs,
        "paper": PAPER,
        "variants_defined": {k: dict(v) for k, v in VARIANTS.items()},
        "variants": {},
    }
    record["command"] = command
    for name in names:
        if name in record["variants"] and not args.restart:
            print(f"{name}: in {path}, skipped", flush=True)
            continue
        config = config_of(args, name)
        out = Path(args.run_root) / f"sparse_ablation-{args.epochs}ep{suffix}" / name
        summary, _ = fit_resumable(config, out, restart=args.restart, callback=epoch_logger(name), command=command)
        result = evaluate(out, data_dir=args.data_dir)
        record["variants"][name] = {
            "config": config.to_dict(),
            "run_dir": str(out),
            "figures": {k: v for k, v in result.items() if k not in ("run", "layers")},
            "layers": result["layers"],
            "training_time_s": summary["time"],
            "metrics": read_metrics(out),
        }
        record["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record["environment"] = environment()
        write_record(path, record)
        print(f"{name}: wrote {path}", flush=True)
    print(table_text(record))
    return record


if __name__ == "__main__":
    main()
