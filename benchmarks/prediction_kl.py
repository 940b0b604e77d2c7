# SPDX-License-Identifier: Apache-2.0
"""
What prediction under ``local_reparam`` saved when the analytic KL became lazy.

``local_reparam`` used to compute every weight site's KL on each model run, prediction included; it now records a
``LocalReparamKL`` whose log-density (the KL) is computed only when an ELBO asks. This script times one posterior
predictive draw (guide, then model replayed against it, under ``local_reparam``, as ``pyro-vdrop evaluate`` and
``Predictive`` make them) with and without the KL the old code computed (``model_trace.compute_log_prob`` on the
weight sites), interleaved in one process, and prints the median times per draw.

    python -m benchmarks.prediction_kl --models mlp,lenet5 --batch-size 1000 --repeats 30

Prints a markdown table and writes ``benchmarks/results/prediction_kl.json``.
"""

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

from benchmarks.models import NUM_DATA, make_batch, make_net
from pyro_vdrop.infer import AutoVariationalDropout, trace_guide_then_model
from pyro_vdrop.nn import bayesianize
from pyro_vdrop.poutine import LocalReparamKL, local_reparam
from pyro_vdrop.util import environment


def _is_weight(name, site):
    return isinstance(site["fn"], LocalReparamKL)


def time_draws(model_name, batch_size, repeats):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = bayesianize(make_net(model_name), num_data=NUM_DATA)
    guide = AutoVariationalDropout(model, parameterization="additive")
    x, y = make_batch(model_name, batch_size)
    guide(x, y)
    times = {"without KL (now)": [], "with KL (before)": []}
    with torch.no_grad(), local_reparam():
        for _ in range(3):  # warm-up
            trace_guide_then_model(model, guide, (x,))
        for _ in range(repeats):
            for label in times:
                start = time.perf_counter()
                _, model_trace = trace_guide_then_model(model, guide, (x,))
                if label == "with KL (before)":
                    model_trace.compute_log_prob(_is_weight)
                times[label].append(time.perf_counter() - start)
    return {label: 1000 * statistics.median(t) for label, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--models", default="mlp,lenet5", help="comma-separated: mlp, lenet5, linear<W>")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prediction_kl.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        ms = time_draws(name, args.batch_size, args.repeats)
        rows.append({"model": name, "batch_size": args.batch_size, "ms_per_draw": ms})
    print("| model | batch | draw without KL (now), ms | with KL (before), ms | saved |")
    print("|---|---|---|---|---|")
    for r in rows:
        now, before = r["ms_per_draw"]["without KL (now)"], r["ms_per_draw"]["with KL (before)"]
        print(f"| {r['model']} | {r['batch_size']} | {now:.1f} | {before:.1f} | {1 - now / before:.0%} |")
    record = {
        "benchmark": "prediction_kl",
        "command": "python -m benchmarks.prediction_kl "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": environment(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "notes": "median ms per posterior predictive draw under local_reparam (guide + model, no_grad), "
        "AutoVariationalDropout(parameterization='additive') on bayesianize(net); 'with KL' adds the weight sites' "
        "analytic KL that local_reparam computed on every model run before it became lazy",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
