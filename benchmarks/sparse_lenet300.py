# SPDX-License-Identifier: Apache-2.0
"""
Sparse variational dropout on LeNet-300-100 or LeNet-5-Caffe / full MNIST [1]: additive parameterization, local
reparameterization, batch 100, by default with ``pyro-vdrop fit --dataset mnist``'s recipe (``RECIPES["mnist"]``:
200 epochs of Adam 1e-3, constant for 100 epochs and then linear to 0, KL weight 0 until epoch 5 and 1 from epoch
20, after 5 epochs of plain pretraining, ``train_clip`` 3; chosen by ``sparse_ablation.py``); the paper reports 1.92%
test error with 68× fewer weights (LeNet-300-100) and 0.75% with 280× (LeNet-5-Caffe) after 200 epochs.

    python -m benchmarks.sparse_lenet300                                             # LeNet-300-100 (~0.5 h)
    python -m benchmarks.sparse_lenet300 --model lenet5 --pretrain-epochs 10 --lr-decay linear   # LeNet-5-Caffe
    python -m benchmarks.sparse_lenet300 --model lenet5 --epochs 200 --estimate   # its CPU-time estimate

The run folder (``runs/benchmarks/sparse_<model>-<epochs>ep`` unless ``--out``) is resumed when it holds an
interrupted run (``--restart`` starts over); the learning curve is in its ``metrics.csv`` while it runs. Prints a
table and writes a JSON record (command, versions, machine, configuration, per-epoch metrics and the final
figures) to ``benchmarks/results/sparse_<model>-<epochs>ep.json``. Needs the MNIST files (``--data-dir`` or
``$PYRO_VDROP_MNIST_DIR``) unless ``--dataset embedded``.

[1] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.paper import RESULTS, epoch_logger, estimate_fit_seconds, fit_resumable, hours, write_record
from pyro_vdrop.train import LR_DECAYS, RECIPES, TrainConfig, environment, evaluate, read_metrics

#: The defaults: ``pyro-vdrop fit --dataset mnist``'s recipe (:data:`pyro_vdrop.train.config.RECIPES`).
RECIPE = RECIPES["mnist"]

#: Molchanov et al. (2017), Table 1, after 200 epochs.
PAPERS = {
    "lenet300": {"test_error": 0.0192, "compression": 68.0, "epochs": 200, "sparsity": 0.985},
    "lenet5": {"test_error": 0.0075, "compression": 280.0, "epochs": 200, "sparsity": 0.9964},
}
#: Back-compatibility: the LeNet-300-100 figures.
PAPER = PAPERS["lenet300"]
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe"}


def record_name(model: str, epochs: int, dataset: str = "mnist", seed: int = 0) -> str:
    """The record's (and run folder's) name; seeds other than 0 get their own, so that a seed's run neither
    resumes nor overwrites another's."""
    return f"sparse_{model}-{epochs}ep" + ("" if dataset == "mnist" else "-embedded") + (f"-seed{seed}" if seed else "")


def _config(args) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        guide="sparse",
        estimator=args.estimator,
        epochs=args.epochs,
        batch_size=100,
        lr=args.lr,
        lr_decay=args.lr_decay,
        train_clip=args.train_clip,
        kl_warmup=args.kl_warmup,
        kl_warmup_start=args.kl_warmup_start,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
        device=args.device,
    )


def _train_clip(value: str) -> float | None:
    return None if value == "none" else float(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PAPERS), default="lenet300")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"], help="epochs (paper: 200)")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=RECIPE["pretrain_epochs"], help="plain training epochs before VD"
    )
    parser.add_argument(
        "--kl-warmup-start", type=float, default=RECIPE["kl_warmup_start"], help="epoch where the KL warm-up starts"
    )
    parser.add_argument(
        "--kl-warmup", type=float, default=RECIPE["kl_warmup"], help="epochs of KL warm-up (paper: epochs 5-20)"
    )
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--lr-decay", choices=LR_DECAYS, default=RECIPE["lr_decay"], help="learning-rate schedule")
    parser.add_argument(
        "--train-clip",
        type=_train_clip,
        default=RECIPE["train_clip"],
        help="zero the means of weights with log alpha at or above this while training ('none': off)",
    )
    parser.add_argument("--estimator", default="lrt", choices=("lrt", "flipout", "single-sample"))
    parser.add_argument("--num-samples", type=int, default=10, help="draws of the MC predictive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", choices=("mnist", "embedded"), default="mnist")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PYRO_VDROP_MNIST_DIR)")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--out", default=None, help="run directory (default: runs/benchmarks/...)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON record")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--restart", action="store_true", help="start the run over instead of resuming it")
    parser.add_argument("--estimate", action="store_true", help="print the run's CPU-time estimate and exit")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = _config(args)
    name = record_name(args.model, args.epochs, args.dataset, args.seed)
    if args.estimate:
        e = estimate_fit_seconds(config)
        print(
            f"sparse VD {NAMES[args.model]}, {args.epochs} epochs (+{args.pretrain_epochs} pretraining): "
            f"{1e3 * e['seconds_per_step']:.0f} ms/step, about {hours(e['seconds'])}",
            flush=True,
        )
        return None
    command = shlex.join(["python", "-m", "benchmarks.sparse_lenet300", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out or f"runs/benchmarks/{name}")
    t0 = time.perf_counter()
    callback = None if args.no_progress else epoch_logger(f"sparse {args.model}")
    summary, resume = fit_resumable(config, out, restart=args.restart, callback=callback, command=command)
    result = evaluate(out, num_samples=args.num_samples)
    wall = time.perf_counter() - t0
    paper = PAPERS[args.model]

    rows = [
        ("test error, θ", f"{100 * result['test_error']:.2f} %", "—"),
        (
            "test error, pruned (log α > 3)",
            f"{100 * result['test_error_pruned']:.2f} %",
            f"{100 * paper['test_error']:.2f} %",
        ),
        (f"test error, MC predictive (S={args.num_samples})", f"{100 * result['test_error_mc']:.2f} %", "—"),
        ("compression", f"{result['compression']:.1f}×", f"{paper['compression']:.0f}×"),
        ("sparsity", f"{100 * result['sparsity']:.2f} %", f"{100 * paper['sparsity']:.2f} %"),
        ("epochs", f"{args.epochs}", f"{paper['epochs']}"),
        ("training time", f"{summary['time']:.0f} s", "—"),
    ]
    print(f"\nsparse VD, {NAMES[args.model]}, MNIST ({args.epochs} epochs; paper: {paper['epochs']})")
    print(f"| {'figure':<36} | {'this run':>10} | {'paper':>8} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 10}|")
    for label, ours, theirs in rows:
        print(f"| {label:<36} | {ours:>10} | {theirs:>8} |")

    record = {
        "benchmark": f"sparse_{args.model}",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "config": config.to_dict(),
        "run_dir": str(out),
        "resumed": resume,
        "figures": {k: v for k, v in result.items() if k not in ("run", "layers")},
        "layers": result["layers"],
        "training_time_s": summary["time"],
        "wall_time_s": wall,
        "paper": paper,
        "meets_paper_target": result["test_error_pruned"] <= paper["test_error"]
        and result["compression"] >= paper["compression"],
        "metrics": read_metrics(out),
    }
    path = Path(args.results) / f"{name}.json"
    write_record(path, record)
    print(f"\nwrote {path}")
    return record


if __name__ == "__main__":
    main()
