# SPDX-License-Identifier: Apache-2.0
"""
Adapters for the peer libraries the suite compares against, each written as that library's documentation
trains a network. The peers are optional: install them into a separate environment (see benchmarks/README.md);
when one is missing its variants are skipped and the reason ("not installed: ...") is recorded.
"""

import importlib

#: variant -> adapter module, distribution name (for versions), description
PEER_VARIANTS = {
    "bayesian_torch_reparam": {
        "module": "bayesian_torch_adapter",
        "distribution": "bayesian-torch",
        "pyro": False,
        "description": "bayesian-torch dnn_to_bnn(type='Reparameterization'): one weight sample per minibatch "
        "(it has no LRT layer), CE + KL / batch, torch.optim.Adam",
    },
    "bayesian_torch_flipout": {
        "module": "bayesian_torch_adapter",
        "distribution": "bayesian-torch",
        "pyro": False,
        "description": "bayesian-torch dnn_to_bnn(type='Flipout'), CE + KL / batch, torch.optim.Adam",
    },
    "tyxe_lrt": {
        "module": "tyxe_adapter",
        "distribution": "tyxe",
        "pyro": True,
        "description": "TyXe VariationalBNN + tyxe.guides.AutoNormal, SVI(pyro.optim.Adam, TraceMeanField_ELBO) "
        "under tyxe.poutine.local_reparameterization()",
    },
    "tyxe_flipout": {
        "module": "tyxe_adapter",
        "distribution": "tyxe",
        "pyro": True,
        "description": "the same under tyxe.poutine.flipout()",
    },
}


def _adapter(name):
    return importlib.import_module(f"{__name__}.{PEER_VARIANTS[name]['module']}")


def peer_unavailable(name):
    """None if the peer of variant ``name`` can be imported, else why not."""
    return _adapter(name).unavailable()


def build_peer(name, net, *, num_data, lr):
    """The step function of the peer variant ``name`` for the torch network ``net``."""
    return _adapter(name).build(name, net, num_data=num_data, lr=lr)
