# SPDX-License-Identifier: Apache-2.0
"""Re-exports :func:`~pyro_vdrop.infer.autoguide.init_to_fan_in` under its older module path."""

from .autoguide.initialization import init_to_fan_in

__all__ = ["init_to_fan_in"]
