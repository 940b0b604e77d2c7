# SPDX-License-Identifier: Apache-2.0
"""The options of the variational-dropout guides, as one validated, frozen object."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

from pyro_vdrop.distributions.util import check_kl_approx
from pyro_vdrop.infer.sparsity import SPARSE_VD_LOG_ALPHA_CLIP

from .initialization import init_to_fan_in

NOISES = ("independent", "correlated", "group", "sbp")
GRANULARITIES = ("weight", "unit", "output", "layer")
#: The noises shared by a group of weights (a unit, a channel or the layer), which cannot have α per weight.
SHARED_NOISES = ("correlated", "group", "sbp")
PARAMETERIZATIONS = ("multiplicative", "additive")

#: Kingma, Salimans, Welling (2015), §3.3: the paper clamps α at 1, i.e. log α ≤ 0.
PAPER_MAX_LOG_ALPHA = 0.0
#: Molchanov, Ashukha, Vetrov (2017), §5: initial log σ² of sparse variational dropout.
SPARSE_VD_INIT_LOG_SIGMA2 = -10.0
#: Default initial log α of the multiplicative parameterization: weak noise (α ≈ 0.018),
#: about where sparse VD's log σ² = -10 starts for fan-in-initialised weights.
DEFAULT_INIT_LOG_ALPHA = -4.0
#: The cap on log α of group variational dropout: sparse VD's upper clip (Molchanov et al. 2017, §4.1), well
#: above the pruning threshold 3, so that a pruned group's noise stays finite.
GROUP_MAX_LOG_ALPHA = SPARSE_VD_LOG_ALPHA_CLIP[1]
#: Initial μ and log σ of log s for noise="sbp": s ≈ 1 (no noise yet), σ = e^-3 ≈ 0.05.
DEFAULT_INIT_NOISE_LOC = 0.0
DEFAULT_INIT_NOISE_LOG_SCALE = -3.0


def check_kl_scale(value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0, else a :class:`ValueError`."""
    if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"kl_scale must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class VariationalDropoutOptions:
    r"""
    The options of :class:`~pyro_vdrop.infer.AutoVariationalDropout` and
    :class:`~pyro_vdrop.infer.AutoVariationalDropoutMessenger`, validated when made and frozen. The defaults
    ``None`` / ``"auto"`` are resolved on construction, so the fields hold the values in force (e.g.
    ``granularity="unit"`` for correlated noise). Make a variant with :func:`~pyro_vdrop.infer.autoguide.preset`,
    or by passing the fields as keywords, not by :func:`dataclasses.replace` of a resolved object.

    :param str noise: ``"independent"`` (default; the paper's B [1]), ``"correlated"`` (the paper's A),
        ``"group"`` (group variational dropout: the noise of A, with the KL counted once per group of the model
        :math:`w = \theta \odot z`, :math:`p(z) \propto 1/|z|`, so that whole units or channels are pruned; see
        :class:`~pyro_vdrop.distributions.GroupVariationalDropoutNormal`) or ``"sbp"`` (structured Bayesian pruning
        [3]: truncated log-normal noise per group, proper truncated log-uniform prior; the weight sites' prior must
        be :class:`~pyro_vdrop.distributions.LogUniformNoisePrior`, whose interval the guide uses).
    :param str granularity: Where α (the noise) varies: ``"weight"``, ``"unit"`` (along the input axis: input
        units of a linear layer, input channels of a convolution; shared along plate dims), ``"output"`` (along
        the output axis, dim 0 of the weight: output units or channels) or ``"layer"`` (one α per site). Default
        ``"weight"`` with independent noise, ``"unit"`` with the shared noises (which cannot have α per weight).
    :param str parameterization: ``"multiplicative"`` (default; learns θ and log α, log α capped at
        ``max_log_alpha`` as in the paper) or ``"additive"`` (sparse variational dropout [2]: learns θ
        and log σ², :math:`\log\alpha = \log\sigma^2 - \log\theta^2` unbounded; per weight with
        independent noise; with ``noise="group"`` the group noise is :math:`z_g \sim \mathcal{N}(\mu_g,
        \sigma_g^2)` with :math:`\mu_g` (initially 1) and :math:`\log\sigma_g^2` learned per group and
        :math:`\log\alpha_g = \log\sigma_g^2 - \log\mu_g^2`, capped at ``max_log_alpha``, the parameterization
        of Bayesian compression's group noise [4], with which a group can be switched off by
        :math:`\mu_g \to 0` without large noise).
    :param float dropout_rate: Fix :math:`\alpha = p/(1-p)` from a dropout rate ``p`` (Gaussian dropout
        read as a posterior [1, §3]); no α parameter, no α gradient, and the KL is a constant.
    :param float kl_scale: The factor on the KL term (default 1); the guide's ``kl_scale`` attribute starts
        from it and may be changed during training.
    :param str kl_approx: The KL approximation, ``"molchanov"`` or ``"kingma"``
        (:func:`~pyro_vdrop.distributions.log_uniform_kl`); default ``None``: the prior's (``"molchanov"``).
    :param tuple log_alpha_clip: ``(low, high)`` bounds on log α inside the KL only, or None.
        Default ``"auto"``: ``(-8, 8)`` for the additive parameterization of independent noise [2], None otherwise
        (the group noise starts at log α = log σ² = -10, below the clip, where the clipped KL has no gradient).
    :param float max_log_alpha: Cap on the learned log α of the multiplicative parameterization,
        applied by clamping in the forward pass; above the cap only a gradient that lowers log α passes
        (:class:`~pyro_vdrop.distributions.cap.Cap`), so that the cap is not a trap. Default ``"auto"``: 0
        (α ≤ 1 [1]), 8 for ``noise="group"`` (pruning needs log α above the threshold 3); None removes the cap
        (then prefer ``kl_approx="molchanov"``).
    :param input_dim: The input axis of each site: an int (a non-negative dim of the weight, i.e. of the
        event shape, or a negative dim of the site's value), a dict ``{site name: int}``, or None for the
        torch layout.
    :param callable init_loc_fn: A per-site initialization strategy for θ (default
        :func:`~pyro_vdrop.infer.init_to_fan_in`).
    :param float init_log_alpha: Initial log α of the multiplicative parameterization (default -4).
    :param float init_log_sigma2: Initial log σ² of the additive parameterization (default -10 [2]).
    :param float init_noise_loc: ``noise="sbp"``: initial μ of log s (default 0).
    :param float init_noise_log_scale: ``noise="sbp"``: initial log σ of log s (default -3).
    :param float train_clip: Additive parameterization of independent noise only: the mean of every weight whose
        log α is at or above ``train_clip`` is 0 in the guide's distribution, its variance σ² kept, so that the
        network trains without the weights that pruning will remove (the ``train_clip`` of [2]'s reference code,
        with the pruning threshold 3). The distribution is then :math:`\mathcal{N}(\theta\,1[\log\alpha < t],
        \sigma^2)` (also its median and the samples); log α, hence the KL, is computed from the unmasked θ, which
        keeps its KL gradient. Default None: off.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick."
        NeurIPS 2015.
    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
    [3] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative
        Noise." NeurIPS 2017.
    [4] Louizos, Ullrich, Welling. "Bayesian Compression for Deep Learning." NeurIPS 2017.
    """

    noise: Literal["independent", "correlated", "group", "sbp"] = "independent"
    granularity: Literal["weight", "unit", "output", "layer"] | None = None
    parameterization: Literal["multiplicative", "additive"] = "multiplicative"
    dropout_rate: float | None = None
    kl_scale: float = 1.0
    kl_approx: str | None = None
    log_alpha_clip: tuple[float, float] | None | Literal["auto"] = "auto"
    max_log_alpha: float | None | Literal["auto"] = "auto"
    input_dim: int | dict[str, int] | None = None
    init_loc_fn: Callable = init_to_fan_in
    init_log_alpha: float = DEFAULT_INIT_LOG_ALPHA
    init_log_sigma2: float = SPARSE_VD_INIT_LOG_SIGMA2
    init_noise_loc: float = DEFAULT_INIT_NOISE_LOC
    init_noise_log_scale: float = DEFAULT_INIT_NOISE_LOG_SCALE
    train_clip: float | None = None

    def __post_init__(self):
        self._check_choices()
        if self.dropout_rate is not None:
            self._check_dropout_rate()
        if self.parameterization == "additive":
            self._check_additive()
        if self.noise in SHARED_NOISES and self.granularity == "weight":
            raise ValueError(
                f"noise={self.noise!r} shares one noise variable, hence one α, among the weights of a unit: "
                "use granularity='unit', 'output' or 'layer', or noise='independent' for α per weight"
            )
        if self.noise == "independent" and self.granularity == "output":
            raise ValueError(
                "granularity='output' (α per output unit) is for the shared noises; with noise='independent' use "
                "'weight', 'unit' or 'layer', or noise='group' to prune output units"
            )
        if self.noise == "sbp":
            self._check_sbp()
        if self.train_clip is not None:
            self._check_train_clip()
        if self.input_dim is not None and not isinstance(self.input_dim, (int, dict)):
            raise TypeError(f"input_dim must be an int, a dict {{site name: int}} or None, got {self.input_dim!r}")
        if not callable(self.init_loc_fn):
            raise TypeError(
                f"init_loc_fn must be an init strategy (a callable taking a site), got {self.init_loc_fn!r}"
            )
        self._resolve()

    def _check_choices(self):
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES} or None, got {self.granularity!r}")
        if self.kl_approx is not None:
            check_kl_approx(self.kl_approx)

    def _check_dropout_rate(self):
        rate = self.dropout_rate
        if not isinstance(rate, (int, float)) or not 0 < rate < 1:
            raise ValueError(f"dropout_rate must be a number in (0, 1), got {rate!r}")
        if self.parameterization != "multiplicative":
            raise ValueError(
                "dropout_rate fixes α = p / (1 - p), which only the multiplicative parameterization has; "
                "drop parameterization='additive' or dropout_rate"
            )
        if self.granularity is not None:
            raise ValueError("dropout_rate fixes one α for every weight; leave granularity unset")
        if self.max_log_alpha != "auto":
            raise ValueError("dropout_rate fixes α, so max_log_alpha does not apply; leave it unset")

    def _check_sbp(self):
        fixed = {  # the values that mean "none" (the resolved options hold None)
            "kl_approx": (None,),
            "log_alpha_clip": ("auto", None),
            "max_log_alpha": ("auto", None),
            "dropout_rate": (None,),
        }
        for name, allowed in fixed.items():
            value = getattr(self, name)
            if not any(value is a or value == a for a in allowed):
                raise ValueError(
                    f"noise='sbp' learns log-normal noise with the exact KL to its truncated log-uniform prior; "
                    f"{name} (an option of the Gaussian noises) does not apply: leave it unset, got {value!r}"
                )
        if not math.isfinite(self.init_noise_loc) or not math.isfinite(self.init_noise_log_scale):
            raise ValueError("init_noise_loc and init_noise_log_scale must be finite numbers")

    def _check_additive(self):
        if self.noise == "group":
            return  # the group noise N(μ_g, σ_g²): σ_g² and μ_g per group, log α_g capped by max_log_alpha
        if self.noise != "independent":
            raise ValueError(
                "parameterization='additive' learns σ² per weight, which cannot be shared by the weights of a "
                "unit: use noise='independent' or noise='group' (or the multiplicative parameterization for "
                "correlated noise)"
            )
        if self.granularity not in (None, "weight"):
            raise ValueError(
                "parameterization='additive' learns σ² (hence α) per weight; granularity must be 'weight' "
                f"(or unset), got {self.granularity!r}. Use parameterization='multiplicative' for α per unit or "
                "layer."
            )
        if self.max_log_alpha not in ("auto", None):
            raise ValueError(
                "max_log_alpha caps the learned log α of the multiplicative parameterization; "
                "the additive one leaves α unbounded (log α is clipped inside the KL by log_alpha_clip)"
            )

    def _check_train_clip(self):
        value = self.train_clip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"train_clip must be a finite log α threshold (e.g. 3) or None, got {value!r}")
        if self.parameterization != "additive" or self.noise != "independent":
            raise ValueError(
                "train_clip zeroes the means of the weights whose log α = log σ² - log θ² passes it, which needs "
                "σ² per weight: use parameterization='additive' with noise='independent' (the 'sparse' preset), or "
                "leave train_clip unset"
            )

    def _resolve(self):
        """Replaces the defaults ``None`` / ``"auto"`` by the values in force."""
        granularity = self.granularity
        if granularity is None:
            granularity = "unit" if self.noise in SHARED_NOISES else "weight"
        log_alpha_clip = self.log_alpha_clip
        if log_alpha_clip == "auto":
            additive = self.parameterization == "additive" and self.noise == "independent"
            log_alpha_clip = SPARSE_VD_LOG_ALPHA_CLIP if additive else None
        if log_alpha_clip is not None:
            log_alpha_clip = tuple(float(v) for v in log_alpha_clip)
            if len(log_alpha_clip) != 2 or not log_alpha_clip[0] < log_alpha_clip[1]:
                raise ValueError(f"log_alpha_clip must be (low, high) with low < high, or None; got {log_alpha_clip!r}")
        max_log_alpha = self.max_log_alpha
        if max_log_alpha == "auto":
            if self.noise == "group":
                max_log_alpha = GROUP_MAX_LOG_ALPHA
            elif self.noise == "sbp" or self.parameterization != "multiplicative":
                max_log_alpha = None
            else:
                max_log_alpha = PAPER_MAX_LOG_ALPHA
        resolved = {
            "granularity": granularity,
            "log_alpha_clip": log_alpha_clip,
            "max_log_alpha": None if max_log_alpha is None else float(max_log_alpha),
            "kl_scale": check_kl_scale(self.kl_scale),
            "init_log_alpha": float(self.init_log_alpha),
            "init_log_sigma2": float(self.init_log_sigma2),
            "init_noise_loc": float(self.init_noise_loc),
            "init_noise_log_scale": float(self.init_noise_log_scale),
            "train_clip": None if self.train_clip is None else float(self.train_clip),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)  # frozen: set once, while constructing


__all__ = [
    "DEFAULT_INIT_LOG_ALPHA",
    "DEFAULT_INIT_NOISE_LOC",
    "DEFAULT_INIT_NOISE_LOG_SCALE",
    "GRANULARITIES",
    "GROUP_MAX_LOG_ALPHA",
    "NOISES",
    "SHARED_NOISES",
    "PAPER_MAX_LOG_ALPHA",
    "PARAMETERIZATIONS",
    "SPARSE_VD_INIT_LOG_SIGMA2",
    "VariationalDropoutOptions",
    "check_kl_scale",
]
