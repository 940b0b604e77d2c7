# SPDX-License-Identifier: Apache-2.0
"""
A run written by pyro-vdrop before checkpoint format 2 (tests/data/format1_run: commit 267a14f, a 784-8-8-8-10 MLP,
interrupted after epoch 2 of 3; its checkpoint pickles Pyro constraint objects and numpy arrays). It loads with
``weights_only=True`` and exactly those classes allowed, resumes bitwise where a run of today's code ends, and
converts to format 2.
"""

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vdrop.optim
from pyro_vdrop.cli import main
from pyro_vdrop.train import CHECKPOINT_FILE, RunError, TrainConfig, fit, load_checkpoint

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


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    return run


def test_format1_run_is_read_and_resumes_bitwise(old_run, tmp_path, monkeypatch):
    original = (old_run / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(pickle.UnpicklingError):  # not plain data: torch.load alone refuses it
        torch.load(old_run / CHECKPOINT_FILE, weights_only=True)
    state = load_checkpoint(old_run / CHECKPOINT_FILE)  # the allowed classes, nothing else
    assert state["version"] == 1 and state["epoch"] == 2
    assert main(["evaluate", "--run", str(old_run), "--num-samples", "2"]) == 0
    assert (old_run / CHECKPOINT_FILE).read_bytes() == original

    assert main(["fit", "--out", str(old_run), "--resume", "--no-progress"]) == 0
    # the fixture was written before fit used Adam's fused kernel; its run keeps the loop's update on resuming, so
    # it continues exactly as an uninterrupted run with the loop's update
    monkeypatch.setattr(pyro_vdrop.optim, "supports_fused", lambda *args, **kwargs: False)
    fit(CONFIG, tmp_path / "today", progress=False)
    resumed, today = load_checkpoint(old_run / CHECKPOINT_FILE), load_checkpoint(tmp_path / "today" / CHECKPOINT_FILE)
    assert resumed["version"] == 2 and resumed["epoch"] == today["epoch"] == 3
    for name, value in today["param_store"]["params"].items():
        assert torch.equal(resumed["param_store"]["params"][name], value), name
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in today["history"]]


def test_convert_keeps_the_old_file(old_run):
    original = (old_run / CHECKPOINT_FILE).read_bytes()
    before = load_checkpoint(old_run / CHECKPOINT_FILE)
    assert main(["convert", "--run", str(old_run)]) == 0
    assert (old_run / f"{CHECKPOINT_FILE}.format1").read_bytes() == original
    assert torch.load(old_run / CHECKPOINT_FILE, weights_only=True)["version"] == 2
    after = load_checkpoint(old_run / CHECKPOINT_FILE)
    for name, value in before["param_store"]["params"].items():
        assert torch.equal(after["param_store"]["params"][name], value)
    assert np.array_equal(after["rng"]["numpy"][1], before["rng"]["numpy"][1])
    assert after["rng"]["python"] == before["rng"]["python"]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_format1_classes_do_not_open_the_door(old_run, tmp_path):
    # a format-1 checkpoint with one more object, or a non-checkpoint file holding only allowed classes: refused
    marker = tmp_path / "pwned"
    state = torch.load(old_run / CHECKPOINT_FILE, weights_only=False)  # our own fixture
    torch.save({**state, "extra": Payload(marker)}, old_run / CHECKPOINT_FILE)
    with pytest.raises(RunError, match="refused to load"):
        load_checkpoint(old_run / CHECKPOINT_FILE)
    torch.save({"version": 2, "key": np.zeros(3, dtype=np.uint32)}, old_run / CHECKPOINT_FILE)
    with pytest.raises(RunError, match="refused to load"):
        load_checkpoint(old_run / CHECKPOINT_FILE)
    assert not marker.exists()
