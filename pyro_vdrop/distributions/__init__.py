# SPDX-License-Identifier: Apache-2.0
"""Distributions for variational dropout: the log-uniform prior, the dropout posteriors and their KLs."""

from .correlated_variational_dropout_normal import CorrelatedVariationalDropoutNormal
from .group_variational_dropout_normal import GroupVariationalDropoutNormal
from .improper_log_uniform import ImproperLogUniform
from .kl import log_uniform_kl
from .log_uniform_noise_prior import SBP_LOG_NOISE_INTERVAL, LogUniformNoisePrior
from .truncated_log_normal import TruncatedLogNormal
from .truncated_log_normal_dropout import TruncatedLogNormalDropout
from .truncated_log_uniform import TruncatedLogUniform
from .util import KL_APPROXIMATIONS
from .variational_dropout_normal import VariationalDropoutNormal

__all__ = [
    "KL_APPROXIMATIONS",
    "SBP_LOG_NOISE_INTERVAL",
    "CorrelatedVariationalDropoutNormal",
    "GroupVariationalDropoutNormal",
    "ImproperLogUniform",
    "LogUniformNoisePrior",
    "TruncatedLogNormal",
    "TruncatedLogNormalDropout",
    "TruncatedLogUniform",
    "VariationalDropoutNormal",
    "log_uniform_kl",
]
