# SPDX-License-Identifier: Apache-2.0
"""
Time one SVI step (forward + backward + Adam) of the MNIST MLP 784-300-100-10, batch 100, on CPU:

- ``pyro_lrt``: Pyro + ``AutoVariationalDropout`` + ``TraceMeanField_ELBO`` under
  ``pyro_vdrop.poutine.local_reparam()``, trained by ``SVI`` with ``pyro_vdrop.optim.JointOptim(torch.optim.Adam,
  ...)`` (one torch optimizer), as README.md recommends
- ``pyro_lrt_pyro_adam``: the same with ``pyro.optim.Adam`` (one torch optimizer per parameter, gradients zero-filled
  by SVI)
- ``pyro_lrt_validated``: the same with ``pyro.enable_validation(True)`` (Pyro's default; the other Pyro
  variants run with validation off, as one would for speed)
- ``pyro_flipout``: the same under ``local_reparam(estimator="flipout")``
- ``pyro_sparse_lrt``: ``pyro_lrt`` with the sparse-VD guide of ``pyro-vdrop fit``,
  ``AutoVariationalDropout(model, parameterization="additive")`` (log σ² learned, log α clipped to [-8, 8] in the KL);
  its maths differ from ``torch_lrt``'s
- ``pyro_lrt_no_cap``: ``pyro_lrt`` with ``AutoVariationalDropout(model, max_log_alpha=None)``: no cap on log α
  (the default caps log α at 0 [Kingma et al. 2015], a clamp in the forward pass); compare with ``torch_lrt_no_cap``
- ``pyro_lrt_torch_adam``: ``pyro_lrt`` with Pyro's PyTorch-native loop instead of ``SVI``: the ELBO as a module
  (``TraceMeanField_ELBO()(model, guide)``) and one ``torch.optim.Adam`` over all parameters, as the torch
  reference does (``pyro.optim.Adam`` keeps one torch optimizer per parameter)
- ``torch_lrt``: the same VD-LRT maths and KL hand-written in plain torch (``benchmarks/torch_vd_lrt.py``), log α
  capped at 0 as by the default guide
- ``torch_lrt_no_cap``: ``torch_lrt`` without the cap
- ``pyro_weight_sample``: Pyro without the handler (one weight sample per minibatch)
- ``deterministic``: the plain torch MLP with cross-entropy

The timings do not depend on the pixel values, so the inputs are random (MNIST-shaped).
Prints a table and writes ``benchmarks/results/step_time.json``.

Usage: ``python benchmarks/step_time.py [--steps 100] [--warmup 10] [--threads 2]``
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the benchmarks package

import pyro_vdrop  # noqa: E402
from benchmarks.torch_vd_lrt import VDMLP  # noqa: E402
from benchmarks.variants import torch_step  # noqa: E402
from pyro_vdrop.distributions import ImproperLogUniform  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.optim import JointOptim  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402
from pyro_vdrop.util import environment  # noqa: E402

SIZES = (784, 300, 100, 10)
NUM_DATA = 60000


def pyro_model(x, y=None):
    h = x
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        w = pyro.sample(f"w{i}", ImproperLogUniform().expand([b, a]).to_event(2))
        bias = pyro.param(f"b{i}", torch.zeros(b))
        h = F.linear(h, w, bias)
        if i < len(SIZES) - 2:
            h = torch.relu(h)
    # the minibatch comes from the data loader, as for the torch variants: pass its indices (a plate with
    # subsample_size would also draw randperm(N) every step, ~0.7 ms here)
    with pyro.plate("data", NUM_DATA, subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Categorical(logits=h), obs=y)


def time_steps(step, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def make_pyro(handler, validate=False, optim="joint", **guide_options):
    pyro.clear_param_store()
    pyro.enable_validation(validate)
    guide = AutoVariationalDropout(pyro_model, **guide_options)
    optim = JointOptim(torch.optim.Adam, {"lr": 1e-3}) if optim == "joint" else pyro.optim.Adam({"lr": 1e-3})
    svi = SVI(pyro_model, guide, optim, TraceMeanField_ELBO(max_plate_nesting=1))

    def step(x, y):
        pyro.enable_validation(validate)
        if handler is None:
            return svi.step(x, y)
        with local_reparam(estimator=handler):
            return svi.step(x, y)

    return step


def make_pyro_torch_adam():
    pyro.clear_param_store()
    pyro.enable_validation(False)
    guide = AutoVariationalDropout(pyro_model)
    loss_fn = TraceMeanField_ELBO(max_plate_nesting=1)(pyro_model, guide)
    state = {}

    def step(x, y):
        pyro.enable_validation(False)
        with local_reparam():
            if "opt" not in state:  # the parameters exist after the first call
                loss_fn(x, y)
                params = [p for _, p in pyro.get_param_store().named_parameters()]
                state["opt"] = torch.optim.Adam(params, lr=1e-3)
            opt = state["opt"]
            opt.zero_grad()
            loss = loss_fn(x, y)
            loss.backward()
            opt.step()
        return loss.item()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP stalls on a shared, loaded machine")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant (medians pooled)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "step_time.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    x = torch.rand(args.batch_size, SIZES[0])
    y = torch.randint(0, SIZES[-1], (args.batch_size,))

    mlp = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    vd = VDMLP(SIZES)
    vd_no_cap = VDMLP(SIZES, max_log_alpha=None)
    torch_lrt = torch_step(vd, lambda x, y: vd.loss(x, y, NUM_DATA))
    torch_lrt_no_cap = torch_step(vd_no_cap, lambda x, y: vd_no_cap.loss(x, y, NUM_DATA))
    deterministic = torch_step(mlp, lambda x, y: F.cross_entropy(mlp(x), y))
    # Pyro's param store is global: the Pyro variants are rebuilt (fresh store) at every round
    builders = {
        "pyro_lrt": lambda: make_pyro("lrt"),
        "pyro_lrt_pyro_adam": lambda: make_pyro("lrt", optim="pyro"),
        "pyro_lrt_validated": lambda: make_pyro("lrt", validate=True),
        "pyro_flipout": lambda: make_pyro("flipout"),
        "pyro_sparse_lrt": lambda: make_pyro("lrt", parameterization="additive"),
        "pyro_lrt_no_cap": lambda: make_pyro("lrt", max_log_alpha=None),
        "pyro_lrt_torch_adam": make_pyro_torch_adam,
        "torch_lrt": lambda: torch_lrt,
        "torch_lrt_no_cap": lambda: torch_lrt_no_cap,
        "pyro_weight_sample": lambda: make_pyro(None),
        "deterministic": lambda: deterministic,
    }
    times = {name: [] for name in builders}
    for _ in range(args.rounds):
        for name, build in builders.items():
            step = build()
            times[name] += time_steps(lambda step=step: step(x, y), args.steps // args.rounds, args.warmup)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    rows = []
    print(f"{'variant':<21} {'median ms/step':>15} {'vs torch_lrt':>13}")
    for name, m in med.items():
        ratio = m / med["torch_lrt"]
        rows.append({"variant": name, "median_ms": m, "ratio_to_torch_lrt": ratio, "steps": len(times[name])})
        print(f"{name:<21} {m:>15.2f} {ratio:>13.2f}")
    record = {
        "benchmark": "step_time",
        "command": "python " + " ".join(sys.argv),
        "description": f"one SVI step (forward+backward+Adam), MLP 784-300-100-10, batch {args.batch_size}, CPU",
        "results": rows,
        "target": "pyro_lrt <= 1.5 x torch_lrt",
        "pyro_lrt_over_torch_lrt": med["pyro_lrt"] / med["torch_lrt"],
        "pyro_lrt_no_cap_over_torch_lrt_no_cap": med["pyro_lrt_no_cap"] / med["torch_lrt_no_cap"],
        "steps_per_variant": args.steps // args.rounds * args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "pyro_vdrop": pyro_vdrop.__version__,
        },
        "machine": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"pyro_lrt / torch_lrt = {record['pyro_lrt_over_torch_lrt']:.2f}; without the cap on both sides "
        f"{record['pyro_lrt_no_cap_over_torch_lrt_no_cap']:.2f}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
