# SPDX-License-Identifier: Apache-2.0
"""Run directories that cannot be turned against their user: safe loading, one writer, atomic files, clear errors."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_vdrop.cli import main
from pyro_vdrop.train import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_CSV,
    METRICS_JSONL,
    RunError,
    TrainConfig,
    evaluate,
    fit,
    load_checkpoint,
    lock_run,
    run_in_progress,
)
from pyro_vdrop.train.checkpoint import decode_checkpoint, encode_checkpoint, rng_state
from pyro_vdrop.train.distributed import private_folder

from .interrupt import Interrupt, interrupt_at

TINY = ["--model", "mlp", "--width", "16", "--train-subset", "120", "--test-subset", "60", "--batch-size", "40"]
TINY += ["--kl-warmup", "1", "--pretrain-epochs", "0", "--no-progress"]
CONFIG = TrainConfig(
    model="mlp", width=16, train_subset=120, test_subset=60, batch_size=40, kl_warmup=1, pretrain_epochs=0, epochs=2
)


class Payload:
    """What an attacker would put in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    fit(CONFIG, out, progress=False)
    return out


@pytest.fixture
def copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def _cli(*argv):
    return subprocess.run(
        [sys.executable, "-m", "pyro_vdrop.cli", *argv], capture_output=True, text=True, timeout=300, env=os.environ
    )


# 1. a checkpoint never runs code ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("command", ["evaluate", "report", "resume"])
def test_malicious_checkpoint_is_refused(copy, tmp_path, capsys, how, command):
    marker = tmp_path / "pwned"
    path = copy / CHECKPOINT_FILE
    if how == "torch.save":  # a real checkpoint with one extra key
        state = encode_checkpoint(load_checkpoint(path))
        torch.save({**state, "extra": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"version": 2, "extra": Payload(marker)}, f)
    argv = {
        "evaluate": ["evaluate", "--run", str(copy)],
        "report": ["report", "--run", str(copy)],
        "resume": ["fit", "--out", str(copy), "--resume", "--no-progress"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "refused to load" in err
    assert how == "pickle" or "(it names posix.system)" in err
    assert not marker.exists()


def test_checkpoint_is_plain_data(run):
    raw = torch.load(run / CHECKPOINT_FILE, weights_only=True)  # the test: no pickled objects at all
    assert raw["version"] == 2 and set(raw["param_store"]["constraints"].values()) == {"real"}
    state = load_checkpoint(run / CHECKPOINT_FILE)
    from pyro.distributions import constraints

    assert all(c is constraints.real for c in state["param_store"]["constraints"].values())
    numpy_state = state["rng"]["numpy"]
    assert numpy_state[0] == "MT19937" and numpy_state[1].dtype.name == "uint32" and len(numpy_state[1]) == 624
    assert isinstance(state["rng"]["python"][1], tuple) and len(state["rng"]["python"][1]) == 625


def test_rng_state_round_trips_exactly():
    import random

    import numpy as np

    np.random.rand(3), random.random(), np.random.randn()  # a cached Gaussian in numpy's state
    rng = rng_state()
    decoded = decode_checkpoint(encode_checkpoint({"param_store": {"params": {}, "constraints": {}}, "rng": rng}))
    back = decoded["rng"]
    assert torch.equal(back["torch"], rng["torch"])
    assert back["python"] == rng["python"]
    for a, b in zip(back["numpy"], rng["numpy"]):
        assert np.array_equal(a, b)


# 2. one writer per run ----------------------------------------------------------------------------------------------


def test_lock_names_its_holder(tmp_path):
    with lock_run(tmp_path, command="first"):
        assert f"pid {os.getpid()}" in run_in_progress(tmp_path)
        with pytest.raises(RunError, match=f"being written by another pyro-vdrop process \\(pid {os.getpid()}"):
            with lock_run(tmp_path):
                pass
    assert run_in_progress(tmp_path) is None
    with lock_run(tmp_path):  # released
        pass


def test_lock_file_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(RunError, match="cannot open the lock file"):
        with lock_run(tmp_path / "run"):
            pass
    assert victim.read_text() == "precious"


def test_concurrent_fits_with_one_out(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fit", *TINY, "--train-subset", "1000", "--epochs", "200", "--out", str(out)]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        first = subprocess.Popen([sys.executable, "-m", "pyro_vdrop.cli", *argv], stderr=stderr, env=os.environ)
    try:

        def wait_for(done):
            deadline = time.monotonic() + 120
            while not done():
                assert first.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.02)

        wait_for(lambda: run_in_progress(out) is not None)  # the first holds the lock, has written nothing yet
        assert main(argv) == 2  # a second writer, started while the first loads its data
        assert f"being written by another pyro-vdrop process (pid {first.pid}" in capsys.readouterr().err
        wait_for((out / CHECKPOINT_FILE).exists)
        config_before = (out / CONFIG_FILE).read_bytes()
        for again in (argv, [*argv, "--overwrite"], ["fit", "--out", str(out), "--resume", "--no-progress"]):
            assert main(again) == 2
            assert f"being written by another pyro-vdrop process (pid {first.pid}" in capsys.readouterr().err
        assert (out / CONFIG_FILE).read_bytes() == config_before
        # a reader is fine, and says the run is in progress
        assert main(["evaluate", "--run", str(out), "--num-samples", "1"]) == 0
        assert f"still being trained (pid {first.pid}" in capsys.readouterr().err
        assert json.loads((out / "evaluation.json").read_text())["in_progress"].startswith(f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)  # killed: the OS releases the lock, nothing stale stays
        first.wait(timeout=60)
    assert run_in_progress(out) is None
    with lock_run(out):
        pass


# 3. / 4. no writes through links, no orphaned temporary files -------------------------------------------------------


def test_report_replaces_symlinks_instead_of_writing_through_them(copy, tmp_path):
    pytest.importorskip("matplotlib")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (copy / "curves.png").symlink_to(victim)
    (copy / "report.md").symlink_to(victim)
    assert main(["report", "--run", str(copy)]) == 0
    assert victim.read_text() == "precious"
    assert not (copy / "curves.png").is_symlink() and (copy / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (copy / "report.md").is_symlink()


@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
def test_stale_temp_files_are_removed_on_start(copy, mode):
    stale = [f".{CHECKPOINT_FILE}.k3j_x9zq.tmp", f".{METRICS_CSV}.abc123de.tmp"]
    kept = [".notes.tmp", "notes.txt", f"{CHECKPOINT_FILE}.tmp"]
    for name in stale + kept:
        (copy / name).write_bytes(b"x" * 100)
    argv = ["fit", "--out", str(copy), mode, "--no-progress"]
    assert main(argv if mode == "--resume" else [*argv, *TINY, "--epochs", "1"]) == 0
    names = {p.name for p in copy.iterdir()}
    assert not names & set(stale) and set(kept) <= names


# 5. metrics repaired from the checkpoint ---------------------------------------------------------------------------


def test_resume_rewrites_metrics_a_crash_left_short(copy):
    for name in (METRICS_CSV, METRICS_JSONL):
        lines = (copy / name).read_text().splitlines(keepends=True)
        (copy / name).write_text("".join(lines[:-1]))  # the crash: the last row never written
    assert main(["fit", "--out", str(copy), "--resume", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (copy / METRICS_JSONL).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert len((copy / METRICS_CSV).read_text().splitlines()) == 3


# 6. the checkpoint must agree with config.json ----------------------------------------------------------------------


def test_checkpoint_contradicting_config_json(copy, capsys):
    record = json.loads((copy / CONFIG_FILE).read_text())
    record["config"]["model"] = "lenet300"
    (copy / CONFIG_FILE).write_text(json.dumps(record))
    assert main(["evaluate", "--run", str(copy)]) == 2
    assert "contradicts" in capsys.readouterr().err
    assert main(["fit", "--out", str(copy), "--resume", "--no-progress"]) == 2
    assert "model='mlp' in the checkpoint but 'lenet300' in config.json" in capsys.readouterr().err
    (copy / CONFIG_FILE).unlink()
    assert main(["evaluate", "--run", str(copy)]) == 2
    assert "config.json is missing" in capsys.readouterr().err


# 7. messages instead of tracebacks ----------------------------------------------------------------------------------


def test_out_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile" / "sub", "/proc/pyro-vdrop-test"):
        assert main(["fit", *TINY, "--epochs", "1", "--out", str(out)]) == 2
        assert f"--out {out}: cannot create the run directory" in capsys.readouterr().err


def test_incomplete_checkpoint(copy, capsys):
    torch.save({"version": 2}, copy / CHECKPOINT_FILE)
    assert main(["evaluate", "--run", str(copy)]) == 2
    assert "not a complete pyro-vdrop checkpoint: it lacks config" in capsys.readouterr().err


def test_diverging_pretraining(tmp_path, capsys):
    argv = ["fit", *TINY, "--pretrain-epochs", "1", "--lr", "1e30", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "pretraining diverged" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # created for the lock, removed again: nothing was written


def test_run_killed_in_its_first_epoch_says_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        fit(CONFIG, out, progress=False, callback=interrupt_at(1))
    assert (out / CONFIG_FILE).exists() and not (out / CHECKPOINT_FILE).exists()
    for argv in (["fit", "--out", str(out), "--resume"], ["fit", *TINY, "--epochs", "2", "--out", str(out)]):
        assert main(argv) == 2
        assert "stopped before its first epoch ended" in capsys.readouterr().err
    assert main(["fit", *TINY, "--epochs", "2", "--out", str(out), "--overwrite"]) == 0


@pytest.mark.skipif(not hasattr(os, "setrlimit") and sys.platform != "linux", reason="needs RLIMIT_FSIZE")
def test_disk_full_during_a_checkpoint_write(tmp_path):
    import resource

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        fit(CONFIG, out, progress=False, callback=interrupt_at(4))  # epoch 1 of 2 checkpointed
    before = (out / CHECKPOINT_FILE).read_bytes()
    limit = 50_000  # the metrics fit, a checkpoint (~250 kB) does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "pyro_vdrop.cli", "fit", "--out", str(out), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"I/O error: [Errno 27] cannot write {out / CHECKPOINT_FILE}: File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / CHECKPOINT_FILE).read_bytes() == before
    assert load_checkpoint(out / CHECKPOINT_FILE)["epoch"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# 8. non-finite numbers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_threshold_must_be_finite(run, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--run", str(run), f"--threshold={value}"])
    assert e.value.code == 2
    assert "--threshold: expected a finite number" in capsys.readouterr().err
    with pytest.raises(RunError, match="--threshold must be a finite number"):
        evaluate(run, threshold=float(value))
    assert not (run / "evaluation.json").exists()


def test_launcher_folder_is_private():
    with private_folder() as folder:
        info = os.lstat(folder)
        assert info.st_mode & 0o777 == 0o700 and info.st_uid == os.getuid()
    assert not os.path.exists(folder)


def test_a_writer_that_loses_the_lock_race_leaves_the_folder_alone(tmp_path, monkeypatch):
    # Two processes start on the same new --out: both see it missing and create it, one takes the lock. The loser
    # must not remove the folder it "created" (a failed run removes a folder it created and left empty): the
    # winner is using it. Simulated: another holder takes the lock just before this fit tries to.
    import contextlib
    import importlib

    loop = importlib.import_module("pyro_vdrop.train.loop")
    out = tmp_path / "new"
    winner = contextlib.ExitStack()
    real_lock_run = loop.lock_run

    def racing_lock_run(run_dir, **kwargs):
        winner.enter_context(real_lock_run(run_dir, command="the winner"))
        return real_lock_run(run_dir, **kwargs)

    monkeypatch.setattr(loop, "lock_run", racing_lock_run)
    with winner:
        with pytest.raises(RunError, match="being written by another pyro-vdrop process"):
            fit(CONFIG, out, progress=False)
        assert out.is_dir() and (out / LOCK_FILE).exists()  # still there for the winner
