# SPDX-License-Identifier: Apache-2.0
"""
One comparison of ``python -m benchmarks.run``, in a process of its own: memory probes, then interleaved step
timings of the variants at each of its points (model, batch size). Not meant to be run by hand:

    python -m benchmarks.worker SPEC.json RESULT.json
"""

import json
import sys
import traceback

import pyro
import torch

from . import measure
from .models import make_batch
from .variants import build, unavailable


def _builder(name, model, batch_size, device, seed):
    def make():
        v = build(name, model, device=device, seed=seed)
        x, y = make_batch(model, batch_size, device=device, seed=seed)
        return v, x, y

    return make


def run(spec):
    torch.set_num_threads(spec["threads"])
    pyro.enable_validation(False)  # as one trains for speed; Pyro's default is on
    device = torch.device(spec["device"])
    start = measure.machine(device)
    memory = spec["memory"]
    timing = spec["timing"]
    seed = spec.get("seed", 0)
    points = []
    names = {name for point in spec["points"] for name in point["variants"]}
    skipped = {name: reason for name in sorted(names) if (reason := unavailable(name)) is not None}  # imports peers
    mem_reason = measure.cpu_memory_supported() if device.type == "cpu" else None

    # memory first: CPU probes fork, and must do so before this process runs any computation
    for point in spec["points"]:
        model, batch_size = point["model"], point["batch_size"]
        results = {}
        for name in point["variants"]:
            if name in skipped:
                continue
            entry = results.setdefault(name, {})
            if memory is None:
                continue
            if mem_reason is not None:
                entry["memory_error"] = mem_reason
                continue
            make = _builder(name, model, batch_size, device, seed)
            if device.type == "cpu":
                probe = measure.probe_memory_cpu(make, warmup=memory["warmup"], steps=memory["steps"])
            else:
                try:
                    probe = measure.probe_memory_cuda(
                        make, device=device, warmup=memory["warmup"], steps=memory["steps"]
                    )
                except Exception as e:  # recorded and reported as an error by benchmarks.run
                    probe = {"error": f"{type(e).__name__}: {e}"}
            if "error" in probe:
                entry["memory_error"] = probe.pop("error")
                print(
                    f"[{model} b={batch_size}] memory probe of {name} failed: {entry['memory_error']}", file=sys.stderr
                )
            entry.update(probe)
        points.append(
            {
                "model": model,
                "batch_size": batch_size,
                "results": results,
                "skipped": {n: skipped[n] for n in point["variants"] if n in skipped},
            }
        )

    for point in points:
        model, batch_size = point["model"], point["batch_size"]
        variants = []
        for name in point["results"]:
            try:
                variants.append(build(name, model, device=device, seed=seed))
            except Exception as e:
                point["results"][name]["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        x, y = make_batch(model, batch_size, device=device, seed=seed)
        try:
            times = measure.time_variants(variants, x, y, device=device, **timing)
        except Exception as e:
            traceback.print_exc()
            for v in variants:
                point["results"][v.name]["error"] = f"timing failed: {type(e).__name__}: {e}"
            times = {}
        for name, t in times.items():
            point["results"][name].update(t)
        del variants, x, y
    from .peers import tyxe_adapter

    return {
        "points": points,
        "machine_start": start,
        "machine_end": measure.machine(device),
        "tyxe_deep_getattr_shim": tyxe_adapter.SHIMMED,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m benchmarks.worker SPEC.json RESULT.json")
    with open(argv[0]) as f:
        spec = json.load(f)
    result = run(spec)
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
