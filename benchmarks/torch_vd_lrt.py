# SPDX-License-Identifier: Apache-2.0
"""
Hand-written plain-torch variational-dropout layers with the local reparameterization trick (LRT):
the reference that ``benchmarks/step_time.py`` and ``python -m benchmarks.run`` compare the Pyro handler against.

Same maths as ``pyro_vdrop`` with ``VariationalDropoutNormal(theta, log_alpha)`` guides,
``ImproperLogUniform`` priors and ``TraceMeanField_ELBO`` under ``local_reparam()``:

    gamma = op(x, theta) + b,  delta = op(x^2, alpha theta^2),  out = gamma + sqrt(delta) * zeta
    loss  = -(N / M) sum_m log p(y_m | out_m) + sum_ij KL_molchanov(log alpha_ij)

where ``op`` is ``F.linear`` or ``F.conv2d`` and zeta is standard normal noise, independent per example and
output element. As in ``AutoVariationalDropout``'s default, log alpha is capped at ``max_log_alpha=0.0``
(``log_alpha.clamp(max=0)`` in the variance and the KL); ``max_log_alpha=None`` drops the cap (for comparison
with ``AutoVariationalDropout(model, max_log_alpha=None)``).

Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vdrop.distributions import log_uniform_kl


def _capped(layer):
    """The layer's log alpha, capped at ``layer.max_log_alpha`` (unless None)."""
    if layer.max_log_alpha is None:
        return layer.log_alpha
    return layer.log_alpha.clamp(max=layer.max_log_alpha)


def _lrt_sample(gamma, delta):
    # tiny keeps the gradient of sqrt finite where an example's inputs are all zero
    return gamma + (delta + torch.finfo(delta.dtype).tiny).sqrt() * torch.randn_like(gamma)


class VDLinearLRT(nn.Module):
    """A linear layer with q(w) = N(theta, alpha theta^2) per weight, sampled by LRT."""

    def __init__(
        self, in_features, out_features, *, log_alpha_init=-3.0, max_log_alpha=0.0, bias=True, device=None, dtype=None
    ):
        super().__init__()
        self.max_log_alpha = max_log_alpha
        kw = {"device": device, "dtype": dtype}
        self.theta = nn.Parameter(torch.randn(out_features, in_features, **kw) / in_features**0.5)
        self.log_alpha = nn.Parameter(torch.full((out_features, in_features), log_alpha_init, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, layer, *, log_alpha_init=-3.0, max_log_alpha=0.0):
        """The LRT layer of an ``nn.Linear``, with theta and the bias copied from it."""
        w = layer.weight
        new = cls(
            w.shape[1],
            w.shape[0],
            log_alpha_init=log_alpha_init,
            max_log_alpha=max_log_alpha,
            bias=layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            new.theta.copy_(w)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def forward(self, x):
        var = _capped(self).exp() * self.theta * self.theta
        return _lrt_sample(F.linear(x, self.theta, self.bias), F.linear(x * x, var))

    def kl(self):
        return log_uniform_kl(_capped(self), "molchanov").sum()


class VDConv2dLRT(nn.Module):
    """
    A 2-d convolution with q(w) = N(theta, alpha theta^2) per weight, sampled by LRT: noise independent per
    example and output element (channel and position), as ``pyro_vdrop``'s ``local_reparam()`` draws it.
    Made from an ``nn.Conv2d``, whose options, weight (theta) and bias it takes.
    """

    def __init__(self, conv, *, log_alpha_init=-3.0, max_log_alpha=0.0):
        super().__init__()
        self.max_log_alpha = max_log_alpha
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
            raise TypeError(f"conv must be an nn.Conv2d with padding_mode='zeros', got {conv!r}")
        w = conv.weight
        self.theta = nn.Parameter(w.detach().clone())
        self.log_alpha = nn.Parameter(torch.full_like(w.detach(), log_alpha_init))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.options = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }

    def forward(self, x):
        var = _capped(self).exp() * self.theta * self.theta
        gamma = F.conv2d(x, self.theta, self.bias, **self.options)
        return _lrt_sample(gamma, F.conv2d(x * x, var, None, **self.options))

    def kl(self):
        return log_uniform_kl(_capped(self), "molchanov").sum()


class VDNet(nn.Module):
    """
    A copy of a torch network with every ``nn.Linear`` and ``nn.Conv2d`` replaced by its LRT layer (theta and
    biases copied from the network); other modules are kept as they are.
    """

    def __init__(self, net, *, log_alpha_init=-3.0, max_log_alpha=0.0):
        super().__init__()
        self.net = copy.deepcopy(net)
        for name, module in list(self.net.named_modules()):
            if type(module) in (nn.Linear, nn.Conv2d):
                new = (
                    VDLinearLRT.from_linear(module, log_alpha_init=log_alpha_init, max_log_alpha=max_log_alpha)
                    if isinstance(module, nn.Linear)
                    else VDConv2dLRT(module, log_alpha_init=log_alpha_init, max_log_alpha=max_log_alpha)
                )
                parent, _, attr = name.rpartition(".")
                setattr(self.net.get_submodule(parent) if parent else self.net, attr, new)
        self.vd_layers = [m for m in self.net.modules() if isinstance(m, (VDLinearLRT, VDConv2dLRT))]
        if not self.vd_layers:
            raise ValueError("net has no nn.Linear or nn.Conv2d layer to replace")

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y, num_data):
        """The negative ELBO estimate: data term scaled by N / M, KL counted once."""
        nll = F.cross_entropy(self(x), y, reduction="sum") * (num_data / x.shape[0])
        return nll + sum(layer.kl() for layer in self.vd_layers)


class VDMLP(nn.Module):
    """The MNIST MLP (e.g. 784-300-100-10) with VD-LRT layers and ReLU."""

    def __init__(self, sizes, *, max_log_alpha=0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            VDLinearLRT(a, b, max_log_alpha=max_log_alpha) for a, b in zip(sizes[:-1], sizes[1:])
        )

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
