# SPDX-License-Identifier: Apache-2.0
"""
bayesian-torch (Intel Labs, PyPI ``bayesian-torch``), trained as its README does: ``dnn_to_bnn`` converts the
torch network in place, the loss is ``cross_entropy + get_kl_loss(net) / batch_size`` and the optimizer
``torch.optim.Adam`` over ``net.parameters()``.

Differences from pyro-vdrop's setup, which the library does not let us remove: the prior is a Normal
N(0, 1) (no log-uniform prior), the posterior N(mu, softplus(rho)^2) with free mu and rho, the biases are
Bayesian too, and its KL is the mean (not the sum) over weights, divided by the batch size: a different
objective from the ELBO, at the same cost. It has no local-reparameterization layer: "Reparameterization"
layers draw one weight sample per minibatch, "Flipout" layers use Flipout.
"""

import copy

import torch
import torch.nn.functional as F

_LAYER_TYPES = {"bayesian_torch_reparam": "Reparameterization", "bayesian_torch_flipout": "Flipout"}


def unavailable():
    try:
        import bayesian_torch.models.dnn_to_bnn  # noqa: F401
    except ImportError as e:
        return f"not installed: {e}"
    return None


def build(name, net, *, num_data, lr):
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss

    # the values of the library's README example
    prior = {
        "prior_mu": 0.0,
        "prior_sigma": 1.0,
        "posterior_mu_init": 0.0,
        "posterior_rho_init": -3.0,
        "type": _LAYER_TYPES[name],
        "moped_enable": False,
        "moped_delta": 0.5,
    }
    ref = next(net.parameters())
    net = copy.deepcopy(net)
    dnn_to_bnn(net, prior)  # builds its layers on the default device and dtype
    net.to(device=ref.device, dtype=ref.dtype)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y) + get_kl_loss(net) / x.shape[0]
        loss.backward()
        opt.step()
        return loss.item()

    return step
