# SPDX-License-Identifier: Apache-2.0
"""
A hand-written plain-torch variational-dropout MLP with the local reparameterization trick:
the reference that ``benchmarks/step_time.py`` compares the Pyro handler against.

Same maths as ``pyro_vdrop`` with ``VariationalDropoutNormal(theta, log_alpha)`` guides,
``ImproperLogUniform`` priors and ``TraceMeanField_ELBO`` under ``local_reparam()``:

    gamma = x theta^T + b,  delta = x^2 (alpha theta^2)^T,  out = gamma + sqrt(delta) * zeta
    loss  = -(N / M) sum_m log p(y_m | out_m) + sum_ij KL_molchanov(log alpha_ij)

Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vdrop.distributions import log_uniform_kl


class VDLinearLRT(nn.Module):
    """A linear layer with q(w) = N(theta, alpha theta^2) per weight, sampled by LRT."""

    def __init__(self, in_features, out_features, *, log_alpha_init=-3.0):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.log_alpha = nn.Parameter(torch.full((out_features, in_features), log_alpha_init))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        var = self.log_alpha.exp() * self.theta * self.theta
        gamma = F.linear(x, self.theta, self.bias)
        delta = F.linear(x * x, var)
        return gamma + (delta + torch.finfo(delta.dtype).tiny).sqrt() * torch.randn_like(gamma)

    def kl(self):
        return log_uniform_kl(self.log_alpha, "molchanov").sum()


class VDMLP(nn.Module):
    """The MNIST MLP (e.g. 784-300-100-10) with VD-LRT layers and ReLU."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(VDLinearLRT(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def loss(self, x, y, num_data):
        """The negative ELBO estimate: data term scaled by N / M, KL counted once."""
        nll = F.cross_entropy(self(x), y, reduction="sum") * (num_data / x.shape[0])
        return nll + sum(layer.kl() for layer in self.layers)
