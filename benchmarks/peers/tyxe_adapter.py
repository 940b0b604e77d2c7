# SPDX-License-Identifier: Apache-2.0
"""
TyXe (PyPI ``tyxe`` 0.0.2), trained as its README does: ``tyxe.VariationalBNN(net, prior, likelihood, guide)``
and the ``SVI(bnn.model, bnn.guide, pyro.optim.Adam, TraceMeanField_ELBO())`` step that ``bnn.fit`` runs per
minibatch, under ``tyxe.poutine.local_reparameterization()`` or ``tyxe.poutine.flipout()``.

Prior and guide as close to pyro-vdrop's as TyXe allows: pyro-vdrop's ``ImproperLogUniform`` prior on the
weights; the biases get TyXe's usual N(0, 1) prior, because TyXe's handlers need a random bias (a
deterministic bias, as in pyro-vdrop's setup, fails in them with a ``KeyError``). The guide is
``tyxe.guides.AutoNormal``: a Normal with free loc and scale, not N(theta, alpha theta^2); pyro-vdrop
registers the analytic KL of any Normal to the log-uniform prior, with alpha = sigma^2 / mu^2. It is
initialised by ``pyro_vdrop.infer.init_to_fan_in`` (TyXe's default init samples the prior, which an
improper prior cannot do). TyXe's guide still samples every weight under its handlers (the sample is
not used); its likelihood plate takes the minibatch as its subsample.

Shim: TyXe 0.0.2 calls ``pyro.util.deep_getattr``, which Pyro 1.9 no longer has; we add it back (the
``functools.reduce(getattr, ...)`` of earlier Pyro releases) before importing TyXe.
"""

import functools

import pyro
import pyro.distributions as dist
import pyro.util
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

#: set when the deep_getattr shim was installed (recorded in the results)
SHIMMED = False


def _deep_getattr(obj, name):
    return functools.reduce(getattr, name.split("."), obj)


def _import_tyxe():
    global SHIMMED
    if not hasattr(pyro.util, "deep_getattr"):
        pyro.util.deep_getattr = _deep_getattr
        SHIMMED = True
    import tyxe

    return tyxe


def unavailable():
    try:
        _import_tyxe()
    except ImportError as e:
        return f"not installed: {e}"
    return None


def build(name, net, *, num_data, lr):
    tyxe = _import_tyxe()
    from pyro_vdrop.distributions import ImproperLogUniform
    from pyro_vdrop.infer import init_to_fan_in

    ref = next(net.parameters())
    zero = torch.zeros((), device=ref.device, dtype=ref.dtype)

    def prior_dist(name, module, param):
        return ImproperLogUniform() if name.endswith("weight") else dist.Normal(zero, zero + 1)

    def init_loc(site):
        # init_to_fan_in makes default-dtype CPU tensors (ImproperLogUniform has no parameters to follow)
        return init_to_fan_in(site).to(device=ref.device, dtype=ref.dtype)

    prior = tyxe.priors.LambdaPrior(prior_dist)
    likelihood = tyxe.likelihoods.Categorical(dataset_size=num_data)
    guide = functools.partial(tyxe.guides.AutoNormal, init_loc_fn=init_loc)
    bnn = tyxe.VariationalBNN(net, prior, likelihood, guide)
    svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO())
    handler = {"tyxe_lrt": tyxe.poutine.local_reparameterization, "tyxe_flipout": tyxe.poutine.flipout}[name]

    def step(x, y):
        with handler():
            return svi.step((x,), y)  # bnn.fit's call: inputs as a tuple

    return step
