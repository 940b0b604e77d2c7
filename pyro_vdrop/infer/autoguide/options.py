# SPDX-License-Identifier: Apache-2.0
"""The options of the variational-dropout guides, as one validated, frozen object."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

from pyro_vdrop.distributions.util import check_kl_approx
from pyro_vdrop.infer.sparsity import SPARSE_VD_LOG_ALPHA_CLIP

from .initialization import init_to_fan_in

NOISES = ("independent", "correlated")
GRANULARITIES = ("weight", "unit", "layer")
PARAMETERIZATIONS = ("multiplicative", "additive")

#: Kingma, Salimans, Welling (2015), §3.3: the paper clamps α at 1, i.e. log α ≤ 0.
PAPER_MAX_LOG_ALPHA = 0.0
#: Molchanov, Ashukha, Vetrov (2017), §5: initial log σ² of sparse variational dropout.
SPARSE_VD_INIT_LOG_SIGMA2 = -10.0
#: Default initial log α of the multiplicative parameterization: weak noise (α ≈ 0.018),
#: about where sparse VD's log σ² = -10 starts for fan-in-initialised weights.
DEFAULT_INIT_LOG_ALPHA = -4.0


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

    :param str noise: ``"independent"`` (default; the paper's B [1]) or ``"correlated"`` (the paper's A).
    :param str granularity: Where α varies: ``"weight"``, ``"unit"`` (along the input axis, shared
        along plate dims) or ``"layer"`` (one α per site). Default ``"weight"`` with independent
        noise, ``"unit"`` with correlated noise (which cannot have α per weight).
    :param str parameterization: ``"multiplicative"`` (default; learns θ and log α, log α capped at
        ``max_log_alpha`` as in the paper) or ``"additive"`` (sparse variational dropout [2]: learns θ
        and log σ², :math:`\log\alpha = \log\sigma^2 - \log\theta^2` unbounded; per weight and
        independent noise only).
    :param float dropout_rate: Fix :math:`\alpha = p/(1-p)` from a dropout rate ``p`` (Gaussian dropout
        read as a posterior [1, §3]); no α parameter, no α gradient, and the KL is a constant.
    :param float kl_scale: The factor on the KL term (default 1); the guide's ``kl_scale`` attribute starts
        from it and may be changed during training.
    :param str kl_approx: The KL approximation, ``"molchanov"`` or ``"kingma"``
        (:func:`~pyro_vdrop.distributions.log_uniform_kl`); default ``None``: the prior's (``"molchanov"``).
    :param tuple log_alpha_clip: ``(low, high)`` bounds on log α inside the KL only, or None.
        Default ``"auto"``: ``(-8, 8)`` for the additive parameterization [2], None otherwise.
    :param float max_log_alpha: Cap on the learned log α of the multiplicative parameterization,
        applied by clamping in the forward pass (no gradient beyond it). Default ``"auto"``: 0
        (α ≤ 1 [1]); None removes the cap (then prefer ``kl_approx="molchanov"``).
    :param input_dim: The input axis of each site: an int (a non-negative dim of the weight, i.e. of the
        event shape, or a negative dim of the site's value), a dict ``{site name: int}``, or None for the
        torch layout.
    :param callable init_loc_fn: A per-site initialization strategy for θ (default
        :func:`~pyro_vdrop.infer.init_to_fan_in`).
    :param float init_log_alpha: Initial log α of the multiplicative parameterization (default -4).
    :param float init_log_sigma2: Initial log σ² of the additive parameterization (default -10 [2]).

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick."
        NeurIPS 2015.
    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
    """

    noise: Literal["independent", "correlated"] = "independent"
    granularity: Literal["weight", "unit", "layer"] | None = None
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

    def __post_init__(self):
        self._check_choices()
        if self.dropout_rate is not None:
            self._check_dropout_rate()
        if self.parameterization == "additive":
            self._check_additive()
        if self.noise == "correlated" and self.granularity == "weight":
            raise ValueError(
                "noise='correlated' shares one noise variable, hence one α, among the weights of an input unit: "
                "use granularity='unit' or 'layer', or noise='independent' for α per weight"
            )
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

    def _check_additive(self):
        if self.noise != "independent":
            raise ValueError(
                "parameterization='additive' learns σ² per weight, which cannot be shared by the weights of a "
                "unit: use noise='independent' (or the multiplicative parameterization for correlated noise)"
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

    def _resolve(self):
        """Replaces the defaults ``None`` / ``"auto"`` by the values in force."""
        granularity = self.granularity
        if granularity is None:
            granularity = "unit" if self.noise == "correlated" else "weight"
        log_alpha_clip = self.log_alpha_clip
        if log_alpha_clip == "auto":
            log_alpha_clip = SPARSE_VD_LOG_ALPHA_CLIP if self.parameterization == "additive" else None
        if log_alpha_clip is not None:
            log_alpha_clip = tuple(float(v) for v in log_alpha_clip)
            if len(log_alpha_clip) != 2 or not log_alpha_clip[0] < log_alpha_clip[1]:
                raise ValueError(f"log_alpha_clip must be (low, high) with low < high, or None; got {log_alpha_clip!r}")
        max_log_alpha = self.max_log_alpha
        if max_log_alpha == "auto":
            max_log_alpha = PAPER_MAX_LOG_ALPHA if self.parameterization == "multiplicative" else None
        resolved = {
            "granularity": granularity,
            "log_alpha_clip": log_alpha_clip,
            "max_log_alpha": None if max_log_alpha is None else float(max_log_alpha),
            "kl_scale": check_kl_scale(self.kl_scale),
            "init_log_alpha": float(self.init_log_alpha),
            "init_log_sigma2": float(self.init_log_sigma2),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)  # frozen: set once, while constructing


__all__ = [
    "DEFAULT_INIT_LOG_ALPHA",
    "GRANULARITIES",
    "NOISES",
    "PAPER_MAX_LOG_ALPHA",
    "PARAMETERIZATIONS",
    "SPARSE_VD_INIT_LOG_SIGMA2",
    "VariationalDropoutOptions",
    "check_kl_scale",
]
