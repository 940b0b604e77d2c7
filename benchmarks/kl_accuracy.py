# SPDX-License-Identifier: Apache-2.0
"""
Accuracy of the KL approximations of ``pyro_vdrop.distributions.log_uniform_kl`` against 1-D numerical
quadrature of the exact KL(N(θ, αθ²) ‖ log-uniform) = const − ½ log α + E_{ε~N(1,α)} log|ε|.

The Molchanov fit is compared with its own constant, ½(γ + log 2) (which makes the KL vanish as α → ∞);
the Kingma fit, valid for α ≤ 1, after aligning its dropped constant by the minimax offset.
Prints a table and writes ``benchmarks/results/kl_accuracy.json``.

    python benchmarks/kl_accuracy.py
"""

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import integrate

from pyro_vdrop.distributions import log_uniform_kl
from pyro_vdrop.util import environment


def expected_log_abs(alpha):
    """E log|ε| for ε ~ N(1, α); the log singularity is moved to an endpoint of the integral."""
    u = 1 / math.sqrt(alpha)

    def integrand(t):
        return math.log(t) * (math.exp(-0.5 * (t - u) ** 2) + math.exp(-0.5 * (t + u) ** 2)) / math.sqrt(2 * math.pi)

    value, _ = integrate.quad(integrand, 0, u + 40, limit=500, epsabs=1e-12, epsrel=1e-12, points=[u])
    return -math.log(u) + value


def main(args):
    rows = []
    for approx, low, high in (("molchanov", -10.0, 10.0), ("kingma", -10.0, 0.0)):
        log_alpha = np.linspace(low, high, args.points)
        exact = np.array([-0.5 * la + expected_log_abs(math.exp(la)) for la in log_alpha])
        fit = log_uniform_kl(torch.tensor(log_alpha, dtype=torch.float64), approx).numpy()
        diff = fit - exact
        if approx == "molchanov":
            offset = (np.euler_gamma + math.log(2)) / 2
        else:
            offset = (diff.max() + diff.min()) / 2
        dev = np.abs(diff - offset)
        rows.append(
            {
                "approx": approx,
                "log_alpha_range": [low, high],
                "points": args.points,
                "constant": offset,
                "max_abs_deviation": float(dev.max()),
                "at_log_alpha": float(log_alpha[dev.argmax()]),
            }
        )
    print(f"{'approx':<10} {'log α range':<14} {'constant':>9} {'max |dev|':>10} {'at log α':>9}")
    for r in rows:
        lo, hi = r["log_alpha_range"]
        print(
            f"{r['approx']:<10} [{lo:+.0f}, {hi:+.0f}]{'':<5} {r['constant']:9.4f} "
            f"{r['max_abs_deviation']:10.4f} {r['at_log_alpha']:9.2f}"
        )
    record = {
        "benchmark": "kl_accuracy",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "figures": rows,
    }
    out = Path(__file__).resolve().parent / "results" / "kl_accuracy.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=201, help="grid points in log α")
    main(parser.parse_args())
