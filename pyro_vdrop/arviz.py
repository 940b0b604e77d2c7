# SPDX-License-Identifier: Apache-2.0
"""
Export of a fitted model and guide to ArviZ (:func:`to_inference_data`).

The groups follow ArviZ's InferenceData schema, plus one custom group, ``variational``,
that holds what a variational-dropout posterior is made of: the means :math:`\\theta`,
the dropout rates :math:`\\log\\alpha` and the per-layer sparsity.

xarray and ArviZ are imported on the first call, not with this module, so that ``import pyro_vdrop`` does not
load them.
"""

import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.distributions.util import base_distribution, normal_log_alpha, safe_log_abs
from pyro_vdrop.infer.predictive import trace_guide_then_model
from pyro_vdrop.infer.sparsity import PRUNE_LOG_ALPHA_THRESHOLD, sparsity_summary
from pyro_vdrop.poutine import LazyWeight, active_local_reparam

__all__ = ["MAX_CONSTANT_DATA_SIZE", "MAX_POSTERIOR_SITE_SIZE", "to_inference_data"]

#: Latent sites with more elements than this (per draw) are left out of the ``posterior``
#: group unless named in ``var_names``: 1,000 draws of a 300×784 layer are 235 million numbers.
MAX_POSTERIOR_SITE_SIZE = 1000

#: Model arguments with more elements than this are left out of ``constant_data``.
MAX_CONSTANT_DATA_SIZE = 1_000_000

_VARIATIONAL_GROUP = "variational"

#: The pruning threshold under the name this module exported before :mod:`pyro_vdrop.infer.sparsity` owned it.
LOG_ALPHA_THRESHOLD = PRUNE_LOG_ALPHA_THRESHOLD


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    var_names: Sequence[str] | None = None,
    chains: int = 1,
    predictive: bool = True,
    log_likelihood: bool = True,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    elbo: Sequence[float] | None = None,
    max_site_size: int = MAX_POSTERIOR_SITE_SIZE,
    threshold: float = PRUNE_LOG_ALPHA_THRESHOLD,
    **kwargs: Any,
):
    r"""
    Draws from a fitted guide and its model and returns them as an ArviZ
    ``InferenceData`` (an ``xarray.DataTree`` with ArviZ ≥ 1.0), ready for
    ``az.summary``, ``az.loo``, ``az.waic`` and ArviZ's plots.

    Each of the ``chains × num_samples`` draws runs the guide and then the model replayed
    against it, under ``torch.no_grad()``, as :class:`~pyro.infer.Predictive` does; unlike
    it, the log-likelihood of the observations is taken under the same draw, and no draw
    from the (improper) prior is needed. Call it with the data to export: every draw must see
    the same observations (a model that subsamples them through the indices of a
    subsampled ``pyro.plate`` is an error; a plate whose ``subsample_size`` is just the
    batch size, as in :func:`~pyro_vdrop.nn.bayesianize`, is fine). The groups:

    - ``posterior``: draws of the latent sites, dims ``(chain, draw, ...)``. A site with more
      than ``max_site_size`` elements (default :data:`MAX_POSTERIOR_SITE_SIZE`) is left out
      unless named in ``var_names``; the omitted sites are listed in the attribute
      ``posterior_omitted_sites``. For each latent site kept, ``"<site>_log_alpha"`` holds its
      :math:`\log\alpha` as a deterministic variable (constant over draws: it is a
      variational parameter, so summarise it with ``az.summary(..., kind="stats")``).
      Sites made with ``pyro.deterministic`` are kept here too.
    - ``variational`` (custom group, no ``chain``/``draw`` dims): for every latent site,
      ``"<site>_theta"`` (the posterior mean or median :math:`\theta`) and
      ``"<site>_log_alpha"`` (:math:`\log\alpha`); over the dim ``site``, ``num_weights``,
      ``num_pruned`` (:math:`\log\alpha >` ``threshold``) and ``sparsity`` of the weight
      sites, those whose prior is :class:`~pyro_vdrop.distributions.ImproperLogUniform`
      (other latents, e.g. a noise scale or a bias with a Normal prior, are not weights that
      variational dropout prunes); ``loss`` (dim ``step``) when ``elbo`` is given. The
      attributes ``compression`` (weights / kept weights, over the weight sites) and
      ``sparsity_threshold`` summarise the whole model. :math:`\theta` and
      :math:`\log\alpha` come, per site and in this order, from ``guide.median()`` and
      ``guide.log_alpha()`` where the guide has them
      (:class:`~pyro_vdrop.infer.AutoVariationalDropout`); from the guide's distribution at
      the site (a :class:`~pyro_vdrop.distributions.VariationalDropoutNormal` or any
      ``Normal``, where :math:`\log\alpha = 2\log(\sigma/|\mu|)`); from ``guide.quantiles()``
      for a real-valued site, with :math:`\sigma = q(\Phi(1)) - q(1/2)` (exact for Normal
      marginals, e.g. ``AutoNormal``); else from the mean and variance of the draws (e.g.
      ``AutoDelta``, or a non-Gaussian guide). The variable attribute ``source`` says which.
    - ``posterior_predictive``: a draw of every observed site from the model under each
      posterior draw, and the model's sample sites that the guide does not cover (e.g. the
      observation site when the model is called without observations).
    - ``log_likelihood``: :math:`\log p(y_i \mid w^{(s)})` per observation (the batch
      dims of the observed site, named after its plates), so that ``az.loo`` and
      ``az.waic`` work. Put the observations in a ``pyro.plate``. The draws come from the
      variational approximation :math:`q`, so PSIS-LOO (on the training data) estimates the
      predictive accuracy of :math:`q`; its Pareto :math:`k` values flag the observations where
      that estimate is unreliable. This group and ``posterior_predictive`` hold
      ``chains × num_samples × N`` numbers each.
    - ``observed_data``; ``constant_data``: the model's tensor arguments (named after the
      model's signature) with at most :data:`MAX_CONSTANT_DATA_SIZE` elements.

    Dims are named, not ``dim_0``: a batch dim after its ``pyro.plate``; the weight of a
    ``Linear`` layer ``fc1`` (site ``fc1.weight``, when ``model`` is the ``nn.Module``)
    ``(fc1_out, fc1_in)``, of a convolution ``(conv1_out, conv1_in, conv1_k0, ...)``, its bias
    ``(fc1_out,)``; any other dim ``<site>_dim_<i>``. ``dims`` and ``coords`` override
    this, as in ``az.from_dict``.

    **The local reparameterization** [1, §2.3]. Called inside
    :func:`pyro_vdrop.poutine.local_reparam`, the model runs under it: the predictive draws
    and the log-likelihood use per-example noise (each observation sees its own weight
    noise, which leaves every per-observation quantity, and so LOO and WAIC, distributed
    as without it), while the ``posterior`` draws of a weight are ordinary draws from its
    guide distribution (:meth:`~pyro_vdrop.poutine.LazyWeight.materialize`), independent of
    that noise.
    The attribute ``local_reparameterization`` names the estimator (``"none"`` outside it).

    **Predictive figures** (attributes of the InferenceData and of every group): for each observed site,
    ``<site>_nll``, the mean negative log predictive density of the observations under the
    ``chains × num_samples`` draws; for a Categorical likelihood also ``<site>_error``, ``<site>_brier`` and
    ``<site>_ece`` of the mean predictive class probabilities (:mod:`pyro_vdrop.metrics`). Made with held-out
    data, these are the test figures of ``pyro-vdrop evaluate``.

    Tensors on any device and of any floating dtype are moved to CPU numpy arrays
    (``bfloat16`` as ``float32``), so an InferenceData made from a GPU-trained model is
    read anywhere.

    Example::

        with pyro_vdrop.poutine.local_reparam():
            idata = to_inference_data(model, guide, x_train, y_train, num_samples=500, elbo=losses)
        az.summary(idata, var_names=["fc3.weight"])
        az.summary(idata, var_names=["fc3.weight_log_alpha"], kind="stats")
        az.loo(idata)
        idata.variational["sparsity"].to_series()

    :param callable model: The Pyro model (a function or a ``PyroModule``).
    :param callable guide: The fitted guide (an autoguide or a function).
    :param args: Positional arguments of the model and guide (the data).
    :param int num_samples: Draws per chain.
    :param list var_names: The latent and deterministic sites to put in ``posterior``
        (default: every one with at most ``max_site_size`` elements).
    :param int chains: The number of chains; the ``chains × num_samples`` independent
        draws are reshaped to ``(chains, num_samples)``.
    :param bool predictive: Whether to make the ``posterior_predictive`` group.
    :param bool log_likelihood: Whether to make the ``log_likelihood`` group.
    :param dict coords: Coordinates by dim name, as for ``az.from_dict``.
    :param dict dims: Dim names (without ``chain`` and ``draw``) by variable name.
    :param list elbo: The losses returned by ``SVI.step`` (Pyro's loss is the negative
        ELBO), one per step; stored as ``variational["loss"]``.
    :param int max_site_size: The size above which a latent site is left out of
        ``posterior`` unless named in ``var_names``.
    :param float threshold: The :math:`\log\alpha` above which a weight counts as pruned
        (default :data:`pyro_vdrop.infer.sparsity.PRUNE_LOG_ALPHA_THRESHOLD`, 3 [2]).
    :param kwargs: Keyword arguments of the model and guide.
    :returns: The InferenceData (``arviz.InferenceData``; ``xarray.DataTree`` with ArviZ ≥ 1.0).

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural
        Networks." ICML 2017.
    """
    elbo, var_names = _checked_arguments(num_samples, chains, max_site_size, threshold, elbo, var_names)
    draws = _Draws(model, guide, args, kwargs, predictive=predictive, log_likelihood=log_likelihood)
    draws.run(chains * num_samples, var_names, max_site_size)
    converter = _Converter(draws, chains=chains, coords=coords, dims=dims, elbo=elbo, threshold=threshold)
    return converter.to_inference_data()


def _checked_arguments(num_samples, chains, max_site_size, threshold, elbo, var_names):
    """Raises on a bad argument of :func:`to_inference_data`; returns ``elbo`` and ``var_names`` as lists."""
    _check_positive_int(num_samples, "num_samples")
    _check_positive_int(chains, "chains")
    _check_positive_int(max_site_size, "max_site_size")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold != threshold:
        raise ValueError(f"threshold must be a number (a log α), got {threshold!r}")
    if elbo is not None:
        try:
            elbo = [float(value) for value in elbo]
        except (TypeError, ValueError) as error:
            raise TypeError(f"elbo must be a sequence of numbers (the losses of SVI.step), got {elbo!r}") from error
    if var_names is not None:
        if isinstance(var_names, str) or not isinstance(var_names, Iterable):
            raise TypeError(f"var_names must be a list of site names, got {var_names!r}")
        var_names = list(var_names)
    return elbo, var_names


class _Draws:
    """
    Draws from a guide and from its model replayed against each: what :class:`_Converter` puts in the groups,
    as ArviZ's ``PyroConverter`` takes them from a fitted ``MCMC``. ``predictive`` and ``log_likelihood`` say
    whether to draw the ``posterior_predictive`` and ``log_likelihood`` groups.
    """

    def __init__(self, model, guide, args, kwargs, *, predictive, log_likelihood):
        self.model, self.guide, self.args, self.kwargs = model, guide, tuple(args), dict(kwargs)
        self.predictive, self.log_likelihood = predictive, log_likelihood
        self.local_reparameterization = _local_reparam_estimator()
        self.values = {"posterior": {}, "posterior_predictive": {}, "log_likelihood": {}}
        self.pointwise = {}  # observed site -> per-draw log p(y_i | w), for the predictive metrics
        self.class_probs = {}  # Categorical observed site -> sum over draws of p(class | x_i, w)

    @torch.no_grad()
    def run(self, num_draws, var_names, max_site_size):
        """Finds the sites, then makes ``num_draws`` draws of those that go in a group."""
        self.num_draws = num_draws
        # One pass with every outer handler (e.g. local_reparam) hidden: the structure of the model and guide.
        guide_trace, model_trace = _run(self.model, self.guide, self.args, self.kwargs, hide_outer=True)
        self.sites = _classify_sites(model_trace, guide_trace)
        self.variational = _variational_parameters(
            self.guide, guide_trace, model_trace, self.sites["latent"], self.args, self.kwargs
        )
        self.posterior_names = _select_posterior(self.sites, model_trace, guide_trace, var_names, max_site_size)
        self.observed = {name: model_trace.nodes[name]["value"] for name in self.sites["observed"]}
        self.weight_sites = [name for name in self.sites["latent"] if _has_log_uniform_prior(model_trace.nodes[name])]
        moment_sites = [n for n, v in self.variational.items() if "moments" in (v.theta_source, v.log_alpha_source)]
        moments = {name: _Moments() for name in moment_sites}
        for _ in range(self.num_draws):
            # Inside local_reparam the weight sites hold lazy weights: _value draws them from q.
            guide_trace, model_trace = _run(self.model, self.guide, self.args, self.kwargs, hide_outer=False)
            for name in moment_sites:
                moments[name].update(_value(guide_trace.nodes[name]))
            self._record(guide_trace, model_trace)
        for name in moment_sites:
            v = self.variational[name]
            mean, log_alpha = moments[name].result(self.num_draws)
            v.theta = mean if v.theta is None else v.theta
            v.log_alpha = log_alpha if v.log_alpha is None else v.log_alpha
        self.model_trace = model_trace  # of the last draw: names the dims

    def _record(self, guide_trace, model_trace):
        sites, values = self.sites, self.values
        for name in self.posterior_names:
            node = guide_trace.nodes[name] if name in sites["latent"] else model_trace.nodes[name]
            _append(values["posterior"], name, _value(node))
        if self.predictive:
            for name in sites["observed"]:
                _append(values["posterior_predictive"], name, model_trace.nodes[name]["fn"].sample())
            for name in sites["unguided"]:
                _append(values["posterior_predictive"], name, _value(model_trace.nodes[name]))
        for name in sites["observed"]:
            node = model_trace.nodes[name]
            _check_same_observations(name, node["value"], self.observed[name])
            if node.get("mask") is None or node.get("mask") is True:  # masked: no predictive figures
                _append(self.pointwise, name, _pointwise_log_prob(node))
            fn = base_distribution(node["fn"])
            if isinstance(fn, torch.distributions.Categorical):
                self.class_probs[name] = self.class_probs.get(name, 0.0) + fn.probs.detach()
        if self.log_likelihood:
            for name in sites["observed"]:
                _append(values["log_likelihood"], name, _pointwise_log_prob(model_trace.nodes[name]))


class _Converter:
    """
    Makes the groups of :func:`to_inference_data` from a :class:`_Draws`, one ``<group>_to_xarray`` method per
    group (each an ``xarray.Dataset``, or ``None`` where the group is left out), after ArviZ's ``PyroConverter``.
    """

    def __init__(self, draws, *, chains, coords, dims, elbo, threshold):
        self.draws = draws
        self.chains, self.num_samples = chains, draws.num_draws // chains
        self.coords = dict(coords or {})
        self.elbo, self.threshold = elbo, threshold
        dims = {name: list(value) for name, value in (dims or {}).items()}
        self.site_dims = _SiteDims(draws.model, draws.model_trace, draws.sites, dims)
        self.attrs = _attrs(
            draws.local_reparameterization, chains, self.num_samples, draws.sites, draws.posterior_names
        )
        self.attrs.update(_predictive_metrics(draws))

    def _stacked(self, values):
        """Each site's draws as an array ``(chain, draw, ...)``, and the names of the dims after those two."""
        values = {name: _stack(draws, self.chains) for name, draws in values.items()}
        return values, {name: self.site_dims(name, value.shape[2:]) for name, value in values.items()}

    def _sample_dataset(self, values):
        return _dataset(*self._stacked(values), self.coords, self.attrs, sample_dims=True)

    def posterior_to_xarray(self):
        """The ``posterior`` group: draws of the latent and deterministic sites, and each kept site's log α."""
        values, dims = self._stacked(self.draws.values["posterior"])
        for name in self.draws.posterior_names:
            if name in self.draws.variational:
                log_alpha = _to_numpy(self.draws.variational[name].log_alpha)
                values[f"{name}_log_alpha"] = np.broadcast_to(log_alpha, values[name].shape[:2] + log_alpha.shape)
                dims[f"{name}_log_alpha"] = dims[name]
        return _dataset(values, dims, self.coords, self.attrs, sample_dims=True)

    def variational_to_xarray(self):
        """
        The custom ``variational`` group: θ and log α of every latent site; the sparsity of the weight sites
        (those with the log-uniform prior); the losses.
        """
        variational, data, data_dims = self.draws.variational, {}, {}
        for name, v in variational.items():
            site_dim = self.site_dims(name, tuple(v.theta.shape))
            data[f"{name}_theta"] = _to_numpy(v.theta)
            data[f"{name}_log_alpha"] = _to_numpy(v.log_alpha)
            data_dims[f"{name}_theta"] = data_dims[f"{name}_log_alpha"] = site_dim
        summary = sparsity_summary(
            {name: variational[name].log_alpha for name in self.draws.weight_sites}, self.threshold
        )
        sites, coords = summary["sites"], self.coords
        if sites:
            data["num_weights"] = np.asarray([s["num_weights"] for s in sites.values()], dtype=np.int64)
            data["num_pruned"] = np.asarray([s["num_pruned"] for s in sites.values()], dtype=np.int64)
            data["sparsity"] = np.asarray([s["fraction_pruned"] for s in sites.values()], dtype=np.float64)
            data_dims.update({"num_weights": ["site"], "num_pruned": ["site"], "sparsity": ["site"]})
            coords = {**coords, "site": list(sites)}
        if self.elbo is not None:
            data["loss"] = np.asarray(self.elbo, dtype=np.float64)
            data_dims["loss"] = ["step"]
        compression = float(summary["total"]["compression"])
        group_attrs = {**self.attrs, "sparsity_threshold": float(self.threshold), "compression": compression}
        ds = _dataset(data, data_dims, coords, group_attrs)
        for name, v in variational.items():
            ds[f"{name}_theta"].attrs["source"] = v.theta_source
            ds[f"{name}_log_alpha"].attrs["source"] = v.log_alpha_source
        if "loss" in ds:
            ds["loss"].attrs["long_name"] = "SVI loss (negative ELBO estimate) per step"
        return ds

    def posterior_predictive_to_xarray(self):
        """The ``posterior_predictive`` group, or None when ``predictive=False``."""
        return self._sample_dataset(self.draws.values["posterior_predictive"]) if self.draws.predictive else None

    def log_likelihood_to_xarray(self):
        """The ``log_likelihood`` group, or None without observations or with ``log_likelihood=False``."""
        if not (self.draws.log_likelihood and self.draws.sites["observed"]):
            return None
        return self._sample_dataset(self.draws.values["log_likelihood"])

    def observed_data_to_xarray(self):
        """The ``observed_data`` group, or None without observations."""
        if not self.draws.sites["observed"]:
            return None
        observed = {name: _to_numpy(value) for name, value in self.draws.observed.items()}
        dims = {name: self.site_dims(name, value.shape) for name, value in observed.items()}
        return _dataset(observed, dims, self.coords, self.attrs)

    def constant_data_to_xarray(self):
        """The ``constant_data`` group (the model's small tensor arguments), or None."""
        draws = self.draws
        constant = _constant_data(draws.model, draws.args, draws.kwargs, draws.model_trace, draws.sites)
        if not constant:
            return None
        dims = {name: self.site_dims.for_argument(name, value.shape) for name, value in constant.items()}
        return _dataset(constant, dims, self.coords, self.attrs)

    def to_inference_data(self):
        """All the groups as one InferenceData (``xarray.DataTree`` with ArviZ ≥ 1.0)."""
        groups = {
            "posterior": self.posterior_to_xarray(),
            _VARIATIONAL_GROUP: self.variational_to_xarray(),
            "posterior_predictive": self.posterior_predictive_to_xarray(),
            "log_likelihood": self.log_likelihood_to_xarray(),
            "observed_data": self.observed_data_to_xarray(),
            "constant_data": self.constant_data_to_xarray(),
        }
        return _inference_data({name: ds for name, ds in groups.items() if ds is not None}, self.attrs)


# ---------------------------------------------------------------------------------------
# running the model and guide


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _local_reparam_estimator():
    """The estimator of an active :func:`~pyro_vdrop.poutine.local_reparam` handler, or ``None``."""
    handler = active_local_reparam()
    return None if handler is None else handler.estimator


def _run(model, guide, args, kwargs, *, hide_outer):
    return trace_guide_then_model(model, guide, args, kwargs, block_outer=hide_outer)


def _value(node):
    """The value of a site; a draw from the weight's distribution if it is a lazy weight."""
    value = node["value"]
    return value.materialize() if isinstance(value, LazyWeight) else value


def _has_log_uniform_prior(node):
    """Whether a site is a weight of variational dropout: its prior is the log-uniform one, maybe expanded."""
    return isinstance(base_distribution(node["fn"]), ImproperLogUniform)


def _is_deterministic(node):
    return node["infer"].get("_deterministic", False)


def _classify_sites(model_trace, guide_trace):
    latent, observed, deterministic, unguided = [], [], [], []
    for name, node in model_trace.nodes.items():
        if node["type"] != "sample" or site_is_subsample(node):
            continue
        if _is_deterministic(node):
            deterministic.append(name)
        elif node["is_observed"]:
            observed.append(name)
        elif name in guide_trace.nodes and guide_trace.nodes[name]["type"] == "sample":
            latent.append(name)
        else:
            unguided.append(name)
    return {"latent": latent, "observed": observed, "deterministic": deterministic, "unguided": unguided}


def _select_posterior(sites, model_trace, guide_trace, var_names, max_site_size):
    candidates = sites["latent"] + sites["deterministic"]
    if var_names is None:
        return [name for name in candidates if _numel(model_trace.nodes[name]["value"]) <= max_site_size]
    unknown = [name for name in var_names if name not in candidates]
    if unknown:
        raise ValueError(
            f"to_inference_data: var_names {unknown} are not latent or deterministic sites of the model; "
            f"choose from {candidates}"
        )
    return [name for name in candidates if name in var_names]


def _numel(value):
    return value.numel() if isinstance(value, torch.Tensor) else int(np.size(value))


def _check_same_observations(name, value, first):
    if value is not first and (value.shape != first.shape or not torch.equal(value, first)):
        raise ValueError(
            f"to_inference_data: the observations at site {name!r} differ between draws (does the model subsample "
            "the data with the indices of a subsampled pyro.plate?); pass the data to export and let the model "
            "use all of it"
        )


def _pointwise_log_prob(node):
    """The log-likelihood of each observation: the batch shape of the observed site."""
    fn = node["fn"]
    log_prob = fn.log_prob(node["value"])
    mask = node.get("mask")
    if mask is not None and mask is not True:
        raise ValueError(
            f"to_inference_data: the observed site {node['name']!r} is masked; the log-likelihood of masked "
            "observations is undefined. Drop them from the data instead"
        )
    return log_prob.expand(fn.batch_shape) if log_prob.shape != fn.batch_shape else log_prob


def _append(store, name, value):
    store.setdefault(name, []).append(_to_numpy(value))


class _Moments:
    """Running mean and variance of a site's draws (Welford)."""

    def __init__(self):
        self.mean = None
        self.m2 = None
        self.count = 0

    def update(self, value):
        value = value.detach()
        if not value.dtype.is_floating_point:
            value = value.double()
        self.count += 1
        if self.mean is None:
            self.mean = value.clone()
            self.m2 = torch.zeros_like(value)
            return
        delta = value - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (value - self.mean)

    def result(self, num_draws):
        if num_draws < 2:
            raise ValueError(
                "to_inference_data: log α of a site whose guide gives no Normal or variational-dropout "
                "distribution is estimated from the draws; use num_samples × chains ≥ 2"
            )
        variance = self.m2 / (self.count - 1)
        log_alpha = safe_log_abs(variance) - 2 * safe_log_abs(self.mean)
        return self.mean, log_alpha


# ---------------------------------------------------------------------------------------
# the variational parameters


#: The wrappers whose base distribution has the same marginals per element.
_RESHAPING_WRAPPERS = (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)


def _call_summary(guide, method, args, kwargs, *leading):
    fn = getattr(guide, method, None)
    if not callable(fn):
        return None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_data = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    return fn(*leading, *args, **kwargs) if takes_data else fn(*leading)


class _Variational:
    """θ and log α of one site, and where each came from."""

    def __init__(self, theta, theta_source, log_alpha, log_alpha_source):
        self.theta, self.theta_source = theta, theta_source
        self.log_alpha, self.log_alpha_source = log_alpha, log_alpha_source


# The standard-normal quantile Φ(1): with a Normal marginal, q(Φ(1)) − q(1/2) = σ.
_PHI_OF_ONE = 0.8413447460685429


def _variational_parameters(guide, guide_trace, model_trace, latent, args, kwargs):
    """Returns ``{site: _Variational}``; a source ``"moments"`` is filled in from the draws."""
    medians = _call_summary(guide, "median", args, kwargs) or {}
    log_alphas = _call_summary(guide, "log_alpha", args, kwargs) or {}
    quantiles = None
    result = {}
    for name in latent:
        shape = guide_trace.nodes[name]["value"].shape
        theta, theta_source = medians.get(name), "guide.median"
        log_alpha, log_alpha_source = log_alphas.get(name), "guide.log_alpha"
        fn = base_distribution(guide_trace.nodes[name]["fn"], _RESHAPING_WRAPPERS)
        if hasattr(fn, "log_alpha") and hasattr(fn, "loc"):  # the variational-dropout posteriors
            fn_theta, fn_log_alpha = fn.loc, fn.log_alpha
        elif isinstance(fn, torch.distributions.Normal):
            fn_theta, fn_log_alpha = fn.loc, normal_log_alpha(fn.loc, fn.scale)
        else:
            fn_theta = fn_log_alpha = None
        if theta is None:
            theta, theta_source = fn_theta, "distribution"
        if log_alpha is None:
            log_alpha, log_alpha_source = fn_log_alpha, "distribution"
        if log_alpha is None and medians and _has_real_support(model_trace.nodes[name]["fn"]):
            # e.g. AutoNormal: Normal marginals in the unconstrained (here: the same) space
            if quantiles is None:
                quantiles = _call_summary(guide, "quantiles", args, kwargs, [0.5, _PHI_OF_ONE]) or {}
            if name in quantiles:
                median, upper = quantiles[name][0], quantiles[name][1]
                log_alpha, log_alpha_source = (
                    normal_log_alpha(median, upper - median),
                    "guide.quantiles",
                )
        if theta is None:
            theta_source = "moments"
        if log_alpha is None:
            log_alpha_source = "moments"
        if theta is not None:
            theta = torch.as_tensor(theta).detach().expand(shape)
        if log_alpha is not None:
            log_alpha = torch.as_tensor(log_alpha).detach().expand(shape)
        result[name] = _Variational(theta, theta_source, log_alpha, log_alpha_source)
    return result


def _has_real_support(fn):
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


# ---------------------------------------------------------------------------------------
# dims, coords and datasets


def _sanitize(name):
    name = str(name).replace(".", "_").replace("/", "_")
    return f"layer{name}" if name[:1].isdigit() else name  # nn.Sequential: "0.weight" -> "layer0_out"


class _SiteDims:
    """Names the dims of a site's value (without ``chain`` and ``draw``)."""

    def __init__(self, model, model_trace, sites, dims):
        self.model = model
        self.model_trace = model_trace
        self.sites = sites
        self.dims = dims
        self.plates = {}  # plate name -> size, of the observed sites
        for name in sites["observed"]:
            for frame in model_trace.nodes[name]["cond_indep_stack"]:
                if frame.vectorized:
                    self.plates[frame.name] = frame.size

    def __call__(self, name, shape):
        shape = tuple(shape)
        if name in self.dims:
            return self._checked(name, self.dims[name], shape)
        base = name
        layer = _layer_dims(self.model, base, shape)
        if layer is not None:
            return layer
        node = self.model_trace.nodes.get(base)
        result = [f"{_sanitize(base)}_dim_{i}" for i in range(len(shape))]
        if node is not None and node["type"] == "sample":
            # batch dims: name them after their plates
            event_dim = node["fn"].event_dim if hasattr(node["fn"], "event_dim") else 0
            batch_ndim = len(shape) - event_dim
            for frame in node["cond_indep_stack"]:
                if frame.vectorized:
                    position = batch_ndim + frame.dim
                    if 0 <= position < len(shape) and shape[position] == frame.size:
                        result[position] = frame.name
        return result

    def for_argument(self, name, shape):
        shape = tuple(shape)
        if name in self.dims:
            return self._checked(name, self.dims[name], shape)
        result = [f"{_sanitize(name)}_dim_{i}" for i in range(len(shape))]
        matches = [plate for plate, size in self.plates.items() if len(shape) and size == shape[0]]
        if len(matches) == 1:
            result[0] = matches[0]
        return result

    @staticmethod
    def _checked(name, names, shape):
        if len(names) != len(shape):
            raise ValueError(
                f"to_inference_data: dims[{name!r}] = {names} has {len(names)} names but the value has shape "
                f"{shape}; give one name per dim, without chain and draw"
            )
        return list(names)


def _layer_dims(model, name, shape):
    """``(fc1_out, fc1_in, ...)`` for the weight and bias sites of torch's linear and conv layers."""
    if not isinstance(model, torch.nn.Module) or "." not in name:
        return None
    path, attr = name.rsplit(".", 1)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    prefix = _sanitize(path)
    transposed = isinstance(module, torch.nn.modules.conv._ConvTransposeNd)
    if not isinstance(module, torch.nn.Linear | torch.nn.modules.conv._ConvNd):
        return None
    if attr == "bias" and len(shape) == 1:
        return [f"{prefix}_out"]
    if attr == "weight" and len(shape) >= 2:
        first, second = ("in", "out") if transposed else ("out", "in")
        return [f"{prefix}_{first}", f"{prefix}_{second}"] + [f"{prefix}_k{i}" for i in range(len(shape) - 2)]
    return None


def _dataset(data, data_dims, coords, attrs, *, sample_dims=False):
    import xarray as xr

    variables = {}
    lead = ["chain", "draw"] if sample_dims else []
    for name, value in data.items():
        variables[name] = (lead + list(data_dims[name]), value)
    ds_coords = {}
    for name, value in data.items():
        for dim, size in zip(lead + list(data_dims[name]), value.shape):
            if dim in ds_coords:
                continue
            if dim in coords:
                ds_coords[dim] = np.asarray(coords[dim])
                if len(ds_coords[dim]) != size:
                    raise ValueError(
                        f"to_inference_data: coords[{dim!r}] has {len(ds_coords[dim])} values but dim {dim!r} "
                        f"of {name!r} has size {size}"
                    )
            else:
                ds_coords[dim] = np.arange(size)
    return xr.Dataset(variables, coords=ds_coords, attrs=dict(attrs))


def _stack(values, chains):
    array = np.stack(values)
    return array.reshape((chains, array.shape[0] // chains) + array.shape[1:])


def _to_numpy(value):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def _constant_data(model, args, kwargs, model_trace, sites):
    target = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        bound = inspect.signature(target).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    observed = [model_trace.nodes[name]["value"] for name in sites["observed"]]
    result = {}
    for name, value in bound.arguments.items():
        if not isinstance(value, torch.Tensor) or value.numel() > MAX_CONSTANT_DATA_SIZE:
            continue
        if any(value is obs for obs in observed):
            continue
        result[name] = _to_numpy(value)
    return result


def _attrs(reparam, chains, num_samples, sites, posterior_names):
    import pyro_vdrop

    omitted = [name for name in sites["latent"] + sites["deterministic"] if name not in posterior_names]
    return {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "pyro_vdrop_version": pyro_vdrop.__version__,
        "num_chains": int(chains),
        "num_draws": int(num_samples),
        "local_reparameterization": reparam if reparam is not None else "none",
        "posterior_omitted_sites": ",".join(omitted),
    }


def _predictive_metrics(draws) -> dict:
    r"""
    The posterior predictive's figures on the observations the export was made with, as attributes: for every
    observed site ``<site>_nll``, the mean negative log predictive density
    :math:`-\frac1N\sum_i \log \frac1S\sum_s p(y_i \mid w^{(s)})`; for a Categorical site also
    ``<site>_error``, ``<site>_brier`` and ``<site>_ece`` (15 equal-width bins) of the predictive class
    probabilities :math:`\frac1S\sum_s p(\cdot \mid x_i, w^{(s)})` (see :mod:`pyro_vdrop.metrics`).
    """
    from pyro_vdrop import metrics

    result = {}
    for name, per_draw in draws.pointwise.items():
        log_lik = torch.stack([torch.as_tensor(v) for v in per_draw]).double()
        log_pred = torch.logsumexp(log_lik, 0) - math.log(log_lik.shape[0])
        result[f"{name}_nll"] = float(-log_pred.mean())
    for name, total in draws.class_probs.items():
        probs = (total / draws.num_draws).reshape(-1, total.shape[-1])
        y = draws.observed[name].reshape(-1)
        if probs.shape[0] != y.shape[0]:  # observations that do not index the class probabilities one to one
            continue
        result[f"{name}_error"] = float((probs.argmax(-1) != y).double().mean())
        result[f"{name}_brier"] = float(metrics.brier_score(probs, y))
        result[f"{name}_ece"] = float(metrics.expected_calibration_error(probs, y))
    return result


def _inference_data(groups, attrs):
    import arviz as az
    import xarray as xr

    if hasattr(az, "InferenceData"):
        return az.InferenceData(attrs=attrs, **groups)
    # ArviZ >= 1.0: InferenceData is an xarray.DataTree
    tree = xr.DataTree.from_dict({f"/{name}": ds for name, ds in groups.items()})
    tree.attrs.update(attrs)
    return tree
