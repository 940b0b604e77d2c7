# SPDX-License-Identifier: Apache-2.0
"""
pyro-vdrop: variational dropout and the local reparameterization trick for Pyro.

Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization
Trick." NeurIPS 2015.
"""

from pyro_vdrop import datasets, distributions, infer, nn, optim, poutine
from pyro_vdrop.arviz import to_inference_data
from pyro_vdrop.poutine import local_reparam

__version__ = "0.1.0.dev0"

__all__ = [
    "__version__",
    "datasets",
    "distributions",
    "infer",
    "local_reparam",
    "nn",
    "optim",
    "poutine",
    "to_inference_data",
]
