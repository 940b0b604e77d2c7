# SPDX-License-Identifier: Apache-2.0
"""Inference for variational dropout: guides, initialization and diagnostics."""

from .effect import AutoVariationalDropoutMessenger
from .gradient_variance import GRADIENT_ESTIMATORS, gradient_variance
from .initialization import init_to_fan_in
from .predictive import Predictive
from .variational_dropout import AutoVariationalDropout

__all__ = [
    "AutoVariationalDropout",
    "AutoVariationalDropoutMessenger",
    "GRADIENT_ESTIMATORS",
    "Predictive",
    "gradient_variance",
    "init_to_fan_in",
]
