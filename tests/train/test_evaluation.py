# SPDX-License-Identifier: Apache-2.0
"""``evaluate``'s calibration and out-of-distribution figures, and the report's figures of them, which must survive
a hostile ``evaluation.json``."""

import copy
import json
import math
import shutil

import pyro
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from pyro_vdrop import metrics
from pyro_vdrop.cli import main
from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.nn import bayesianize
from pyro_vdrop.train import TrainConfig, evaluate, fit, open_run, predict_logits, predictive_probs, write_report
from pyro_vdrop.train.evaluation import OOD_SHIFTS, PIXEL_NOISE_STD, ood_figures, posterior, shifted_inputs
from pyro_vdrop.train.report import entropy_data, ood_rows, reliability_data

# A tiny run: 200 images, a 3 × 32 MLP, one epoch of pretraining so that it predicts something; a few seconds.
TINY = dict(
    model="mlp", width=32, train_subset=200, test_subset=100, batch_size=50, epochs=2, kl_warmup=1, pretrain_epochs=1
)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluation") / "run"
    fit(TrainConfig(**TINY), run, progress=False)
    return run, evaluate(run, num_samples=4)


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"evaluation.json holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_calibration_figures_match_the_metrics(evaluated_run):
    run, result = evaluated_run
    session, _ = open_run(run)
    theta, _ = posterior(session.guide)
    probs = predict_logits(session.model, session.x_test, session.y_test, params=theta).softmax(-1)
    y = session.y_test
    assert result["test_nll"] == pytest.approx(float(metrics.negative_log_likelihood(probs, y)), rel=1e-6)
    assert result["test_brier"] == pytest.approx(float(metrics.brier_score(probs, y)), rel=1e-6)
    assert result["test_ece"] == pytest.approx(float(metrics.expected_calibration_error(probs, y)), abs=1e-6)
    for suffix in ("", "_pruned", "_mc"):
        for name in ("nll", "brier", "ece", "ece_equal_mass"):
            assert math.isfinite(result[f"test_{name}{suffix}"])
        assert 0 <= result[f"test_ece{suffix}"] <= 1 and 0 <= result[f"test_brier{suffix}"] <= 2
    assert result["test_nll_mc"] == result["test_nll_mc"]  # the key of earlier versions is kept
    for name in ("theta", "pruned", "mc"):
        bins = result["reliability"][name]
        assert sum(bins["count"]) == result["num_test"] and len(bins["count"]) == result["ece_bins"]
    assert _strict_json(run / "evaluation.json")["test_ece_mc"] == result["test_ece_mc"]


def test_ood_figures(evaluated_run):
    _, result = evaluated_run
    ood = result["ood"]
    assert list(ood["shifts"]) == ["test", *OOD_SHIFTS]
    for name, row in ood["shifts"].items():
        assert row["num_examples"] == result["num_test"]
        assert 0 <= row["mutual_information"] <= row["entropy"] <= math.log(10) + 1e-6
        assert row["aleatoric"] == pytest.approx(row["entropy"] - row["mutual_information"], abs=1e-5)
        if name != "test":
            assert 0 <= row["auroc_mutual_information"] <= 1 and 0 <= row["auroc_entropy"] <= 1
    assert ood["shifts"]["uniform-noise"]["accuracy"] is None
    assert 0 <= ood["shifts"]["rotated-90"]["accuracy"] <= 1
    for key in ("entropy_histogram", "mutual_information_histogram"):
        counts = ood[key]["counts"]
        assert all(sum(c) == result["num_test"] for c in counts.values())


def test_predictive_probs_match_explicit_weight_draws():
    # The reference: draw every weight from the guide's posterior N(θ, αθ²) (its median and log α), run the plain
    # torch network with it and average the softmaxes. Under LRT each example's output has the same law as with
    # an explicit weight draw, so the two Monte Carlo means agree within their standard error, entry by entry.
    # θ and α are set so that the noise moves the predictive far (~11 SE) from the θ-network's softmax, so
    # dropping the noise or averaging logits instead of probabilities fails.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(net)
    x, y = torch.randn(16, 4), torch.randint(3, (16,))
    model = bayesianize(net, num_data=len(x))
    guide = AutoVariationalDropout(model)
    guide(x, y)
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in ["0.weight", "2.weight"]:
            store[f"AutoVariationalDropout.locs.{name}"].mul_(4)
            store[f"AutoVariationalDropout.log_alphas.{name}"].uniform_(-1.0, 1.0)
    num_samples, num_reference = 150, 20000
    probs = predictive_probs(model, guide, x, y, num_samples=num_samples, estimator="lrt")

    theta, log_alpha = guide.median(), guide.log_alpha()
    with torch.no_grad():
        weights = {
            k: theta[k] + (0.5 * log_alpha[k]).exp() * theta[k].abs() * torch.randn((num_reference,) + theta[k].shape)
            for k in theta
        }
        draws = vmap(lambda w: functional_call(reference, w, (x,)).softmax(-1))(weights)
        theta_probs = functional_call(reference, theta, (x,)).softmax(-1)
    standard_error = (draws.var(0) * (1 / num_samples + 1 / num_reference)).sqrt()
    assert ((theta_probs - draws.mean(0)) / standard_error).abs().max() > 8, "the noise should matter here"
    assert ((probs - draws.mean(0)) / standard_error).abs().max() < 5


def test_shifted_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 784, generator=g)
    y = torch.randint(10, (50,), generator=g)
    x_in, y_in, shifts = shifted_inputs(x, y, seed=1, num_examples=20)
    assert x_in.shape == (20, 784) and set(shifts) == set(OOD_SHIFTS)
    rotated, labels = shifts["rotated-90"]
    assert torch.equal(rotated.reshape(20, 28, 28), torch.rot90(x_in.reshape(20, 28, 28), 1, dims=(1, 2)))
    assert torch.equal(labels, y_in)
    noisy, _ = shifts["pixel-noise"]
    low, high = float(x.min()), float(x.max())
    assert float(noisy.min()) >= low and float(noisy.max()) <= high
    # noise of sd 0.5 of the range, clipped: far from the clean images (seeded; tolerance generous)
    assert float((noisy - x_in).abs().mean()) > PIXEL_NOISE_STD / 4
    assert shifts["uniform-noise"][1] is None
    again = shifted_inputs(x, y, seed=1, num_examples=20)
    assert all(torch.equal(a, b) for a, b in zip(again[2]["pixel-noise"][:1], shifts["pixel-noise"][:1]))
    images = torch.rand(8, 1, 28, 28, generator=g)  # LeNet-5 layout
    _, _, shifts = shifted_inputs(images, y[:8], num_examples=8)
    assert shifts["rotated-90"][0].shape == images.shape


def test_deterministic_network_has_no_mutual_information():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(784, 10, generator=g)
    x, y = torch.rand(40, 784, generator=g), torch.randint(10, (40,), generator=g)
    figures = ood_figures(lambda inputs: (inputs @ weight).softmax(-1)[None], x, y)
    for name in OOD_SHIFTS:
        row = figures["shifts"][name]
        assert row["mutual_information"] == 0.0 and row["auroc_mutual_information"] == 0.5


def test_evaluate_prints_the_tables(evaluated_run, capsys):
    run, _ = evaluated_run
    assert main(["evaluate", "--run", str(run), "--num-samples", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "evaluation.json").read_text())
    for word in ("NLL", "Brier", "ECE", "AUROC(MI)", *OOD_SHIFTS):
        assert word in printed
    assert f"{result['test_brier_mc']:7.4f}" in printed


def test_report_draws_reliability_and_entropy(evaluated_run, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(evaluated_run[0], run)
    write_report(run)
    text = (run / "report.md").read_text()
    for name in ("reliability.png", "entropy.png"):
        assert name in text and (run / name).read_bytes()[:4] == b"\x89PNG"
    assert "## Calibration" in text and "## Out of distribution" in text and "| rotated-90 |" in text


HOSTILE = {
    "reliability": [
        "not a dict",
        {"mc": {"count": [1, 2], "confidence": [0.5], "accuracy": [0.5, 0.5], "lower": [0, 0.5], "upper": [0.5, 1]}},
        {
            "mc": {
                "count": [1, -2],
                "confidence": [0.5, 0.5],
                "accuracy": [0.5, 0.5],
                "lower": [0, 0.5],
                "upper": [0.5, 1],
            }
        },
        {"mc": {"count": [1, 2], "confidence": [0.5, 7], "accuracy": [0.5, 0.5], "lower": [0, 0.5], "upper": [0.5, 1]}},
        {"mc": {"count": [1] * 5000, "confidence": [0.5] * 5000, "accuracy": [0.5] * 5000}},
        {"mc": {"count": [True], "confidence": [0.5], "accuracy": [0.5], "lower": [0], "upper": [1]}},
    ],
    "ood": [
        "not a dict",
        {"shifts": "x", "entropy_histogram": {"edges": [0, 1], "counts": {"$\\frac{a}{b}$": [1]}}},
        {"entropy_histogram": {"edges": [1, 0], "counts": {"test": [1]}}},
        {"entropy_histogram": {"edges": [0, 1], "counts": {"test": [1.5]}}},
        {"entropy_histogram": {"edges": [0, 1, 2], "counts": {"test": [1]}}},
        {"shifts": {"<script>": {"entropy": 1}, "test": {"entropy": "NaN", "accuracy": [1]}}},
    ],
}


@pytest.mark.parametrize(
    "key, value", [(k, v) for k, values in HOSTILE.items() for v in values], ids=lambda v: str(v)[:20]
)
def test_malformed_evaluation_parts_are_refused(evaluated_run, key, value):
    evaluation = {**evaluated_run[1], key: value}
    if key == "reliability":
        assert reliability_data(evaluation) is None
    else:
        assert entropy_data(evaluation) is None
        rows = ood_rows(evaluation) or {}
        assert "<script>" not in rows and all(
            v is None or isinstance(v, float) for r in rows.values() for v in r.values()
        )


def test_report_skips_malformed_evaluation_parts(evaluated_run, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(evaluated_run[0], run)
    write_report(run)  # the figures of a good evaluation.json, which a bad one must remove
    evaluation = json.loads((run / "evaluation.json").read_text())
    evaluation["reliability"] = HOSTILE["reliability"][2]
    evaluation["ood"] = HOSTILE["ood"][-1] | {"entropy_histogram": HOSTILE["ood"][1]["entropy_histogram"]}
    evaluation["test_nll"] = "1e999"
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    write_report(run)
    text = (run / "report.md").read_text()
    for figure in ("reliability.png", "entropy.png"):
        assert figure not in text and not (run / figure).exists()
    assert "<script>" not in text and "frac" not in text
    assert "| θ network |" not in text  # its NLL is not a number: the row is left out, the others stay
    assert "| MC predictive |" in text
    assert "| test | — | — | — | — | — |" in text  # numbers that are not numbers are left blank
