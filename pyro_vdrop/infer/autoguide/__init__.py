# SPDX-License-Identifier: Apache-2.0
"""
Variational-dropout guides, after :mod:`pyro.infer.autoguide`: the autoguide and its effect-based twin, the
base class they share, their options as one validated object, the papers' variants as presets, and the
initialization of weight sites with an improper prior.
"""

from .base import AutoVariationalDropoutBase
from .effect import AutoVariationalDropoutMessenger
from .guides import AutoVariationalDropout
from .initialization import init_to_fan_in
from .options import VariationalDropoutOptions
from .presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "AutoVariationalDropout",
    "AutoVariationalDropoutBase",
    "AutoVariationalDropoutMessenger",
    "VariationalDropoutOptions",
    "init_to_fan_in",
    "preset",
]
