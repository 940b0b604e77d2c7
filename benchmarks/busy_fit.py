# SPDX-License-Identifier: Apache-2.0
"""
``pyro-vdrop fit`` on a busy machine: the wall time of a short default run alone, and beside one busy-looping
process, as the command ran before (OpenMP's own default wait policy), with the program's default
(``OMP_WAIT_POLICY=PASSIVE`` when other processes keep a CPU busy at start, else OpenMP's default; see
:mod:`pyro_vdrop.program`), with ``PASSIVE`` forced, and with ``--threads 1``.

    python -m benchmarks.busy_fit --repeats 2

Run it on an otherwise idle machine. Prints a table and writes ``benchmarks/results/busy_fit.json``.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyro_vdrop.util import environment

FIT = ["fit", "--epochs", "6", "--pretrain-epochs", "1", "--no-progress"]

#: The command as it ran before the program set a wait policy: pyro_vdrop.cli.main, OpenMP's own default.
BEFORE = "import sys; from pyro_vdrop.cli import main; sys.exit(main())"

#: label -> (busy neighbour, extra environment, extra arguments, the command before the program's default)
CASES = {
    "quiet, before (OpenMP default)": (False, {}, [], True),
    "quiet, program default (machine sampled)": (False, {}, [], False),
    "quiet, OMP_WAIT_POLICY=PASSIVE": (False, {"OMP_WAIT_POLICY": "PASSIVE"}, [], False),
    "busy, before (OpenMP default)": (True, {}, [], True),
    "busy, program default (machine sampled)": (True, {}, [], False),
    "busy, --threads 1": (True, {}, ["--threads", "1"], False),
}


def _spin(stop):
    while not stop.is_set():
        pass


def run_fit(out: Path, env_update: dict, extra: list, before: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(env_update)
    program = ["-c", BEFORE] if before else ["-m", "pyro_vdrop"]
    argv = [sys.executable, *program, *FIT, *extra, "--overwrite", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "busy_fit.json"))
    args = parser.parse_args(argv)
    times = {label: [] for label in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for label, (busy, env_update, extra, before) in CASES.items():
                stop = multiprocessing.Event()
                spinner = multiprocessing.Process(target=_spin, args=(stop,)) if busy else None
                if spinner:
                    spinner.start()
                try:
                    times[label].append(run_fit(Path(tmp) / "run", env_update, extra, before))
                finally:
                    if spinner:
                        stop.set()
                        spinner.join()
    quiet = statistics.median(times["quiet, before (OpenMP default)"])
    print("| case | wall s (median) | × quiet, before |")
    print("|---|---|---|")
    for label, t in times.items():
        print(f"| {label} | {statistics.median(t):.1f} | {statistics.median(t) / quiet:.2f} |")
    record = {
        "benchmark": "busy_fit",
        "command": "python -m benchmarks.busy_fit "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "fit_command": "pyro-vdrop " + " ".join(FIT),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": environment(),
        "notes": "busy: one Python process spinning beside the run; each case's wall time includes the interpreter's "
        "start; cases interleaved, repeats times",
        "seconds": times,
        "median_seconds": {label: statistics.median(t) for label, t in times.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
