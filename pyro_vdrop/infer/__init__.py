# SPDX-License-Identifier: Apache-2.0
"""Inference for variational dropout: guides, initialization and diagnostics."""

from .initialization import init_to_fan_in

__all__ = ["init_to_fan_in"]
