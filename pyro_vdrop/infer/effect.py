# SPDX-License-Identifier: Apache-2.0
"""Re-exports the effect-based variational-dropout guide under its older path (:mod:`pyro_vdrop.infer.autoguide`)."""

from .autoguide.effect import AutoVariationalDropoutMessenger
from .autoguide.options import DEFAULT_INIT_LOG_ALPHA, SPARSE_VD_INIT_LOG_SIGMA2

__all__ = ["DEFAULT_INIT_LOG_ALPHA", "SPARSE_VD_INIT_LOG_SIGMA2", "AutoVariationalDropoutMessenger"]
