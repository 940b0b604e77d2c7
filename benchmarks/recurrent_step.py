# SPDX-License-Identifier: Apache-2.0
"""
Time one training step (forward + backward + Adam) of the row-LSTM classifier of ``tutorials/07_sequences.py``
(an LSTM over the 28 rows of a 28 × 28 image, hidden size 64, then a Linear layer to 10 classes; batch 100) on CPU:

- ``torch_lstm``: the plain torch network (torch's fused ``nn.LSTM`` kernel) with cross-entropy: the reference
- ``pyro_single_sample``: ``bayesianize`` + sparse-VD ``AutoVariationalDropout(parameterization="additive")`` +
  ``TraceMeanField_ELBO`` without ``local_reparam``: one weight sample per minibatch, torch's fused kernel
- ``pyro_flipout``: the same under ``local_reparam(estimator="flipout")``: the Python cell loop, Flipout with
  per-sequence signs (the tutorial's setting)
- ``pyro_correlated``: ``AutoVariationalDropout(noise="correlated")`` under ``local_reparam()``: the cell loop with
  Gaussian noise on the gate inputs, one draw per sequence
- ``pyro_mean``: the sparse-VD guide under ``local_reparam(estimator="mean")``: the cell loop without noise (the
  loop's own cost)

The variants run interleaved (``--rounds`` rounds of ``--steps`` steps each, the median per round, then the median
of the rounds), so that a change in the load of a shared CPU affects them alike; ratios are to ``torch_lstm`` in the
same run. Inputs are random (the timing does not depend on the pixel values).
Prints a table and writes ``benchmarks/results/recurrent_step.json``.

Usage: ``python benchmarks/recurrent_step.py [--steps 10] [--rounds 3] [--hidden 64] [--threads 1]``
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.nn import bayesianize  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402
from pyro_vdrop.util import environment  # noqa: E402

BATCH, ROWS, NUM_DATA = 100, 28, 60000


class RowLSTM(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.lstm = nn.LSTM(ROWS, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def torch_variant(hidden):
    net = RowLSTM(hidden)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    return step


def pyro_variant(hidden, estimator, noise):
    model = bayesianize(RowLSTM(hidden), num_data=NUM_DATA)
    kwargs = dict(noise="correlated") if noise == "correlated" else dict(parameterization="additive")
    guide = AutoVariationalDropout(model, **kwargs)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())

    def step(x, y):
        if estimator is None:
            svi.step(x, y)
        else:
            with local_reparam(estimator=estimator):
                svi.step(x, y)

    return step


VARIANTS = {
    "torch_lstm": lambda h: torch_variant(h),
    "pyro_single_sample": lambda h: pyro_variant(h, None, "independent"),
    "pyro_flipout": lambda h: pyro_variant(h, "flipout", "independent"),
    "pyro_correlated": lambda h: pyro_variant(h, "lrt", "correlated"),
    "pyro_mean": lambda h: pyro_variant(h, "mean", "independent"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "recurrent_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    x = torch.rand(BATCH, ROWS, ROWS)
    y = torch.randint(0, 10, (BATCH,))
    steps = {}
    for name, make in VARIANTS.items():
        pyro.clear_param_store()
        steps[name] = make(args.hidden)
        for _ in range(args.warmup):
            steps[name](x, y)
    rounds = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step(x, y)
                times.append(time.perf_counter() - start)
            rounds[name].append(statistics.median(times))
    ms = {name: 1e3 * statistics.median(r) for name, r in rounds.items()}
    ratios = {name: ms[name] / ms["torch_lstm"] for name in ms}
    print(f"{'variant':20s} {'ms/step':>9s} {'× torch_lstm':>13s}")
    for name in VARIANTS:
        print(f"{name:20s} {ms[name]:9.1f} {ratios[name]:13.1f}")
    record = {
        "command": "python " + " ".join(sys.argv),
        "description": __doc__.strip().split("\n\n")[0],
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "batch": BATCH, "rows": ROWS},
        "ms_per_step": ms,
        "ratio_to_torch_lstm": ratios,
        "rounds_ms": {name: [1e3 * t for t in r] for name, r in rounds.items()},
        "note": "CPU shared with other jobs: the ratios, measured interleaved in one run, are the figures to use",
        "machine": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
