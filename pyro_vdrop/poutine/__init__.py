# SPDX-License-Identifier: Apache-2.0
"""Effect handlers: the local reparameterization trick (and Flipout) for weight sites."""

from .handlers import local_reparam
from .lazy_weight import LazyWeight, LazyWeightError
from .local_reparam_messenger import LocalReparamMessenger
from .local_reparam_site import LocalReparamSite

__all__ = ["LazyWeight", "LazyWeightError", "LocalReparamMessenger", "LocalReparamSite", "local_reparam"]
