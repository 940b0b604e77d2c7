# SPDX-License-Identifier: Apache-2.0
"""
pyro-vdrop: variational dropout and the local reparameterization trick for Pyro.

Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization
Trick." NeurIPS 2015.
"""

# Private names of Pyro and torch that pyro-vdrop uses, each for want of a public equivalent (one place to check
# when Pyro or torch change):
# - pyro.poutine.runtime._PYRO_STACK: the active effect handlers; read only in pyro_vdrop/poutine/runtime.py.
# - pyro.poutine.handlers._make_handler: how Pyro makes its own lower-case handlers (poutine/handlers.py).
# - AutoGuide._setup_prototype / _create_plates, AutoMessenger._pyro_sample / _adjust_plates: the hooks Pyro's
#   own autoguides override or call (infer/autoguide/guides.py, effect.py).
# - Tensor._pyro_custom_init: Pyro's init-strategy protocol flag (infer/autoguide/initialization.py).
# - torch.Tensor._make_subclass, torch._C.DisableTorchFunctionSubclass: torch's documented recipe for tensor
#   subclasses with __torch_function__ (poutine/lazy_weight.py).
# - torch.nn.modules.conv._ConvNd / _ConvTransposeNd: the common bases of torch's conv layers (arviz.py dims).
# - the "_deterministic" key of a site's infer dict, which marks pyro.deterministic sites (arviz.py).
# - PyroOptim._add_params / torch.optim.Optimizer internals in pyro_vdrop/optim and nn.Module._apply in
#   nn/bayesian_module.py: overridden hooks.
# - torch.distributions.utils._standard_normal in distributions/correlated_variational_dropout_normal.py.
# - PyroModule._pyro_name: a module's site-name prefix outside a call (serialization.py; Pyro's
#   _pyro_get_fullname works only inside one).
import importlib

__version__ = "0.1.0.dev0"

# The sub-packages and functions below are imported when first used (PEP 562), so that `import pyro_vdrop` does
# not import torch: the `pyro-vdrop` program (pyro_vdrop.program) sets process-wide defaults first.
_SUBMODULES = ("datasets", "distributions", "infer", "nn", "optim", "poutine")
_FUNCTIONS = {
    "load": "pyro_vdrop.serialization",
    "local_reparam": "pyro_vdrop.poutine",
    "save": "pyro_vdrop.serialization",
    "to_inference_data": "pyro_vdrop.arviz",
}

__all__ = [
    "__version__",
    "datasets",
    "distributions",
    "infer",
    "load",
    "local_reparam",
    "nn",
    "optim",
    "poutine",
    "save",
    "to_inference_data",
]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"pyro_vdrop.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'pyro_vdrop' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
