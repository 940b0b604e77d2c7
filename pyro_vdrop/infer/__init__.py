# SPDX-License-Identifier: Apache-2.0
"""Inference for variational dropout: guides, initialization and diagnostics."""

from .effect import AutoVariationalDropoutMessenger
from .initialization import init_to_fan_in
from .variational_dropout import AutoVariationalDropout

__all__ = [
    "AutoVariationalDropout",
    "AutoVariationalDropoutMessenger",
    "init_to_fan_in",
]
