# SPDX-License-Identifier: Apache-2.0
"""Distributions for variational dropout: the log-uniform prior, the dropout posteriors and their KLs."""

from .correlated_variational_dropout_normal import CorrelatedVariationalDropoutNormal
from .improper_log_uniform import ImproperLogUniform
from .kl import log_uniform_kl
from .util import KL_APPROXIMATIONS
from .variational_dropout_normal import VariationalDropoutNormal

__all__ = [
    "KL_APPROXIMATIONS",
    "CorrelatedVariationalDropoutNormal",
    "ImproperLogUniform",
    "VariationalDropoutNormal",
    "log_uniform_kl",
]
