# SPDX-License-Identifier: Apache-2.0
"""Data-parallel training in 2 local processes (gloo on 127.0.0.1): pyro_vdrop.train.launch and fit --nproc."""

import time
from datetime import timedelta

import pyro
import pytest
import torch
import torch.distributed as dist

from pyro_vdrop.cli import main
from pyro_vdrop.train import (
    CHECKPOINT_FILE,
    LOCK_FILE,
    RunError,
    Session,
    TrainConfig,
    fit,
    launch,
    load_checkpoint,
    process_group,
)

from .interrupt import Interrupt

# 200 images, global batch 20: 10 steps per epoch, each process 10 images per step
TINY = dict(
    model="mlp", width=16, train_subset=200, test_subset=100, batch_size=20, epochs=2, kl_warmup=1, pretrain_epochs=0
)
TINY_ARGS = ["--model", "mlp", "--width", "16", "--train-subset", "200", "--test-subset", "100", "--batch-size", "20"]
TINY_ARGS += ["--epochs", "2", "--kl-warmup", "1", "--pretrain-epochs", "0", "--no-progress", "--threads", "1"]
STEPS = 20


def tiny(**options):
    return TrainConfig(**{**TINY, **options})


class _Record:
    """A fit callback: records each process's step losses, dumps its param store after the last step (or stops)."""

    def __init__(self, folder, *, stop_at=None):
        self.folder, self.stop_at, self.losses = folder, stop_at, []

    def __call__(self, info):
        if info["step"] == self.stop_at:
            raise Interrupt
        self.losses.append(info["loss"])
        if info["step"] == STEPS:
            params = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
            torch.save({"params": params, "losses": self.losses}, self.folder / f"rank{info['rank']}.pt")


def _params(run):
    return load_checkpoint(run / CHECKPOINT_FILE)["param_store"]["params"]


@pytest.fixture(scope="module")
def lrt_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lrt")
    summary = launch(fit, tiny(), folder / "run", nproc=2, threads=1, progress=False, callback=_Record(folder))
    dumps = [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]
    return folder / "run", summary, dumps


def test_processes_hold_identical_parameters(lrt_run):
    run, summary, (rank0, rank1) = lrt_run
    assert summary["nproc"] == 2 and summary["epochs"] == 2
    saved = _params(run)
    assert sorted(rank0["params"]) == sorted(rank1["params"]) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(rank0["params"][name], value), name
        assert torch.equal(rank1["params"][name], value), name

    # not vacuous: training moved the parameters, and the processes drew different noise on different data
    Session(tiny(), device=torch.device("cpu"))  # the initialisation: same seed
    initial = {k: v.detach() for k, v in pyro.get_param_store().named_parameters()}
    assert sorted(initial) == sorted(saved)
    moved = {k: not torch.allclose(saved[k], v, atol=1e-3) for k, v in initial.items()}
    assert all(moved.values()), moved
    assert len(rank0["losses"]) == len(rank1["losses"]) == STEPS
    assert all(a != b for a, b in zip(rank0["losses"], rank1["losses"]))
    state = load_checkpoint(run / CHECKPOINT_FILE)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert len(state["history"]) == 2 and state["step"] == STEPS


def test_noise_free_run_equals_single_process_run_with_the_same_global_batch(tmp_path, capsys):
    # With the noise-free estimator, averaging the gradients of 2 half batches is the gradient of the global batch:
    # the 2-process run must equal a single-process run with batch 20 to float tolerance (rtol 1e-5, atol 1e-6),
    # and differ from one with batch 10.
    assert main(["fit", *TINY_ARGS, "--estimator", "mean", "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    printed = capsys.readouterr().out
    assert "2 processes" in printed and str(tmp_path / "two") in printed
    fit(tiny(estimator="mean"), tmp_path / "one", progress=False)
    fit(tiny(estimator="mean", batch_size=10), tmp_path / "half", progress=False)
    two, one, half = (_params(tmp_path / name) for name in ("two", "one", "half"))
    for name, value in one.items():
        assert torch.allclose(two[name], value, rtol=1e-5, atol=1e-6), (name, (two[name] - value).abs().max())
    assert any(not torch.allclose(half[name], value, rtol=1e-5, atol=1e-6) for name, value in one.items())
    # the epoch's metrics are reduced over the processes: the same as the single process's
    h2 = load_checkpoint(tmp_path / "two" / CHECKPOINT_FILE)["history"]
    h1 = load_checkpoint(tmp_path / "one" / CHECKPOINT_FILE)["history"]
    for r2, r1 in zip(h2, h1):
        for key in ("loss", "elbo", "expected_log_lik", "kl", "train_acc", "test_error", "sparsity", "step"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), key


def test_padding_counts_each_example_once(tmp_path):
    # N = 7 does not divide among 2 processes: the last global minibatch holds example 7 and a repeat of example 1
    # (DistributedSampler's padding). The padding is masked out and the real example weighted N/1, so the noise-free
    # 2-process run equals the single-process run (whose last minibatch holds example 7 alone).
    config = tiny(estimator="mean", train_subset=7, batch_size=2, epochs=3, kl_warmup=0)
    launch(fit, config, tmp_path / "two", nproc=2, threads=1, progress=False)
    fit(config, tmp_path / "one", progress=False)
    two, one = _params(tmp_path / "two"), _params(tmp_path / "one")
    for name, value in one.items():
        assert torch.allclose(two[name], value, rtol=1e-5, atol=1e-6), (name, (two[name] - value).abs().max())
    h2 = load_checkpoint(tmp_path / "two" / CHECKPOINT_FILE)["history"]
    h1 = load_checkpoint(tmp_path / "one" / CHECKPOINT_FILE)["history"]
    for r2, r1 in zip(h2, h1):
        for key in ("loss", "elbo", "expected_log_lik", "train_acc", "step"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), key


def test_resume_continues_exactly(lrt_run, tmp_path):
    full, _, _ = lrt_run
    cut = tmp_path / "cut"
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="Interrupt"):
        launch(fit, tiny(), cut, nproc=2, threads=1, progress=False, callback=_Record(tmp_path, stop_at=15))
    assert load_checkpoint(cut / CHECKPOINT_FILE)["epoch"] == 1
    assert main(["fit", "--resume", "--out", str(cut), "--nproc", "2", "--threads", "1", "--no-progress"]) == 0
    a, b = _params(full), _params(cut)
    for name, value in a.items():
        assert torch.equal(b[name], value), name


def test_resume_needs_the_same_number_of_processes(lrt_run, tmp_path, capsys):
    run, _, _ = lrt_run
    with pytest.raises(RunError, match="written by a run in 2 process.*resume it with --nproc 2"):
        fit(None, run, resume=True, progress=False)
    single = tmp_path / "single"
    fit(tiny(epochs=1), single, progress=False)
    before = {p.name: p.read_bytes() for p in single.iterdir() if p.name != LOCK_FILE}
    # the error is raised in the processes, reported once by the command
    assert main(["fit", "--resume", "--out", str(single), "--nproc", "2", "--threads", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "in 1 process(es), and this one has 2: resume it with --nproc 1" in err
    assert {p.name: p.read_bytes() for p in single.iterdir() if p.name != LOCK_FILE} == before


def test_batch_size_must_divide_among_processes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", *TINY_ARGS, "--batch-size", "25", "--nproc", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 25" in err and "--nproc 2" in err and "divisible by 2" in err
    assert not out.exists()


def _fails_in_process_1():
    if dist.get_rank() == 1:
        raise RunError("process 1 cannot go on")
    dist.barrier()  # process 0 waits for a process that is gone


def test_an_error_in_one_process_stops_the_others():
    start = time.perf_counter()
    with pytest.raises(RunError, match="process 1 cannot go on"):
        launch(_fails_in_process_1, nproc=2, threads=1, timeout=timedelta(seconds=60))
    assert time.perf_counter() - start < 30  # not the collective's timeout


def test_nproc_under_torchrun_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["fit", *TINY_ARGS, "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_process_group_needs_the_launcher_variables(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunError, match="MASTER_ADDR, MASTER_PORT, WORLD_SIZE are not set: start the processes with"):
        with process_group():
            pass
    assert not dist.is_initialized()


class _NotPlainData:
    pass


def _returns_an_object():
    return _NotPlainData()


def test_launch_returns_plain_data_only():
    # the result comes back through torch.load(weights_only=True): an object is refused, not unpickled
    with pytest.raises(TypeError, match="is not plain data"):
        launch(_returns_an_object, nproc=2, threads=1)
