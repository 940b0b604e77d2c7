# SPDX-License-Identifier: Apache-2.0

import pyro
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample

from .initialization import init_to_fan_in


class Predictive(pyro.infer.Predictive):
    r"""
    :class:`pyro.infer.Predictive` for models with :class:`~pyro_vdrop.distributions.ImproperLogUniform`
    priors; same arguments, same results.

    Pyro's ``Predictive`` first runs the model once on its own, drawing every latent site from its
    prior (``init_to_sample``) to learn the model's shapes; an improper prior cannot be sampled, so
    that run fails. This class gives the log-uniform sites of that shape-finding run a
    :func:`~pyro_vdrop.infer.init_to_fan_in` value; every other site is drawn as Pyro would draw
    it, and the returned draws come from the guide (or ``posterior_samples``) as usual — in
    particular unobserved likelihood sites are sampled, not set to a point estimate.
    Under :func:`~pyro_vdrop.poutine.local_reparam` the draws use per-example noise::

        predictive = Predictive(model, guide=guide, num_samples=100, return_sites=["obs", "_RETURN"])
        with pyro_vdrop.poutine.local_reparam():
            samples = predictive(x_test)

    :param model: The model.
    :param dict posterior_samples: As for :class:`pyro.infer.Predictive`.
    :param guide: The guide.
    :param int num_samples: The number of draws.
    :param return_sites: Sites to return (as for :class:`pyro.infer.Predictive`).
    :param bool parallel: Vectorize the draws (as for :class:`pyro.infer.Predictive`).
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
