# SPDX-License-Identifier: Apache-2.0
"""
The parameters, posteriors and summaries that :class:`~pyro_vdrop.infer.AutoVariationalDropout` and
:class:`~pyro_vdrop.infer.AutoVariationalDropoutMessenger` share.
"""

import math
from contextlib import nullcontext
from operator import attrgetter
from typing import Any

import torch
from pyro import poutine
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn.module import PyroParam, pyro_method

from pyro_vdrop.distributions import (
    CorrelatedVariationalDropoutNormal,
    GroupVariationalDropoutNormal,
    ImproperLogUniform,
    LogUniformNoisePrior,
    TruncatedLogNormalDropout,
    VariationalDropoutNormal,
)
from pyro_vdrop.distributions.cap import cap
from pyro_vdrop.distributions.util import base_distribution
from pyro_vdrop.infer.sparsity import (
    PRUNE_LOG_ALPHA_THRESHOLD,
    SBP_LOG_ALPHA_THRESHOLD,
    group_summary,
    sparsity_summary,
    unit_summary,
)

from .options import VariationalDropoutOptions, check_kl_scale


def _reference_tensor(args, kwargs):
    """The first floating-point tensor among the model's inputs (one level into lists, tuples, dicts)."""
    values = list(args) + list(kwargs.values())
    for value in list(values):
        if isinstance(value, (list, tuple)):
            values.extend(value)
        elif isinstance(value, dict):
            values.extend(value.values())
    for value in values:
        if torch.is_tensor(value) and value.is_floating_point():
            return value
    return None


def _option(name):
    return property(lambda self: getattr(self.options, name), doc=f"``options.{name}`` (read-only).")


class AutoVariationalDropoutBase:
    """
    Options, parameters, posteriors and summaries shared by
    :class:`~pyro_vdrop.infer.AutoVariationalDropout` and :class:`~pyro_vdrop.infer.AutoVariationalDropoutMessenger`:
    combine it with a Pyro guide class (:class:`~pyro.infer.autoguide.AutoGuide`,
    :class:`~pyro.infer.autoguide.AutoMessenger`) to make a variational-dropout guide.

    Parameters live in three :class:`~pyro.nn.PyroModule` containers keyed by site name:
    ``locs`` (:math:`\\theta`), ``log_alphas`` (multiplicative, learned α) and
    ``log_sigma2s`` (additive). Every parameter has the site's number of dimensions and
    ``event_dim``, so Pyro subsamples it inside subsampled plates.

    The options (:class:`~pyro_vdrop.infer.autoguide.VariationalDropoutOptions`) are read as ``guide.options``
    and, read-only, as attributes of the same names (``guide.noise``, ...); ``guide.kl_scale`` starts at
    ``options.kl_scale`` and may be reassigned.
    """

    noise = _option("noise")
    granularity = _option("granularity")
    parameterization = _option("parameterization")
    dropout_rate = _option("dropout_rate")
    kl_approx = _option("kl_approx")
    log_alpha_clip = _option("log_alpha_clip")
    max_log_alpha = _option("max_log_alpha")
    input_dim = _option("input_dim")
    init_loc_fn = _option("init_loc_fn")
    init_log_alpha = _option("init_log_alpha")
    init_log_sigma2 = _option("init_log_sigma2")
    init_noise_loc = _option("init_noise_loc")
    init_noise_log_scale = _option("init_noise_log_scale")
    train_clip = _option("train_clip")

    def _set_options(self, options: VariationalDropoutOptions | None, keywords: dict[str, Any]):
        """Sets ``self.options`` from ``options=`` or from the option keywords (not both)."""
        if options is None:
            options = VariationalDropoutOptions(**keywords)
        elif keywords:
            raise TypeError(
                f"{type(self).__name__}: pass either options= or the option keywords {sorted(keywords)}, not both; "
                "to change a preset, use preset(name, **overrides)"
            )
        elif not isinstance(options, VariationalDropoutOptions):
            raise TypeError(f"options must be a VariationalDropoutOptions (see preset()), got {options!r}")
        self.options = options
        self.kl_scale = options.kl_scale
        self._like = None  # the (dtype, device) of the model's inputs, set while initializing
        self._layouts = {}
        self._noise_bounds = {}  # noise="sbp": the prior's interval (a, b) of log s per site

    @property
    def kl_scale(self) -> float:
        """The factor on the KL term; may be changed during training (e.g. KL annealing from 0 to 1)."""
        return self._kl_scale

    @kl_scale.setter
    def kl_scale(self, value):
        self._kl_scale = check_kl_scale(value)

    # ---- initialization ------------------------------------------------------------------

    def _set_like(self, args, kwargs):
        """Remembers the dtype and device of the model's first floating-point input (None clears it)."""
        ref = None if args is None else _reference_tensor(args, kwargs)
        self._like = None if ref is None else (ref.dtype, ref.device)

    def _init_loc(self, site):
        """Calls ``init_loc_fn`` and gives the value the dtype and device of the model's inputs."""
        value = self.init_loc_fn(site)
        if self._like is not None and torch.is_tensor(value):
            dtype, device = self._like
            value = value.to(dtype=dtype, device=device)
        return value

    def _check_site(self, name, fn, site=None):
        prior = base_distribution(fn)
        if self.noise == "sbp":
            if isinstance(prior, LogUniformNoisePrior):
                self._noise_bounds[name] = (prior.low, prior.high)
                return
            if isinstance(prior, ImproperLogUniform):
                raise ValueError(
                    f"{type(self).__name__}(noise='sbp') needs the proper prior of structured Bayesian pruning at "
                    f"weight site {name!r}, which has the improper log-uniform prior: build the model with "
                    "bayesianize(net, prior=LogUniformNoisePrior(-20.0, 0.0)), or use noise='group' for the "
                    "log-uniform prior"
                )
        elif isinstance(prior, ImproperLogUniform):
            return
        elif isinstance(prior, LogUniformNoisePrior):
            raise ValueError(
                f"site {name!r} has the prior LogUniformNoisePrior of structured Bayesian pruning: use "
                f"{type(self).__name__}(model, noise='sbp')"
            )
        hint = ""
        if site is not None and any(frame.vectorized for frame in site["cond_indep_stack"]):
            # an unobserved site inside a plate: most often the likelihood, when the guide first ran without data
            hint = (
                f"If {name!r} is the likelihood, the guide first ran without its observations: call it (or SVI) "
                "with them, e.g. guide(x, y), so that the site is observed. Otherwise: "
            )
        raise ValueError(
            f"{type(self).__name__} handles only sites whose prior is ImproperLogUniform (LogUniformNoisePrior with "
            f"noise='sbp'), but site {name!r} has "
            f"prior {fn!r}. " + hint + self._combine_hint(name)
        )

    def _combine_hint(self, name):
        return (
            "Combine it with another guide for the other sites through AutoGuideList, e.g.\n"
            "    init_model = InitMessenger(init_to_fan_in)(model)  # log-uniform sites cannot be sampled\n"
            "    guide = AutoGuideList(init_model)\n"
            "    guide.append(AutoVariationalDropout(poutine.block(model, expose=weight_sites)))\n"
            "    guide.append(AutoNormal(poutine.block(init_model, hide=weight_sites)))"
        )

    def _site_input_dim(self, name, ndim, event_dim):
        """The input axis of a site as a negative dim of its value, or None for a scalar site."""
        input_dim = self.input_dim.get(name) if isinstance(self.input_dim, dict) else self.input_dim
        if input_dim is None:
            if ndim == 0:
                return None
            return -event_dim + 1 if event_dim >= 2 else -1
        if not isinstance(input_dim, int):
            raise TypeError(f"input_dim for site {name!r} must be an int, got {input_dim!r}")
        if input_dim >= 0:
            if input_dim >= event_dim:
                raise ValueError(
                    f"input_dim={input_dim} is out of range for site {name!r}, whose weight (event shape) has "
                    f"{event_dim} dims; give a dim of the weight, or a negative dim of the site's value"
                )
            return input_dim - event_dim
        if input_dim < -ndim:
            raise ValueError(f"input_dim={input_dim} is out of range for site {name!r} with {ndim} dims")
        return input_dim

    def _create_params(self, name, init_loc, event_dim):
        """Creates the parameters of one site from its (full-size) initial θ."""
        ndim = init_loc.dim()
        input_axis = self._site_input_dim(name, ndim, event_dim)
        self._layouts[name] = (event_dim, input_axis)
        deep_setattr(self, "locs." + name, PyroParam(init_loc, event_dim=event_dim))
        if self.dropout_rate is not None:
            return
        if self.parameterization == "additive" and self.noise == "independent":
            init = torch.full_like(init_loc, self.init_log_sigma2)
            deep_setattr(self, "log_sigma2s." + name, PyroParam(init, event_dim=event_dim))
            return
        if self.granularity == "weight":
            shape = init_loc.shape
        else:
            shape = [1] * ndim
            if self.granularity == "unit" and input_axis is not None:
                shape[input_axis] = init_loc.shape[input_axis]
            elif self.granularity == "output" and event_dim >= 2:
                shape[-event_dim] = init_loc.shape[-event_dim]
            elif self.granularity == "output":
                raise ValueError(
                    f"granularity='output' needs a weight (event shape) with an output axis, dim 0, and an input "
                    f"axis; site {name!r} has event_dim={event_dim}"
                )
        like = dict(dtype=init_loc.dtype, device=init_loc.device)
        if self.noise == "sbp":
            deep_setattr(
                self,
                "noise_locs." + name,
                PyroParam(torch.full(shape, self.init_noise_loc, **like), event_dim=event_dim),
            )
            init = torch.full(shape, self.init_noise_log_scale, **like)
            deep_setattr(self, "noise_log_scales." + name, PyroParam(init, event_dim=event_dim))
            return
        if self.parameterization == "additive":  # noise="group": z_g ~ N(μ_g, σ_g²)
            deep_setattr(self, "group_locs." + name, PyroParam(torch.ones(shape, **like), event_dim=event_dim))
            init = torch.full(shape, self.init_log_sigma2, **like)
            deep_setattr(self, "log_sigma2s." + name, PyroParam(init, event_dim=event_dim))
            return
        init = torch.full(shape, self.init_log_alpha, **like)
        deep_setattr(self, "log_alphas." + name, PyroParam(init, event_dim=event_dim))

    # ---- the posterior -------------------------------------------------------------------

    def _get_loc(self, name):
        return attrgetter(name)(self.locs)

    def _get_log_alpha_param(self, name, loc):
        """The (broadcastable) log α in force for the posterior, before any KL clipping."""
        if self.dropout_rate is not None:
            p = self.dropout_rate
            return torch.full((), math.log(p) - math.log1p(-p), dtype=loc.dtype, device=loc.device)
        log_alpha = attrgetter(name)(self.log_alphas)
        if self.max_log_alpha is not None:
            log_alpha = cap(log_alpha, self.max_log_alpha)
        return log_alpha

    def posterior(self, name: str):
        """
        The guide distribution of a weight site: exactly a :class:`~pyro_vdrop.distributions.VariationalDropoutNormal`
        (``noise="independent"``), :class:`~pyro_vdrop.distributions.CorrelatedVariationalDropoutNormal`
        (``"correlated"``), :class:`~pyro_vdrop.distributions.GroupVariationalDropoutNormal` (``"group"``; with the
        additive parameterization its ``loc`` is θ μ_g) or
        :class:`~pyro_vdrop.distributions.TruncatedLogNormalDropout` (``"sbp"``), wrapped in ``.to_event(event_dim)``.

        :param str name: The site's name.
        :raises KeyError: if the guide has no parameters for the site (yet).
        """
        event_dim, input_axis = self._layouts[name]
        loc = self._get_loc(name)
        # built from the guide's own parameters: valid by construction, so not re-validated on every step
        options = {"kl_approx": self.kl_approx, "log_alpha_clip": self.log_alpha_clip, "validate_args": False}
        if self.parameterization == "additive" and self.noise == "independent":
            log_sigma2 = attrgetter(name)(self.log_sigma2s)
            posterior = VariationalDropoutNormal.from_additive(loc, log_sigma2, **options)
            if self.train_clip is not None:
                # the weights pruning would remove get mean 0; σ² and log α (so the KL) are those of θ
                keep = (posterior.log_alpha.detach() < self.train_clip).to(loc.dtype)
                posterior.loc = loc * keep
        elif self.noise == "independent":
            posterior = VariationalDropoutNormal(loc, self._get_log_alpha_param(name, loc), **options)
        elif self.noise == "sbp":
            noise_loc = attrgetter(name)(self.noise_locs)
            noise_scale = attrgetter(name)(self.noise_log_scales).exp()
            noise_shape = self._noise_shape(loc, event_dim, input_axis)
            low, high = self._noise_bounds[name]
            posterior = TruncatedLogNormalDropout(
                loc, noise_loc.expand(noise_shape), noise_scale.expand(noise_shape), low, high
            )
        elif self.parameterization == "additive":  # noise="group": w = θ z, z ~ N(μ, σ²) = μ N(1, α)
            group_loc = attrgetter(name)(self.group_locs)
            log_alpha = VariationalDropoutNormal.from_additive(group_loc, attrgetter(name)(self.log_sigma2s)).log_alpha
            if self.max_log_alpha is not None:
                log_alpha = cap(log_alpha, self.max_log_alpha)
            log_alpha = log_alpha.expand(self._noise_shape(loc, event_dim, input_axis))
            posterior = GroupVariationalDropoutNormal(loc * group_loc, log_alpha, **options)
        else:
            log_alpha = self._get_log_alpha_param(name, loc).expand(self._noise_shape(loc, event_dim, input_axis))
            cls = GroupVariationalDropoutNormal if self.noise == "group" else CorrelatedVariationalDropoutNormal
            posterior = cls(loc, log_alpha, **options)
        return posterior.to_event(event_dim)

    def _noise_shape(self, loc, event_dim, input_axis):
        """
        The shape of the shared noise: the site's batch dims (plates) in full, and one noise variable per input
        unit (channel), or per output unit (channel) with ``granularity="output"``; α may be shared among them
        (``granularity="layer"``).
        """
        axis = -event_dim if self.granularity == "output" else input_axis
        batch_ndim = loc.dim() - event_dim
        return [n if (i < batch_ndim or i - loc.dim() == axis) else 1 for i, n in enumerate(loc.shape)]

    def _kl_scale_context(self):
        if self.kl_scale == 1:
            return nullcontext()
        if self.kl_scale == 0:
            return poutine.mask(mask=False)
        return poutine.scale(scale=self.kl_scale)

    # ---- summaries -----------------------------------------------------------------------

    def _check_initialized(self):
        if not self._layouts:
            raise RuntimeError(
                f"{type(self).__name__} has no parameters yet: call it once with the model's arguments "
                "(or run one SVI step) before asking for summaries"
            )

    def _medians(self):
        self._check_initialized()
        with torch.no_grad():
            if self.noise == "sbp":
                # the median of w = θ s is θ times the median of s (s > 0)
                return {name: self._base_posterior(name).median for name in self._layouts}
            if self.noise == "group" or self.train_clip is not None:  # θ μ_g (additive), θ 1[log α < t]
                return {name: self._base_posterior(name).mean.clone() for name in self._layouts}
            return {name: self._get_loc(name).clone() for name in self._layouts}

    def _base_posterior(self, name):
        return base_distribution(self.posterior(name))

    @property
    def prune_threshold(self) -> float:
        r"""
        The default pruning threshold on :math:`\log\alpha`: 3 [Molchanov et al. 2017], or 0 for
        ``noise="sbp"`` (signal-to-noise ratio below 1 [Neklyudov et al. 2017]).
        """
        return SBP_LOG_ALPHA_THRESHOLD if self.noise == "sbp" else PRUNE_LOG_ALPHA_THRESHOLD

    @pyro_method
    @torch.no_grad()
    def log_alpha(self) -> dict[str, torch.Tensor]:
        r"""
        The :math:`\log\alpha` in force for every weight (after the cap ``max_log_alpha``,
        before the KL-only clipping ``log_alpha_clip``), with the site's full shape. With ``noise="sbp"`` it is
        :math:`\log(\mathrm{Var}\,s / (\mathbb{E}s)^2) = -2\log\mathrm{SNR}` of the weight's noise, the quantity
        that is :math:`\log\alpha` for Gaussian noise.

        :returns: A dict mapping site name to a tensor of :math:`\log\alpha`, on the parameters' device.
        :rtype: dict
        """
        self._check_initialized()
        result = {}
        for name in self._layouts:
            loc = self._get_loc(name)
            if self.parameterization == "additive" and self.noise == "independent":
                log_alpha = VariationalDropoutNormal.from_additive(loc, attrgetter(name)(self.log_sigma2s)).log_alpha
            elif self.noise in ("sbp", "group"):
                log_alpha = self._base_posterior(name).noise_log_alpha
            else:
                log_alpha = self._get_log_alpha_param(name, loc)
            result[name] = log_alpha.expand(loc.shape).clone()
        return result

    @pyro_method
    @torch.no_grad()
    def group_log_alpha(self) -> dict[str, torch.Tensor]:
        r"""
        :math:`\log\alpha` of every noise variable (one per group: an input or output unit or channel), for the
        shared noises (``"correlated"``, ``"group"``, ``"sbp"``); the shape is the noise's (the weight's, with
        size 1 along the dims the noise is shared in).

        :raises ValueError: for ``noise="independent"``, which has no groups.
        :rtype: dict
        """
        self._check_initialized()
        if self.noise == "independent":
            raise ValueError("noise='independent' has one noise variable per weight, no groups; see log_alpha()")
        result = {}
        for name in self._layouts:
            base = base_distribution(self.posterior(name))
            result[name] = base.noise_log_alpha.expand(base.noise_shape).clone()
        return result

    @pyro_method
    @torch.no_grad()
    def sparsity(self, threshold: float | None = None) -> dict:
        r"""
        How many weights, units and groups would be pruned: weights with :math:`\log\alpha > \text{threshold}`
        (default :attr:`prune_threshold`: 3, Molchanov et al. 2017; 0, i.e. SNR < 1, for ``noise="sbp"``); see
        :func:`~pyro_vdrop.infer.sparsity_summary`.

        :param float threshold: The pruning threshold on :math:`\log\alpha`.
        :returns: ``{"sites": {name: stats}, "total": stats, "units": ..., "groups": ...}``, where ``stats`` is a
            dict with ``num_weights``, ``num_pruned``, ``num_kept`` (ints), ``fraction_pruned`` and
            ``compression`` (``num_weights / num_kept``, ``inf`` if every weight is pruned); ``units`` counts
            the input and output units (channels) of each site that keep a weight
            (:func:`~pyro_vdrop.infer.sparsity.unit_summary`), and ``groups`` (shared noises only) the noise
            variables kept (:func:`~pyro_vdrop.infer.sparsity.group_summary`).
        :rtype: dict
        """
        if threshold is None:
            threshold = self.prune_threshold
        log_alpha = self.log_alpha()
        result = sparsity_summary(log_alpha, threshold)
        axes = {}
        for name, (event_dim, input_axis) in self._layouts.items():
            if event_dim >= 2 and input_axis is not None:
                axes[name] = (-event_dim, input_axis)
        result["units"] = unit_summary({name: log_alpha[name] for name in axes}, threshold, axes)
        if self.noise != "independent":
            result["groups"] = group_summary(self.group_log_alpha(), threshold)
        return result


__all__ = ["AutoVariationalDropoutBase"]
