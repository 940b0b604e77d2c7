# SPDX-License-Identifier: Apache-2.0
"""
Pyro's ``AutoNormal`` on MNIST networks under ``local_reparam()``: the plain recipe ("before": default
``init_scale=0.1``, the full KL from the first step, Adam at lr 1e-3; also at lr 1e-2) against the README's
warm-up recipe ("after": ``init_scale=1e-3``, ``pyro_vdrop.infer.kl_annealing`` raising the KL weight linearly
from 0 in the first epoch to 1 at epoch 5, lr 1e-2), for

- ``mlp``: a 784-200-200-10 ``PyroModule[nn.Sequential]`` MLP (``bayesianize`` of the torch net), and
- ``cnn``: PyTorch's MNIST example CNN (``pytorch/examples/mnist``: two 3x3 convolutions, max-pool, dropout,
  9216-128-10) through ``bayesianize``,

both with the log-uniform prior, ``TraceMeanField_ELBO``, Adam and minibatches of 100, on the embedded MNIST
subset (``load_dataset("embedded")``). Accuracy is that of the posterior mean (``local_reparam(estimator="mean")``)
on the embedded test images. On the 2-core development machine the defaults take a few minutes::

    python -m benchmarks.autonormal_warmup                    # both nets, both recipes
    python -m benchmarks.autonormal_warmup --models mlp --epochs 3 --out /tmp/x.json   # a quick look

Prints a markdown table and writes ``benchmarks/results/autonormal_warmup.json``.
"""

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_vdrop
from pyro_vdrop.datasets import load_dataset
from pyro_vdrop.infer import init_to_fan_in, kl_annealing
from pyro_vdrop.nn import bayesianize
from pyro_vdrop.util import environment

#: The recipes: AutoNormal's ``init_scale``, the number of warm-up epochs (0: the full KL from the start) and
#: Adam's learning rate.
#: "before, lr 1e-2" separates the learning rate's part of the improvement from the init's and warm-up's.
RECIPES = {
    "before": {"init_scale": 0.1, "warmup_epochs": 0, "lr": 1e-3},
    "before, lr 1e-2": {"init_scale": 0.1, "warmup_epochs": 0, "lr": 1e-2},
    "after": {"init_scale": 1e-3, "warmup_epochs": 5, "lr": 1e-2},
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


def pytorch_mnist_cnn() -> nn.Module:
    """The network of PyTorch's MNIST example (``pytorch/examples``, ``mnist/main.py``) as an ``nn.Sequential``."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(9216, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, 10),
    )


NETS = {"mlp": (mlp, True), "cnn": (pytorch_mnist_cnn, False)}  # name: (constructor, flatten the images)


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    """The KL weight of ``epoch`` (0-based): 0 in the first epoch, rising linearly to 1 at ``warmup_epochs``."""
    return 1.0 if warmup_epochs == 0 else min(1.0, epoch / warmup_epochs)


@torch.no_grad()
def accuracy(model, guide, x, y, batch_size=500) -> float:
    """Test accuracy of the posterior mean weights."""
    correct = 0
    with pyro_vdrop.local_reparam(estimator="mean"):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            guide_trace = poutine.trace(guide).get_trace(xb)
            logits = poutine.replay(model, trace=guide_trace)(xb)
            correct += (logits.argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def train(net_name, recipe, *, epochs, batch_size, train_subset, test_subset, seed, lr=None):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    make, flatten = NETS[net_name]
    x, y = load_dataset("embedded", "train", flatten=flatten)
    x_test, y_test = load_dataset("embedded", "test", flatten=flatten)
    x, y, x_test, y_test = x[:train_subset], y[:train_subset], x_test[:test_subset], y_test[:test_subset]
    model = bayesianize(make(), num_data=len(x))
    options = RECIPES[recipe]
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in, init_scale=options["init_scale"])
    svi = SVI(model, guide, pyro.optim.Adam({"lr": options["lr"] if lr is None else lr}), TraceMeanField_ELBO())
    start = time.perf_counter()
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        with pyro_vdrop.local_reparam(), kl_annealing(weight=kl_weight(epoch, options["warmup_epochs"])):
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                total += svi.step(x[idx], y[idx])
        losses.append(total / len(x))
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(model, guide, x_test, y_test), "loss_per_example": losses, "train_seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="override the recipes' learning rates")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--train-subset", type=int, default=5000, help="first N embedded training images")
    parser.add_argument("--cnn-train-subset", type=int, default=2000, help="the CNN's N (it is ~40x the MLP's cost)")
    parser.add_argument("--test-subset", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "autonormal_warmup.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for net_name in args.models.split(","):
        subset = args.cnn_train_subset if net_name == "cnn" else args.train_subset
        for recipe in RECIPES:
            result = train(
                net_name,
                recipe,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                train_subset=subset,
                test_subset=args.test_subset,
                seed=args.seed,
            )
            options = dict(RECIPES[recipe], lr=RECIPES[recipe]["lr"] if args.lr is None else args.lr)
            rows.append({"model": net_name, "recipe": recipe, **options, "train_images": subset, **result})
            print(
                f"{net_name} {recipe}: accuracy {result['accuracy']:.3f} ({result['train_seconds']:.0f} s)",
                file=sys.stderr,
            )
    print("| model | recipe | init_scale | warm-up epochs | lr | train images | epochs | test accuracy | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['recipe']} | {r['init_scale']:g} | {r['warmup_epochs']} | {r['lr']:g} | "
            f"{r['train_images']} | {args.epochs} | {r['accuracy']:.1%} | {r['train_seconds']:.0f} |"
        )
    record = {
        "command": "python -m benchmarks.autonormal_warmup "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": environment(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "recipes": RECIPES,
        "notes": "AutoNormal(init_loc_fn=init_to_fan_in) under local_reparam(), TraceMeanField_ELBO, Adam; accuracy "
        "of the posterior mean on the first test_subset embedded test images",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
