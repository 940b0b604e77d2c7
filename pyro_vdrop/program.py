# SPDX-License-Identifier: Apache-2.0
"""
The ``pyro-vdrop`` program's entry point.

A program, unlike a library, may set process-wide defaults. This one chooses OpenMP's wait policy before torch (and
with it the OpenMP runtime, which reads ``OMP_WAIT_POLICY`` once, when it is loaded) is imported, unless the user
has set the variable. With OpenMP's default policy idle torch threads spin-wait for work a while: on a quiet machine
that is the fastest, but when another program also wants the CPUs (a test suite, a second run) the spinning threads
and the descheduled ones stall each other and a run can take three times as long. So when other processes keep at
least :data:`BUSY_CPUS` CPUs busy at start (sampled from ``/proc/stat`` over :data:`SAMPLE_SECONDS`), the program
sets ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep); otherwise it leaves OpenMP's default. Measured with
``benchmarks/busy_fit.py``: passive waiting costs about 45 % on a quiet 2-core machine and saves about half the time
beside one busy process. Set ``OMP_WAIT_POLICY`` yourself to choose.
"""

import os
import sys
import time

#: The OpenMP wait policy the program sets on a busy machine.
OMP_WAIT_POLICY = "PASSIVE"

#: Other processes' CPU use (in CPUs) from which the machine counts as busy.
BUSY_CPUS = 0.5

#: How long the program samples the machine's CPU use at start.
SAMPLE_SECONDS = 0.1


def _cpu_times():
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def busy_cpus(seconds: float = SAMPLE_SECONDS) -> float | None:
    """
    The CPUs that other processes keep busy, averaged over ``seconds`` (this process sleeps meanwhile), from
    ``/proc/stat``; None where that cannot be read (not Linux).
    """
    try:
        total0, idle0 = _cpu_times()
        time.sleep(seconds)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (total - (idle1 - idle0)) / total


def wait_policy(environ, busy: float | None) -> str | None:
    """The ``OMP_WAIT_POLICY`` to set: None if the user set one or the machine is not known to be busy."""
    if "OMP_WAIT_POLICY" in environ or busy is None or busy < BUSY_CPUS:
        return None
    return OMP_WAIT_POLICY


def main(argv: list[str] | None = None) -> int:
    """Runs ``pyro-vdrop``: :func:`pyro_vdrop.cli.main` with the program's process-wide defaults."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:  # later, OpenMP has read its environment
        policy = wait_policy(os.environ, busy_cpus())
        if policy is not None:
            os.environ["OMP_WAIT_POLICY"] = policy
    from pyro_vdrop.cli import main as cli_main

    return cli_main(argv)


__all__ = ["BUSY_CPUS", "OMP_WAIT_POLICY", "SAMPLE_SECONDS", "busy_cpus", "main", "wait_policy"]
