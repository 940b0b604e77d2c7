# SPDX-License-Identifier: Apache-2.0
r"""
Metrics of predictive uncertainty: how good the predicted probabilities are (negative log-likelihood, Brier score,
calibration error and the data of a reliability diagram), how the uncertainty splits into its aleatoric and
epistemic parts, how well a score tells two groups apart (AUROC), and, for regression, RMSE, Gaussian NLL and the
coverage of predictive intervals.

Every function takes tensors and returns tensors on their device and in their floating dtype (call ``float()`` for
a number); arguments are checked, and a wrong one raises a :class:`ValueError` or :class:`TypeError` naming it.
Classification inputs are ``probs`` of shape ``(N, C)`` (rows sum to 1) and integer labels ``y`` of shape ``(N,)``;
the uncertainty decomposition takes Monte Carlo draws of the class probabilities, shape ``(S, N, C)``.

**References**

[1] Guo, Pleiss, Sun, Weinberger. "On Calibration of Modern Neural Networks." ICML 2017.
[2] Naeini, Cooper, Hauskrecht. "Obtaining Well Calibrated Probabilities Using Bayesian Binning." AAAI 2015.
[3] Nixon, Dusenberry, Zhang, Jerfel, Tran. "Measuring Calibration in Deep Learning." CVPR Workshops 2019.
[4] Brier. "Verification of Forecasts Expressed in Terms of Probability." Monthly Weather Review, 1950.
[5] Depeweg, Hernández-Lobato, Doshi-Velez, Udluft. "Decomposition of Uncertainty in Bayesian Deep Learning for
    Efficient and Risk-sensitive Learning." ICML 2018.
[6] Houlsby, Huszár, Ghahramani, Lengyel. "Bayesian Active Learning for Classification and Preference Learning."
    arXiv:1112.5745, 2011.
[7] Hendrycks, Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
    Networks." ICLR 2017.
"""

import math
from typing import NamedTuple

import torch

#: The binnings of :func:`expected_calibration_error` and :func:`reliability_diagram`.
BINNINGS = ("equal-width", "equal-mass")

#: Default number of bins of the calibration error: 15, as Guo et al. [1].
DEFAULT_NUM_BINS = 15

#: How far the rows of ``probs`` may sum from 1 (float32 softmax averages stay well within).
_SUM_TOLERANCE = 1e-3


# ---- argument checks -------------------------------------------------------------------------------------------


def _check_tensor(value, name: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(value, name: str) -> torch.Tensor:
    _check_tensor(value, name)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return value


def _check_probs(probs, name: str = "probs", *, dims: int = 2) -> torch.Tensor:
    _check_float(probs, name)
    shape = "(N, C)" if dims == 2 else "(S, N, C)"
    if probs.dim() != dims:
        raise ValueError(f"{name} must have shape {shape} (class probabilities), got shape {tuple(probs.shape)}")
    if probs.shape[-2] == 0:
        raise ValueError(f"{name} holds no examples (shape {tuple(probs.shape)})")
    if probs.shape[-1] < 2:
        raise ValueError(f"{name} must have at least 2 classes in its last dim, got shape {tuple(probs.shape)}")
    if bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValueError(f"{name} must hold probabilities in [0, 1]; for logits pass logits.softmax(-1)")
    worst = float((probs.sum(-1) - 1).abs().max())
    if worst > _SUM_TOLERANCE:
        raise ValueError(
            f"the rows of {name} must sum to 1 (one probability per class), but one is off by {worst:.3g}; "
            "for logits pass logits.softmax(-1)"
        )
    return probs


def _check_labels(y, probs: torch.Tensor, name: str = "y") -> torch.Tensor:
    _check_tensor(y, name)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    n, c = probs.shape[-2:]
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one label per row of probs, got shape {tuple(y.shape)}")
    if y.device != probs.device:
        raise ValueError(f"{name} is on {y.device} but probs on {probs.device}; move them to one device")
    if n and (int(y.min()) < 0 or int(y.max()) >= c):
        low, high = int(y.min()), int(y.max())
        raise ValueError(f"{name} must hold class labels in [0, {c - 1}], got values in [{low}, {high}]")
    return y.long()


def _check_same_shape(value, reference: torch.Tensor, name: str, reference_name: str) -> torch.Tensor:
    _check_float(value, name)
    if value.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {reference_name}, {tuple(reference.shape)}, got {tuple(value.shape)}"
        )
    if value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {reference_name} on {reference.device}")
    return value


def _check_bins(num_bins, binning: str) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")


# ---- classification --------------------------------------------------------------------------------------------


def negative_log_likelihood(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""
    The mean negative log-likelihood of the labels, :math:`-\frac1N\sum_i \log p_{i,y_i}` (nats), with the
    probabilities clamped at the smallest normal number of their dtype so that a zero gives a large finite value.

    For a Monte Carlo predictive pass the *mean* of the draws' probabilities, :math:`\frac1S\sum_s p(y|x, w_s)`,
    not the mean of their log-likelihoods (which is the expected log-likelihood, a lower bound).

    :param torch.Tensor probs: Class probabilities, shape ``(N, C)``.
    :param torch.Tensor y: Integer labels, shape ``(N,)``.
    :rtype: torch.Tensor
    """
    _check_probs(probs)
    y = _check_labels(y, probs)
    p = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -p.clamp(min=torch.finfo(probs.dtype).tiny).log().mean()


def brier_score(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""
    The multi-class Brier score [4], :math:`\frac1N\sum_i\sum_c (p_{ic} - [y_i = c])^2`, in :math:`[0, 2]`:
    scikit-learn's ``brier_score_loss`` with ``labels`` (for two classes that is twice its binary score, which
    counts the positive class only).

    :param torch.Tensor probs: Class probabilities, shape ``(N, C)``.
    :param torch.Tensor y: Integer labels, shape ``(N,)``.
    :rtype: torch.Tensor
    """
    _check_probs(probs)
    y = _check_labels(y, probs)
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(-1).mean()


class ReliabilityDiagram(NamedTuple):
    """The bins of a reliability diagram (see :func:`reliability_diagram`), one entry per bin."""

    #: Lower end of each bin (equal-width: the bin edge; equal-mass: the smallest confidence in it).
    lower: torch.Tensor
    #: Upper end of each bin (equal-width: the bin edge; equal-mass: the largest confidence in it).
    upper: torch.Tensor
    #: Number of examples in each bin (int64).
    count: torch.Tensor
    #: Mean confidence (top-class probability) in each bin; NaN for an empty bin.
    confidence: torch.Tensor
    #: Accuracy (share of correct top-class predictions) in each bin; NaN for an empty bin.
    accuracy: torch.Tensor


def _bin_indices(confidence: torch.Tensor, num_bins: int, binning: str) -> torch.Tensor:
    """The bin of every example: equal-width bins of [0, 1], or ``num_bins`` groups of the sorted confidences."""
    n = confidence.shape[0]
    if binning == "equal-width":
        # bin b holds (b/B, (b+1)/B]; a confidence of exactly 0 joins the first bin
        return (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    order = torch.argsort(confidence, stable=True)
    index = torch.empty(n, dtype=torch.long, device=confidence.device)
    # numpy.array_split's sizes: the first N mod B bins hold one example more than the others
    size, extra = divmod(n, num_bins)
    rank = torch.arange(n, device=confidence.device)
    big = extra * (size + 1)  # examples in the larger bins
    index[order] = torch.where(
        rank < big, rank // (size + 1), extra + torch.div(rank - big, max(size, 1), rounding_mode="floor")
    )
    return index


def reliability_diagram(
    probs: torch.Tensor,
    y: torch.Tensor,
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    binning: str = "equal-width",
) -> ReliabilityDiagram:
    r"""
    The data of a reliability diagram [1, 2]: the examples grouped by their confidence
    :math:`\hat p_i = \max_c p_{ic}`, and per bin the mean confidence and the accuracy of the top-class
    prediction :math:`\hat y_i = \arg\max_c p_{ic}`. A calibrated model's points lie on the diagonal.

    **Bins.** ``"equal-width"`` (default; Guo et al. [1]): bin :math:`b` holds the confidences in
    :math:`(b/B, (b+1)/B]` (a confidence of 0 joins the first bin); bins may be empty, and with a confident network
    most examples fall into the last one. ``"equal-mass"`` (adaptive binning, Nixon et al. [3]): the examples sorted
    by confidence and split into :math:`B` groups whose sizes differ by at most one (``numpy.array_split``'s rule;
    equal confidences may fall on either side of a boundary); every bin is populated when :math:`N \ge B`.

    :param torch.Tensor probs: Class probabilities, shape ``(N, C)``.
    :param torch.Tensor y: Integer labels, shape ``(N,)``.
    :param int num_bins: :math:`B` (default 15 [1]).
    :param str binning: ``"equal-width"`` or ``"equal-mass"``.
    :rtype: ReliabilityDiagram
    """
    _check_probs(probs)
    y = _check_labels(y, probs)
    _check_bins(num_bins, binning)
    confidence, prediction = probs.max(-1)
    correct = (prediction == y).to(probs.dtype)
    index = _bin_indices(confidence, num_bins, binning)
    count = torch.zeros(num_bins, dtype=torch.long, device=probs.device).index_add_(0, index, torch.ones_like(index))
    totals = torch.zeros(2, num_bins, dtype=probs.dtype, device=probs.device)
    totals.index_add_(1, index, torch.stack([confidence, correct]))
    nonempty = count > 0
    nan = torch.tensor(math.nan, dtype=probs.dtype, device=probs.device)
    mean_confidence = torch.where(nonempty, totals[0] / count.clamp(min=1), nan)
    accuracy = torch.where(nonempty, totals[1] / count.clamp(min=1), nan)
    if binning == "equal-width":
        edges = torch.linspace(0, 1, num_bins + 1, dtype=probs.dtype, device=probs.device)
        lower, upper = edges[:-1], edges[1:]
    else:
        inf = torch.full((num_bins,), math.inf, dtype=probs.dtype, device=probs.device)
        lower = inf.scatter_reduce(0, index, confidence, reduce="amin")
        upper = (-inf).scatter_reduce(0, index, confidence, reduce="amax")
        lower, upper = torch.where(nonempty, lower, nan), torch.where(nonempty, upper, nan)
    return ReliabilityDiagram(lower, upper, count, mean_confidence, accuracy)


def expected_calibration_error(
    probs: torch.Tensor,
    y: torch.Tensor,
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    binning: str = "equal-width",
) -> torch.Tensor:
    r"""
    The expected calibration error [1, 2] of the top-class prediction,

    .. math::

        \mathrm{ECE} = \sum_{b=1}^{B} \frac{n_b}{N}\,\bigl|\mathrm{acc}_b - \mathrm{conf}_b\bigr| ,

    over the bins of :func:`reliability_diagram` (``"equal-width"``, the usual ECE [1], or ``"equal-mass"``, the
    adaptive ECE of Nixon et al. [3], less biased when most confidences are near 1); empty bins count 0. The ECE
    depends on the binning and, being the mean of absolute values, is biased upward on small test sets: compare
    models on the same data and binning, and read it beside the NLL and Brier score, which need no binning.

    :param torch.Tensor probs: Class probabilities, shape ``(N, C)``.
    :param torch.Tensor y: Integer labels, shape ``(N,)``.
    :param int num_bins: :math:`B` (default 15 [1]).
    :param str binning: ``"equal-width"`` or ``"equal-mass"``.
    :rtype: torch.Tensor
    """
    bins = reliability_diagram(probs, y, num_bins=num_bins, binning=binning)
    gap = (bins.accuracy - bins.confidence).abs().nan_to_num(0.0)
    return (gap * bins.count.to(gap.dtype)).sum() / bins.count.sum()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    r"""The entropy :math:`-\sum_c p_c \log p_c` (nats) of each row of ``probs`` (shape ``(..., C)``; 0 log 0 = 0)."""
    _check_float(probs, "probs")
    if probs.dim() < 1 or probs.shape[-1] < 1:
        raise ValueError(f"probs must have the classes in a last dim, got shape {tuple(probs.shape)}")
    return -torch.special.xlogy(probs, probs).sum(-1)


class UncertaintyDecomposition(NamedTuple):
    r"""Per example: ``total`` = ``aleatoric`` + ``epistemic`` (nats), see :func:`decompose_uncertainty`."""

    #: Entropy of the predictive mean, :math:`H[\bar p]`.
    total: torch.Tensor
    #: Expected entropy of the draws, :math:`\frac1S\sum_s H[p_s]` (expected data entropy).
    aleatoric: torch.Tensor
    #: Mutual information between the label and the weights, ``total - aleatoric`` (BALD [6]).
    epistemic: torch.Tensor


def decompose_uncertainty(sample_probs: torch.Tensor) -> UncertaintyDecomposition:
    r"""
    Splits the predictive entropy of each example into its aleatoric and epistemic parts [5, 6], from :math:`S`
    Monte Carlo draws :math:`p_s = p(y \mid x, w_s)`, :math:`w_s \sim q(w)`:

    .. math::

        \underbrace{H\Bigl[\frac1S\sum_s p_s\Bigr]}_{\text{total}}
        = \underbrace{\frac1S\sum_s H[p_s]}_{\text{aleatoric (expected data entropy)}}
        + \underbrace{I[y; w \mid x]}_{\text{epistemic (mutual information)}} .

    The mutual information is large when the draws disagree — the weights are uncertain about this input, as for
    inputs unlike the training data — and is 0 when they agree, however spread each draw's probabilities are
    (noise in the labels: aleatoric). It is clamped at 0 (Jensen's inequality makes it non-negative; rounding can
    make it a tiny negative number). With one draw, or draws that agree exactly, it is 0. The plug-in estimate from
    :math:`S` draws is biased low for the total entropy and hence for the mutual information: compare figures
    computed with the same :math:`S`.

    :param torch.Tensor sample_probs: Class probabilities of each draw, shape ``(S, N, C)``.
    :rtype: UncertaintyDecomposition
    """
    _check_probs(sample_probs, "sample_probs", dims=3)
    total = entropy(sample_probs.mean(0))
    aleatoric = entropy(sample_probs).mean(0)
    return UncertaintyDecomposition(total, aleatoric, (total - aleatoric).clamp(min=0))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""
    The area under the ROC curve of ``scores`` as a detector of ``labels`` (True = positive; e.g. out of
    distribution, scored by the mutual information [7]): the probability that a random positive scores higher than
    a random negative, ties counting one half (the Mann-Whitney statistic; scikit-learn's ``roc_auc_score``).
    0.5 is chance, 1 a perfect detector.

    :param torch.Tensor scores: Real scores, shape ``(N,)``; higher means "more likely positive".
    :param torch.Tensor labels: Booleans (or 0/1), shape ``(N,)``, with both classes present.
    :rtype: torch.Tensor
    """
    _check_float(scores, "scores")
    _check_tensor(labels, "labels")
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (N,), got {tuple(scores.shape)}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores, {tuple(scores.shape)}, got {tuple(labels.shape)}")
    if labels.dtype != torch.bool:
        if labels.is_floating_point() or bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError("labels must be booleans or 0/1 (True = positive)")
        labels = labels != 0
    labels = labels.to(scores.device)
    num_pos = int(labels.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"labels must hold both classes to define an AUROC; got {num_pos} positive, {num_neg} negative"
        )
    # average ranks (1-based) with ties sharing the mean of their ranks
    sorted_scores, order = torch.sort(scores.double())
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(sorted_scores)
    ranks[order] = mean_rank[inverse]
    u = ranks[labels].sum() - num_pos * (num_pos + 1) / 2
    return (u / (num_pos * num_neg)).to(scores.dtype)


# ---- regression ------------------------------------------------------------------------------------------------


def rmse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The root mean squared error :math:`\sqrt{\frac1N\sum_i (\hat y_i - y_i)^2}` over all elements."""
    _check_float(y, "y")
    _check_same_shape(pred, y, "pred", "y")
    if y.numel() == 0:
        raise ValueError("y holds no values")
    return (pred - y).pow(2).mean().sqrt()


def gaussian_nll(mean: torch.Tensor, scale: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
    r"""
    The mean negative log-likelihood (nats per element) of ``y`` under :math:`\mathcal N(\mu, \sigma^2)`,

    .. math::

        \frac1N\sum_i \Bigl[\tfrac12\log(2\pi\sigma_i^2) + \frac{(y_i - \mu_i)^2}{2\sigma_i^2}\Bigr] .

    For a Monte Carlo predictive of a Normal likelihood, the moment-matched Gaussian has
    :math:`\mu = \frac1S\sum_s \mu_s` and :math:`\sigma^2 = \sigma_{\text{obs}}^2 + \frac1S\sum_s(\mu_s - \mu)^2`.

    :param torch.Tensor mean: :math:`\mu`, the shape of ``y``.
    :param scale: :math:`\sigma > 0`: a tensor broadcastable to ``y``, or a number.
    :param torch.Tensor y: The targets.
    :rtype: torch.Tensor
    """
    _check_float(y, "y")
    _check_same_shape(mean, y, "mean", "y")
    if y.numel() == 0:
        raise ValueError("y holds no values")
    if not torch.is_tensor(scale):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a tensor or a number, got {type(scale).__name__}")
        scale = torch.tensor(float(scale), dtype=y.dtype, device=y.device)
    _check_float(scale, "scale")
    if not bool((scale > 0).all()):
        raise ValueError("scale must be positive (a standard deviation)")
    try:
        torch.broadcast_shapes(scale.shape, y.shape)
    except RuntimeError:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to y's {tuple(y.shape)}") from None
    variance = scale.pow(2)
    return (0.5 * torch.log(2 * math.pi * variance) + (y - mean).pow(2) / (2 * variance)).mean()


def predictive_interval(samples: torch.Tensor, *, level: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The central ``level`` interval of Monte Carlo draws, from the empirical quantiles :math:`(1 \mp \text{level})/2`
    along the first dim (linear interpolation, :func:`torch.quantile`).

    :param torch.Tensor samples: Draws, shape ``(S, ...)``.
    :param float level: The probability mass inside, in (0, 1).
    :returns: ``(lower, upper)``, each of shape ``samples.shape[1:]``.
    """
    _check_float(samples, "samples")
    if samples.dim() < 1 or samples.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 draws along dim 0, got shape {tuple(samples.shape)}")
    _check_level(level)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype, device=samples.device)
    lower, upper = torch.quantile(samples, q, dim=0)
    return lower, upper


def _check_level(level) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")


def interval_coverage(y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    r"""
    The share of targets inside their predictive interval, :math:`\frac1N\sum_i [l_i \le y_i \le u_i]`; for
    calibrated central intervals of level :math:`\gamma` it is close to :math:`\gamma` (e.g. with
    :func:`predictive_interval`, or :math:`\mu \pm z\sigma` for a Gaussian predictive).

    :param torch.Tensor y: The targets.
    :param torch.Tensor lower: Lower ends, the shape of ``y``.
    :param torch.Tensor upper: Upper ends, the shape of ``y``.
    :rtype: torch.Tensor
    """
    _check_float(y, "y")
    _check_same_shape(lower, y, "lower", "y")
    _check_same_shape(upper, y, "upper", "y")
    if y.numel() == 0:
        raise ValueError("y holds no values")
    if bool((lower > upper).any()):
        raise ValueError("lower must not exceed upper")
    return ((lower <= y) & (y <= upper)).to(y.dtype).mean()


__all__ = [
    "BINNINGS",
    "DEFAULT_NUM_BINS",
    "ReliabilityDiagram",
    "UncertaintyDecomposition",
    "auroc",
    "brier_score",
    "decompose_uncertainty",
    "entropy",
    "expected_calibration_error",
    "gaussian_nll",
    "interval_coverage",
    "negative_log_likelihood",
    "predictive_interval",
    "reliability_diagram",
    "rmse",
]
