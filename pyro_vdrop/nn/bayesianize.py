# SPDX-License-Identifier: Apache-2.0
"""Turning a torch network into a Pyro model with log-uniform priors on its weights."""

import copy
import numbers
import warnings
from collections.abc import Callable, Iterable

import torch
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule, PyroParam, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn
from torch.distributions import constraints

from pyro_vdrop.distributions import ImproperLogUniform

from .bayesian_module import LIKELIHOODS, BayesianModule, bayesian_class
from .recurrent import RECURRENT_LAYERS, to_bayesian_recurrent_

#: The layer types whose weights become random: the local reparameterization trick applies to the linear,
#: convolutional, embedding and attention ones; recurrent ones get one weight per sequence (see
#: :mod:`pyro_vdrop.nn.recurrent`).
SUPPORTED_LAYERS = (
    nn.Linear,
    nn.modules.linear.NonDynamicallyQuantizableLinear,  # the output projection of nn.MultiheadAttention
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.MultiheadAttention,
) + tuple(RECURRENT_LAYERS)
_LAYER_NAMES = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)


def _random_params(layer: nn.Module, random_bias: bool) -> list[str]:
    """The names of a supported layer's parameters that become random sites."""
    if type(layer) in RECURRENT_LAYERS:
        if getattr(layer, "proj_size", 0):
            raise NotImplementedError(
                f"bayesianize: an LSTM with proj_size > 0 ({layer}) is not supported; use proj_size=0"
            )
        names = layer._flat_weights_names
        return [n for n in names if n.startswith("weight_") or (random_bias and n.startswith("bias_"))]
    if isinstance(layer, nn.MultiheadAttention):
        # the packed input projection, or the separate ones when the key/value dims differ; the output
        # projection is the layer's own submodule ``out_proj`` (a Linear)
        names = [
            n
            for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            if getattr(layer, n) is not None
        ]
        bias = "in_proj_bias"
    else:
        names, bias = ["weight"], "bias"
    if random_bias and getattr(layer, bias, None) is not None:
        names.append(bias)
    return names


_RESERVED = ("obs_scale", "num_data", "likelihood", "random_sites", "deterministic_modules")

Prior = TorchDistribution | Callable[[str, torch.Tensor], TorchDistribution]


def _site_prior(prior, name: str, value: torch.Tensor):
    if prior is None:
        prior = ImproperLogUniform(dtype=value.dtype, device=value.device)
    if isinstance(prior, torch.distributions.Distribution):
        if prior.batch_shape or prior.event_shape:
            raise ValueError(
                f"prior must be a scalar distribution (batch and event shape ()), got {prior}; bayesianize expands "
                "it to each weight's shape. For per-site priors pass a callable (site_name, tensor) -> distribution."
            )
        return prior.expand(value.shape).to_event(value.dim())
    if callable(prior):
        d = prior(name, value)
        if not isinstance(d, torch.distributions.Distribution) or d.shape() != value.shape:
            raise ValueError(
                f"prior({name!r}, tensor of shape {tuple(value.shape)}) must return a distribution of shape "
                f"{tuple(value.shape)} (batch_shape + event_shape), got {d!r}"
            )
        return d.to_event(len(d.batch_shape)) if d.batch_shape else d
    raise TypeError(
        f"prior must be a Distribution, a callable (site_name, tensor) -> Distribution or None, got {prior!r}"
    )


def bayesianize(
    module: nn.Module,
    *,
    prior: Prior | None = None,
    layers: Iterable[str] | None = None,
    random_bias: bool = False,
    likelihood: str = "categorical",
    obs_scale: float | torch.Tensor | None = None,
    num_data: int | None = None,
) -> BayesianModule:
    r"""
    Turns a torch network into a Pyro model whose weights are random, with the log-uniform prior
    :math:`p(w) \propto 1/|w|` of variational dropout [1, §4]:

    .. math::

        w \sim p(w), \qquad y_i \mid x_i, w \sim p(y_i \mid f_w(x_i)), \quad i = 1, \dots, N.

    The weight of every :class:`~torch.nn.Linear`, :class:`~torch.nn.Conv1d` / ``Conv2d`` / ``Conv3d``,
    :class:`~torch.nn.ConvTranspose1d` / ``2d`` / ``3d`` and :class:`~torch.nn.Embedding` layer, the input
    projection (``in_proj_weight``, or ``q/k/v_proj_weight``) and output projection (``out_proj.weight``) of every
    :class:`~torch.nn.MultiheadAttention` (so also of transformer layers), and every weight matrix
    (``weight_ih_l0``, ``weight_hh_l0``, ..., ``_reverse``) of every :class:`~torch.nn.LSTM` / ``GRU`` / ``RNN``
    (or of the layers named in ``layers``) becomes a :class:`~pyro.nn.PyroSample` site named by its module path
    (``"fc1.weight"``, ``"attn.in_proj_weight"``) with prior ``ImproperLogUniform().expand(w.shape).to_event(w.dim())``.
    Biases stay deterministic parameters (trained by SVI as ``pyro.param`` sites of the same names) unless
    ``random_bias=True``. All other layers stay deterministic; those holding parameters (e.g. ``BatchNorm``,
    ``LayerNorm``) are listed in a warning and in ``model.deterministic_modules``. Under
    :func:`~pyro_vdrop.poutine.local_reparam` an embedding draws one weight per example (dim 0 of its indices,
    a sequence of ``(batch, length)`` token ids) and the linear layers (attention projections included) draw
    independent noise per token; see :func:`~pyro_vdrop.poutine.lazy_weight.lazy_embedding`. Recurrent layers
    become :mod:`pyro_vdrop.nn.recurrent` layers (same class family, same parameters), whose weight is one sample
    per sequence, shared by its time steps; under :func:`~pyro_vdrop.poutine.local_reparam` they need a
    correlated-noise guide or the ``"flipout"``, ``"per-example"`` or ``"mean"`` estimator (``"lrt"`` raises: it
    is not exact over time steps).

    The input is not changed: the model is a deep copy converted with :func:`~pyro.nn.module.to_pyro_module_`,
    still an instance of the network's class. Its ``forward(x, y=None)`` (see :meth:`BayesianModule.forward`)
    runs the network, observes ``y`` at site ``"obs"`` inside ``pyro.plate("data", size=num_data,
    subsample=torch.arange(len(x)))`` — so minibatch ELBOs are scaled by :math:`N/M` [1, §1] — and returns the logits
    or mean. The original weights stay available for initialising a guide::

        model = bayesianize(net, num_data=60000)
        guide = AutoNormal(model, init_loc_fn=init_to_value(values=model.initial_weights()))

    :param torch.nn.Module module: The network; its ``forward`` takes a single input batch.
    :param prior: The weight prior: a scalar distribution expanded to each weight's shape, or a callable
        ``(site_name, tensor) -> distribution`` of the weight's shape (use it for priors whose parameters must
        be on the weights' device or dtype); default :class:`~pyro_vdrop.distributions.ImproperLogUniform`.
        See the caveats of the improper prior (Hron et al. 2018) in its documentation.
    :param layers: Module paths (``dict(module.named_modules())`` keys) of the layers to make random; default
        all supported layers.
    :param bool random_bias: Give the biases of those layers the prior too.
    :param str likelihood: ``"categorical"`` (the network's outputs are logits of shape ``(M, classes)``) or
        ``"normal"`` (outputs are the mean of a Normal with standard deviation ``obs_scale``).
    :param obs_scale: The Normal likelihood's noise standard deviation; None learns it (positive parameter
        ``"obs_scale"``, initialised to 1). Not allowed with ``"categorical"``.
    :param int num_data: :math:`N`, the size of the full training set, when the model is fed minibatches;
        None: every batch is the whole data set.
    :returns: the model.
    :rtype: BayesianModule

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
    """
    if not isinstance(module, nn.Module) or isinstance(module, PyroModule):
        raise TypeError(
            f"module must be a plain torch.nn.Module (not already a PyroModule), got {type(module).__name__}"
        )
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "categorical" and obs_scale is not None:
        raise ValueError("obs_scale applies to likelihood='normal' only")
    if num_data is not None and (
        isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral) or num_data < 1
    ):
        raise ValueError(f"num_data must be a positive int (the training set size) or None, got {num_data!r}")
    for name in _RESERVED:
        if hasattr(module, name):
            raise ValueError(f"the module already has an attribute {name!r}, which bayesianize needs; rename it")

    named = dict(module.named_modules())
    if layers is None:
        chosen = [name for name, m in named.items() if type(m) in SUPPORTED_LAYERS]
    else:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of module names, got the string {layers!r}; use [{layers!r}]")
        chosen = list(dict.fromkeys(layers))
        for name in chosen:
            if name not in named:
                raise ValueError(f"layers: no module named {name!r}; the module's layers are {sorted(named)}")
            if type(named[name]) not in SUPPORTED_LAYERS:
                raise TypeError(
                    f"layers: {name!r} is a {type(named[name]).__name__}; only {_LAYER_NAMES} weights can be made "
                    "random"
                )
    if not chosen:
        raise ValueError(
            "the module has no layer to make random (see layers=); supported: "
            f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)}"
        )
    if type(module) in RECURRENT_LAYERS:
        raise TypeError(
            f"bayesianize: the module is itself an {type(module).__name__}, whose output (a tuple) is not logits; "
            "wrap it in a module that maps its output to the logits or mean"
        )
    left = [
        name
        for name, m in named.items()
        if name not in chosen and type(m) not in SUPPORTED_LAYERS and any(True for _ in m.parameters(recurse=False))
    ]
    if left:
        warnings.warn(
            "bayesianize leaves these modules with parameters deterministic (only the weights of "
            f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} become random): "
            f"{', '.join(f'{n} ({type(named[n]).__name__})' for n in left)}",
            UserWarning,
            stacklevel=2,
        )

    template = copy.deepcopy(module)
    model = copy.deepcopy(module)
    to_pyro_module_(model)
    model.__class__ = bayesian_class(type(module))
    random_sites = []
    for layer_name in chosen:
        layer = model.get_submodule(layer_name)
        if type(template.get_submodule(layer_name)) in RECURRENT_LAYERS:
            to_bayesian_recurrent_(layer)  # before the sites are set: torch's RNN reads every weight on setattr
        for param_name in _random_params(template.get_submodule(layer_name), random_bias):
            site = f"{layer_name}.{param_name}" if layer_name else param_name
            value = getattr(layer, param_name)
            setattr(layer, param_name, PyroSample(_site_prior(prior, site, value.detach())))
            random_sites.append(site)

    model.__dict__["_bayesianize_template"] = template  # not a submodule: no duplicate parameters
    model.likelihood = likelihood
    model.num_data = None if num_data is None else int(num_data)
    model.random_sites = tuple(random_sites)
    model.deterministic_modules = tuple(left)
    if likelihood == "normal":
        ref = next(iter(template.parameters()))
        if obs_scale is None:
            model.obs_scale = PyroParam(torch.ones((), dtype=ref.dtype, device=ref.device), constraints.positive)
        else:
            scale = torch.as_tensor(obs_scale, dtype=ref.dtype, device=ref.device)
            if not (scale > 0).all():
                raise ValueError(f"obs_scale must be positive, got {obs_scale!r}")
            model.register_buffer("obs_scale", scale)
    return model


__all__ = ["SUPPORTED_LAYERS", "bayesianize"]
