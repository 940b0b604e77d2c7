# SPDX-License-Identifier: Apache-2.0
"""Neural networks: turning torch networks into variational-dropout models, reference nets, pruning."""

from .bayesian_module import BayesianModule
from .bayesianize import SUPPORTED_LAYERS, bayesianize
from .prune import LOG_ALPHA_THRESHOLD, prune
from .recurrent import GRU, LSTM, RNN, gate_sparsity, to_bayesian_recurrent_
from .reference_nets import lenet5_caffe, lenet_300_100, mnist_mlp

__all__ = [
    "LOG_ALPHA_THRESHOLD",
    "SUPPORTED_LAYERS",
    "GRU",
    "LSTM",
    "RNN",
    "BayesianModule",
    "bayesianize",
    "gate_sparsity",
    "lenet5_caffe",
    "lenet_300_100",
    "mnist_mlp",
    "prune",
    "to_bayesian_recurrent_",
]
