# SPDX-License-Identifier: Apache-2.0
"""
The variational-dropout autoguide and the code it shares with its effect-based twin
(:class:`~pyro_vdrop.infer.AutoVariationalDropoutMessenger`).
"""

import math
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from operator import attrgetter
from typing import Literal

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn.module import PyroModule, PyroParam, pyro_method
from pyro.ops.tensor_utils import periodic_repeat

from pyro_vdrop.distributions import (
    CorrelatedVariationalDropoutNormal,
    ImproperLogUniform,
    VariationalDropoutNormal,
)
from pyro_vdrop.distributions.util import base_distribution, check_kl_approx

from .initialization import init_to_fan_in
from .sparsity import PRUNE_LOG_ALPHA_THRESHOLD, SPARSE_VD_LOG_ALPHA_CLIP, sparsity_summary

NOISES = ("independent", "correlated")
GRANULARITIES = ("weight", "unit", "layer")
PARAMETERIZATIONS = ("multiplicative", "additive")

#: Kingma, Salimans, Welling (2015), §3.3: the paper clamps α at 1, i.e. log α ≤ 0.
PAPER_MAX_LOG_ALPHA = 0.0
#: Molchanov, Ashukha, Vetrov (2017), §5: initial log σ² of sparse variational dropout.
SPARSE_VD_INIT_LOG_SIGMA2 = -10.0
#: Default initial log α of the multiplicative parameterization: weak noise (α ≈ 0.018),
#: about where sparse VD's log σ² = -10 starts for fan-in-initialised weights.
DEFAULT_INIT_LOG_ALPHA = -4.0


class _Cap(torch.autograd.Function):
    """
    ``x.clamp(max=cap)`` with the same gradient (1 where ``x <= cap``, else 0), computed without a comparison
    kernel: ``x - clamp(x) = max(x - cap, 0)``, whose sign is the mask of capped entries. About twice as fast
    as the backward of ``clamp`` (a comparison and a ``where``) on CPU.
    """

    @staticmethod
    def forward(ctx, x, cap):
        y = x.clamp(max=cap)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: keep it differentiable
            return torch.where(x <= y, grad, torch.zeros_like(grad)), None
        return torch.addcmul(grad, grad, x.sub(y).sign_(), value=-1.0), None


def _is_log_uniform(fn) -> bool:
    return isinstance(base_distribution(fn), ImproperLogUniform)


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


class _VariationalDropoutMixin:
    """
    Options, parameters, posteriors and summaries shared by
    :class:`AutoVariationalDropout` and :class:`~pyro_vdrop.infer.AutoVariationalDropoutMessenger`.

    Parameters live in three :class:`~pyro.nn.PyroModule` containers keyed by site name:
    ``locs`` (:math:`\\theta`), ``log_alphas`` (multiplicative, learned α) and
    ``log_sigma2s`` (additive). Every parameter has the site's number of dimensions and
    ``event_dim``, so Pyro subsamples it inside subsampled plates.
    """

    def _set_options(
        self,
        *,
        noise,
        granularity,
        parameterization,
        dropout_rate,
        kl_scale,
        kl_approx,
        log_alpha_clip,
        max_log_alpha,
        input_dim,
        init_loc_fn,
        init_log_alpha,
        init_log_sigma2,
    ):
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if granularity is not None and granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES} or None, got {granularity!r}")
        if kl_approx is not None:
            check_kl_approx(kl_approx)
        if dropout_rate is not None:
            if not isinstance(dropout_rate, (int, float)) or not 0 < dropout_rate < 1:
                raise ValueError(f"dropout_rate must be a number in (0, 1), got {dropout_rate!r}")
            if parameterization != "multiplicative":
                raise ValueError(
                    "dropout_rate fixes α = p / (1 - p), which only the multiplicative parameterization has; "
                    "drop parameterization='additive' or dropout_rate"
                )
            if granularity is not None:
                raise ValueError("dropout_rate fixes one α for every weight; leave granularity unset")
            if max_log_alpha != "auto":
                raise ValueError("dropout_rate fixes α, so max_log_alpha does not apply; leave it unset")
        if parameterization == "additive":
            if noise != "independent":
                raise ValueError(
                    "parameterization='additive' learns σ² per weight, which cannot be shared by the weights of a "
                    "unit: use noise='independent' (or the multiplicative parameterization for correlated noise)"
                )
            if granularity not in (None, "weight"):
                raise ValueError(
                    "parameterization='additive' learns σ² (hence α) per weight; granularity must be 'weight' "
                    f"(or unset), got {granularity!r}. Use parameterization='multiplicative' for α per unit or layer."
                )
            if max_log_alpha not in ("auto", None):
                raise ValueError(
                    "max_log_alpha caps the learned log α of the multiplicative parameterization; "
                    "the additive one leaves α unbounded (log α is clipped inside the KL by log_alpha_clip)"
                )
        if noise == "correlated" and granularity == "weight":
            raise ValueError(
                "noise='correlated' shares one noise variable, hence one α, among the weights of an input unit: "
                "use granularity='unit' or 'layer', or noise='independent' for α per weight"
            )
        if granularity is None:
            granularity = "unit" if noise == "correlated" else "weight"
        if log_alpha_clip == "auto":
            log_alpha_clip = SPARSE_VD_LOG_ALPHA_CLIP if parameterization == "additive" else None
        if log_alpha_clip is not None:
            log_alpha_clip = tuple(float(v) for v in log_alpha_clip)
            if len(log_alpha_clip) != 2 or not log_alpha_clip[0] < log_alpha_clip[1]:
                raise ValueError(f"log_alpha_clip must be (low, high) with low < high, or None; got {log_alpha_clip!r}")
        if max_log_alpha == "auto":
            max_log_alpha = PAPER_MAX_LOG_ALPHA if parameterization == "multiplicative" else None
        if max_log_alpha is not None:
            max_log_alpha = float(max_log_alpha)
        if input_dim is not None and not isinstance(input_dim, (int, dict)):
            raise TypeError(f"input_dim must be an int, a dict {{site name: int}} or None, got {input_dim!r}")
        if not callable(init_loc_fn):
            raise TypeError(f"init_loc_fn must be an init strategy (a callable taking a site), got {init_loc_fn!r}")

        self.noise = noise
        self.granularity = granularity
        self.parameterization = parameterization
        self.dropout_rate = dropout_rate
        self.kl_scale = kl_scale
        self.kl_approx = kl_approx
        self.log_alpha_clip = log_alpha_clip
        self.max_log_alpha = max_log_alpha
        self.input_dim = input_dim
        self.init_loc_fn = init_loc_fn
        self.init_log_alpha = float(init_log_alpha)
        self.init_log_sigma2 = float(init_log_sigma2)
        self._like = None  # the (dtype, device) of the model's inputs, set while initializing
        self._layouts = {}

    @property
    def kl_scale(self) -> float:
        """The factor on the KL term; may be changed during training (e.g. KL annealing from 0 to 1)."""
        return self._kl_scale

    @kl_scale.setter
    def kl_scale(self, value):
        if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
            raise ValueError(f"kl_scale must be a finite number >= 0, got {value!r}")
        self._kl_scale = float(value)

    # ---- initialization ------------------------------------------------------------------

    def _init_loc(self, site):
        """Calls ``init_loc_fn`` and gives the value the dtype and device of the model's inputs."""
        value = self.init_loc_fn(site)
        if self._like is not None and torch.is_tensor(value):
            dtype, device = self._like
            value = value.to(dtype=dtype, device=device)
        return value

    def _check_site(self, name, fn, site=None):
        if _is_log_uniform(fn):
            return
        hint = ""
        if site is not None and any(frame.vectorized for frame in site["cond_indep_stack"]):
            # an unobserved site inside a plate: most often the likelihood, when the guide first ran without data
            hint = (
                f"If {name!r} is the likelihood, the guide first ran without its observations: call it (or SVI) "
                "with them, e.g. guide(x, y), so that the site is observed. Otherwise: "
            )
        raise ValueError(
            f"{type(self).__name__} handles only sites whose prior is ImproperLogUniform, but site {name!r} has "
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
        if self.parameterization == "additive":
            init = torch.full_like(init_loc, self.init_log_sigma2)
            deep_setattr(self, "log_sigma2s." + name, PyroParam(init, event_dim=event_dim))
            return
        if self.granularity == "weight":
            shape = init_loc.shape
        else:
            shape = [1] * ndim
            if self.granularity == "unit" and input_axis is not None:
                shape[input_axis] = init_loc.shape[input_axis]
        init = torch.full(shape, self.init_log_alpha, dtype=init_loc.dtype, device=init_loc.device)
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
            log_alpha = _Cap.apply(log_alpha, self.max_log_alpha)
        return log_alpha

    def _get_posterior(self, name):
        """
        The guide distribution of a site: exactly a :class:`VariationalDropoutNormal` or
        :class:`CorrelatedVariationalDropoutNormal`, wrapped in ``.to_event(event_dim)``.
        """
        event_dim, input_axis = self._layouts[name]
        loc = self._get_loc(name)
        options = {"kl_approx": self.kl_approx, "log_alpha_clip": self.log_alpha_clip}
        if self.parameterization == "additive":
            log_sigma2 = attrgetter(name)(self.log_sigma2s)
            posterior = VariationalDropoutNormal.from_additive(loc, log_sigma2, **options)
        elif self.noise == "independent":
            posterior = VariationalDropoutNormal(loc, self._get_log_alpha_param(name, loc), **options)
        else:
            batch_ndim = loc.dim() - event_dim
            noise_shape = [
                size if (i < batch_ndim or i - loc.dim() == input_axis) else 1 for i, size in enumerate(loc.shape)
            ]
            log_alpha = self._get_log_alpha_param(name, loc).expand(noise_shape)
            posterior = CorrelatedVariationalDropoutNormal(loc, log_alpha, **options)
        return posterior.to_event(event_dim)

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

    @pyro_method
    @torch.no_grad()
    def log_alpha(self) -> dict[str, torch.Tensor]:
        r"""
        The :math:`\log\alpha` in force for every weight (after the cap ``max_log_alpha``,
        before the KL-only clipping ``log_alpha_clip``), with the site's full shape.

        :returns: A dict mapping site name to a tensor of :math:`\log\alpha`, on the parameters' device.
        :rtype: dict
        """
        self._check_initialized()
        result = {}
        for name in self._layouts:
            loc = self._get_loc(name)
            if self.parameterization == "additive":
                log_alpha = VariationalDropoutNormal.from_additive(loc, attrgetter(name)(self.log_sigma2s)).log_alpha
            else:
                log_alpha = self._get_log_alpha_param(name, loc)
            result[name] = log_alpha.expand(loc.shape).clone()
        return result

    @pyro_method
    @torch.no_grad()
    def sparsity(self, threshold: float = PRUNE_LOG_ALPHA_THRESHOLD) -> dict:
        r"""
        How many weights variational dropout would prune: those with :math:`\log\alpha > \text{threshold}`
        (default 3, Molchanov et al. 2017).

        :param float threshold: The pruning threshold on :math:`\log\alpha`.
        :returns: ``{"sites": {name: stats}, "total": stats}``, where ``stats`` is a dict with
            ``num_weights``, ``num_pruned``, ``num_kept`` (ints), ``fraction_pruned`` and
            ``compression`` (``num_weights / num_kept``, ``inf`` if every weight is pruned).
        :rtype: dict
        """

        return sparsity_summary(self.log_alpha(), threshold)


class AutoVariationalDropout(_VariationalDropoutMixin, AutoGuide):
    r"""
    A variational-dropout guide [1]: a Gaussian-dropout posterior on every weight site whose prior
    is :class:`~pyro_vdrop.distributions.ImproperLogUniform`,

    .. math::

        q(w_{ij}) = \mathcal{N}(w_{ij} \mid \theta_{ij}, \alpha_{ij}\theta_{ij}^2) ,

    with :math:`\theta` and (unless fixed) :math:`\alpha` learned. Each site's guide distribution is
    exactly a :class:`~pyro_vdrop.distributions.VariationalDropoutNormal` (independent noise) or a
    :class:`~pyro_vdrop.distributions.CorrelatedVariationalDropoutNormal` (correlated noise), wrapped
    in ``.to_event(event_dim)``, under the model's own site name and without auxiliary sites, so
    :class:`~pyro.infer.TraceMeanField_ELBO` uses the registered analytic KL to the log-uniform prior
    (the marginal KL of every weight, as a function of :math:`\log\alpha` only [1, §4]), and the
    :func:`~pyro_vdrop.poutine.local_reparam` effect can read ``loc``, ``scale``, ``log_alpha`` and
    ``noise_shape`` from it. Without that effect the guide draws one weight sample per step (the
    paper's "single weight sample" estimator).

    The variants of the papers, one line each::

        AutoVariationalDropout(model)                                         # B: independent noise, α per weight
        AutoVariationalDropout(model, noise="correlated")                     # A: noise per input unit
        AutoVariationalDropout(model, noise="correlated", kl_scale=1 / 3)     # A2: A with the KL divided by 3
        AutoVariationalDropout(model, parameterization="additive")            # sparse VD [2]
        AutoVariationalDropout(model, noise="correlated", dropout_rate=0.5)   # Gaussian dropout, α = p/(1-p) fixed

    **Noise and the input axis.** ``noise="independent"`` (variational dropout B [1, §3.3]) draws one
    noise per weight. ``noise="correlated"`` (variational dropout A) draws :math:`w_i = s_i\theta_i`,
    :math:`s_i \sim \mathcal{N}(1, \alpha_i)`: one noise per *input unit*, shared by all its outgoing
    weights, which is Gaussian dropout on the layer's inputs; for unit :math:`i`,
    :math:`\mathrm{Cov}(w_{ai}, w_{bi}) = \alpha_i\theta_{ai}\theta_{bi}` and weights of different units
    are independent. The input axis follows torch's layout: dim 1 of a weight with two or more dims
    (``nn.Linear``: ``(out, in)``, so ``log_alpha`` has shape ``(1, in)``; ``nn.ConvNd``:
    ``(out, in/groups, *kernel)``, shape ``(1, in/groups, 1, ...)``), and the single axis of a vector
    (``x @ w``); for a site with no event dims, the rightmost plate dim. Plate dims always get
    independent noise. Change it with ``input_dim``.

    **KL.** The registered KL counts the *marginal* KL of every weight, also with correlated noise
    (the paper's practice): the joint of a correlated posterior is degenerate and its KL to the
    log-uniform prior is infinite (Hron et al. [3]), so with correlated noise use
    :class:`~pyro.infer.TraceMeanField_ELBO`, not :class:`~pyro.infer.Trace_ELBO`. Hron et al. also show
    that under the improper log-uniform prior the true posterior is generally improper and the
    sparsity is not a Bayesian Occam effect: read the KL as a regulariser [3].

    **KL scale.** ``kl_scale`` is applied as the ``scale`` of the guide's sample site
    (:func:`pyro.poutine.scale`; ``poutine.mask(False)`` for 0). :class:`~pyro.infer.TraceMeanField_ELBO`
    multiplies the analytic KL by it, giving ``data term - kl_scale * KL`` (``kl_scale=1/3`` is the
    paper's A2). :class:`~pyro.infer.Trace_ELBO` scales only the guide's :math:`\log q(w)`, not the
    model's :math:`\log p(w)`, so its estimate is :math:`\log p(w) - \text{kl\_scale}\,\log q(w)`, which
    is *not* a scaled KL: use ``kl_scale != 1`` with ``TraceMeanField_ELBO`` only (the effect-based
    :class:`~pyro_vdrop.infer.AutoVariationalDropoutMessenger` scales the whole site and is exact under
    both). ``kl_scale`` may be reassigned between steps, e.g. to anneal the KL weight from 0 to 1 [2].

    **Initialization.** :math:`\theta` comes from ``init_loc_fn`` (default
    :func:`~pyro_vdrop.infer.init_to_fan_in`; Pyro's default strategies sample from the prior, which the
    improper log-uniform prior cannot do). To start from a pretrained torch network whose layers were
    made Bayesian with ``PyroSample`` (the site names of a ``PyroModule`` are the keys of the torch
    ``state_dict``)::

        init_loc_fn = init_to_value(values=pretrained.state_dict(), fallback=init_to_fan_in)

    Initial values take the dtype and device of the model's first floating-point input (else their own),
    so float64 and GPU inputs give float64 and GPU parameters. A weight of exactly 0 has zero variance
    under the multiplicative parameterization; keep pretrained weights away from 0 or use the additive one.

    :param callable model: A Pyro model.
    :param str noise: ``"independent"`` (default; paper's B) or ``"correlated"`` (paper's A).
    :param str granularity: Where α varies: ``"weight"``, ``"unit"`` (along the input axis, shared
        along plate dims) or ``"layer"`` (one α per site). Default ``"weight"`` with independent
        noise, ``"unit"`` with correlated noise (which cannot have α per weight).
    :param str parameterization: ``"multiplicative"`` (default; learns θ and log α, log α capped at
        ``max_log_alpha`` as in the paper) or ``"additive"`` (sparse variational dropout [2]: learns θ
        and log σ², :math:`\log\alpha = \log\sigma^2 - \log\theta^2` unbounded; per weight and
        independent noise only).
    :param float dropout_rate: Fix :math:`\alpha = p/(1-p)` from a dropout rate ``p`` (Gaussian dropout
        read as a posterior [1, §3]); no α parameter, no α gradient, and the KL is a constant.
    :param float kl_scale: The factor on the KL term (default 1; see above).
    :param str kl_approx: The KL approximation, ``"molchanov"`` or ``"kingma"``
        (:func:`~pyro_vdrop.distributions.log_uniform_kl`); default: the prior's (``"molchanov"``).
    :param tuple log_alpha_clip: ``(low, high)`` bounds on log α inside the KL only, or None.
        Default ``"auto"``: ``(-8, 8)`` for the additive parameterization [2], None otherwise.
    :param float max_log_alpha: Cap on the learned log α of the multiplicative parameterization,
        applied by clamping in the forward pass (no gradient beyond it). Default ``"auto"``: 0
        (α ≤ 1 [1]); None removes the cap (then prefer ``kl_approx="molchanov"``).
    :param input_dim: The input axis of each site: an int (a non-negative dim of the weight, i.e. of the
        event shape, or a negative dim of the site's value), a dict ``{site name: int}``, or None for the
        torch layout (see above).
    :param callable init_loc_fn: A per-site initialization strategy for θ (default ``init_to_fan_in``).
    :param float init_log_alpha: Initial log α of the multiplicative parameterization (default -4).
    :param float init_log_sigma2: Initial log σ² of the additive parameterization (default -10 [2]).
    :param callable create_plates: As for :class:`~pyro.infer.autoguide.AutoGuide`.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick."
        NeurIPS 2015.
    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
    [3] Hron, Matthews, Ghahramani. "Variational Bayesian dropout: pitfalls and fixes." ICML 2018.
    """

    def __init__(
        self,
        model: Callable,
        *,
        noise: Literal["independent", "correlated"] = "independent",
        granularity: Literal["weight", "unit", "layer"] | None = None,
        parameterization: Literal["multiplicative", "additive"] = "multiplicative",
        dropout_rate: float | None = None,
        kl_scale: float = 1.0,
        kl_approx: str | None = None,
        log_alpha_clip: tuple[float, float] | None | Literal["auto"] = "auto",
        max_log_alpha: float | None | Literal["auto"] = "auto",
        input_dim: int | dict[str, int] | None = None,
        init_loc_fn: Callable = init_to_fan_in,
        init_log_alpha: float = DEFAULT_INIT_LOG_ALPHA,
        init_log_sigma2: float = SPARSE_VD_INIT_LOG_SIGMA2,
        create_plates: Callable | None = None,
    ):
        self._set_options(
            noise=noise,
            granularity=granularity,
            parameterization=parameterization,
            dropout_rate=dropout_rate,
            kl_scale=kl_scale,
            kl_approx=kl_approx,
            log_alpha_clip=log_alpha_clip,
            max_log_alpha=max_log_alpha,
            input_dim=input_dim,
            init_loc_fn=init_loc_fn,
            init_log_alpha=init_log_alpha,
            init_log_sigma2=init_log_sigma2,
        )
        model = InitMessenger(self._init_loc)(model)
        super().__init__(model, create_plates=create_plates)

    def _setup_prototype(self, *args, **kwargs):
        try:
            self._setup(*args, **kwargs)
        except BaseException:
            # a failed set-up (e.g. a first call without the observations) must not leave a half-made guide that
            # later calls would take as set up
            self.prototype_trace = None
            raise

    def _setup(self, *args, **kwargs):
        ref = _reference_tensor(args, kwargs)
        self._like = None if ref is None else (ref.dtype, ref.device)
        try:
            super()._setup_prototype(*args, **kwargs)
        finally:
            self._like = None

        self.locs = PyroModule()
        if self.dropout_rate is None:
            if self.parameterization == "additive":
                self.log_sigma2s = PyroModule()
            else:
                self.log_alphas = PyroModule()
        self._layouts = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            self._check_site(name, site["fn"], site)
        if isinstance(self.input_dim, dict):
            unknown = set(self.input_dim) - {name for name, _ in self.prototype_trace.iter_stochastic_nodes()}
            if unknown:
                raise ValueError(f"input_dim names sites that the model does not sample: {sorted(unknown)}")
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            init_loc = site["value"].detach()
            event_dim = site["fn"].event_dim
            # If subsampling, repeat the initial value to full size.
            for frame in site["cond_indep_stack"]:
                full_size = frame.full_size or frame.size
                if full_size != frame.size:
                    init_loc = periodic_repeat(init_loc, full_size, frame.dim - event_dim).contiguous()
            self._create_params(name, init_loc, event_dim)

    def forward(self, *args, **kwargs):
        """
        An automatic guide with the same ``*args, **kwargs`` as the base ``model``.

        .. note:: This method is used internally by :class:`~torch.nn.Module`.
            Users should instead use :meth:`~torch.nn.Module.__call__`.

        :return: A dict mapping sample site name to sampled value.
        :rtype: dict
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)

        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                posterior = self._get_posterior(name)
                with self._kl_scale_context():
                    result[name] = pyro.sample(name, posterior)
        return result

    @pyro_method
    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        r"""
        Returns the posterior median (= mean) :math:`\theta` of each weight site. To use the pruned
        network, zero the weights with :math:`\log\alpha > 3` (see :meth:`log_alpha`).

        :return: A dict mapping sample site name to median tensor.
        :rtype: dict
        """
        self._check_initialized()
        return {name: self._get_loc(name).clone() for name in self._layouts}

    @pyro_method
    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        """
        Returns the posterior quantiles of each weight (of its marginal
        :math:`\\mathcal{N}(\\theta, \\alpha\\theta^2)`).

        :param quantiles: A list of requested quantiles between 0 and 1.
        :type quantiles: torch.Tensor or list
        :return: A dict mapping sample site name to a tensor of quantile values, with the quantiles
            along a new leftmost dim.
        :rtype: dict
        """
        self._check_initialized()
        results = {}
        for name in self._layouts:
            base = base_distribution(self._get_posterior(name))
            q = torch.as_tensor(quantiles, dtype=base.loc.dtype, device=base.loc.device)
            z = torch.special.ndtri(q.reshape((-1,) + (1,) * base.loc.dim()))
            results[name] = base.loc + base.scale * z
        return results


__all__ = ["AutoVariationalDropout"]
