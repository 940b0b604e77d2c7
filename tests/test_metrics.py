# SPDX-License-Identifier: Apache-2.0
"""Every metric against a hand-computed case and, where one exists, against scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from pyro_vdrop import metrics

# Three examples, three classes; labels 0, 1, 2. Confidences 0.8, 0.5, 0.6; the third prediction (class 1) is wrong.
PROBS = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])
LABELS = torch.tensor([0, 1, 2])


def random_case(n=500, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(n, c, generator=g, dtype=dtype)).softmax(-1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(-1)  # calibrated labels
    return probs, y


# ---- hand-computed ---------------------------------------------------------------------------------------------


def test_nll_hand():
    expected = -(math.log(0.8) + math.log(0.5) + math.log(0.3)) / 3
    assert float(metrics.negative_log_likelihood(PROBS, LABELS)) == pytest.approx(expected, rel=1e-6)


def test_nll_of_zero_probability_is_finite():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = metrics.negative_log_likelihood(probs, torch.tensor([1, 0]))
    assert torch.isfinite(value) and float(value) > 40


def test_brier_hand():
    # (0.04 + 0.01 + 0.01) + (0.04 + 0.25 + 0.09) + (0.01 + 0.36 + 0.49) = 0.06 + 0.38 + 0.86
    assert float(metrics.brier_score(PROBS, LABELS)) == pytest.approx(1.30 / 3, rel=1e-6)


def test_ece_equal_width_hand():
    # 5 bins of width 0.2: 0.8 -> (0.6, 0.8] bin 3 (correct), 0.5 -> bin 2 (correct), 0.6 -> bin 2 (wrong)
    # bin 2: conf 0.55, acc 0.5, 2 of 3 examples; bin 3: conf 0.8, acc 1
    expected = 2 / 3 * 0.05 + 1 / 3 * 0.2
    ece = metrics.expected_calibration_error(PROBS, LABELS, num_bins=5)
    assert float(ece) == pytest.approx(expected, rel=1e-6)
    bins = metrics.reliability_diagram(PROBS, LABELS, num_bins=5)
    assert bins.count.tolist() == [0, 0, 2, 1, 0]
    assert torch.isnan(bins.confidence[0]) and torch.isnan(bins.accuracy[4])
    assert float(bins.confidence[2]) == pytest.approx(0.55) and float(bins.accuracy[2]) == 0.5
    assert torch.allclose(bins.lower, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8]))
    assert torch.allclose(bins.upper, torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0]))


def test_ece_equal_mass_hand():
    # sorted confidences 0.5 (right), 0.6 (wrong), 0.8 (right); 2 bins of sizes 2 and 1 (array_split)
    # bin 0: conf 0.55, acc 0.5; bin 1: conf 0.8, acc 1
    ece = metrics.expected_calibration_error(PROBS, LABELS, num_bins=2, binning="equal-mass")
    assert float(ece) == pytest.approx(2 / 3 * 0.05 + 1 / 3 * 0.2, rel=1e-6)
    bins = metrics.reliability_diagram(PROBS, LABELS, num_bins=2, binning="equal-mass")
    assert bins.count.tolist() == [2, 1]
    assert bins.lower.tolist() == pytest.approx([0.5, 0.8]) and bins.upper.tolist() == pytest.approx([0.6, 0.8])


def test_equal_mass_bin_sizes_follow_array_split():
    probs, y = random_case(n=103)
    bins = metrics.reliability_diagram(probs, y, num_bins=10, binning="equal-mass")
    assert bins.count.tolist() == [len(part) for part in np.array_split(np.arange(103), 10)]
    confidences = probs.max(-1).values
    assert float(bins.lower[0]) == float(confidences.min()) and float(bins.upper[-1]) == float(confidences.max())
    assert bool((bins.upper[:-1] <= bins.lower[1:]).all())  # bins follow each other


def test_ece_bin_edges_are_closed_on_the_right():
    # a confidence of exactly 0.6 belongs to (0.4, 0.6], and one of exactly 1 to the last bin
    probs = torch.tensor([[0.6, 0.4], [1.0, 0.0]])
    bins = metrics.reliability_diagram(probs, torch.tensor([0, 0]), num_bins=5)
    assert bins.count.tolist() == [0, 0, 1, 0, 1]


def test_perfect_calibration_has_zero_ece():
    # confidence 0.75 for 4 examples, 3 of them right
    probs = torch.tensor([[0.75, 0.25]] * 4)
    y = torch.tensor([0, 0, 0, 1])
    # (equal-mass bins with fewer examples than 4 would each hold 0 or 1 right answer: one bin)
    for binning, num_bins in (("equal-width", 15), ("equal-mass", 1)):
        ece = metrics.expected_calibration_error(probs, y, num_bins=num_bins, binning=binning)
        assert float(ece) == pytest.approx(0.0, abs=1e-7)


def test_ece_of_calibrated_labels_is_small():
    # labels drawn from the probabilities themselves: ECE shrinks with N (seed 0, N = 20,000; 0.02 is ~5× its size)
    probs, y = random_case(n=20000, seed=0)
    for binning in metrics.BINNINGS:
        assert float(metrics.expected_calibration_error(probs, y, binning=binning)) < 0.02


def test_entropy_hand():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    expected = [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert metrics.entropy(probs).tolist() == pytest.approx(expected, rel=1e-6)


def test_decompose_uncertainty_hand():
    # example 0: two confident draws that disagree -> all epistemic
    # example 1: two identical uniform draws -> all aleatoric
    sample_probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]], dtype=torch.float64)
    total, aleatoric, epistemic = metrics.decompose_uncertainty(sample_probs)
    assert total.tolist() == pytest.approx([math.log(2), math.log(2)])
    assert aleatoric.tolist() == pytest.approx([0.0, math.log(2)])
    assert epistemic.tolist() == pytest.approx([math.log(2), 0.0], abs=1e-12)


def test_decompose_uncertainty_adds_up():
    g = torch.Generator().manual_seed(1)
    sample_probs = torch.randn(20, 50, 10, generator=g, dtype=torch.float64).softmax(-1)
    d = metrics.decompose_uncertainty(sample_probs)
    assert torch.allclose(d.total, d.aleatoric + d.epistemic, atol=1e-12)
    assert bool((d.epistemic >= 0).all()) and bool((d.total <= math.log(10) + 1e-12).all())
    one = metrics.decompose_uncertainty(sample_probs[:1])
    assert torch.equal(one.epistemic, torch.zeros(50, dtype=torch.float64))


def test_auroc_hand_with_ties():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5) (0.9>0.1) (0.5=0.5: 1/2) (0.5>0.1) -> 3.5 / 4
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    labels = torch.tensor([True, True, False, False])
    assert float(metrics.auroc(scores, labels)) == pytest.approx(3.5 / 4)
    assert float(metrics.auroc(-scores, labels)) == pytest.approx(0.5 / 4)


def test_rmse_and_gaussian_nll_hand():
    y = torch.tensor([0.0, 1.0, 2.0])
    pred = torch.tensor([1.0, 1.0, 0.0])
    assert float(metrics.rmse(pred, y)) == pytest.approx(math.sqrt(5 / 3))
    # sigma = 2: 0.5 log(8 pi) + (1 + 0 + 4) / (3 * 8)
    expected = 0.5 * math.log(8 * math.pi) + 5 / 24
    assert float(metrics.gaussian_nll(pred, 2.0, y)) == pytest.approx(expected, rel=1e-6)
    scale = torch.tensor([1.0, 2.0, 4.0])
    expected = sum(0.5 * math.log(2 * math.pi * s**2) + (a - b) ** 2 / (2 * s**2) for a, b, s in zip(y, pred, scale))
    assert float(metrics.gaussian_nll(pred, scale, y)) == pytest.approx(float(expected) / 3, rel=1e-6)


def test_gaussian_nll_matches_torch():
    g = torch.Generator().manual_seed(2)
    mean, y = torch.randn(2, 100, generator=g, dtype=torch.float64)
    scale = torch.rand(100, generator=g, dtype=torch.float64) + 0.1
    expected = torch.nn.functional.gaussian_nll_loss(mean, y, scale**2, full=True)
    assert float(metrics.gaussian_nll(mean, scale, y)) == pytest.approx(float(expected), rel=1e-12)


def test_interval_coverage_hand():
    y = torch.tensor([0.0, 1.0, 2.0, 3.0])
    lower = torch.tensor([-1.0, 1.0, 2.5, 0.0])
    upper = torch.tensor([1.0, 2.0, 3.0, 2.9])
    assert float(metrics.interval_coverage(y, lower, upper)) == 0.5  # ends count as inside


def test_predictive_interval_coverage():
    # draws and targets from one N(0, 1) per element: a 90% interval covers about 90% (seed 3; 4,000 targets give
    # a standard error of 0.005, 1,000 draws a quantile error about as large: tolerance 0.02)
    g = torch.Generator().manual_seed(3)
    samples = torch.randn(1000, 4000, generator=g, dtype=torch.float64)
    y = torch.randn(4000, generator=g, dtype=torch.float64)
    lower, upper = metrics.predictive_interval(samples, level=0.9)
    assert float(metrics.interval_coverage(y, lower, upper)) == pytest.approx(0.9, abs=0.02)
    hand = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    lower, upper = metrics.predictive_interval(hand, level=0.5)  # quantiles 0.25, 0.75 with interpolation
    assert lower.tolist() == [1.0] and upper.tolist() == [3.0]


# ---- against scikit-learn --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_nll_and_brier_match_sklearn(seed, num_classes):
    probs, y = random_case(c=num_classes, seed=seed)
    labels = list(range(num_classes))
    expected_nll = log_loss(y.numpy(), probs.numpy(), labels=labels)
    # (scikit-learn halves the score of two classes unless told not to)
    expected_brier = brier_score_loss(y.numpy(), probs.numpy(), labels=labels, scale_by_half=False)
    assert float(metrics.negative_log_likelihood(probs, y)) == pytest.approx(expected_nll, rel=1e-10)
    assert float(metrics.brier_score(probs, y)) == pytest.approx(expected_brier, rel=1e-10)


def test_binary_brier_is_twice_sklearn_positive_class():
    probs, y = random_case(c=2, seed=4)
    positive = brier_score_loss(y.numpy(), probs[:, 1].numpy())
    assert float(metrics.brier_score(probs, y)) == pytest.approx(2 * positive, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(300, generator=g) < 0.3
    scores = torch.randn(300, generator=g, dtype=torch.float64) + labels.double()
    scores = (scores * 4).round() / 4  # plenty of ties
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert float(metrics.auroc(scores, labels)) == pytest.approx(expected, rel=1e-12)
    assert float(metrics.auroc(scores, labels.long())) == pytest.approx(expected, rel=1e-12)


# ---- dtypes, devices and argument checks -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_follow_inputs(dtype, device):
    probs, y = PROBS.to(device, dtype), LABELS.to(device)
    for fn in (metrics.negative_log_likelihood, metrics.brier_score, metrics.expected_calibration_error):
        value = fn(probs, y)
        assert value.dtype == dtype and value.device.type == device.type and value.dim() == 0
    bins = metrics.reliability_diagram(probs, y, binning="equal-mass", num_bins=2)
    assert bins.confidence.dtype == dtype and bins.count.dtype == torch.long and bins.count.device.type == device.type
    d = metrics.decompose_uncertainty(probs.expand(4, 3, 3))
    assert d.epistemic.dtype == dtype and d.epistemic.device.type == device.type
    assert metrics.auroc(probs[:, 0], y.to(device) == 0).dtype == dtype


@pytest.mark.parametrize(
    "probs, y, match",
    [
        ([[0.5, 0.5]], torch.tensor([0]), "probs must be a torch.Tensor"),
        (torch.tensor([[1, 0]]), torch.tensor([0]), "probs must be a floating-point tensor"),
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), r"probs must have shape \(N, C\)"),
        (torch.tensor([[2.0, -1.0]]), torch.tensor([0]), r"probabilities in \[0, 1\]"),
        (torch.tensor([[0.5, 0.6]]), torch.tensor([0]), "rows of probs must sum to 1"),
        (torch.tensor([[math.nan, 0.5]]), torch.tensor([0]), "probs holds NaN"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), "y must hold integer class labels"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), r"y must have shape \(1,\)"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), r"class labels in \[0, 1\]"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "probs holds no examples"),
    ],
)
def test_classification_arguments_are_checked(probs, y, match):
    with pytest.raises((TypeError, ValueError), match=match):
        metrics.negative_log_likelihood(probs, y)


def test_other_arguments_are_checked():
    with pytest.raises(ValueError, match="num_bins must be a positive int"):
        metrics.expected_calibration_error(PROBS, LABELS, num_bins=0)
    with pytest.raises(ValueError, match="binning must be one of"):
        metrics.expected_calibration_error(PROBS, LABELS, binning="quantile")
    with pytest.raises(ValueError, match=r"sample_probs must have shape \(S, N, C\)"):
        metrics.decompose_uncertainty(PROBS)
    with pytest.raises(ValueError, match="labels must hold both classes"):
        metrics.auroc(torch.rand(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must be booleans or 0/1"):
        metrics.auroc(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pred must have the shape of y"):
        metrics.rmse(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="scale must be positive"):
        metrics.gaussian_nll(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="level must be a number in"):
        metrics.predictive_interval(torch.zeros(5, 2), level=1.0)
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        metrics.interval_coverage(torch.zeros(2), torch.ones(2), torch.zeros(2))
