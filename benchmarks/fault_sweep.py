# SPDX-License-Identifier: Apache-2.0
"""
Bad inputs and faults against the ``pyro-vdrop`` command, as a careful user and an attacker would try them.

Each case builds a run folder (or a bad option), runs the command in a fresh process and checks how it ended: the
expected exit status, one message on stderr without a traceback, and, where the case has one, its own check (the
marker file a malicious checkpoint would create does not exist, a symlinked file is unchanged, the previous
checkpoint is intact). Prints a table and writes ``benchmarks/results/fault_sweep.json``.

    python benchmarks/fault_sweep.py            # about 3 minutes on 2 CPU cores
"""

import argparse
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pyro_vdrop.train import CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, environment, load_checkpoint

TINY = ["--model", "mlp", "--width", "16", "--train-subset", "120", "--test-subset", "60", "--batch-size", "40"]
TINY += ["--kl-warmup", "1", "--pretrain-epochs", "0", "--no-progress", "--threads", "1", "--epochs", "2"]
RESULTS = Path(__file__).resolve().parent / "results"


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def cli(*argv, limit_file_size=None, timeout=300):
    def limits():
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run(
        [sys.executable, "-m", "pyro_vdrop.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limits,
    )


class Sweep:
    def __init__(self, root: Path):
        self.root = root
        self.rows = []
        self.base = root / "base"
        assert cli("fit", *TINY, "--out", str(self.base)).returncode == 0
        self.count = 0

    def copy(self) -> Path:
        self.count += 1
        target = self.root / f"case{self.count}"
        shutil.copytree(self.base, target)
        return target

    def case(self, group, name, argv, *, expect, check=None, require=None, forbid=None, **kwargs):
        t0 = time.perf_counter()
        proc = cli(*argv, **kwargs)
        extra = check() if check is not None else True
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        ok = proc.returncode == expect and "Traceback" not in proc.stderr and bool(extra)
        ok = ok and (expect == 0 or any("error" in line for line in lines))
        ok = ok and (require is None or require in proc.stderr) and (forbid is None or forbid not in proc.stderr)
        message = next((line for line in lines if "error" in line or "note" in line), "")
        message = message.replace(str(self.root), "<sweep>")  # the record names no path of this machine
        self.rows.append(
            {
                "group": group,
                "case": name,
                "exit": proc.returncode,
                "expected": expect,
                "handled": ok,
                "message": message[:300],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(f"{'ok  ' if ok else 'FAIL'} {proc.returncode:>3}  {group:<14} {name:<48} {message[:90]}", flush=True)


def malicious(sweep: Sweep):
    for how in ("torch.save", "pickle"):
        for command in ("evaluate", "report", "resume"):
            run = sweep.copy()
            marker = sweep.root / f"pwned-{sweep.count}"
            path = run / CHECKPOINT_FILE
            if how == "torch.save":
                state = torch.load(path, weights_only=True)
                torch.save({**state, "extra": Payload(marker)}, path)
            else:
                with open(path, "wb") as f:
                    pickle.dump({"version": 2, "extra": Payload(marker)}, f)
            argv = {
                "evaluate": ["evaluate", "--run", str(run)],
                "report": ["report", "--run", str(run)],
                "resume": ["fit", "--out", str(run), "--resume", "--no-progress"],
            }[command]
            sweep.case(
                "code in file", f"{how} payload, {command}", argv, expect=2, check=lambda m=marker: not m.exists()
            )
    run = sweep.copy()
    state = load_checkpoint(run / CHECKPOINT_FILE)
    torch.save({**state, "version": 1}, run / CHECKPOINT_FILE)
    sweep.case("code in file", "format-1 checkpoint, evaluate", ["evaluate", "--run", str(run)], expect=0)
    sweep.case(
        "code in file",
        "format-1 checkpoint, convert",
        ["convert", "--run", str(run)],
        expect=0,
        check=lambda: (run / f"{CHECKPOINT_FILE}.format1").exists(),
    )


def broken_checkpoints(sweep: Sweep):
    def write(run, data):
        (run / CHECKPOINT_FILE).unlink()
        if data is None:
            (run / CHECKPOINT_FILE).mkdir()
        else:
            (run / CHECKPOINT_FILE).write_bytes(data)

    good = (sweep.base / CHECKPOINT_FILE).read_bytes()
    for name, data in [
        ("truncated to half", good[: len(good) // 2]),
        ("empty", b""),
        ("random bytes", os.urandom(4096)),
        ("a directory", None),
    ]:
        run = sweep.copy()
        write(run, data)
        sweep.case("bad checkpoint", name, ["evaluate", "--run", str(run)], expect=2)
    run = sweep.copy()
    torch.save({"version": 2}, run / CHECKPOINT_FILE)
    sweep.case("bad checkpoint", "dict missing keys, evaluate", ["evaluate", "--run", str(run)], expect=2)
    sweep.case("bad checkpoint", "dict missing keys, resume", ["fit", "--out", str(run), "--resume"], expect=2)
    run = sweep.copy()
    record = json.loads((run / CONFIG_FILE).read_text())
    record["config"]["model"] = "lenet300"
    (run / CONFIG_FILE).write_text(json.dumps(record))
    sweep.case("bad checkpoint", "contradicts config.json, evaluate", ["evaluate", "--run", str(run)], expect=2)
    sweep.case("bad checkpoint", "contradicts config.json, resume", ["fit", "--out", str(run), "--resume"], expect=2)
    run = sweep.copy()
    (run / CONFIG_FILE).write_text("{not json")
    sweep.case("bad checkpoint", "config.json not JSON", ["evaluate", "--run", str(run)], expect=2)
    run = sweep.copy()
    (run / CONFIG_FILE).unlink()
    sweep.case("bad checkpoint", "config.json missing", ["report", "--run", str(run)], expect=2)
    run = sweep.copy()
    state = load_checkpoint(run / CHECKPOINT_FILE)
    name = next(iter(state["param_store"]["params"]))
    state["param_store"]["params"][name] = torch.zeros(3)
    from pyro_vdrop.train import save_checkpoint

    save_checkpoint(run / CHECKPOINT_FILE, state)
    sweep.case("bad checkpoint", "parameter of the wrong shape", ["evaluate", "--run", str(run)], expect=2)


def run_folders(sweep: Sweep):
    root = sweep.root
    (root / "afile").write_text("")
    sweep.case("run folder", "--out under a file", ["fit", *TINY, "--out", str(root / "afile" / "sub")], expect=2)
    sweep.case("run folder", "--out in /proc", ["fit", *TINY, "--out", "/proc/pyro-vdrop-sweep"], expect=2)
    sweep.case("run folder", "--out is a file", ["fit", *TINY, "--out", str(root / "afile")], expect=2)
    sweep.case("run folder", "--resume without --out", ["fit", "--resume"], expect=2)
    sweep.case("run folder", "--resume with --overwrite", ["fit", "--resume", "--overwrite", "--out", "x"], expect=2)
    sweep.case("run folder", "evaluate a missing folder", ["evaluate", "--run", str(root / "nowhere")], expect=2)
    sweep.case("run folder", "existing run without --resume", ["fit", *TINY, "--out", str(sweep.base)], expect=2)
    victim = root / "victim.txt"
    victim.write_text("precious")
    run = sweep.copy()
    (run / "curves.png").symlink_to(victim)
    sweep.case(
        "run folder",
        "report with curves.png a symlink",
        ["report", "--run", str(run)],
        expect=0,
        check=lambda: victim.read_text() == "precious" and not (run / "curves.png").is_symlink(),
    )
    run = sweep.copy()
    (run / LOCK_FILE).unlink(missing_ok=True)
    (run / LOCK_FILE).symlink_to(victim)
    sweep.case(
        "run folder",
        "lock file a symlink, resume",
        ["fit", "--out", str(run), "--resume"],
        expect=2,
        check=lambda: victim.read_text() == "precious",
    )
    # a run killed in its first epoch: config.json and no checkpoint
    run = root / "killed"
    run.mkdir()
    shutil.copy(sweep.base / CONFIG_FILE, run / CONFIG_FILE)
    sweep.case("run folder", "killed in epoch 1, --resume", ["fit", "--out", str(run), "--resume"], expect=2)
    sweep.case("run folder", "killed in epoch 1, new run", ["fit", *TINY, "--out", str(run)], expect=2)
    sweep.case(
        "run folder", "killed in epoch 1, --overwrite", ["fit", *TINY, "--out", str(run), "--overwrite"], expect=0
    )


def concurrency_and_io(sweep: Sweep):
    root = sweep.root
    out = root / "concurrent"
    argv = ["fit", *TINY[:-2], "--epochs", "500", "--train-subset", "1000", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "pyro_vdrop.cli", *argv], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # the second starts 0.3 s after the first
        sweep.case("one writer", "second fit 0.3 s later, same --out", argv, expect=2)
        while not (out / CHECKPOINT_FILE).exists() and first.poll() is None:
            time.sleep(0.1)
        sweep.case("one writer", "fit --overwrite while it trains", [*argv, "--overwrite"], expect=2)
        evaluate = ["evaluate", "--run", str(out), "--num-samples", "2"]
        sweep.case("one writer", "evaluate while it trains", evaluate, expect=0, require="still being trained")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    run = sweep.copy()
    stale = [run / f".{CHECKPOINT_FILE}.x1y2z3w4.tmp", run / ".metrics.csv.abcd1234.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    sweep.case(
        "one writer",
        "stale .tmp files of a killed write, --resume",
        ["fit", "--out", str(run), "--resume", "--no-progress"],
        expect=0,
        check=lambda: not any(path.exists() for path in stale),
    )
    before = (out / CHECKPOINT_FILE).read_bytes()  # the killed run's last checkpoint
    sweep.case(
        "i/o",
        "disk full (RLIMIT_FSIZE 50 kB) during fit --resume",
        ["fit", "--out", str(out), "--resume", "--no-progress", "--threads", "1"],
        expect=1,
        limit_file_size=50_000,
        check=lambda: not list(out.glob(".*.tmp")) and (out / CHECKPOINT_FILE).read_bytes() == before,
    )
    sweep.case(
        "one writer",
        "evaluate after the SIGKILL: lock released",
        ["evaluate", "--run", str(out), "--num-samples", "2"],
        expect=0,
        forbid="still being trained",
    )
    base = [a for a in TINY if a not in ("--pretrain-epochs", "0")]
    for pretrain in ("1", "0"):
        argv = ["fit", *base, "--lr", "1e30", "--pretrain-epochs", pretrain, "--out", str(root / f"lr{pretrain}")]
        sweep.case("numbers", f"--lr 1e30, --pretrain-epochs {pretrain}", argv, expect=2)
    for value in ("nan", "inf", "-inf"):
        sweep.case(
            "numbers",
            f"evaluate --threshold={value}",
            ["evaluate", "--run", str(sweep.base), f"--threshold={value}"],
            expect=2,
        )
    sweep.case(
        "numbers", "evaluate --num-samples 0", ["evaluate", "--run", str(sweep.base), "--num-samples", "0"], expect=2
    )
    sweep.case("numbers", "fit --lr nan", ["fit", "--lr", "nan"], expect=2)
    sweep.case("numbers", "fit --kl-warmup inf", ["fit", "--kl-warmup", "inf"], expect=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_sweep.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pyro-vdrop-sweep-") as folder:
        sweep = Sweep(Path(folder))
        for part in (malicious, broken_checkpoints, run_folders, concurrency_and_io):
            part(sweep)
    handled = sum(row["handled"] for row in sweep.rows)
    print(f"\n{handled} of {len(sweep.rows)} bad inputs and faults handled ({time.perf_counter() - t0:.0f} s)")
    groups = {}
    for row in sweep.rows:
        tried, ok = groups.get(row["group"], (0, 0))
        groups[row["group"]] = (tried + 1, ok + row["handled"])
    for group, (tried, ok) in groups.items():
        print(f"  {group:<16} {ok} / {tried}")
    record = {
        "command": "python benchmarks/fault_sweep.py",
        "environment": environment(),
        "handled": handled,
        "tried": len(sweep.rows),
        "groups": {group: {"tried": t, "handled": h} for group, (t, h) in groups.items()},
        "cases": sweep.rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.out.relative_to(Path.cwd()) if args.out.is_relative_to(Path.cwd()) else args.out}")


if __name__ == "__main__":
    main()
