# SPDX-License-Identifier: Apache-2.0
"""Effect handlers: the local reparameterization trick (and Flipout) for weight sites."""

from .estimators import ALL_ESTIMATORS, ESTIMATORS
from .handlers import active_local_reparam, estimator_handler, local_reparam
from .lazy_weight import LazyWeight, LazyWeightError, UnsupportedOperation
from .local_reparam_messenger import LocalReparamMessenger
from .local_reparam_site import LocalReparamKL, LocalReparamSite
from .per_sequence_weight import RECURRENT_ESTIMATORS, PerSequenceWeight

__all__ = [
    "ALL_ESTIMATORS",
    "ESTIMATORS",
    "LazyWeight",
    "LazyWeightError",
    "LocalReparamKL",
    "LocalReparamMessenger",
    "LocalReparamSite",
    "PerSequenceWeight",
    "RECURRENT_ESTIMATORS",
    "UnsupportedOperation",
    "active_local_reparam",
    "estimator_handler",
    "local_reparam",
]
