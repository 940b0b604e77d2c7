# SPDX-License-Identifier: Apache-2.0
"""
A run written by pyro-vdrop before checkpoint format 2 (tests/data/format1_run: commit 267a14f, a 784-8-8-8-10
MLP, interrupted after epoch 2 of 3; its checkpoint pickles Pyro constraint objects and numpy arrays). It must be
refused until the user converts it, and once converted resume bitwise where a run of today's code ends.
"""

import shutil
from pathlib import Path

import torch

from pyro_vdrop.cli import main
from pyro_vdrop.train import CHECKPOINT_FILE, TrainConfig, fit, load_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "format1_run"
CONFIG = TrainConfig(
    model="mlp",
    width=8,
    train_subset=100,
    test_subset=50,
    batch_size=50,
    epochs=3,
    kl_warmup=1.5,
    pretrain_epochs=1,
    seed=5,
)


def test_format1_run_is_refused_then_converts_and_resumes_bitwise(tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    original = (run / CHECKPOINT_FILE).read_bytes()
    for argv in (["evaluate", "--run", str(run)], ["fit", "--out", str(run), "--resume", "--no-progress"]):
        assert main(argv) == 2
        assert "pyro-vdrop convert --run DIR --trust-checkpoint" in capsys.readouterr().err
    assert (run / CHECKPOINT_FILE).read_bytes() == original

    assert main(["convert", "--run", str(run), "--trust-checkpoint"]) == 0
    assert (run / f"{CHECKPOINT_FILE}.format1").read_bytes() == original
    assert torch.load(run / CHECKPOINT_FILE, weights_only=True)["version"] == 2
    assert load_checkpoint(run / CHECKPOINT_FILE)["epoch"] == 2

    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 0
    fit(CONFIG, tmp_path / "today", progress=False)
    resumed, today = load_checkpoint(run / CHECKPOINT_FILE), load_checkpoint(tmp_path / "today" / CHECKPOINT_FILE)
    assert resumed["epoch"] == today["epoch"] == 3
    for name, value in today["param_store"]["params"].items():
        assert torch.equal(resumed["param_store"]["params"][name], value), name
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in today["history"]]
