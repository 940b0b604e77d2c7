# SPDX-License-Identifier: Apache-2.0
"""
The shape of [1, Table 1] on MNIST: the variance of the ELBO gradient with respect to the top- and
bottom-layer weight means, for the estimators LRT, Flipout, separate weights per example, one weight
sample per minibatch and no noise, after N and 10N epochs; and the wall time per epoch of each.

Protocol (recorded in the JSON): the paper's fully connected ReLU net with 3 hidden layers (width
``--width``), an ``AutoVariationalDropout`` guide (independent noise, α per weight), ``TraceMeanField_ELBO``,
Adam, trained with LRT on a subset of ``--train-size`` MNIST training images (batch 100). At epochs N and
10N the parameters are frozen and, for every estimator, ``pyro_vdrop.infer.gradient_variance`` draws
``--draws`` gradients: on one fixed minibatch (noise only) and over ``--draws`` random minibatches
(noise + data, as in the paper, where "no noise" is not zero). Times are medians of ``--time-steps``
SVI steps per estimator, scaled to one epoch of the subset.

Usage: ``python benchmarks/grad_variance.py --data-dir DIR`` (or ``PYRO_VDROP_MNIST_DIR``).

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO

import pyro_vdrop
from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.infer.gradient_variance import GRADIENT_ESTIMATORS, gradient_variance
from pyro_vdrop.poutine import local_reparam
from pyro_vdrop.util import environment


def load(data_dir, train_size):
    from pyro_vdrop.datasets import load_mnist

    x, y = load_mnist("train", data_dir=data_dir, flatten=True)
    return x[:train_size].float(), y[:train_size]


def make_model(sizes, num_data):
    def model(x, y=None):
        h = x
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            w = pyro.sample(f"w{i}", ImproperLogUniform(device=x.device).expand([b, a]).to_event(2))
            h = F.linear(h, w, pyro.param(f"b{i}", lambda b=b: torch.zeros(b, device=x.device)))
            if i < len(sizes) - 2:
                h = torch.relu(h)
        with pyro.plate("data", num_data, subsample_size=x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=h), obs=y)

    return model


def handler(estimator):
    mode = GRADIENT_ESTIMATORS[estimator]
    return local_reparam(estimator=mode) if mode else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_VDROP_MNIST_DIR"))
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1, help="N: variances after N and 10N epochs")
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--time-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP stalls on a shared, loaded machine")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "grad_variance.json"))
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("give --data-dir or set PYRO_VDROP_MNIST_DIR to the MNIST IDX folder")
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    pyro.enable_validation(False)
    t0 = time.time()
    x, y = load(args.data_dir, args.train_size)
    n, batch = x.shape[0], 100
    sizes = (784, args.width, args.width, args.width, 10)
    model = make_model(sizes, n)
    guide = AutoVariationalDropout(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), TraceMeanField_ELBO(max_plate_nesting=1))
    with local_reparam():
        guide(x[:batch], y[:batch])
    names = sorted(pyro.get_param_store().keys())
    loc_names = [k for k in names if "loc" in k and ("w0" in k or f"w{len(sizes) - 2}" in k)]
    bottom = next(k for k in loc_names if k.endswith("w0"))
    top = next(k for k in loc_names if k.endswith(f"w{len(sizes) - 2}"))
    fixed = (x[:batch], y[:batch])

    def measure():
        out = {}
        for est in GRADIENT_ESTIMATORS:
            perm = torch.randperm(n)[: args.draws * batch].reshape(args.draws, batch)
            batches = [(x[i], y[i]) for i in perm]
            noise = gradient_variance(model, guide, *fixed, params=[bottom, top], estimator=est, num_draws=args.draws)
            full = gradient_variance(
                model, guide, params=[bottom, top], estimator=est, num_draws=args.draws, batches=batches
            )
            out[est] = {
                "fixed_batch": {"bottom": noise[bottom]["variance"], "top": noise[top]["variance"]},
                "random_batches": {"bottom": full[bottom]["variance"], "top": full[top]["variance"]},
            }
        return out

    variances = {}
    epoch = 0
    for target in (args.epochs, 10 * args.epochs):
        while epoch < target:
            perm = torch.randperm(n)
            with local_reparam():
                for i in range(0, n, batch):
                    svi.step(x[perm[i : i + batch]], y[perm[i : i + batch]])
            epoch += 1
        variances[f"epoch_{epoch}"] = measure()
        print(f"epoch {epoch}: measured ({time.time() - t0:.0f} s)")

    epoch_time = {}
    steps_per_epoch = n // batch
    for est in GRADIENT_ESTIMATORS:
        times = []
        for s in range(args.time_steps + 3):
            i = (s * batch) % n
            t = time.perf_counter()
            with handler(est):
                svi.step(x[i : i + batch], y[i : i + batch])
            if s >= 3:
                times.append(time.perf_counter() - t)
        epoch_time[est] = statistics.median(times) * steps_per_epoch

    e1, e10 = f"epoch_{args.epochs}", f"epoch_{10 * args.epochs}"
    header = f"{'estimator':<22}" + "".join(
        f"{c:>14}" for c in (f"top{args.epochs}", f"top{10 * args.epochs}", f"bottom{args.epochs}")
    )
    header += f"{f'bottom{10 * args.epochs}':>14}{'s/epoch':>10}"
    for kind in ("random_batches", "fixed_batch"):
        print(f"\nvariance of the gradient ({kind.replace('_', ' ')}), width {args.width}, {n} training images")
        print(header)
        for est in GRADIENT_ESTIMATORS:
            v1, v10 = variances[e1][est][kind], variances[e10][est][kind]
            row = (v1["top"], v10["top"], v1["bottom"], v10["bottom"])
            print(f"{est:<22}" + "".join(f"{v:>14.3e}" for v in row) + f"{epoch_time[est]:>10.2f}")
    ratios = {
        k: {
            layer: variances[k]["single weight sample"]["fixed_batch"][layer]
            / variances[k]["lrt"]["fixed_batch"][layer]
            for layer in ("top", "bottom")
        }
        for k in variances
    }
    print("\nsingle-sample / LRT variance ratio (fixed batch):", json.dumps(ratios))
    record = {
        "benchmark": "grad_variance",
        "command": "python " + " ".join(sys.argv),
        "protocol": {
            "net": f"MLP {sizes}, ReLU (paper: 3 hidden layers; width reduced for CPU)",
            "guide": "AutoVariationalDropout (independent noise, alpha per weight, multiplicative)",
            "elbo": "TraceMeanField_ELBO",
            "training": f"LRT, Adam lr {args.lr}, batch {batch}, first {n} MNIST training images",
            "parameters": {"bottom": bottom, "top": top},
            "variance": "mean over weights of the per-weight sample variance of the gradient over draws",
            "draws": args.draws,
        },
        "variances": variances,
        "single_over_lrt_fixed_batch": ratios,
        "seconds_per_epoch": epoch_time,
        "total_seconds": time.time() - t0,
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__, "pyro_vdrop": pyro_vdrop.__version__},
        "machine": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
