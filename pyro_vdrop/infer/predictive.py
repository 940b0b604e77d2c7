# SPDX-License-Identifier: Apache-2.0

import contextlib
from collections.abc import Callable, Mapping

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from pyro_vdrop.poutine import LazyWeight, active_local_reparam

from .autoguide.initialization import init_to_fan_in


def trace_guide_then_model(
    model: Callable,
    guide: Callable,
    args: tuple = (),
    kwargs: Mapping | None = None,
    *,
    block_outer: bool = False,
) -> tuple[Trace, Trace]:
    """
    One posterior draw as Pyro's :class:`~pyro.infer.Predictive` makes it: runs ``guide`` under
    :func:`~pyro.poutine.trace`, then ``model`` replayed against the guide's trace.

    :param callable model: The model.
    :param callable guide: The guide.
    :param tuple args: Positional arguments of both.
    :param dict kwargs: Keyword arguments of both.
    :param bool block_outer: Hide both runs from every handler the caller entered (e.g.
        :func:`~pyro_vdrop.poutine.local_reparam`), so that the guide draws concrete weights.
    :returns: ``(guide_trace, model_trace)``.
    """
    kwargs = {} if kwargs is None else kwargs
    # poutine.block() outside the tracers hides the sites from every handler the caller entered
    with poutine.block() if block_outer else contextlib.nullcontext():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


class Predictive(pyro.infer.Predictive):
    r"""
    :class:`pyro.infer.Predictive` for models with :class:`~pyro_vdrop.distributions.ImproperLogUniform`
    priors and for the :func:`~pyro_vdrop.poutine.local_reparam` effect; same arguments, same results.

    - Pyro's ``Predictive`` first runs the model once on its own, drawing every latent site from its
      prior (``init_to_sample``) to learn the model's shapes; an improper prior cannot be sampled, so
      that run fails. This class gives the log-uniform sites of that shape-finding run a
      :func:`~pyro_vdrop.infer.init_to_fan_in` value; every other site is drawn as Pyro would draw it,
      and the returned draws come from the guide (or ``posterior_samples``) as usual — in particular
      unobserved likelihood sites are sampled, not set to a point estimate.
    - Inside :func:`~pyro_vdrop.poutine.local_reparam` (with a ``guide``, sequential draws) each draw
      runs the guide and replays the model against it, so the draws use per-example pre-activation
      noise and no weight is ever sampled. Weight sites hold no sampled value then: they are left out
      of the default return sites, and asking for one raises an error. Each returned site has shape
      ``(num_samples,) + site_shape``::

        predictive = Predictive(model, guide=guide, num_samples=100, return_sites=["obs", "_RETURN"])
        with pyro_vdrop.local_reparam():
            samples = predictive(x_test)

    :param model: The model.
    :param dict posterior_samples: As for :class:`pyro.infer.Predictive`.
    :param guide: The guide.
    :param int num_samples: The number of draws.
    :param return_sites: Sites to return (as for :class:`pyro.infer.Predictive`).
    :param bool parallel: Vectorize the draws (as for :class:`pyro.infer.Predictive`; not under
        ``local_reparam``).
    """

    def __init__(self, model, posterior_samples=None, *, guide=None, num_samples=None, return_sites=(), parallel=False):
        init = init_to_fan_in(fallback=init_to_sample)
        super().__init__(
            InitMessenger(init)(model),
            posterior_samples,
            guide=guide,
            num_samples=num_samples,
            return_sites=return_sites,
            parallel=parallel,
        )

    def forward(self, *args, **kwargs):
        if self.guide is None or active_local_reparam() is None:
            return super().forward(*args, **kwargs)
        if self.parallel:
            raise ValueError(
                "Predictive(parallel=True) is not supported inside local_reparam: the draws are made one at a "
                "time by replaying the model against the guide; pass parallel=False"
            )
        draws = {}
        with torch.no_grad():
            for _ in range(self.num_samples):
                guide_trace, model_trace = trace_guide_then_model(self.model, self.guide, args, kwargs)
                model_trace = prune_subsample_sites(model_trace)
                for name, site in model_trace.nodes.items():
                    if site["type"] != "sample" and name != "_RETURN":
                        continue
                    if not self._returned(name, guide_trace):
                        continue
                    value = site["value"]
                    if isinstance(value, LazyWeight):
                        if self.return_sites:
                            raise ValueError(
                                f"Predictive: site {name!r} is a weight under local_reparam, which samples "
                                "pre-activations and never the weight itself; leave it out of return_sites, or "
                                "draw weights outside local_reparam"
                            )
                        continue
                    draws.setdefault(name, []).append(value)
        if self.return_sites:
            missing = [name for name in self.return_sites if name not in draws]
            if missing:
                raise ValueError(f"Predictive: return_sites {missing} are not sites of the model")
        return {name: torch.stack(values) for name, values in draws.items()}

    def _returned(self, name, guide_trace):
        # Pyro's rule: the sites listed; None: every sample site; (): the sites the guide does not give
        if self.return_sites:
            return name in self.return_sites
        if name == "_RETURN":
            return False
        return self.return_sites is None or name not in guide_trace.nodes


__all__ = ["Predictive", "trace_guide_then_model"]
