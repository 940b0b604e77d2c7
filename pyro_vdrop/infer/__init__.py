# SPDX-License-Identifier: Apache-2.0
"""Inference for variational dropout: guides, initialization and diagnostics."""

from .effect import AutoVariationalDropoutMessenger
from .initialization import init_to_fan_in
from .predictive import Predictive
from .variational_dropout import AutoVariationalDropout

__all__ = [
    "AutoVariationalDropout",
    "AutoVariationalDropoutMessenger",
    "Predictive",
    "init_to_fan_in",
]
