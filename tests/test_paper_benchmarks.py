# SPDX-License-Identifier: Apache-2.0
"""Quick modes of the paper-reproduction scripts (tiny data, seconds): Table 1, Fig. 1a, sparse VD, the README
table and the driver; their resumption after an interruption."""

import json
import math
from pathlib import Path

import pyro
import pytest
import torch

from benchmarks import fig1a, paper_table, reproduce, sparse_ablation, sparse_lenet300, table1
from benchmarks.grad_variance import make_model
from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.infer.gradient_variance import gradient_variance
from pyro_vdrop.poutine import local_reparam

TABLE1 = [
    "--dataset",
    "embedded",
    "--width",
    "8",
    "--epochs",
    "1",
    "2",
    "--measure-batch",
    "40",
    "20",
    "--chunk",
    "20",
    "--draws",
    "3",
    "--train-size",
    "200",
]


def test_table1_trains_and_measures_on_the_device(tmp_path, device):
    args = TABLE1[: TABLE1.index("--epochs")] + ["--epochs", "1", "--measure-batch", "40", "--chunk", "20"]
    args += ["--draws", "2", "--train-size", "200", "--device", device.type]
    record = table1.main(args + ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "t.json")])
    assert record["complete"] and record["protocol"]["device"].startswith(device.type)
    row = record["points"]["1"]["variances"]["M40"]
    assert row["lrt"]["fixed_batch"]["top"] > 0 and row["no noise"]["fixed_batch"]["top"] == 0.0


def _variances(record):
    """The measured variances, without the seconds they took."""
    return {
        p: {m: {e: {k: v for k, v in r.items() if k != "seconds"} for e, r in row.items()} for m, row in pt.items()}
        for p, point in record["points"].items()
        for pt in [point["variances"]]
    }


def test_table1_quick_record_and_exact_resume(tmp_path):
    full = table1.main(TABLE1 + ["--run-dir", str(tmp_path / "a"), "--out", str(tmp_path / "a.json")])
    assert full["complete"] and sorted(full["points"]) == ["1", "2"]
    point = full["points"]["2"]
    assert set(point["variances"]) == {"M40", "M20"}
    for row in point["variances"].values():
        assert set(row) == set(table1.GRADIENT_ESTIMATORS)
        for est, r in row.items():
            for kind in ("fixed_batch", "random_batches"):
                assert r[kind]["top"] >= 0 and r[kind]["bottom"] >= 0
            if est != "no noise":
                assert r["fixed_batch"]["top"] > 0
        assert row["no noise"]["fixed_batch"] == {"top": 0.0, "bottom": 0.0}  # no noise on one batch: no variance
    assert set(point["mean_log_alpha"]) == {"w0", "w1", "w2", "w3"}
    assert point["command"].startswith("python -m benchmarks.table1 --dataset embedded")
    assert json.loads((tmp_path / "a.json").read_text())["points"].keys() == {"1", "2"}

    # interrupted after the first measurement point, then rerun: the record continues, with the same numbers
    args = TABLE1 + ["--run-dir", str(tmp_path / "b"), "--out", str(tmp_path / "b.json")]
    first = table1.main(args + ["--stop-after", "1"])
    assert list(first["points"]) == ["1"] and not first["complete"]
    assert list(json.loads((tmp_path / "b.json").read_text())["points"]) == ["1"]
    resumed = table1.main(args)
    assert resumed["complete"]
    assert _variances(resumed) == _variances(full)

    other = list(args)
    other[other.index("--draws") + 1] = "4"
    with pytest.raises(SystemExit, match="other options"):  # a resumed run must keep its options
        table1.main(other)


def _tiny_vd(seed=0, width=8, n=200):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.randn(n, 12)
    y = torch.randint(0, 10, (n,))
    model = make_model((12, width, 10), n)
    guide = AutoVariationalDropout(model, init_log_alpha=-1.0)
    with local_reparam():
        guide(x[:10], y[:10])
    return model, guide, x, y


def test_chunked_gradient_variance_is_the_minibatch_gradient():
    model, guide, x, y = _tiny_vd()
    params = sorted(k for k in pyro.get_param_store().keys() if "loc" in k)
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 200, 40)]
    elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=1)
    # no noise: the chunked gradient is exactly the minibatch's, so the variances over batches agree
    full = gradient_variance(model, guide, params=params, estimator="no noise", num_draws=5, batches=batches, elbo=elbo)
    chunked = table1.chunked_gradient_variance(
        model, guide, batches, params=params, estimator="no noise", num_draws=5, chunk=15, elbo=elbo
    )
    for p in params:
        assert full[p]["variance"] > 0
        assert chunked[p]["variance"] == pytest.approx(full[p]["variance"], rel=1e-4)
        assert chunked[p]["mean_sq"] == pytest.approx(full[p]["mean_sq"], rel=1e-4)
    # per-example weights: the same distribution of gradients, so the same variance up to Monte Carlo error
    # (400 draws: the relative standard error of a mean over the weights' variances is a few per cent)
    fixed = [batches[0]]
    torch.manual_seed(1)
    full = gradient_variance(
        model, guide, params=params, estimator="per-example weights", num_draws=400, batches=fixed, elbo=elbo
    )
    torch.manual_seed(2)
    chunked = table1.chunked_gradient_variance(
        model, guide, fixed, params=params, estimator="per-example weights", num_draws=400, chunk=10, elbo=elbo
    )
    for p in params:
        assert chunked[p]["variance"] == pytest.approx(full[p]["variance"], rel=0.15)
    with pytest.raises(ValueError, match="shares noise"):
        table1.chunked_gradient_variance(
            model, guide, fixed, params=params, estimator="single weight sample", num_draws=2, chunk=10, elbo=elbo
        )


FIG1A = ["--dataset", "embedded", "--train-subset", "200", "--test-subset", "100", "--epochs", "2", "--no-progress"]


def test_fig1a_quick_grid_skips_done_cells(tmp_path, capsys):
    args = FIG1A + ["--widths", "8", "--methods", "bernoulli", "B", "--results", str(tmp_path / "res")]
    args += ["--run-root", str(tmp_path / "runs")]
    assert fig1a.main(args) == 0
    for method in ("bernoulli", "B"):
        record = json.loads((tmp_path / "res" / "fig1a" / f"w8-{method}-2ep-embedded.json").read_text())
        assert (record["width"], record["method"], record["epochs"]) == (8, method, 2)
        assert [m["epoch"] for m in record["metrics"]] == [1, 2]  # the learning curve
        assert 0 <= record["test_error"] <= 1
        assert record["command"].startswith("python -m benchmarks.fig1a")
        # variational dropout starts at the Gaussian dropout of p = 0.5: log α = 0
        assert record["config"]["init_log_alpha"] == (0.0 if method == "B" else None)
    # where α ended, per weight site, read back from the run: B's log α has one value per weight, capped at 0
    b_path = tmp_path / "res" / "fig1a" / "w8-B-2ep-embedded.json"
    learned = json.loads(b_path.read_text())["log_alpha"]
    session, _ = fig1a.open_run(tmp_path / "runs" / "fig1a-2ep-embedded" / "w8-B")
    expected = session.guide.log_alpha()
    assert set(learned) == set(expected) and len(learned) == 4
    for name, entry in learned.items():
        assert entry["cap"] == 0.0
        assert entry["mean"] == pytest.approx(expected[name].mean().item(), abs=1e-6) and entry["mean"] <= 0.0
        assert entry["at_cap"] == pytest.approx((expected[name] >= -1e-3).double().mean().item())
    # a record written before the record kept α gets it when the grid passes by
    record = json.loads(b_path.read_text())
    del record["log_alpha"]
    b_path.write_text(json.dumps(record))
    capsys.readouterr()
    assert fig1a.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("exists, skipped") == 2 and out.count("added the learned α") == 1
    assert json.loads(b_path.read_text())["log_alpha"] == learned
    pytest.importorskip("matplotlib")
    assert fig1a.main(args + ["--plot"]) == 0
    assert (tmp_path / "res" / "fig1a-2ep-embedded.png").stat().st_size > 1000
    assert (tmp_path / "res" / "fig1a-2ep-embedded-curves.png").stat().st_size > 1000


def test_fig1a_init_log_alpha_follows_p_unless_given():
    def config(*argv):
        parser_args = fig1a.argparse.Namespace(
            dataset="embedded", data_dir=None, train_subset=None, test_subset=None, epochs=1, batch_size=100,
            lr=1e-3, kl_warmup=0.0, seed=0, device="cpu", p=0.5, init_log_alpha=None,
        )  # fmt: skip
        for flag, value in zip(argv[::2], argv[1::2]):
            setattr(parser_args, flag, value)
        return fig1a.config_for(fig1a.resolve_init_log_alpha(parser_args), 8, "A")

    assert config().init_log_alpha == 0.0
    assert config("p", 0.2).init_log_alpha == pytest.approx(math.log(0.25))
    assert config("p", 0.2, "init_log_alpha", -3.0).init_log_alpha == -3.0


def test_fig1a_cell_argv_narrows_the_grid_to_one_cell():
    argv = ["--widths", "100", "500", "--epochs", "3", "--methods", "A", "B", "--jobs=4", "--device", "cuda"]
    assert fig1a.cell_argv(argv, 500, "B") == [
        "--epochs", "3", "--device", "cuda", "--widths", "500", "--methods", "B", "--jobs", "1",
    ]  # fmt: skip


def test_fig1a_parallel_cells_match_sequential_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = FIG1A + ["--widths", "8", "--methods", "bernoulli", "A"]
    assert fig1a.main(base + ["--results", str(tmp_path / "seq"), "--run-root", str(tmp_path / "r1")]) == 0
    par = base + ["--results", str(tmp_path / "par"), "--run-root", str(tmp_path / "r2"), "--jobs", "2"]
    assert fig1a.main(par) == 0
    out = capsys.readouterr().out
    assert out.count("started (log") == 2
    for method in ("bernoulli", "A"):
        name = f"w8-{method}-2ep-embedded.json"
        seq = json.loads((tmp_path / "seq" / "fig1a" / name).read_text())
        got = json.loads((tmp_path / "par" / "fig1a" / name).read_text())
        assert got["test_error"] == seq["test_error"]  # same seed, same cell: the same run
        assert "--jobs 1" in got["command"] and "--widths 8 --methods " + method in got["command"]
        assert (tmp_path / "r2" / "fig1a-2ep-embedded" / f"w8-{method}.log").is_file()
    assert fig1a.main(par + ["--widths", "8", "--methods", "B", "--epochs", "0"]) == 1  # a failing cell is reported
    assert "1 cell(s) failed: w8-B" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="reads the process table from /proc (Linux)")
def test_fig1a_sigterm_stops_the_cells_too(tmp_path):
    # killing the grid (SIGTERM, as `kill` or a job scheduler sends) must not leave its cells training on
    import signal
    import subprocess
    import sys
    import time

    root = Path(fig1a.__file__).resolve().parents[1]
    run_root = tmp_path / "runs"
    argv = [*FIG1A[:-3], "--epochs", "50", "--widths", "8", "--methods", "A", "B", "--jobs", "2"]
    argv += ["--run-root", str(run_root), "--results", str(tmp_path / "res"), "--no-progress"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    grid = subprocess.Popen([sys.executable, "-m", "benchmarks.fig1a", *argv], cwd=root, env=env)

    def cells():  # the processes, other than the grid, whose command line names this test's run root
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            if str(run_root).encode() in cmdline and int(proc.name) != grid.pid:
                found.append(int(proc.name))
        return found

    deadline = time.monotonic() + 60
    while len(cells()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(cells()) == 2, "the two cells did not start"
    grid.send_signal(signal.SIGTERM)
    grid.wait(timeout=60)
    assert cells() == []


def test_fig1a_bernoulli_resumes_exactly(tmp_path, monkeypatch):
    args = fig1a.argparse.Namespace(
        dataset="embedded", data_dir=None, train_subset=200, test_subset=100, p=0.5, epochs=3, batch_size=50,
        lr=1e-3, kl_warmup=0.0, seed=0, device="cpu",
    )  # fmt: skip
    config = fig1a.config_for(args, 8, "bernoulli")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = fig1a.train_bernoulli(config, tmp_path / "a", progress=False)

    save = fig1a.save_state
    calls = []

    def interrupted(path, state):
        save(path, state)
        calls.append(state["epoch"])
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(fig1a, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fig1a.train_bernoulli(config, tmp_path / "b", progress=False)
    monkeypatch.setattr(fig1a, "save_state", save)
    resumed = fig1a.train_bernoulli(config, tmp_path / "b", progress=False)
    strip = [{k: v for k, v in m.items() if k != "epoch_time"} for m in full["metrics"]]
    assert [{k: v for k, v in m.items() if k != "epoch_time"} for m in resumed["metrics"]] == strip


def test_fig1a_bernoulli_inputs_drops_the_pixels_too(tmp_path, capsys):
    args = FIG1A + ["--widths", "8", "--methods", "bernoulli", "bernoulli-inputs", "--results", str(tmp_path / "res")]
    assert fig1a.main(args + ["--run-root", str(tmp_path / "runs")]) == 0
    nets = {}
    for method in ("bernoulli", "bernoulli-inputs"):
        record = json.loads((tmp_path / "res" / "fig1a" / f"w8-{method}-2ep-embedded.json").read_text())
        assert record["method"] == method and record["label"] == fig1a.LABELS[method]
        state = fig1a.load_state(tmp_path / "runs" / "fig1a-2ep-embedded" / f"w8-{method}" / "bernoulli.pt")
        nets[method] = state["net"]
    # a dropout module before the first linear layer shifts every layer's index in the Sequential by one
    shifted = {k.replace(k.split(".")[0], str(int(k.split(".")[0]) + 1), 1): v for k, v in nets["bernoulli"].items()}
    assert shifted.keys() == nets["bernoulli-inputs"].keys()
    assert "Bernoulli dropout p=0.5, inputs too" in capsys.readouterr().out  # the table has the extra row


SPARSE = ["--dataset", "embedded", "--train-subset", "200", "--test-subset", "100", "--num-samples", "2"]
SPARSE += ["--epochs", "2", "--pretrain-epochs", "1", "--kl-warmup-start", "0", "--kl-warmup", "1", "--threads", "1"]


def test_sparse_lenet5_quick_resumes(tmp_path, monkeypatch):
    args = ["--model", "lenet5", *SPARSE, "--out", str(tmp_path / "run"), "--results", str(tmp_path / "res")]

    def stop_in_epoch_2(name):
        def callback(info):
            if info["epoch"] >= 1:
                raise KeyboardInterrupt

        return callback

    monkeypatch.setattr(sparse_lenet300, "epoch_logger", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        sparse_lenet300.main(args)
    assert not (tmp_path / "res").exists()
    monkeypatch.undo()
    record = sparse_lenet300.main(args)
    assert record["resumed"] and record["benchmark"] == "sparse_lenet5"
    assert [m["epoch"] for m in record["metrics"]] == [1, 2]
    assert record["paper"] == {"test_error": 0.0075, "compression": 280.0, "epochs": 200, "sparsity": 0.9964}
    assert (tmp_path / "res" / "sparse_lenet5-2ep-embedded.json").is_file()
    assert record["figures"]["compression"] >= 1


def test_sparse_seed_runs_have_their_own_run_folder_and_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*SPARSE, "--epochs", "1", "--pretrain-epochs", "0", "--results", "res", "--no-progress"]
    first = sparse_lenet300.main(args)
    other = sparse_lenet300.main([*args, "--seed", "1"])
    assert not other["resumed"] and other["config"]["seed"] == 1
    assert other["run_dir"] == str(Path("runs/benchmarks/sparse_lenet300-1ep-embedded-seed1"))
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "sparse_lenet300-1ep-embedded-seed1.json",
        "sparse_lenet300-1ep-embedded.json",
    ]
    assert json.loads((tmp_path / "res" / "sparse_lenet300-1ep-embedded.json").read_text())["config"]["seed"] == 0
    assert first["run_dir"] == str(Path("runs/benchmarks/sparse_lenet300-1ep-embedded"))


def test_sparse_ablation_records_each_variant_and_skips_done_ones(tmp_path, capsys):
    args = ["--dataset", "embedded", "--epochs", "1", "--train-subset", "200", "--test-subset", "100"]
    args += ["--run-root", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    record = sparse_ablation.main([*args, "--only", "baseline,hold-linear+train-clip"])
    variants = record["variants"]
    assert list(variants) == ["baseline", "hold-linear+train-clip"]
    assert variants["baseline"]["config"]["train_clip"] is None
    assert variants["hold-linear+train-clip"]["config"]["train_clip"] == 3.0
    assert variants["hold-linear+train-clip"]["config"]["lr_decay"] == "hold-linear"
    assert [m["epoch"] for m in variants["baseline"]["metrics"]] == [1]
    path = tmp_path / "res" / "sparse_ablation-lenet300-1ep-embedded.json"
    assert json.loads(path.read_text())["variants"].keys() == variants.keys()
    capsys.readouterr()
    sparse_ablation.main([*args, "--only", "baseline"])  # done: skipped, not retrained
    assert "baseline: in" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sparse_ablation.main([*args, "--only", "cosine"])


def _table1_record(width, top10, lrt10):
    variances = {
        est: {"random_batches": {"top": 1.0, "bottom": 1.0}, "fixed_batch": {"top": 1.0, "bottom": 1.0}}
        for est in table1.GRADIENT_ESTIMATORS
    }
    variances["single weight sample"]["random_batches"] = {"top": top10, "bottom": 3.0}
    variances["lrt"]["random_batches"] = {"top": lrt10, "bottom": 2.0}
    return {
        "command": f"python -m benchmarks.table1 --width {width}",
        "protocol": {"width": width, "measure_batch": [1000]},
        "points": {"10": {"variances": {"M1000": variances}, "mean_log_alpha": {"w0": -0.5, "w3": -1.25}}},
        "complete": False,
    }


def test_paper_table_from_synthetic_records(tmp_path):
    res = tmp_path / "results"
    (res / "fig1a").mkdir(parents=True)
    # the widest Table 1 record is used
    (res / "table1-w100.json").write_text(json.dumps(_table1_record(100, 9.0, 1.0)))
    (res / "table1-w500.json").write_text(json.dumps(_table1_record(500, 4.9e4, 7.8e3)))
    # each width's verdict from its longest training with both kinds of cell: w100 at 50 epochs (its 10-epoch cells
    # say the opposite), w500 at 10 epochs (its 50-epoch run has no baseline)
    for width, epochs, method, err in (
        (100, 50, "A", 0.0141),
        (100, 50, "bernoulli", 0.0152),
        (100, 50, "gaussian-dropout", 0.0161),
        (100, 10, "A", 0.0300),
        (100, 10, "bernoulli", 0.0200),
        (500, 10, "B", 0.0170),
        (500, 10, "bernoulli", 0.0160),
        (500, 50, "B", 0.0120),
    ):
        cell = {
            "width": width,
            "method": method,
            "epochs": epochs,
            "test_error": err,
            "command": f"python -m benchmarks.fig1a --epochs {epochs}",
        }
        (res / "fig1a" / f"w{width}-{method}-{epochs}ep.json").write_text(json.dumps(cell))
    sparse = {
        "command": "python -m benchmarks.sparse_lenet300 --epochs 20",
        "config": {"epochs": 20},
        "figures": {"test_error_pruned": 0.0184, "compression": 70.4},
    }
    (res / "sparse_lenet300-20ep.json").write_text(json.dumps(sparse))
    rows = {r["claim"]: r for r in paper_table.rows(res)}
    t10 = rows["Table 1: single-sample / LRT gradient variance, 10 epochs (M = 1000)"]
    assert t10["ours"].startswith("6.3× top, 1.5× bottom at M = 1000 (width 500; mean log α -0.5, -1.2")
    assert t10["record"] == "`results/table1-w500.json`"
    assert rows["Table 1: single-sample / LRT gradient variance, 100 epochs (M = 1000)"]["ours"] == "not run"
    # a row comes from the widest record that has its point: here the 100-epoch point of a CUDA record
    cuda = _table1_record(500, 3.6e3, 1e3)
    cuda["points"] = {"100": cuda["points"]["10"]}
    cuda["command"] += " --device cuda"
    (res / "table1-w500-cuda.json").write_text(json.dumps(cuda))
    rows = {r["claim"]: r for r in paper_table.rows(res)}
    t100 = rows["Table 1: single-sample / LRT gradient variance, 100 epochs (M = 1000)"]
    assert t100["ours"].startswith("3.6× top") and t100["record"] == "`results/table1-w500-cuda.json`"
    assert t100["command"].endswith("--device cuda")
    assert rows["Table 1: single-sample / LRT gradient variance, 10 epochs (M = 1000)"] == t10
    assert rows["Fig. 1a: variational dropout A at 100 units"]["ours"] == "1.41 % (50 epochs)"
    assert rows["Fig. 1a: variational dropout A2 at 1250 units"]["ours"] == "not run"
    beats = rows["Fig. 1a: variational dropout matches or beats Bernoulli and Gaussian dropout"]
    assert beats["ours"] == (
        "w100: yes (1.41 vs 1.52 %, 50 epochs); w500: no (1.70 vs 1.60 %, no gaussian-dropout run, 10 epochs)"
    )
    assert beats["command"] == "python -m benchmarks.fig1a --epochs 50; python -m benchmarks.fig1a --epochs 10"
    assert beats["record"] == "`results/fig1a/w100-*-50ep.json`, `results/fig1a/w500-*-10ep.json`"
    lenet300 = rows["Sparse VD LeNet-300-100 (Molchanov et al. 2017)"]
    assert (
        lenet300["ours"] == "1.84 % at 70× (20 epochs)" and lenet300["record"] == "`results/sparse_lenet300-20ep.json`"
    )
    lenet5 = rows["Sparse VD LeNet-5-Caffe (Molchanov et al. 2017)"]
    assert lenet5["ours"] == "not run" and "--model lenet5" in lenet5["command"]
    # other seeds of the same run: their spread joins the row; a seed of a shorter run does not
    for seed, err, ratio in ((1, 0.0190, 80.0), (2, 0.0196, 66.2)):
        other = {**sparse, "figures": {"test_error_pruned": err, "compression": ratio}}
        (res / f"sparse_lenet300-20ep-seed{seed}.json").write_text(json.dumps(other))
    (res / "sparse_lenet300-10ep-seed3.json").write_text(json.dumps({**sparse, "config": {"epochs": 10}}))
    lenet300 = {r["claim"]: r for r in paper_table.rows(res)}["Sparse VD LeNet-300-100 (Molchanov et al. 2017)"]
    assert lenet300["ours"] == "1.84 % at 70× (20 epochs); 3 seeds: mean 1.90 % (1.84–1.96 %) at 66–80×"
    assert lenet300["record"] == "`results/sparse_lenet300-20ep.json` and `sparse_lenet300-20ep-seed*.json`"
    for seed in (1, 2):
        (res / f"sparse_lenet300-20ep-seed{seed}.json").unlink()

    readme = tmp_path / "README.md"
    readme.write_text(f"# head\n\n{paper_table.START}\nold\n{paper_table.END}\n\ntail\n")
    assert paper_table.main(["--results", str(res), "--readme", str(readme), "--write-readme"]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("# head\n") and text.endswith("\ntail\n")
    assert "| Sparse VD LeNet-300-100 (Molchanov et al. 2017) | 1.92 % at 68× | 1.84 % at 70× (20 epochs) |" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        paper_table.main(["--results", str(res), "--readme", str(readme), "--write-readme"])


def test_benchmarks_readme_has_the_paper_table_block():
    text = paper_table.README.read_text()
    assert paper_table.START in text and paper_table.END in text


def test_reproduce_runs_resumably(tmp_path, capsys):
    common = ["--quick", "--results", str(tmp_path / "res"), "--run-root", str(tmp_path / "runs")]
    common += ["--log-dir", str(tmp_path / "logs"), "--readme", str(tmp_path / "README.md")]
    readme = tmp_path / "README.md"
    readme.write_text(f"{paper_table.START}\n{paper_table.END}\n")
    assert reproduce.main(common + ["--dry-run", "--device", "cpu", "--fig1a-jobs", "3"]) == 0
    out = capsys.readouterr().out
    for name in reproduce.EXPERIMENTS:
        line = next(line for line in out.splitlines() if f"] {name}: nice -n 10 " in line)
        assert "--device cpu" in line
        assert ("--jobs 3" in line) == (name == "fig1a")
    assert not (tmp_path / "logs").exists()
    assert reproduce.main(common + ["--only", "table1", "--no-estimate"]) == 0
    record = json.loads((tmp_path / "res" / "table1-w16-embedded.json").read_text())
    assert record["complete"]
    log = (tmp_path / "logs" / "table1.log").read_text()
    assert "epoch 1: measured" in log and "epoch 2: measured" in log
    assert "| claim | published | ours | command | record |" in readme.read_text()
    capsys.readouterr()
    assert reproduce.main(common + ["--only", "table1"]) == 0
    assert "table1: record complete, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("script", [table1.parse, sparse_ablation.main])
def test_mnist_scripts_say_where_the_data_must_come_from(script, monkeypatch, capsys):
    monkeypatch.delenv("PYRO_VDROP_MNIST_DIR", raising=False)
    with pytest.raises(SystemExit):
        script(["--dataset", "mnist"])
    assert "give --data-dir or set PYRO_VDROP_MNIST_DIR" in capsys.readouterr().err
    monkeypatch.setenv("PYRO_VDROP_MNIST_DIR", "some/folder")
    assert table1.parse([]).data_dir == "some/folder"
    assert table1.parse(["--dataset", "embedded", "--data-dir", "x"]).data_dir is None


def test_checkpoint_rng_state_resumes_only_on_its_own_kind_of_device():
    from benchmarks.paper import restore_rng_state, rng_state

    cpu = torch.device("cpu")
    state = rng_state(cpu)
    expected = torch.rand(3)
    restore_rng_state(state, cpu)
    assert torch.equal(torch.rand(3), expected)  # the same stream continues
    written_on_cuda = {**state, "cuda_rng": torch.zeros(16, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="written on 'cuda'; resume it with --device cuda or use --restart"):
        restore_rng_state(written_on_cuda, cpu)
    with pytest.raises(ValueError, match="written on 'cpu'; resume it with --device cpu"):
        restore_rng_state(state, torch.device("cuda"))
