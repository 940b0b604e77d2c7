# SPDX-License-Identifier: Apache-2.0
"""
Predictive uncertainty on the embedded MNIST data, in one run: the default ``pyro-vdrop fit`` (sparse variational
dropout, LeNet-300-100), plain Gaussian dropout (``pyro-vdrop fit --guide gaussian-dropout``) and the deterministic
network both start from (5 epochs of plain pretraining), each evaluated as ``pyro-vdrop evaluate`` does: test error,
NLL, Brier score and ECE of the θ network, the pruned network and the MC predictive, and the out-of-distribution
check (rotated, pixel-noised and uniform-noise images).

    python -m benchmarks.uncertainty                  # the defaults of pyro-vdrop fit; about 2 minutes on 2 cores
    python -m benchmarks.uncertainty --quick          # a smoke test (tiny data; the figures mean nothing)

Prints the tables and writes ``benchmarks/results/uncertainty.json`` (``uncertainty-quick.json`` with ``--quick``)
with the command, versions, machine, configurations and figures.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from pyro_vdrop.train import Session, TrainConfig, environment, evaluate, fit
from pyro_vdrop.train.components import select_device
from pyro_vdrop.train.evaluation import classification_figures, ood_figures

RESULTS = Path(__file__).parent / "results"
QUICK = dict(model="mlp", width=32, train_subset=300, test_subset=200, epochs=2, kl_warmup=1, pretrain_epochs=1)


def deterministic_figures(config: TrainConfig, *, seed: int) -> dict:
    """The figures of the plain network that ``fit`` pretrains with ``config`` (same seed: the same network)."""
    t0 = time.perf_counter()
    session = Session(config, device=select_device(config.device))
    net = session.network.eval()

    def draws(inputs):
        with torch.no_grad():
            return torch.cat([net(inputs[i : i + 1000]) for i in range(0, len(inputs), 1000)]).softmax(-1)[None]

    x, y = session.x_test, session.y_test
    figures = classification_figures(draws(x)[0], y)
    return {
        **{f"test_{k}": v for k, v in figures.items()},
        "ood": ood_figures(draws, x, y, seed=seed),
        "time": time.perf_counter() - t0,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=10, help="draws of the MC predictive (evaluate's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MC draws and shifted images")
    parser.add_argument("--out", default="runs/benchmarks/uncertainty", help="folder of the two runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny data and model: a smoke test")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON record goes")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else {}
    configs = {
        "sparse VD": TrainConfig(**base),
        "Gaussian dropout": TrainConfig(**base, guide="gaussian-dropout"),
    }
    t0 = time.perf_counter()
    runs = {}
    for name, config in configs.items():
        out = Path(args.out) / (("quick-" if args.quick else "") + config.guide)
        summary = fit(config, out, overwrite=True, progress=False, command=shlex.join(sys.argv))
        runs[name] = evaluate(out, num_samples=args.num_samples, seed=args.seed) | {"training_time": summary["time"]}
    deterministic = deterministic_figures(configs["sparse VD"], seed=args.seed)
    wall = time.perf_counter() - t0

    print(f"\ncalibration on the {runs['sparse VD']['num_test']} test images (ECE: 15 equal-width bins)")
    print(f"| {'predictor':<46} | {'error':>7} | {'NLL':>6} | {'Brier':>6} | {'ECE':>6} |")
    print(f"|{'-' * 48}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    table = []
    for name, result in runs.items():
        for label, suffix in (("θ", ""), ("pruned (log α > 3)", "_pruned"), (f"MC (S={args.num_samples})", "_mc")):
            table.append(
                (f"{name}, {label}", {k: result[f"test_{k}{suffix}"] for k in ("error", "nll", "brier", "ece")})
            )
    table.append(
        ("deterministic (pretrained)", {k: deterministic[f"test_{k}"] for k in ("error", "nll", "brier", "ece")})
    )
    for label, f in table:
        print(f"| {label:<46} | {100 * f['error']:6.2f}% | {f['nll']:.4f} | {f['brier']:.4f} | {f['ece']:.4f} |")

    print("\nout of distribution (MC predictive; deterministic: one draw, so MI = 0); AUROC vs the test images")
    header = f"| {'predictor':<26} | {'set':<14} | {'accuracy':>8} | {'H':>6} | {'MI':>7} "
    header += f"| {'AUROC MI':>8} | {'AUROC H':>7} |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    ood = {name: r["ood"] for name, r in runs.items()} | {"deterministic (pretrained)": deterministic["ood"]}
    for name, record in ood.items():
        for shift, row in record["shifts"].items():
            accuracy = "—" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
            aurocs = [row.get(k) for k in ("auroc_mutual_information", "auroc_entropy")]
            aurocs = ["—" if v is None else f"{v:.3f}" for v in aurocs]
            print(
                f"| {name:<26} | {shift:<14} | {accuracy:>8} | {row['entropy']:.4f} | {row['mutual_information']:.5f} "
                f"| {aurocs[0]:>8} | {aurocs[1]:>7} |"
            )

    record = {
        "benchmark": "uncertainty",
        "command": shlex.join(["python", "-m", "benchmarks.uncertainty", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "configs": {name: config.to_dict() for name, config in configs.items()},
        "num_samples": args.num_samples,
        "seed": args.seed,
        "runs": {name: {k: v for k, v in r.items() if k not in ("run", "layers")} for name, r in runs.items()},
        "deterministic": deterministic,
        "wall_time_s": wall,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / ("uncertainty-quick.json" if args.quick else "uncertainty.json")
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path} ({wall:.0f} s)")
    return record


if __name__ == "__main__":
    main()
