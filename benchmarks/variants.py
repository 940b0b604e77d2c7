# SPDX-License-Identifier: Apache-2.0
"""
The training-step variants that ``python -m benchmarks.run`` times: each is built as its users would write it
and exposes one ``step(x, y)`` (forward + backward + optimizer step, returning the loss as a float).

Pyro keeps parameters in one global store; every Pyro-based variant (ours and TyXe) gets a store of its own
(``ParamStoreDict.scope``), entered by :meth:`Variant.scope` around its steps, so that variants with the same
site names do not share parameters.
"""

import contextlib
from dataclasses import dataclass, field

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO

import pyro_vdrop

from .models import NUM_DATA, make_net
from .peers import PEER_VARIANTS, build_peer, peer_unavailable
from .torch_vd_lrt import VDNet

#: variant -> what it runs (ours and the references; the peers' are in benchmarks/peers).
OWN_VARIANTS = {
    "deterministic": "the plain torch net, F.cross_entropy, torch.optim.Adam",
    "torch_lrt": "hand-written plain-torch VD-LRT (benchmarks/torch_vd_lrt.py), same maths and KL (log alpha "
    "capped at 0), torch.optim.Adam",
    "pyro_vdrop_lrt": "bayesianize + AutoVariationalDropout + SVI(JointOptim(torch.optim.Adam), "
    'TraceMeanField_ELBO) under local_reparam(estimator="lrt")',
    "pyro_vdrop_lrt_validated": "pyro_vdrop_lrt with Pyro's validation on (pyro.enable_validation(True), Pyro's "
    "default; every other Pyro variant runs with it off)",
    "pyro_vdrop_sparse_validated": "the sparse VD path of README.md: pyro_vdrop_lrt with AutoVariationalDropout(model, "
    'parameterization="additive"), validation on',
    "pyro_vdrop_flipout": 'the same under local_reparam(estimator="flipout")',
    "pyro_weight_sample": "the same model and guide without the handler: one weight sample per minibatch",
    "pyro_vdrop_per_example": 'the same under local_reparam(estimator="per-example"): a weight sample per example',
}
VARIANTS = {**OWN_VARIANTS, **{name: spec["description"] for name, spec in PEER_VARIANTS.items()}}
#: the variants of the step-time suite, in table order (per-example weights only in the scaling study)
STEP_VARIANTS = [name for name in VARIANTS if name != "pyro_vdrop_per_example"]
SCALING_VARIANTS = ["deterministic", "torch_lrt", "pyro_vdrop_lrt", "pyro_vdrop_per_example"]
_ESTIMATORS = {
    "pyro_vdrop_lrt": "lrt",
    "pyro_vdrop_lrt_validated": "lrt",
    "pyro_vdrop_sparse_validated": "lrt",
    "pyro_vdrop_flipout": "flipout",
    "pyro_vdrop_per_example": "per-example",
}
_VALIDATED = ("pyro_vdrop_lrt_validated", "pyro_vdrop_sparse_validated")


@dataclass
class Variant:
    """A built variant: ``step(x, y)`` runs one training step; enter ``scope()`` around steps."""

    name: str
    step: object
    param_state: dict | None = field(default=None)

    def scope(self):
        if self.param_state is None:
            return contextlib.nullcontext()
        return pyro.get_param_store().scope(self.param_state)


def unavailable(name):
    """None if the variant can run here, else the reason it cannot (e.g. a peer that is not installed)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    return peer_unavailable(name) if name in PEER_VARIANTS else None


def torch_step(module, loss_fn, lr=1e-3):
    """A plain torch training step of ``module``: ``torch.optim.Adam``, ``loss_fn(x, y)``, returns the loss."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)

    def step(x, y):
        opt.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _pyro_vdrop(net, estimator, lr, *, validate=False, **guide_options):
    # the user code of README.md ("From a torch network", "The local reparameterization trick")
    model = pyro_vdrop.nn.bayesianize(net, num_data=NUM_DATA)
    guide = pyro_vdrop.infer.AutoVariationalDropout(model, **guide_options)
    optim = pyro_vdrop.optim.JointOptim(torch.optim.Adam, {"lr": lr})
    svi = SVI(model, guide, optim, TraceMeanField_ELBO())
    if estimator is None:
        return svi.step

    def step(x, y):
        # the worker turns validation off; the validated variants turn it on for their own steps
        with pyro.validation_enabled(validate), pyro_vdrop.poutine.local_reparam(estimator=estimator):
            return svi.step(x, y)

    return step


def build(name, model_name, *, device="cpu", dtype=torch.float32, lr=1e-3, seed=0):
    """
    Builds the variant ``name`` for the network ``model_name`` (fresh parameters, seeded).

    :raises RuntimeError: if the variant cannot run here (see :func:`unavailable`).
    """
    reason = unavailable(name)
    if reason is not None:
        raise RuntimeError(f"variant {name!r} cannot run: {reason}")
    pyro.set_rng_seed(seed)
    net = make_net(model_name, device=device, dtype=dtype)
    if name == "deterministic":
        return Variant(name, torch_step(net, lambda x, y: F.cross_entropy(net(x), y), lr))
    if name == "torch_lrt":
        vd = VDNet(net)
        return Variant(name, torch_step(vd, lambda x, y: vd.loss(x, y, NUM_DATA), lr))
    state = {"params": {}, "constraints": {}}
    with pyro.get_param_store().scope(state):
        if name in PEER_VARIANTS:
            step = build_peer(name, net, num_data=NUM_DATA, lr=lr)
        else:
            options = {"parameterization": "additive"} if name == "pyro_vdrop_sparse_validated" else {}
            step = _pyro_vdrop(net, _ESTIMATORS.get(name), lr, validate=name in _VALIDATED, **options)
    if PEER_VARIANTS.get(name, {}).get("pyro", True):
        return Variant(name, step, state)
    return Variant(name, step)
