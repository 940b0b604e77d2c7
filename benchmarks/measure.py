# SPDX-License-Identifier: Apache-2.0
"""
Measuring training steps: interleaved step timing, peak memory of a step, and the machine and versions that a
benchmark record carries.

Peak memory on CPU: each (variant, point) is probed in a forked child of the worker (forked before the worker
computes anything, so no thread pool is inherited). The child pins glibc's mmap threshold (``mallopt``) so that
freed large blocks go back to the kernel instead of staying resident in the heap, builds the variant, runs
warm-up steps (parameters, optimizer state and lazily built state now exist), trims the heap and reads
``VmRSS``, resets the kernel's peak (``echo 5 > /proc/self/clear_refs``), runs the probe steps and reads
``VmHWM``. ``step_peak_mib`` = VmHWM - VmRSS before the steps: the transient memory of a step (activations,
noise, gradients' temporaries) above the trained state; ``state_mib`` = VmRSS before the steps - VmRSS before
building: parameters, gradients, optimizer state and what the library keeps; ``total_peak_mib`` their sum.
On CUDA the same three figures come from ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` after
``reset_peak_memory_stats``, in the worker process itself.
"""

import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import select
import signal
import statistics
import sys
import time

import torch

from pyro_vdrop.util import environment

MIB = 2**20
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 64 * 1024


def versions():
    """Python, torch, Pyro, pyro-vdrop and the peers' versions ("not installed" where missing)."""
    out = {"python": platform.python_version()}
    for key, dist in [
        ("torch", "torch"),
        ("pyro", "pyro-ppl"),
        ("pyro_vdrop", "pyro-vdrop"),
        ("bayesian_torch", "bayesian-torch"),
        ("tyxe", "tyxe"),
    ]:
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "not installed"
    return out


def machine(device):
    """The machine, in the schema of every run and benchmark record (:func:`pyro_vdrop.util.environment`)."""
    return environment(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants, x, y, *, device, warmup, rounds, target_s, max_steps_per_round):
    """
    Median step times of several variants on one minibatch, interleaved: after ``warmup`` steps each, ``rounds``
    rounds in which every variant runs its steps in turn (order reversed every other round, so slow drifts of
    the machine hit all variants alike). Each variant gets about ``target_s`` seconds in all (its step count per
    round from the warm-up time, at least 1 and at most ``max_steps_per_round``).

    :returns: ``{name: {"median_ms", "p25_ms", "p75_ms", "steps"}}``
    """
    device = torch.device(device)
    per_round = {}
    for v in variants:
        with v.scope():
            _sync(device)
            start = time.perf_counter()
            for _ in range(warmup):
                v.step(x, y)
            _sync(device)
            t = (time.perf_counter() - start) / max(warmup, 1)
        per_round[v.name] = max(1, min(max_steps_per_round, round(target_s / rounds / max(t, 1e-6))))
    times = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else reversed(variants):
            with v.scope():
                for _ in range(per_round[v.name]):
                    _sync(device)
                    start = time.perf_counter()
                    v.step(x, y)
                    _sync(device)
                    times[v.name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {
            "median_ms": statistics.median(ts) * 1e3,
            "p25_ms": q[0] * 1e3,
            "p75_ms": q[2] * 1e3,
            "steps": len(ts),
        }
    return out


def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def cpu_memory_supported():
    """None if the CPU peak-memory probe works here, else why not."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return "needs Linux /proc and fork"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        return f"cannot reset the peak RSS (/proc/self/clear_refs): {e}"
    return None


def _probe_cpu_child(build, warmup, steps):
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)  # also turns off the dynamic threshold
        libc.mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD)
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    rss0 = _proc_status_kib("VmRSS")
    v, x, y = build()
    with v.scope():
        for _ in range(warmup):
            v.step(x, y)
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        rss1 = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for _ in range(steps):
            v.step(x, y)
        hwm = _proc_status_kib("VmHWM")
    return {
        "step_peak_mib": (hwm - rss1) / 1024,
        "state_mib": (rss1 - rss0) / 1024,
        "total_peak_mib": (hwm - rss0) / 1024,
        "glibc_tuned": libc is not None,
    }


def probe_memory_cpu(build, *, warmup, steps, timeout_s=600.0):
    """
    Runs :func:`_probe_cpu_child` in a forked child; ``build()`` returns ``(variant, x, y)``.

    Call it only from a process that has not computed anything with more than one torch thread yet (as
    ``benchmarks/worker.py`` does): a child forked after OpenMP started its thread pool can hang (it is killed
    after ``timeout_s`` seconds without an answer, and the error recorded).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        code = 0
        try:
            result = _probe_cpu_child(build, warmup, steps)
        except BaseException as e:  # report any failure to the parent
            result, code = {"error": f"{type(e).__name__}: {e}"}, 1
        with os.fdopen(write, "w") as f:
            f.write(json.dumps(result))
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        if not select.select([f], [], [], timeout_s)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"error": f"memory probe timed out after {timeout_s:.0f} s (forked after OpenMP started?)"}
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"error": f"memory probe died (wait status {status})"}
    return json.loads(text)


def probe_memory_cuda(build, *, device, warmup, steps):
    """The CUDA figures, in this process: allocated memory before building, before the steps, and its peak."""
    device = torch.device(device)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    v, x, y = build()
    try:
        with v.scope():
            for _ in range(warmup):
                v.step(x, y)
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                v.step(x, y)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
    finally:
        del v, x, y
        gc.collect()
        torch.cuda.empty_cache()
    return {
        "step_peak_mib": (peak - before) / MIB,
        "state_mib": (before - base) / MIB,
        "total_peak_mib": (peak - base) / MIB,
    }
