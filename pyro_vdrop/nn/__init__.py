# SPDX-License-Identifier: Apache-2.0
"""Neural networks: turning torch networks into variational-dropout models, reference nets, pruning, compression."""

from .bayesian_module import BayesianModule
from .bayesianize import SUPPORTED_LAYERS, bayesianize
from .compress import (
    COMPRESSIBLE_LAYERS,
    SelectInputs,
    compress,
    compressed_bytes,
    count_parameters,
    layer_widths,
    load_compressed,
    save_compressed,
)
from .prune import LOG_ALPHA_THRESHOLD, prune
from .recurrent import GRU, LSTM, RNN, gate_sparsity, to_bayesian_recurrent_
from .reference_nets import lenet5_caffe, lenet_300_100, mnist_mlp

__all__ = [
    "COMPRESSIBLE_LAYERS",
    "GRU",
    "LOG_ALPHA_THRESHOLD",
    "LSTM",
    "RNN",
    "SUPPORTED_LAYERS",
    "BayesianModule",
    "SelectInputs",
    "bayesianize",
    "compress",
    "compressed_bytes",
    "count_parameters",
    "gate_sparsity",
    "layer_widths",
    "lenet5_caffe",
    "lenet_300_100",
    "load_compressed",
    "mnist_mlp",
    "prune",
    "save_compressed",
    "to_bayesian_recurrent_",
]
