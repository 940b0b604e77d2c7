# SPDX-License-Identifier: Apache-2.0
"""
Learned log α of a relevant and an irrelevant input in a linear regression, for each guide variant:
the sparsifying behaviour of variational dropout at the smallest scale (the setting of
``tests/infer/test_variational_dropout.py::test_sparse_vd_prunes_an_irrelevant_input``).

    python benchmarks/sparsify_regression.py

Prints a markdown table and writes ``benchmarks/results/sparsify_regression.json``.
"""

import datetime
import json
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.infer import AutoVariationalDropout, AutoVariationalDropoutMessenger
from pyro_vdrop.util import environment


def model(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def data(n=100):
    x = torch.randn(n, 2)
    y = x[:, 0] + 0.5 * torch.randn(n)
    # the irrelevant input: exactly uncorrelated, in the sample, with the relevant one and the target
    q, _ = torch.linalg.qr(torch.stack([x[:, 0], y], -1))
    x1 = x[:, 1] - q @ (q.T @ x[:, 1])
    x[:, 1] = x1 / x1.std()
    return x, y


def run(cls, options, seed, steps):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x, y = data()
    guide = cls(model, **options)
    optim = pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / steps)})  # lr decays 100x
    svi = SVI(model, guide, optim, TraceMeanField_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    if cls is AutoVariationalDropoutMessenger:
        guide.median(x, y)
    return guide.log_alpha()["w"].tolist()


VARIANTS = [
    ("sparse VD (additive)", AutoVariationalDropout, {"parameterization": "additive"}, 200),
    ("sparse VD, messenger guide", AutoVariationalDropoutMessenger, {"parameterization": "additive"}, 200),
    ("B (multiplicative, log α ≤ 0)", AutoVariationalDropout, {}, 200),
    ("B, log α uncapped", AutoVariationalDropout, {"max_log_alpha": None}, 1000),
    ("A (correlated), log α uncapped", AutoVariationalDropout, {"noise": "correlated", "max_log_alpha": None}, 1000),
]


def main():
    rows = []
    print("| variant | steps | seed 0: log α (relevant, irrelevant) | seed 1 |")
    print("|---|---:|---|---|")
    for name, cls, options, steps in VARIANTS:
        result = [run(cls, options, seed, steps) for seed in (0, 1)]
        rows.append({"variant": name, "options": options, "steps": steps, "log_alpha_by_seed": result})
        print(f"| {name} | {steps} | {result[0][0]:.2f}, {result[0][1]:.2f} | {result[1][0]:.2f}, {result[1][1]:.2f} |")
    record = {
        "benchmark": "sparsify_regression",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "figures": rows,
    }
    out = Path(__file__).resolve().parent / "results" / "sparsify_regression.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
