# SPDX-License-Identifier: Apache-2.0
"""
What a training step keeps for its backward pass: the tensors that autograd saves during one step of a suite
variant (``benchmarks/variants.py``), listed with ``torch.autograd.graph.saved_tensors_hooks``, each storage once,
leaving out the parameters (which the step keeps anyway). Sizes are deterministic (they do not depend on the
machine's load), so this runs on a busy machine; grouped by the line of pyro-vdrop, Pyro or torch.distributions
code that saved them.

Prints a table per variant and writes ``benchmarks/results/saved_tensors.json``.

    python -m benchmarks.saved_tensors [--model mlp] [--batch-size 100] [--variants deterministic,pyro_vdrop_lrt]
"""

import argparse
import collections
import datetime
import json
import sys
import traceback
from pathlib import Path

import pyro
import torch

from pyro_vdrop.util import environment

from .models import make_batch
from .variants import build

RESULTS = Path(__file__).resolve().parent / "results"
_OWN = ("/pyro_vdrop/", "/benchmarks/", "/pyro/", "/torch/distributions/")


def _where():
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(part in frame.filename for part in _OWN) and not frame.filename.endswith("saved_tensors.py"):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.line.strip()[:80]}"
    return "?"


def saved_tensors(name, model, batch_size):
    """The tensors saved for backward in one step (after one warm-up step) of variant ``name``."""
    v = build(name, model)
    x, y = make_batch(model, batch_size)
    records = []

    def pack(t):
        records.append((t, _where()))
        return t

    with v.scope():
        v.step(x, y)  # parameters are made in the first step
        params = {p.untyped_storage().data_ptr() for p in pyro.get_param_store().values()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            v.step(x, y)
    seen, total = set(), 0
    by_line = collections.defaultdict(lambda: {"bytes": 0, "tensors": 0, "shapes": set()})
    for t, where in records:
        ptr = t.untyped_storage().data_ptr()
        base = t if t._base is None else t._base  # a transposed weight is a view of the parameter
        if ptr in seen or ptr in params or (base.is_leaf and base.requires_grad):
            continue
        seen.add(ptr)
        nbytes = t.untyped_storage().nbytes()
        total += nbytes
        by_line[where]["bytes"] += nbytes
        by_line[where]["tensors"] += 1
        by_line[where]["shapes"].add(tuple(t.shape))
    lines = [
        {"where": k, "mib": v["bytes"] / 2**20, "tensors": v["tensors"], "shapes": sorted(v["shapes"])}
        for k, v in sorted(by_line.items(), key=lambda kv: -kv[1]["bytes"])
    ]
    return {"variant": name, "saved_mib": total / 2**20, "by_line": lines}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--variants", default="deterministic,torch_lrt,pyro_vdrop_lrt")
    parser.add_argument("--out", default=str(RESULTS / "saved_tensors.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    rows = [saved_tensors(n, args.model, args.batch_size) for n in args.variants.split(",") if n]
    det = next((r["saved_mib"] for r in rows if r["variant"] == "deterministic"), None)
    for r in rows:
        r["ratio_to_deterministic"] = r["saved_mib"] / det if det else None
        ratio = f" ({r['ratio_to_deterministic']:.2f}x deterministic)" if det else ""
        print(f"== {r['variant']}: {r['saved_mib']:.3f} MiB saved for backward{ratio} ==")
        for line in r["by_line"]:
            print(f"  {line['mib']:7.3f} MiB {line['tensors']:3d}  {line['where']}")
    record = {
        "benchmark": "saved_tensors",
        "command": "python -m benchmarks.saved_tensors " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": environment(),
        "model": args.model,
        "batch_size": args.batch_size,
        "notes": "tensors saved for backward in one training step, each storage once, parameters left out",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, default=list) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
