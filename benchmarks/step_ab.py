# SPDX-License-Identifier: Apache-2.0
"""
Interleaved A/B timing of one change to the README's sparse variational dropout step (``bayesianize(lenet_300_100())``,
``AutoVariationalDropout(model, parameterization="additive")``, ``JointOptim(torch.optim.Adam)``,
``TraceMeanField_ELBO()``, steps under ``local_reparam()``; MLP 784-300-100-10, one thread), in one process: the
variants alternate in short rounds and the medians of their step times are compared, so that the load of a shared
machine falls on every variant alike.

- ``--what fused-lrt``: the LRT linear layer as one autograd node (``linear_lrt(..., fused=True)``) against
  autograd of the formula (``fused=False``, the default)
- ``--what masks``: the backward passes of the additive log α and the clipped KL with float indicators made by
  ``sign`` (as now) against the bool masks and ``masked_fill_`` they used before
- ``--what adam``: ``JointOptim(torch.optim.Adam, {"lr": 1e-3})`` (torch's default on CPU: the per-tensor loop)
  against ``foreach=True`` and ``fused=True``
- ``--what fit-adam``: the step of ``pyro-vdrop fit``'s default run (its :class:`~pyro_vdrop.train.Session`:
  sparse guide, LRT, ``JointLRScheduler``, embedded data, batch 100) with Adam's fused kernel (fit's choice where
  torch has it) against the per-tensor loop

Prints a table and writes ``benchmarks/results/step_ab-<what>.json``.

Usage: ``python benchmarks/step_ab.py --what fused-lrt [--rounds 20] [--steps 10] [--batch-size 100]``
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import pyro_vdrop  # noqa: E402
import pyro_vdrop.distributions.kl as kl  # noqa: E402
import pyro_vdrop.distributions.variational_dropout_normal as vdn  # noqa: E402
import pyro_vdrop.poutine.lazy_weight as lazy_weight  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.optim import JointOptim  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402
from pyro_vdrop.poutine.lazy_ops import linear_lrt  # noqa: E402
from pyro_vdrop.util import environment  # noqa: E402


def _masked_additive_backward(ctx, grad):
    # _AdditiveLogAlpha.backward before the float indicator (a bool mask and masked_fill_)
    (loc,) = ctx.saved_tensors
    below = loc.abs() < torch.finfo(loc.dtype).tiny
    return grad.div(loc).mul_(-2.0).masked_fill_(below, 0.0), grad


def _masked_kl_backward(ctx, grad):
    # _MolchanovKL.backward (first-order path) before the float indicator
    log_alpha, inner, u = ctx.saved_tensors
    d = inner.neg().sigmoid_().add_(torch.addcmul(u, u, u, value=-1.0), alpha=2 * kl.MOLCHANOV_K1 * kl.MOLCHANOV_K3)
    d = d.mul_(grad).mul_(-0.5)
    if ctx.clip is not None:
        d = d.masked_fill_(inner != log_alpha, 0.0)
    return d, None, None


@contextlib.contextmanager
def _masks(old):
    """The backward passes of the additive log α and the clipped KL as they were (``old``) or are."""
    saved = vdn._AdditiveLogAlpha.backward, kl._MolchanovKL.backward
    if old:
        vdn._AdditiveLogAlpha.backward = staticmethod(_masked_additive_backward)
        kl._MolchanovKL.backward = staticmethod(_masked_kl_backward)
    try:
        yield
    finally:
        vdn._AdditiveLogAlpha.backward, kl._MolchanovKL.backward = (staticmethod(f) for f in saved)


def _fused(*args, **kwargs):
    return linear_lrt(*args, fused=True, **kwargs)


def _unfused(*args, **kwargs):
    return linear_lrt(*args, fused=False, **kwargs)


def make_step(optim_args, validate, fused=False, old_masks=False):
    """A README step; ``fused`` selects the LRT kernel and ``old_masks`` the backward passes while the step runs."""
    model = pyro_vdrop.nn.bayesianize(pyro_vdrop.nn.lenet_300_100(), num_data=60000)
    guide = AutoVariationalDropout(model, parameterization="additive")
    svi = SVI(model, guide, JointOptim(torch.optim.Adam, optim_args), TraceMeanField_ELBO())

    def step(x, y):
        pyro.enable_validation(validate)
        lazy_weight.linear_lrt = _fused if fused else _unfused
        try:
            with local_reparam(), _masks(old_masks):
                return svi.step(x, y)
        finally:
            lazy_weight.linear_lrt = linear_lrt

    return step


def make_fit_steps(batch_size):
    """``pyro-vdrop fit``'s default step with a fused and a looping Adam, on one session's model and guide."""
    from pyro_vdrop.optim import JointLRScheduler
    from pyro_vdrop.train import Session, TrainConfig, estimator_handler
    from pyro_vdrop.train.config import LinearDecay

    config = TrainConfig(batch_size=batch_size)
    session = Session(config, device=torch.device("cpu"))
    x, y = session.x_train[:batch_size], session.y_train[:batch_size]

    def make_step(fused):
        optim = JointLRScheduler(
            torch.optim.lr_scheduler.LambdaLR,
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": config.lr, "fused": fused},
                "lr_lambda": LinearDecay(session.total_steps, config.lr_decay),
            },
        )
        svi = SVI(session.recorder(session.model), session.guide, optim, TraceMeanField_ELBO())

        def step(_x, _y):
            with estimator_handler(config.estimator):
                loss = svi.step(x, y)
            optim.step()
            return loss

        return step

    return {"fused": make_step(True), "loop": make_step(False)}, "loop"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=("fused-lrt", "masks", "adam", "fit-adam"), required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant = rounds x steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--validation", choices=("on", "off"), default="on")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    validate = args.validation == "on"
    x = torch.rand(args.batch_size, 784)
    y = torch.randint(0, 10, (args.batch_size,))
    lr = {"lr": 1e-3}
    if args.what == "fused-lrt":
        # one model and guide (Pyro's param store is global); the variants differ only in the kernel
        fused = make_step(lr, validate, fused=True)
        variants = {"fused": fused, "unfused": make_step(lr, validate, fused=False)}
        baseline = "unfused"
    elif args.what == "masks":
        variants = {"float": make_step(lr, validate), "bool": make_step(lr, validate, old_masks=True)}
        baseline = "bool"
    elif args.what == "fit-adam":
        pyro.enable_validation(validate)
        variants, baseline = make_fit_steps(args.batch_size)
    else:
        variants = {
            "default": make_step(lr, validate),
            "foreach": make_step({**lr, "foreach": True}, validate),
            "fused": make_step({**lr, "fused": True}, validate),
        }
        baseline = "default"
    times = {name: [] for name in variants}
    for step in variants.values():
        for _ in range(args.warmup):
            step(x, y)
    for _ in range(args.rounds * args.steps):  # one step of each variant in turn
        for name, step in variants.items():
            t = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{'variant':<10} {'median ms/step':>15} {'vs ' + baseline:>12} {'paired':>8}")
    rows = []
    for name, m in med.items():
        ratio = m / med[baseline]
        # the median of the ratios of neighbouring steps (the same moment's load on both)
        paired = statistics.median(a / b for a, b in zip(times[name], times[baseline]))
        rows.append(
            {
                "variant": name,
                "median_ms": m,
                f"ratio_to_{baseline}": ratio,
                "median_paired_ratio": paired,
                "steps": len(times[name]),
            }
        )
        print(f"{name:<10} {m:>15.2f} {ratio:>12.3f} {paired:>8.3f}")
    record = {
        "benchmark": "step_ab",
        "what": args.what,
        "command": "python " + " ".join(sys.argv),
        "description": (
            "pyro-vdrop fit's default step (sparse guide, LRT, MLP 784-300-100-10, embedded data)"
            if args.what == "fit-adam"
            else "README sparse-VD SVI step, MLP 784-300-100-10"
        )
        + f", batch {args.batch_size}, validation "
        f"{args.validation}, {args.threads} thread(s), variants interleaved in {args.rounds} rounds",
        "results": rows,
        "machine": environment(),
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"step_ab-{args.what}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
