# SPDX-License-Identifier: Apache-2.0
"""
Re-exports the variational-dropout autoguide and its constants under their older module path; they live in
:mod:`pyro_vdrop.infer.autoguide` (the guide and its options) and :mod:`pyro_vdrop.infer.sparsity`.
"""

from .autoguide.guides import AutoVariationalDropout
from .autoguide.options import (
    DEFAULT_INIT_LOG_ALPHA,
    GRANULARITIES,
    NOISES,
    PAPER_MAX_LOG_ALPHA,
    PARAMETERIZATIONS,
    SPARSE_VD_INIT_LOG_SIGMA2,
)
from .sparsity import PRUNE_LOG_ALPHA_THRESHOLD, SPARSE_VD_LOG_ALPHA_CLIP

__all__ = [
    "DEFAULT_INIT_LOG_ALPHA",
    "GRANULARITIES",
    "NOISES",
    "PAPER_MAX_LOG_ALPHA",
    "PARAMETERIZATIONS",
    "PRUNE_LOG_ALPHA_THRESHOLD",
    "SPARSE_VD_INIT_LOG_SIGMA2",
    "SPARSE_VD_LOG_ALPHA_CLIP",
    "AutoVariationalDropout",
]
