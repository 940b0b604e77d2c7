# SPDX-License-Identifier: Apache-2.0
"""
A minimal sparse Bayesian linear regression with the log-uniform prior and a
variational-dropout posterior, trained by plain ``pyro.infer.SVI``.

Only 2 of the 10 inputs matter; the learned log α of the others grows large,
which is how variational dropout prunes weights.

    python examples/minimal_svi.py
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_vdrop.distributions import ImproperLogUniform, VariationalDropoutNormal


def model(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def guide(x, y=None):
    # sparse variational dropout: learn θ and log σ², derive log α = log σ² − log θ²
    theta = pyro.param("theta", lambda: 0.1 * torch.randn(x.shape[-1]))
    log_sigma2 = pyro.param("log_sigma2", lambda: torch.full((x.shape[-1],), -10.0))
    q = VariationalDropoutNormal.from_additive(theta, log_sigma2, log_alpha_clip=(-8.0, 8.0))
    pyro.sample("w", q.to_event(1))


def main(args):
    pyro.set_rng_seed(args.seed)
    true_w = torch.zeros(10)
    true_w[:2] = torch.tensor([2.0, -1.5])
    x = torch.randn(args.num_data, 10)
    y = x @ true_w + 0.5 * torch.randn(args.num_data)

    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.01 ** (1 / args.num_steps)})  # lr decays 100x
    svi = SVI(model, guide, optim, TraceMeanField_ELBO())
    for step in range(args.num_steps):
        loss = svi.step(x, y)
        if step % (args.num_steps // 5) == 0:
            print(f"step {step:5d}  loss {loss:10.2f}")

    theta = pyro.param("theta").detach()
    log_sigma2 = pyro.param("log_sigma2").detach()
    log_alpha = VariationalDropoutNormal.from_additive(theta, log_sigma2).log_alpha
    keep = log_alpha <= 3.0
    rmse = ((x @ (theta * keep) - y).pow(2).mean().sqrt()).item()
    print("true w   ", " ".join(f"{v:6.2f}" for v in true_w))
    print("theta    ", " ".join(f"{v:6.2f}" for v in theta))
    print("log alpha", " ".join(f"{v:6.2f}" for v in log_alpha))
    print(f"kept {int(keep.sum())} of {keep.numel()} weights (sparsity {1 - keep.float().mean():.0%}); rmse {rmse:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-data", type=int, default=500)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
