# SPDX-License-Identifier: Apache-2.0
"""Inference for variational dropout: guides, initialization and diagnostics."""

from .autoguide import (
    AutoVariationalDropout,
    AutoVariationalDropoutMessenger,
    VariationalDropoutOptions,
    init_to_fan_in,
    preset,
)
from .gradient_variance import GRADIENT_ESTIMATORS, gradient_variance
from .kl_annealing import KLAnnealingMessenger, kl_annealing
from .predictive import Predictive, trace_guide_then_model
from .sparsity import (
    PRUNE_LOG_ALPHA_THRESHOLD,
    SBP_LOG_ALPHA_THRESHOLD,
    SPARSE_VD_LOG_ALPHA_CLIP,
    group_summary,
    prune_params,
    sparsity_summary,
    unit_summary,
)

__all__ = [
    "AutoVariationalDropout",
    "AutoVariationalDropoutMessenger",
    "GRADIENT_ESTIMATORS",
    "KLAnnealingMessenger",
    "PRUNE_LOG_ALPHA_THRESHOLD",
    "Predictive",
    "SBP_LOG_ALPHA_THRESHOLD",
    "SPARSE_VD_LOG_ALPHA_CLIP",
    "VariationalDropoutOptions",
    "gradient_variance",
    "group_summary",
    "init_to_fan_in",
    "kl_annealing",
    "preset",
    "prune_params",
    "sparsity_summary",
    "trace_guide_then_model",
    "unit_summary",
]
