# SPDX-License-Identifier: Apache-2.0
"""The variational-dropout autoguide, after Pyro's :class:`~pyro.infer.autoguide.AutoNormal`."""

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.nn.module import PyroModule, pyro_method
from pyro.ops.tensor_utils import periodic_repeat

from pyro_vdrop.distributions.util import base_distribution

from .base import AutoVariationalDropoutBase
from .options import VariationalDropoutOptions


class AutoVariationalDropout(AutoVariationalDropoutBase, AutoGuide):
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

    The variants of the papers, one line each (also as named option sets,
    :func:`~pyro_vdrop.infer.autoguide.preset`, e.g. ``AutoVariationalDropout(model, options=preset("A2"))``)::

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

    The options are keyword arguments, or one :class:`~pyro_vdrop.infer.autoguide.VariationalDropoutOptions`
    passed as ``options=`` (not both):

    :param callable model: A Pyro model.
    :param VariationalDropoutOptions options: All the options below as one object (e.g. from
        :func:`~pyro_vdrop.infer.autoguide.preset`).
    :param keywords: The fields of :class:`~pyro_vdrop.infer.autoguide.VariationalDropoutOptions`, each documented
        there: ``noise`` (``"independent"``, the paper's B, or ``"correlated"``, A), ``granularity``
        (``"weight"``, ``"unit"``, ``"layer"``), ``parameterization`` (``"multiplicative"`` or ``"additive"`` [2]),
        ``dropout_rate``, ``kl_scale``, ``kl_approx``, ``log_alpha_clip``, ``max_log_alpha``, ``input_dim``
        (see above), ``init_loc_fn``, ``init_log_alpha``, ``init_log_sigma2``.
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
        options: VariationalDropoutOptions | None = None,
        create_plates: Callable | None = None,
        **keywords: Any,
    ):
        self._set_options(options, keywords)
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
        self._set_like(args, kwargs)
        try:
            super()._setup_prototype(*args, **kwargs)
        finally:
            self._set_like(None, None)

        self.locs = PyroModule()
        if self.dropout_rate is None:
            if self.parameterization == "additive":
                self.log_sigma2s = PyroModule()
                if self.noise == "group":
                    self.group_locs = PyroModule()
            elif self.noise == "sbp":
                self.noise_locs = PyroModule()
                self.noise_log_scales = PyroModule()
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
                posterior = self.posterior(name)
                with self._kl_scale_context():
                    result[name] = pyro.sample(name, posterior)
        return result

    @pyro_method
    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        r"""
        Returns the posterior median (= mean) :math:`\theta` of each weight site (with ``noise="sbp"``,
        :math:`\theta` times the median of the log-normal noise). To use the pruned network, zero the weights with
        :math:`\log\alpha >` :attr:`prune_threshold` (see :meth:`log_alpha`).

        :return: A dict mapping sample site name to median tensor.
        :rtype: dict
        """
        return self._medians()

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
            base = base_distribution(self.posterior(name))
            q = torch.as_tensor(quantiles, dtype=base.loc.dtype, device=base.loc.device)
            q = q.reshape((-1,) + (1,) * base.loc.dim())
            if self.noise == "sbp":  # w = θ s with s > 0: the q-quantile of s for θ >= 0, the (1-q)-quantile for θ < 0
                q = torch.where(base.loc >= 0, q, 1 - q)
                results[name] = base.loc * base.noise.icdf(q)
                continue
            results[name] = base.loc + base.scale * torch.special.ndtri(q)
        return results


__all__ = ["AutoVariationalDropout"]
