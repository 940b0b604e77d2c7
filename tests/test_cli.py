# SPDX-License-Identifier: Apache-2.0
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pyro_vdrop.cli import main
from pyro_vdrop.nn import compress, count_parameters, layer_widths, load_compressed, prune
from pyro_vdrop.train import CHECKPOINT_FILE, LOCK_FILE, load_checkpoint, open_run, save_checkpoint

TINY = ["--model", "mlp", "--width", "16", "--train-subset", "120", "--test-subset", "60", "--batch-size", "40"]
TINY += ["--kl-warmup", "1", "--pretrain-epochs", "0", "--no-progress"]


def _files(folder):
    # the lock file records the last process that tried to write the run: not part of the run
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != LOCK_FILE} if folder.exists() else {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["fit", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_fit_writes_run_and_prints_summary(run_dir, capsys):
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["model"] == "mlp" and record["config"]["width"] == 16
    assert record["command"].startswith("pyro-vdrop fit --model mlp")
    assert {"torch", "pyro", "python", "platform"} <= set(record["environment"])
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["test_error_pruned"] == metrics[-1]["test_error_pruned"]

    out = tmp = run_dir.parent / "again"
    assert main(["fit", *TINY, "--epochs", "1", "--out", str(tmp)]) == 0
    printed = capsys.readouterr().out
    assert "test error (pruned)" in printed and "compression" in printed and str(out) in printed


@pytest.mark.parametrize("guide,threshold", [("group", "3"), ("sbp", "0")])
def test_fit_group_guides_print_units_kept(guide, threshold, tmp_path, capsys):
    out = tmp_path / guide
    assert main(["fit", *TINY, "--guide", guide, "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{guide} guide" in printed and f"log α > {threshold} removed" in printed
    assert "input units kept" in printed and "/784" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == float(threshold)
    units = summary["units"]
    assert list(units) == ["fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight"]
    assert units["fc1.weight"]["inputs"] == units["fc1.weight"]["groups"] == 784
    # evaluate, report and export prune at the guide's threshold unless told otherwise
    assert main(["evaluate", "--run", str(out), "--num-samples", "2"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["threshold"] == float(threshold)
    capsys.readouterr()
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "net.pt")]) == 0
    assert f"log α > {threshold} pruned" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(out), "--num-samples", "2", "--threshold", "5"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["threshold"] == 5.0


def test_sbp_needs_the_local_reparameterization(tmp_path, capsys):
    argv = ["fit", *TINY, "--guide", "sbp", "--estimator", "single-sample", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "local reparameterization" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["fit", "--epochs", "0"], "--epochs: expected a positive integer"),
        (["fit", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["fit", "--dropout-p", "1.5"], "--dropout-p: expected a number in (0, 1)"),
        (["fit", "--lr", "-1"], "--lr: expected a number in (0, ∞)"),
        (["evaluate"], "the following arguments are required: --run"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_fit_init_log_alpha(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", *TINY, "--guide", "B", "--init-log-alpha", "-1.5", "--epochs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["init_log_alpha"] == -1.5
    code = main(["fit", *TINY, "--init-log-alpha", "0", "--out", str(tmp_path / "sparse")])
    assert code == 2 and "init_log_alpha applies to the guides that learn log α directly (A, A2, B)" in (
        capsys.readouterr().err
    )


def test_data_dir_needs_mnist(tmp_path, capsys):
    assert main(["fit", *TINY, "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "data_dir applies to dataset='mnist' only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_mnist_files(tmp_path, capsys):
    code = main(["fit", *TINY, "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot load the 'mnist' train data" in err and str(tmp_path) in err
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(run_dir, capsys):
    before = _files(run_dir)
    assert main(["fit", *TINY, "--epochs", "2", "--out", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["fit", "--resume", "--model", "lenet300", "--out", str(run_dir), "--no-progress"]) == 2
    assert "trained with another configuration: model='lenet300' (run has 'mlp')" in capsys.readouterr().err
    assert main(["fit", "--resume", "--overwrite", "--out", str(run_dir)]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["fit", "--resume", "--data-dir", str(run_dir), "--out", str(run_dir)]) == 2
    assert "data_dir applies to dataset='mnist' only" in capsys.readouterr().err
    assert _files(run_dir) == before


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    assert main(["fit", "--resume", "--out", str(tmp_path)]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    assert main(["fit", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_evaluate_and_report_errors(tmp_path, run_dir, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    # a run directory whose checkpoint belongs to another model
    state = load_checkpoint(run_dir / CHECKPOINT_FILE)
    state["config"]["width"] = 32
    save_checkpoint(tmp_path / CHECKPOINT_FILE, state)
    (tmp_path / "config.json").write_text(json.dumps({"config": state["config"]}))
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "does not fit the model built from its configuration" in capsys.readouterr().err
    assert not (tmp_path / "evaluation.json").exists()


def test_evaluate(run_dir, capsys):
    assert main(["evaluate", "--run", str(run_dir), "--num-samples", "3"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["num_samples"] == 3 and result["num_test"] == 60
    assert f"{100 * result['test_error_mc']:.2f} %" in printed


def test_report(run_dir, capsys):
    pytest.importorskip("matplotlib")
    assert main(["report", "--run", str(run_dir), "--max-units", "9"]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (run_dir / "report.md").read_text()
    for name in ("log_alpha_hist.png", "curves.png", "first_layer_masks.png", "input_mask.png"):
        assert name in text
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    # the units kept per layer are those of the exported network
    session, _ = open_run(run_dir)
    kept = layer_widths(compress(prune(session.model, session.guide)))
    assert "| `input` | 784 |" in text and "| `fc1` | 16 |" in text
    assert f"784-16-16-16-10 → {'-'.join(map(str, kept))}" in text


def test_report_without_matplotlib(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["report", "--run", str(run_dir)]) == 2
    assert "pip install 'pyro-vdrop[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["3", "-3"])
def test_export(run_dir, tmp_path, capsys, threshold):
    out = tmp_path / "model.pt"
    before = _files(run_dir)
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--threshold", threshold]) == 0
    printed = capsys.readouterr().out
    assert _files(run_dir) == before  # the run is only read
    session, _ = open_run(run_dir)
    masked = prune(session.model, session.guide, threshold=float(threshold)).eval()
    exported = load_compressed(out)
    x = session.x_test
    with torch.no_grad():
        assert torch.allclose(exported(x), masked(x), atol=1e-5)
    widths = layer_widths(exported)
    assert f"784-16-16-16-10  {'-'.join(map(str, widths))}" in printed
    assert f"{count_parameters(exported):,}" in printed and "CPU latency, batch 100" in printed
    assert f"{out.stat().st_size / 1e3:.1f} kB" in printed
    if threshold == "-3":  # most first-layer weights pruned: inputs go
        assert count_parameters(exported) < count_parameters(masked)
    assert torch.load(out, weights_only=True)["format"] == "pyro-vdrop-compressed"

    sparse = tmp_path / "sparse.pt"
    assert main(["export", "--run", str(run_dir), "--out", str(sparse), "--sparse", "--threshold", threshold]) == 0
    capsys.readouterr()
    with torch.no_grad():
        assert torch.equal(load_compressed(sparse)(x), exported(x))
    if threshold == "-3":
        assert sparse.stat().st_size < out.stat().st_size


def test_export_errors(run_dir, tmp_path, capsys):
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "no" / "model.pt")]) == 2
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "no such directory" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()
    with pytest.raises(SystemExit):
        main(["export", "--run", str(run_dir)])
    assert "--out" in capsys.readouterr().err


def test_killed_process_resumes_to_the_same_parameters(tmp_path):
    # Train in a subprocess that is SIGKILLed in the middle of epoch 3 (no cleanup runs), resume it with the
    # command line, and compare with an uninterrupted run of the same seed.
    argv = [*TINY, "--epochs", "4", "--seed", "3"]
    killed = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pyro_vdrop import cli, train

        def kill(info):
            if info["step"] == 7:
                os.kill(os.getpid(), signal.SIGKILL)

        train.fit = lambda *args, fit=train.fit, **kwargs: fit(*args, **kwargs, callback=kill)
        cli.main(["fit", *{argv!r}, "--out", {str(killed)!r}])
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(killed / CHECKPOINT_FILE)["epoch"] == 2
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]

    assert main(["fit", "--resume", "--out", str(killed), "--no-progress"]) == 0
    assert main(["fit", *argv, "--out", str(tmp_path / "full")]) == 0
    a = load_checkpoint(killed / CHECKPOINT_FILE)
    b = load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE)
    assert a["epoch"] == b["epoch"] == 4
    for name, value in b["param_store"]["params"].items():
        assert torch.allclose(a["param_store"]["params"][name], value, rtol=0, atol=1e-6), name


def test_fit_options_come_from_train_config():
    # one option per TrainConfig field, with its choices, and the same validation as TrainConfig's
    import argparse
    import dataclasses

    from pyro_vdrop.cli import build_parser
    from pyro_vdrop.train import TrainConfig

    parser = build_parser()
    fit = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    options = {action.dest: action for action in fit._actions}
    for field in dataclasses.fields(TrainConfig):
        action = options[field.name]
        assert action.default is None, field.name  # given options are told from defaults
        assert tuple(action.choices or ()) == tuple(field.metadata["choices"] or ()), field.name
        if field.metadata["kind"] is not None:
            bad = "nan" if field.metadata["kind"] == "finite_number" else "-1"  # a log α threshold may be negative
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(bad)
            with pytest.raises(ValueError, match=f"{field.name} must be"):
                TrainConfig(**{field.name: float(bad) if bad == "nan" else -1})


def test_fit_takes_the_data_sets_recipe_where_no_option_is_given(monkeypatch, tmp_path):
    # `--dataset mnist` trains with RECIPES["mnist"]; given options win; other guides do not get train_clip
    import pyro_vdrop.train as train
    from pyro_vdrop.train import RECIPES, RunError, TrainConfig

    seen = []

    def fake_fit(config, out, **kwargs):
        seen.append(config)
        raise RunError("stopped by the test")

    monkeypatch.setattr(train, "fit", fake_fit)
    out = str(tmp_path / "run")
    assert main(["fit", "--dataset", "mnist", "--out", out]) == 2
    assert main(["fit", "--dataset", "mnist", "--epochs", "3", "--guide", "B", "--out", out]) == 2
    assert main(["fit", "--out", out]) == 2
    recipe, override, embedded = seen
    assert {k: getattr(recipe, k) for k in RECIPES["mnist"]} == RECIPES["mnist"]
    assert override.epochs == 3 and override.guide == "B" and override.train_clip is None
    assert override.lr == RECIPES["mnist"]["lr"]
    assert embedded == TrainConfig()
    with pytest.raises(ValueError, match="dataset must be one of"):
        TrainConfig.for_dataset("cifar")
