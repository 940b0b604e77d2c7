# SPDX-License-Identifier: Apache-2.0
"""
Initialization strategies for sites whose prior is improper.

Pyro's built-in strategies (``init_to_feasible``, ``init_to_median``, ...) draw from
the prior, which :class:`~pyro_vdrop.distributions.ImproperLogUniform` cannot do. The
strategy here gives such weight sites the random initialisation of a torch layer.
"""

import math

import torch
from pyro.infer.autoguide.initialization import init_to_median

from pyro_vdrop.distributions import ImproperLogUniform, LogUniformNoisePrior
from pyro_vdrop.distributions.util import base_distribution


def init_to_fan_in(site=None, *, fallback=init_to_median):
    r"""
    Initializes :class:`~pyro_vdrop.distributions.ImproperLogUniform` (and
    :class:`~pyro_vdrop.distributions.LogUniformNoisePrior`) sites like a torch
    layer: uniformly on :math:`[-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}}]`, with
    ``fan_in`` the product of all but the first dimension of the site's shape (the
    ``in_features``, or ``in_channels/groups × kernel`` of a convolution weight), and
    never exactly 0, with the prior's ``dtype`` and ``device`` (torch's defaults when the prior
    has none; :func:`~pyro_vdrop.nn.bayesianize` sets them from the layer). Other sites are
    passed to ``fallback``.

    Use it with any Pyro autoguide::

        guide = AutoNormal(model, init_loc_fn=init_to_fan_in)

    :param dict site: The sample site (Pyro's init-strategy calling convention).
    :param callable fallback: The strategy for every other site (default ``init_to_median``).
    """
    if site is None:
        return lambda site: init_to_fan_in(site, fallback=fallback)
    prior = base_distribution(site["fn"])
    if not isinstance(prior, (ImproperLogUniform, LogUniformNoisePrior)):
        return fallback(site)
    shape = site["fn"].shape()
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    # the prior's dtype and device (set by bayesianize from the layer); torch's defaults when it has none
    value = torch.empty(shape, dtype=prior.dtype, device=prior.device).uniform_(-bound, bound)
    # keep |w| away from 0, where the log-uniform density is infinite
    tiny = bound * 1e-3
    value = torch.where(value.abs() < tiny, torch.full_like(value, tiny), value)
    value._pyro_custom_init = False
    return value
