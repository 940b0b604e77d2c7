# SPDX-License-Identifier: Apache-2.0

from collections.abc import Callable, Collection

from pyro.distributions import Delta
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import Independent

from pyro_vdrop.distributions import (
    CorrelatedVariationalDropoutNormal,
    TruncatedLogNormalDropout,
    VariationalDropoutNormal,
)
from pyro_vdrop.distributions.util import base_distribution

from .estimators import ESTIMATORS, LRT
from .lazy_weight import LazyWeight
from .local_reparam_site import LocalReparamKL, LocalReparamSite
from .runtime import handlers_inside, handlers_outside

_AUX_SUFFIX = "_unconstrained"
_DROPOUT_POSTERIORS = (VariationalDropoutNormal, CorrelatedVariationalDropoutNormal, TruncatedLogNormalDropout)


class LocalReparamMessenger(Messenger):
    r"""
    Samples pre-activations instead of weights: the local reparameterization trick [1, §2.3]
    (or Flipout [2]) as an effect handler.

    Inside this handler a latent site whose distribution is a factorized Gaussian —
    :class:`~pyro_vdrop.distributions.VariationalDropoutNormal`, a plain
    :class:`~pyro.distributions.Normal` (e.g. the auxiliary site of
    :class:`~pyro.infer.autoguide.AutoNormal`), or
    :class:`~pyro_vdrop.distributions.CorrelatedVariationalDropoutNormal`, optionally
    ``.to_event(n)`` — gets no sampled value. Its value is a
    :class:`~pyro_vdrop.poutine.LazyWeight` carrying the Gaussian; when the model feeds it to
    ``F.linear``, ``@``/``matmul``, ``F.conv1d/2d/3d`` or ``F.conv_transpose1d/2d/3d`` (also through slices of the
    weight and ``F.multi_head_attention_forward``) the op returns a sample of the output

    .. math::

        b = \mathrm{op}(x, \mu) + \sqrt{\mathrm{op}(x^2, \sigma^2)} \odot \zeta, \qquad
        \zeta \sim \mathcal{N}(0, I),

    whose noise is independent across the examples of a minibatch, so the variance of the
    ELBO gradient falls as :math:`1/M` [1, §2] at the cost of two matmuls and :math:`M \times J`
    normals. ``F.embedding`` returns the looked-up rows of one weight sample per example (dim 0 of the
    indices). Correlated (dropout "A") noise is drawn exactly as :math:`\xi \sim \mathcal{N}(1, \alpha)`
    on the op's inputs (outputs), once per example.

    **ELBO accounting.** The guide runs first: its site gets the lazy value and a zero log-density.
    The model is replayed against it, and its site gets the analytic term
    :math:`\log p - \log q \to -\mathrm{KL}(q\,\|\,p)` (via :func:`torch.distributions.kl_divergence`,
    scaled and masked like the guide site, recorded as a :class:`~pyro_vdrop.poutine.LocalReparamKL` and
    computed only when the ELBO asks for the site's log-density: prediction does not pay for it), so no
    weight-sized sample or per-weight log-density is computed. Hence
    :class:`~pyro.infer.TraceMeanField_ELBO` (recommended: it uses the same analytic KL) and
    :class:`~pyro.infer.Trace_ELBO` both compute :math:`\mathbb{E}[\log p(y \mid x, w)] - \mathrm{KL}(q \| p)`.
    An effect-based guide (a :class:`~pyro.poutine.guide.GuideMessenger`, e.g.
    :class:`~pyro_vdrop.infer.AutoVariationalDropoutMessenger`) shares each site with the model: the model's copy
    of the site (its ``infer["prior"]``) gets the same analytic term.
    A site without a registered KL raises an error when the ELBO asks for its term. The handler must be outside
    any :func:`~pyro.poutine.trace` whose trace is used in an ELBO, e.g. around the ``svi.step`` call.

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
        with local_reparam():
            for x, y in loader:
                svi.step(x, y)

    :param str estimator: ``"lrt"`` (default, the local reparameterization trick) or ``"flipout"``;
        for diagnostics also ``"per-example"`` (an explicit weight sample per example: exact but
        :math:`M` weight-sized samples) and ``"mean"`` (no noise: the posterior mean weight).
    :param sites: ``None`` (default: every site whose distribution is a
        :class:`~pyro_vdrop.distributions.VariationalDropoutNormal` or
        :class:`~pyro_vdrop.distributions.CorrelatedVariationalDropoutNormal`, and the ``Normal`` of an
        autoguide's auxiliary site; a plain ``Normal`` elsewhere is left alone, since an unobserved Normal
        likelihood must stay a sample), a collection of site names (any factorized Gaussian site named
        is made lazy), or a callable ``(name, msg) -> bool``: it *selects* the sites made lazy, every other
        site stays an ordinary sample. An autoguide's auxiliary site ``"<name>_unconstrained"`` is selected by
        ``"<name>"``; if the guide transforms it (a constrained site: ``exp``, ``sigmoid``, slicing), it becomes
        one ordinary sample at the transform, with its ordinary log-density, as without the handler.
    :param bool fallback: If ``True``, a lazy weight used by an unsupported operation is replaced by
        one ordinary weight sample (drawn once per site and model run; autoguide sites included). Off by
        default: such uses raise a :class:`~pyro_vdrop.poutine.LazyWeightError` naming the site and the op.

    **Tied weights.** Every use of a weight in one model run sees the same weight per example (see
    :class:`~pyro_vdrop.poutine.LazyWeight`); a tied use whose noise cannot be shared raises a
    :class:`~pyro_vdrop.poutine.LazyWeightError` naming the site and both ops.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    [2] Wen, Vicol, Ba, Tran, Grosse. "Flipout: Efficient Pseudo-Independent Weight
        Perturbations on Mini-Batches." ICLR 2018.
    """

    def __init__(
        self,
        *,
        estimator: str = LRT,
        sites: Collection[str] | Callable[[str, dict], bool] | None = None,
        fallback: bool = False,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"local_reparam: estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not (sites is None or callable(sites) or isinstance(sites, Collection)) or isinstance(sites, str):
            raise TypeError(
                f"local_reparam: sites must be None, a collection of site names or a callable, got {sites!r}"
            )
        super().__init__()
        self.estimator = estimator
        self.sites = sites
        self.fallback = bool(fallback)
        self._origins = set()

    def _selected(self, msg, auxiliary):
        if self.sites is None:
            return True
        name = msg["name"]
        if callable(self.sites):
            return bool(self.sites(name, msg))
        if auxiliary and name.endswith(_AUX_SUFFIX) and name[: -len(_AUX_SUFFIX)] in self.sites:
            return True
        return name in self.sites

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        base = base_distribution(fn, Independent)
        if isinstance(base, LocalReparamSite):
            return
        if isinstance(base, Delta) and isinstance(base.v, LazyWeight):
            # An autoguide's (AutoNormal's) site on top of a lazy auxiliary value. The lazy value passed
            # through the transform unchanged, so the transform is the identity and the site's value is
            # distributed as the auxiliary Gaussian: record that distribution, so that an analytic KL applies.
            base.v.mark_delivered()
            q = base.v.root.distribution
            if base.v.root is base.v and q.batch_shape == fn.batch_shape and q.event_shape == fn.event_shape:
                msg["fn"] = q
                msg["value"] = base.v
                self._origins.add(id(msg))
            return
        auxiliary = bool(msg["infer"].get("is_auxiliary", False))
        if not self._selected(msg, auxiliary):
            return
        if self.sites is None and not auxiliary and not isinstance(base, _DROPOUT_POSTERIORS):
            # By default a plain Normal is made lazy only at an autoguide's auxiliary site: an unobserved
            # Normal elsewhere is as likely a likelihood (e.g. a regression's y at prediction time) as a
            # weight. Hand-written guides with Normal weights name their sites with sites=[...].
            return
        lazy = LazyWeight.from_distribution(
            fn, site=msg["name"], estimator=self.estimator, fallback=self.fallback, auxiliary=auxiliary
        )
        if lazy is None:
            return
        msg["value"] = lazy
        self._origins.add(id(msg))

    def _pyro_post_sample(self, msg):
        value = msg["value"]
        origin = id(msg) in self._origins
        self._origins.discard(id(msg))
        if msg["is_observed"] or not isinstance(value, LazyWeight):
            return
        self._check_outside_trace(msg["name"])
        if origin:
            self._record_origin(msg, value)
            if self._shared_site(msg):
                # an effect-based guide (a GuideMessenger, e.g. AutoVariationalDropoutMessenger) runs inside the
                # model: guide and model share this site, and the guide's get_traces() gives the model's copy of
                # it the prior recorded in msg["infer"]["prior"]; that copy gets -KL(q || p) (scale and mask are
                # the shared site's), and the model run that uses the weight starts here
                value.start_run()
                msg["infer"]["prior"] = LocalReparamKL(msg["infer"]["prior"], value.root)
        else:
            # the model's site: a model run begins, whose uses of the weight share its noise
            value.start_run()
            self._record_kl(msg, value.root)

    def _shared_site(self, msg):
        """Whether ``msg`` is a site that an effect-based guide inside this handler shares with the model."""
        if "prior" not in msg["infer"]:
            return False
        return any(isinstance(frame, GuideMessenger) for frame in handlers_inside(self))

    def _check_outside_trace(self, name):
        if any(isinstance(frame, TraceMessenger) for frame in handlers_outside(self)):
            raise RuntimeError(
                f"local_reparam at site {name!r}: the handler is inside a poutine.trace, which records the site "
                "before the handler can fill in its analytic log-density. Apply local_reparam outside the trace, "
                "e.g. `with pyro_vdrop.poutine.local_reparam(): svi.step(...)`."
            )

    @staticmethod
    def _record_origin(msg, lazy):
        # The density of q is accounted for analytically on the model site that consumes the value.
        if lazy.site == msg["name"]:
            lazy.kl_scale = msg["scale"]
            lazy.kl_mask = msg["mask"]
        # Recorded as a LocalReparamSite: TraceMeanField_ELBO then finds no registered KL for the site and
        # uses the terms recorded here and on the model site, so that the KL is computed once, not twice.
        # Its log_prob is zero, or, if the guide transformed an autoguide's auxiliary value into an ordinary
        # sample (a site without real support), that sample's log-density: computed when the ELBO asks.
        msg["fn"] = LocalReparamSite(msg["fn"], lazy)

    @staticmethod
    def _record_kl(msg, lazy):
        # -KL(q || p), computed when an ELBO asks for the site's log-density (prediction never does); scaled and
        # masked like the guide site that made the lazy value.
        msg["fn"] = LocalReparamKL(msg["fn"], lazy)
        msg["scale"] = lazy.kl_scale
        msg["mask"] = lazy.kl_mask
