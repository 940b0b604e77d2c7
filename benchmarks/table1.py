# SPDX-License-Identifier: Apache-2.0
"""
[1, Table 1] at the paper's protocol: the variance of minibatch gradient estimates over M = 1000 examples (and
M = 100), with respect to the top- and bottom-layer weight means of the paper's fully connected ReLU net (3 hidden
layers of ``--width`` units) trained on the full MNIST training set, after 10 and 100 epochs, for every estimator
(LRT, Flipout, separate weights per example, one weight sample per minibatch, no noise).

    python -m benchmarks.table1 --width 500 --data-dir $PYRO_VDROP_MNIST_DIR        # hours on a CPU
    python -m benchmarks.table1 --width 500 --estimate                              # prints its CPU-time estimate

Protocol: an ``AutoVariationalDropout`` guide (variational dropout B: independent weight noise, α per weight;
``--init-log-alpha``, default 0, i.e. α = 1, the Bernoulli p = 0.5 equivalent and the paper's cap on α),
``TraceMeanField_ELBO``, Adam ``--lr`` with batch ``--batch-size``, trained with LRT. At every epoch of
``--epochs`` the parameters are frozen and, for every estimator and every M of ``--measure-batch``,
``--draws`` gradients are drawn: on one fixed minibatch (noise only) and over ``--draws`` random minibatches (noise
+ data, as in the paper, where "no noise" is not zero). The mean log α per layer is recorded with each point. The
per-example estimator materialises one weight matrix per example, so it is computed in chunks of ``--chunk``
examples (exactly the M-example gradient: the examples' noises are independent and the KL is deterministic).

Resumable: the training state (parameters, Adam's state, the random number generator) is checkpointed after every
epoch in ``--run-dir`` (``torch.load(weights_only=True)``), and the JSON record is rewritten atomically after every
measurement point; a rerun with the same options continues where the last one stopped (``--restart`` starts
over). The measurements draw from their own seeded generator, so an interrupted and resumed run gives the same
numbers as an uninterrupted one.

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from benchmarks.grad_variance import make_model
from benchmarks.paper import (
    RESULTS,
    hours,
    load_state,
    read_record,
    resolve_mnist_dir,
    restore_rng_state,
    rng_state,
    save_state,
    write_record,
)
from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.infer.gradient_variance import GRADIENT_ESTIMATORS, gradient_variance
from pyro_vdrop.poutine import estimator_handler, local_reparam
from pyro_vdrop.train.components import select_device
from pyro_vdrop.util import environment

#: [1, Table 1]: variance of the gradient wrt the top / bottom layer after 10 / 100 epochs (M = 1000).
PAPER = {
    "lrt": {"top10": 7.8e3, "top100": 1.2e3, "bottom10": 1.9e2, "bottom100": 1.1e2},
    "per-example weights": {"top10": 1.4e4, "top100": 2.6e3, "bottom10": 4.3e2, "bottom100": 2.5e2},
    "single weight sample": {"top10": 4.9e4, "top100": 4.3e3, "bottom10": 8.5e2, "bottom100": 3.3e2},
    "no noise": {"top10": 2.8e3, "top100": 5.9e1, "bottom10": 1.3e2, "bottom100": 9.0e0},
}
#: The options a resumed run must share with the run it continues.
RUN_OPTIONS = (
    "width",
    "dataset",
    "train_size",
    "batch_size",
    "lr",
    "seed",
    "init_log_alpha",
    "draws",
    "measure_batch",
    "chunk",
)
#: Estimators whose M-example gradient is the sum of its chunks' (independent noise per example).
CHUNKABLE = ("lrt", "flipout", "per-example weights", "no noise")


def load(args):
    from pyro_vdrop.datasets import load_dataset

    kw = {"data_dir": args.data_dir} if args.dataset == "mnist" else {}
    x, y = load_dataset(args.dataset, "train", flatten=True, **kw)
    if args.train_size is not None:
        if args.train_size > x.shape[0]:
            sys.exit(f"--train-size {args.train_size} exceeds the {x.shape[0]} training images")
        x, y = x[: args.train_size], y[: args.train_size]
    return x.float(), y


def chunked_gradient_variance(model, guide, batches, *, params, estimator, num_draws, chunk, elbo):
    r"""
    :func:`~pyro_vdrop.infer.gradient_variance.gradient_variance` over ``batches`` (draw ``s`` uses
    ``batches[s % len(batches)]``), with each minibatch's gradient accumulated over chunks of ``chunk`` examples:
    :math:`\nabla \mathcal L_M = \sum_k \frac{c_k}{M} \nabla \mathcal L_{c_k}` holds when the examples' noises are
    independent (LRT, Flipout, per-example weights) or absent, since the data term of a chunk is scaled by
    :math:`N / c_k` and the KL is deterministic. Raises for the single weight sample, which shares one weight
    sample across the minibatch.
    """
    if estimator not in CHUNKABLE:
        raise ValueError(f"chunked_gradient_variance: estimator {estimator!r} shares noise across examples")
    mode = GRADIENT_ESTIMATORS[estimator]
    leaves = [pyro.param(name).unconstrained() for name in params]
    mean = [torch.zeros_like(p) for p in leaves]
    m2 = [torch.zeros_like(p) for p in leaves]
    for s in range(num_draws):
        x, y = batches[s % len(batches)]
        m = x.shape[0]
        grads = [torch.zeros_like(p) for p in leaves]
        for i in range(0, m, chunk):
            xc, yc = x[i : i + chunk], y[i : i + chunk]
            with estimator_handler(mode):
                loss = elbo.differentiable_loss(model, guide, xc, yc) * (xc.shape[0] / m)
            for acc, g in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True)):
                if g is not None:
                    acc += g
        for i, g in enumerate(grads):  # Welford's update
            delta = g - mean[i]
            mean[i] += delta / (s + 1)
            m2[i] += delta * (g - mean[i])
    return {
        name: {"variance": (m2[i] / (num_draws - 1)).mean().item(), "mean_sq": mean[i].pow(2).mean().item()}
        for i, name in enumerate(params)
    }


class Experiment:
    """The network, guide, optimiser and data of one Table 1 run."""

    def __init__(self, args):
        self.args = args
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        self.device = select_device(args.device)
        x, y = load(args)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.n = self.x.shape[0]
        self.sizes = (self.x.shape[1], args.width, args.width, args.width, 10)
        self.model = make_model(self.sizes, self.n)
        self.guide = AutoVariationalDropout(self.model, init_log_alpha=args.init_log_alpha)
        self.optim = pyro.optim.Adam({"lr": args.lr})
        self.elbo = TraceMeanField_ELBO(max_plate_nesting=1)
        self.svi = SVI(self.model, self.guide, self.optim, self.elbo)
        with local_reparam():
            self.guide(self.x[: args.batch_size], self.y[: args.batch_size])
        last = len(self.sizes) - 2
        names = sorted(k for k in pyro.get_param_store().keys() if "loc" in k)
        self.bottom = next(k for k in names if k.endswith("w0"))
        self.top = next(k for k in names if k.endswith(f"w{last}"))

    def train_epoch(self) -> float:
        perm = torch.randperm(self.n)
        b = self.args.batch_size
        total = 0.0
        with local_reparam():
            for i in range(0, self.n, b):
                total += self.svi.step(self.x[perm[i : i + b]], self.y[perm[i : i + b]])
        return total / self.n

    def state(self) -> dict:
        store = pyro.get_param_store()
        return {
            "params": {k: store[k].unconstrained().detach().clone() for k in store.keys()},
            "optim": self.optim.get_state(),
            **rng_state(self.device),
        }

    def restore(self, state: dict) -> None:
        store = pyro.get_param_store()
        if set(state["params"]) != set(store.keys()):
            raise ValueError("the checkpoint's parameters do not match the network; rerun with --restart")
        with torch.no_grad():
            for k, v in state["params"].items():
                store[k].unconstrained().copy_(v)
        self.optim.set_state(state["optim"])
        restore_rng_state(state, self.device)

    def mean_log_alpha(self) -> dict:
        with torch.no_grad():
            return {k: v.mean().item() for k, v in self.guide.log_alpha().items()}

    def measure(self, epoch: int) -> dict:
        """Every estimator's gradient variance at every M, from a generator seeded by ``(seed, epoch)``."""
        args = self.args
        params = [self.bottom, self.top]
        out = {}
        with torch.random.fork_rng():
            torch.manual_seed(1_000_003 * args.seed + epoch)
            for m in args.measure_batch:
                if m > self.n:
                    raise ValueError(f"--measure-batch {m} exceeds the {self.n} training images")
                fixed = [(self.x[:m], self.y[:m])]
                row = {}
                for est in GRADIENT_ESTIMATORS:
                    batches = [
                        (self.x[idx], self.y[idx]) for idx in (torch.randperm(self.n)[:m] for _ in range(args.draws))
                    ]
                    t0 = time.perf_counter()
                    result = {}
                    for kind, bs in (("fixed_batch", fixed), ("random_batches", batches)):
                        if est in CHUNKABLE and m > args.chunk:
                            v = chunked_gradient_variance(
                                self.model,
                                self.guide,
                                bs,
                                params=params,
                                estimator=est,
                                num_draws=args.draws,
                                chunk=args.chunk,
                                elbo=self.elbo,
                            )
                        else:
                            v = gradient_variance(
                                self.model,
                                self.guide,
                                params=params,
                                estimator=est,
                                num_draws=args.draws,
                                batches=bs,
                                elbo=self.elbo,
                            )
                        result[kind] = {"bottom": v[self.bottom]["variance"], "top": v[self.top]["variance"]}
                    result["seconds"] = time.perf_counter() - t0
                    row[est] = result
                out[f"M{m}"] = row
        return out


def ratios(point: dict) -> dict:
    """Single-sample / LRT and per-example / LRT variance ratios per M, kind and layer."""
    out = {}
    for m, row in point["variances"].items():
        out[m] = {
            f"{name}/lrt": {
                kind: {layer: row[name][kind][layer] / row["lrt"][kind][layer] for layer in ("top", "bottom")}
                for kind in ("random_batches", "fixed_batch")
            }
            for name in ("single weight sample", "per-example weights", "flipout", "no noise")
        }
    return out


def table_text(record: dict) -> str:
    """The printed table: ours (random minibatches, as in the paper) next to the paper's numbers."""
    points = sorted(record["points"], key=int)
    lines = []
    for m in record["protocol"]["measure_batch"]:
        lines.append(f"\nvariance over random minibatches of M = {m}, width {record['protocol']['width']}")
        head = f"{'estimator':<22}"
        for p in points:
            head += f"{f'top{p}':>11}{f'bottom{p}':>11}"
        lines.append(head + "   paper (M = 1000): top10 / top100 / bottom10 / bottom100")
        for est in GRADIENT_ESTIMATORS:
            row = f"{est:<22}"
            for p in points:
                v = record["points"][p]["variances"][f"M{m}"][est]["random_batches"]
                row += f"{v['top']:>11.2e}{v['bottom']:>11.2e}"
            paper = PAPER.get(est)
            if paper:
                row += "   " + " / ".join(f"{paper[k]:.1e}" for k in ("top10", "top100", "bottom10", "bottom100"))
            lines.append(row)
    for p in points:
        la = record["points"][p]["mean_log_alpha"]
        lines.append(f"epoch {p}: mean log alpha per layer " + ", ".join(f"{k} {v:.2f}" for k, v in la.items()))
    return "\n".join(lines)


def estimate(args) -> dict:
    """CPU seconds of the run, from the timing of a few training steps and one gradient draw per estimator."""
    exp = Experiment(args)
    b = args.batch_size
    times = []
    with local_reparam():
        for s in range(8):
            t = time.perf_counter()
            idx = torch.arange(s * b, (s + 1) * b) % exp.n
            exp.svi.step(exp.x[idx], exp.y[idx])
            times.append(time.perf_counter() - t)
    step = statistics.median(times[2:])
    train = step * -(-exp.n // b) * max(args.epochs)
    draw = 0.0
    for m in args.measure_batch:
        for est in GRADIENT_ESTIMATORS:
            t = time.perf_counter()
            if est in CHUNKABLE and m > args.chunk:
                chunked_gradient_variance(
                    exp.model,
                    exp.guide,
                    [(exp.x[:m], exp.y[:m])],
                    params=[exp.bottom, exp.top],
                    estimator=est,
                    num_draws=2,
                    chunk=args.chunk,
                    elbo=exp.elbo,
                )
            else:
                gradient_variance(
                    exp.model,
                    exp.guide,
                    exp.x[:m],
                    exp.y[:m],
                    params=[exp.bottom, exp.top],
                    estimator=est,
                    num_draws=2,
                    elbo=exp.elbo,
                )
            draw += (time.perf_counter() - t) / 2
    measure = draw * 2 * args.draws * len(args.epochs)
    return {
        "seconds_per_step": step,
        "training_seconds": train,
        "measuring_seconds": measure,
        "seconds": train + measure,
    }


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=500, help="hidden units per layer (paper: 3 hidden layers)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 100], help="measurement points (epochs)")
    parser.add_argument("--measure-batch", type=int, nargs="+", default=[1000, 100], help="minibatch sizes M")
    parser.add_argument("--draws", type=int, default=50, help="gradient draws per variance")
    parser.add_argument("--chunk", type=int, default=100, help="examples per chunk of a large-M gradient")
    parser.add_argument("--batch-size", type=int, default=100, help="training minibatch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init-log-alpha", type=float, default=0.0, help="initial log alpha (0: alpha = 1)")
    parser.add_argument("--train-size", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--dataset", choices=("mnist", "embedded"), default="mnist")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PYRO_VDROP_MNIST_DIR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to train and measure")
    parser.add_argument("--run-dir", default=None, help="checkpoint folder (default: runs/benchmarks/table1-w<W>)")
    parser.add_argument("--out", default=None, help="JSON record (default: benchmarks/results/table1-w<W>.json)")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    parser.add_argument("--estimate", action="store_true", help="print the run's CPU-time estimate and exit")
    parser.add_argument("--stop-after", type=int, default=None, help="exit after this many new measurement points")
    args = parser.parse_args(argv)
    for name in ("width", "draws", "chunk", "batch_size"):
        if getattr(args, name) < (2 if name == "draws" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive (draws: at least 2)")
    if min(args.epochs) < 1 or min(args.measure_batch) < 1:
        parser.error("--epochs and --measure-batch take positive integers")
    args.epochs = sorted(set(args.epochs))
    resolve_mnist_dir(parser, args)
    suffix = "" if args.dataset == "mnist" else "-embedded"
    args.run_dir = Path(args.run_dir or f"runs/benchmarks/table1-w{args.width}{suffix}")
    args.out = Path(args.out or RESULTS / f"table1-w{args.width}{suffix}.json")
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    command = shlex.join(["python", "-m", "benchmarks.table1", *(sys.argv[1:] if argv is None else argv)])
    if args.estimate:
        e = estimate(args)
        print(
            f"table1 width {args.width}: {e['seconds_per_step'] * 1e3:.0f} ms per training step; estimate "
            f"{hours(e['training_seconds'])} training + {hours(e['measuring_seconds'])} measuring = "
            f"{hours(e['seconds'])} of this machine's time",
            flush=True,
        )
        return None
    options = {k: getattr(args, k) for k in RUN_OPTIONS}
    record = None if args.restart else read_record(args.out)
    checkpoint = args.run_dir / "checkpoint.pt"
    if record is not None and record["protocol"]["options"] != options:
        sys.exit(f"{args.out} was written with other options {record['protocol']['options']}; use --restart")
    exp = Experiment(args)
    epoch, epoch_times = 0, []
    if checkpoint.is_file() and not args.restart:
        state = load_state(checkpoint)
        if state["options"] != options:
            sys.exit(f"{checkpoint} was written with other options {state['options']}; use --restart")
        exp.restore(state)
        epoch, epoch_times = int(state["epoch"]), list(state["epoch_times"])
        print(f"resumed from {checkpoint} at epoch {epoch}", flush=True)
    if record is None or args.restart:
        record = {
            "benchmark": "table1",
            "command": command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(),
            "protocol": {
                "net": f"MLP {exp.sizes}, ReLU (the paper's 3 hidden layers, width {args.width})",
                "guide": "AutoVariationalDropout (variational dropout B: independent noise, alpha per weight)",
                "elbo": "TraceMeanField_ELBO",
                "training": f"LRT, Adam lr {args.lr}, batch {args.batch_size}, {exp.n} training images",
                "parameters": {"bottom": exp.bottom, "top": exp.top},
                "variance": "mean over weights of the per-weight sample variance of the gradient over draws",
                "width": args.width,
                "device": str(exp.device),
                "measure_batch": args.measure_batch,
                "options": options,
            },
            "paper": PAPER,
            "points": {},
            "complete": False,
        }
    record["command"] = command
    new_points = 0
    target = max(args.epochs)
    while epoch < target:
        t0 = time.perf_counter()
        loss = exp.train_epoch()
        epoch += 1
        epoch_times.append(time.perf_counter() - t0)
        save_state(checkpoint, {"epoch": epoch, "epoch_times": epoch_times, "options": options, **exp.state()})
        print(f"epoch {epoch}/{target}: loss {loss:.4f}, {epoch_times[-1]:.1f} s", flush=True)
        if epoch in args.epochs and str(epoch) not in record["points"]:
            t0 = time.perf_counter()
            point = {"mean_log_alpha": exp.mean_log_alpha(), "variances": exp.measure(epoch)}
            # each point's own provenance: a record can gather points from several runs of the same options
            point["command"], point["date"] = command, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            point["ratios"] = ratios(point)
            point["measure_seconds"] = time.perf_counter() - t0
            point["seconds_per_epoch"] = statistics.median(epoch_times)
            record["points"][str(epoch)] = point
            record["complete"] = all(str(p) in record["points"] for p in args.epochs)
            record["environment_end"] = environment()
            write_record(args.out, record)
            print(f"epoch {epoch}: measured in {point['measure_seconds']:.0f} s; wrote {args.out}", flush=True)
            new_points += 1
            if args.stop_after is not None and new_points >= args.stop_after:
                print(f"stopping after {new_points} new measurement point(s) (--stop-after)", flush=True)
                return record
    record["complete"] = all(str(p) in record["points"] for p in args.epochs)
    write_record(args.out, record)
    print(table_text(record))
    return record


if __name__ == "__main__":
    main()
