# SPDX-License-Identifier: Apache-2.0
"""Smoke test of the benchmark suite (``python -m benchmarks.run``): its quick mode, record schema and helpers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import measure, run, table

ROOT = Path(__file__).resolve().parent.parent


def _finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_step_suite(tmp_path):
    variants = ["deterministic", "torch_lrt", "pyro_vdrop_lrt", "pyro_vdrop_lrt_validated"]
    code = run.main(["--quick", "--only", ",".join(["linear512"] + variants), "--out", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name == "suite_step-cpu-quick-partial.json"
    record = json.loads(path.read_text())
    for key in ("command", "versions", "machine", "settings", "notes", "comparisons"):
        assert key in record
    assert record["command"].startswith("python -m benchmarks.run")
    assert record["versions"]["torch"] == torch.__version__
    for key in ("platform", "cpu_count", "cpu_model", "load_average", "device", "torch", "pyro", "pyro_vdrop"):
        assert key in record["machine"]
    (comparison,) = record["comparisons"]
    assert (comparison["model"], comparison["batch_size"]) == ("linear512", 32)
    rows = {r["variant"]: r for r in comparison["results"]}
    assert set(rows) == set(variants)
    for row in rows.values():
        assert "error" not in row and "memory_error" not in row
        for key in ("median_ms", "p25_ms", "p75_ms", "ratio_to_torch_lrt", "ratio_to_deterministic"):
            assert _finite_positive(row[key]), (row["variant"], key, row[key])
        assert row["steps"] >= 1
        assert row["p25_ms"] <= row["median_ms"] <= row["p75_ms"]
        for key in ("step_peak_mib", "state_mib", "total_peak_mib"):
            assert math.isfinite(row[key]) and row[key] >= 0
        ratio = row["memory_ratio_to_deterministic"]  # None where the deterministic step's peak rounds to 0
        assert ratio is None or ratio == pytest.approx(row["step_peak_mib"] / rows["deterministic"]["step_peak_mib"])
    assert rows["torch_lrt"]["ratio_to_torch_lrt"] == 1.0
    markdown = table.step_markdown(record)
    assert "`pyro_vdrop_lrt`" in markdown and "Quick mode" in markdown


def test_only_rejects_unknown_terms():
    with pytest.raises(ValueError, match="unknown term 'lenet'"):
        run.classify_only(["lenet"])
    assert run.classify_only(["mlp", "torch_lrt"]) == (["step"], ["mlp"], ["torch_lrt"])
    assert run.classify_only(["scaling"])[0] == ["scaling"]


def test_growth_factors():
    points = [{"x": x, "y": {"quadratic": 3.0 * x**2, "linear": 5.0 * x + 0.0}} for x in (2, 4, 8, 16)]
    points[-1]["y"].pop("linear")  # measured over a shorter range
    g = run.growth(points, ["quadratic", "linear"])
    assert g["quadratic"]["factor"] == pytest.approx(64.0)
    assert g["quadratic"]["loglog_slope"] == pytest.approx(2.0)
    assert g["quadratic"]["common_range"] == [2, 8] and g["quadratic"]["common_factor"] == pytest.approx(16.0)
    assert g["linear"]["range"] == [2, 8] and g["linear"]["loglog_slope"] == pytest.approx(1.0)


_PROBE_SCRIPT = """
import json, torch
from benchmarks import measure
from benchmarks.variants import Variant

def build():
    state = torch.ones(16 * 2**18)  # 16 MiB kept between steps

    def step(x, y):
        t = torch.empty(48 * 2**18).fill_(1.0)  # a 48 MiB temporary per step
        return float(t.sum() + state[0])

    return Variant("fake", step), None, None

print(json.dumps(measure.probe_memory_cpu(build, warmup=1, steps=2)))
"""


@pytest.mark.skipif(measure.cpu_memory_supported() is not None, reason="needs Linux /proc/self/clear_refs and fork")
def test_cpu_memory_probe_sees_a_known_allocation():
    # in a fresh process, as in the suite's workers: forking this test process, whose OpenMP pool other tests
    # may have started, could hang the child
    out = subprocess.run(
        [sys.executable, "-c", _PROBE_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    probe = json.loads(out.stdout)
    # the temporary, plus at most a few MiB of interpreter and allocator noise
    assert 48 - 1 <= probe["step_peak_mib"] <= 48 + 4
    assert 16 <= probe["state_mib"] <= 16 + 16


def test_torch_reference_has_the_guides_maths():
    # benchmarks/torch_vd_lrt.py is the reference of the step-time ratios: the same KL (log α capped at 0, as
    # AutoVariationalDropout's default) and the same LRT output moments as pyro-vdrop.
    import pyro
    from torch.distributions import kl_divergence

    import pyro_vdrop
    from benchmarks.torch_vd_lrt import VDLinearLRT

    torch.manual_seed(0)
    layer = VDLinearLRT(5, 3)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-6.0, 3.0, 15).reshape(3, 5))  # some entries above the cap
    pyro.clear_param_store()
    model = pyro_vdrop.nn.bayesianize(torch.nn.Linear(5, 3), num_data=10)
    guide = pyro_vdrop.infer.AutoVariationalDropout(model)
    x = torch.randn(2, 5)
    guide(x, torch.tensor([0, 2]))
    with torch.no_grad():
        guide.locs.weight.copy_(layer.theta)
        guide.log_alphas.weight.copy_(layer.log_alpha)
    q = guide.posterior("weight")
    p = pyro_vdrop.distributions.ImproperLogUniform().expand([3, 5]).to_event(2)
    assert torch.allclose(layer.kl(), kl_divergence(q, p), rtol=1e-6)
    assert not torch.allclose(VDLinearLRT.kl(_uncapped(layer)), layer.kl())  # the cap matters here

    # LRT moments of the reference's output against the closed form with the capped variance (20,000 draws)
    with torch.no_grad():
        draws = torch.stack([layer(x) for _ in range(20000)])
    mean = torch.nn.functional.linear(x, layer.theta, layer.bias)
    var = torch.nn.functional.linear(x * x, q.base_dist.variance.detach())
    assert torch.allclose(draws.mean(0), mean, atol=4 * (var / 20000).sqrt().max().item())
    assert torch.allclose(draws.var(0), var, rtol=0.05)


def _uncapped(layer):
    import copy

    other = copy.deepcopy(layer)
    other.max_log_alpha = None
    return other


def test_uncertainty_quick(tmp_path):
    from benchmarks import uncertainty

    record = uncertainty.main(["--quick", "--out", str(tmp_path / "runs"), "--results", str(tmp_path)])
    assert (tmp_path / "uncertainty-quick.json").is_file()
    for key in ("command", "environment", "configs", "runs", "deterministic"):
        assert key in record
    assert set(record["runs"]) == {"sparse VD", "Gaussian dropout"}
    assert record["deterministic"]["ood"]["shifts"]["uniform-noise"]["auroc_mutual_information"] == 0.5
    for figures in record["runs"].values():
        assert math.isfinite(figures["test_ece_mc"])
        assert 0 <= figures["ood"]["shifts"]["rotated-90"]["auroc_entropy"] <= 1


def test_prediction_kl_quick(tmp_path):
    from benchmarks import prediction_kl

    out = tmp_path / "prediction_kl.json"
    assert prediction_kl.main(["--models", "linear64", "--batch-size", "8", "--repeats", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m benchmarks.prediction_kl")
    (row,) = record["results"]
    assert set(row["ms_per_draw"]) == {"without KL (now)", "with KL (before)"}
    assert all(math.isfinite(v) and v > 0 for v in row["ms_per_draw"].values())


def test_compress_mnist_quick(tmp_path):
    from benchmarks import compress_mnist

    argv = ["--dataset", "embedded", "--train-subset", "300", "--epochs", "1", "--pretrain-epochs", "1"]
    argv += ["--guide", "sparse", "--num-samples", "2", "--run-dir", str(tmp_path / "run"), "--results", str(tmp_path)]
    record = compress_mnist.main(argv + ["--no-progress"])
    assert (tmp_path / "compress-lenet300-sparse-1ep-embedded.json").is_file()
    figures = record["figures"]
    assert figures["dense_units"] == [784, 300, 100]
    assert all(0 < k <= d for k, d in zip(figures["units"], figures["dense_units"]))
    assert figures["test_error_exported"] == figures["test_error_pruned"]
    assert figures["exported_parameters"] <= figures["parameters"]
    assert record["metrics"] and isinstance(record["meets_target"], bool)
    # a second call resumes the finished run instead of training it again
    again = compress_mnist.main(argv + ["--no-progress"])
    assert again["figures"]["units"] == figures["units"]


@pytest.mark.parametrize("name", ["pyro_vdrop_lrt_validated", "pyro_vdrop_sparse_validated"])
def test_validated_variants_validate(name):
    # the worker turns Pyro's validation off; these variants turn it on for their own steps (labels out of the
    # Categorical's support then raise a ValueError naming the support) and leave it as it was
    import pyro

    from benchmarks.models import make_batch
    from benchmarks.variants import build

    pyro.enable_validation(False)
    v = build(name, "linear512")
    x, y = make_batch("linear512", 8)
    with v.scope():
        v.step(x, y)
        with pytest.raises(ValueError, match="support"):
            v.step(x, torch.full_like(y, 10_000))
    assert not pyro.poutine.util.is_validation_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the scripts' path without CUDA")
@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_reproduce.sh"])
def test_gpu_scripts_skip_without_cuda(tmp_path, script):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / script), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "MNIST": str(tmp_path)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{script[:-3]}: skipped: CUDA is not available" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing was run


def test_gpu_reproduce_needs_the_mnist_folder(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_reproduce.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=60,
    )
    assert proc.returncode == 2 and "set MNIST or PYRO_VDROP_MNIST_DIR" in proc.stderr


def test_saved_tensors_of_the_lrt_step():
    # what one LRT step keeps for its backward pass: two weight-sized tensors per layer (the capped log α and σ²,
    # which the guide keeps anyway) and the batch-sized x, standard deviations and noise; it kept four per layer
    # and x² before (benchmarks/saved_tensors.py)
    from benchmarks.saved_tensors import saved_tensors

    weights = (784 * 300 + 300 * 100 + 100 * 10) * 4 / 2**20
    lrt = saved_tensors("pyro_vdrop_lrt", "mlp", 4)
    deterministic = saved_tensors("deterministic", "mlp", 4)
    assert 0 < deterministic["saved_mib"] < 0.1
    assert 2 * weights < lrt["saved_mib"] < 2 * weights + 0.1
