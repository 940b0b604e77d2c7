# SPDX-License-Identifier: Apache-2.0
"""
Profile (cProfile) the README's sparse variational dropout step: ``bayesianize(lenet_300_100())``,
``AutoVariationalDropout(model, parameterization="additive")``, ``JointOptim(torch.optim.Adam)``,
``TraceMeanField_ELBO()``, steps under ``local_reparam()``; MLP 784-300-100-10, batch 100, one thread.

Function-call counts are the evidence (they do not depend on the machine's load); times are noisy on a shared
machine. Prints a summary (calls per step, the top functions by own time, the Python functions by call count) and
writes it to ``--out`` (a text file).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/profile_step.py --validation on [--steps 200] [--out FILE]``
"""

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import pyro_vdrop  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.optim import JointOptim  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validation", choices=("on", "off"), default="on")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None, help="text file for the summary (default: print only)")
    parser.add_argument("--dump", default=None, help="also write the raw profile (pstats format) to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(args.validation == "on")
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    model = pyro_vdrop.nn.bayesianize(pyro_vdrop.nn.lenet_300_100(), num_data=60000)
    guide = AutoVariationalDropout(model, parameterization="additive")
    svi = SVI(model, guide, JointOptim(torch.optim.Adam, {"lr": 1e-3}), TraceMeanField_ELBO())
    x = torch.rand(100, 784)
    y = torch.randint(0, 10, (100,))
    with local_reparam():
        for _ in range(args.warmup):
            svi.step(x, y)
        profile = cProfile.Profile()
        t = time.perf_counter()
        profile.enable()
        for _ in range(args.steps):
            svi.step(x, y)
        profile.disable()
        t = time.perf_counter() - t
    stats = pstats.Stats(profile)
    if args.dump:
        stats.dump_stats(args.dump)
    total_calls = stats.total_calls
    python_calls = sum(nc for (file, _, _), (_, nc, *_) in stats.stats.items() if file != "~")
    buf = io.StringIO()
    buf.write(f"# command: OMP_NUM_THREADS=1 python benchmarks/profile_step.py --validation {args.validation} ")
    buf.write(f"--steps {args.steps}\n")
    buf.write(f"# torch {torch.__version__}, pyro {pyro.__version__}\n")
    buf.write(f"# {1000 * t / args.steps:.2f} ms/step under the profiler (noisy: shared machine)\n")
    buf.write(f"# function calls per step: {total_calls / args.steps:.1f} (Python functions: ")
    buf.write(f"{python_calls / args.steps:.1f})\n\n")
    stats.stream = buf
    stats.sort_stats("tottime").print_stats(args.top)
    buf.write("\n# Python functions by call count\n")
    stats.sort_stats("ncalls").print_stats(r"\.py", args.top)
    text = buf.getvalue().replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    text = text.replace(str(Path(torch.__file__).parent.parent) + "/", "")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
