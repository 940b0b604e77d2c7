# SPDX-License-Identifier: Apache-2.0
r"""
The papers' variants of variational dropout as named option sets:

========================  ==========================================================================
``"sparse"``              sparse VD [2]: independent noise, additive parameterization, log α clipped
                          to (-8, 8) inside the KL, the prior's KL fit (Molchanov's [2])
``"B"``                   variational dropout B [1, §3.3]: independent noise, α per weight, α ≤ 1,
                          Kingma's KL fit
``"A"``                   variational dropout A [1, §3.3]: correlated noise, α per input unit, α ≤ 1,
                          Kingma's KL fit
``"A2"``                  A with the KL term scaled by 1/3 [1, §5]
``"gaussian-dropout"``    Gaussian dropout read as a posterior [1, §3]: correlated noise with
                          α = p / (1 - p) fixed from a dropout rate (``dropout_rate=p`` is required)
``"group"``               group variational dropout [3, 4]: Gaussian noise per input unit (channel),
                          :math:`z_g \sim \mathcal{N}(\mu_g, \sigma_g^2)` learned additively, the KL once per
                          group, log α ≤ 8; prunes whole units
``"sbp"``                 structured Bayesian pruning [3]: truncated log-normal noise per input unit
                          (channel), the exact KL to the proper truncated log-uniform prior (the weight
                          sites' prior must be :class:`~pyro_vdrop.distributions.LogUniformNoisePrior`)
========================  ==========================================================================

**References**

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
[2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
[3] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative Noise."
    NeurIPS 2017.
[4] Louizos, Ullrich, Welling. "Bayesian Compression for Deep Learning." NeurIPS 2017.
"""

from types import MappingProxyType
from typing import Any

from pyro_vdrop.infer.sparsity import SPARSE_VD_LOG_ALPHA_CLIP

from .options import VariationalDropoutOptions

#: "A2" is variant A with the KL term scaled down by a factor of 3 [1, §5].
A2_KL_SCALE = 1.0 / 3.0

#: The keywords of :class:`VariationalDropoutOptions` that make each paper variant.
PRESETS = MappingProxyType(
    {
        "sparse": MappingProxyType(
            {"noise": "independent", "parameterization": "additive", "log_alpha_clip": SPARSE_VD_LOG_ALPHA_CLIP}
        ),
        "B": MappingProxyType({"noise": "independent", "kl_approx": "kingma"}),
        "A": MappingProxyType({"noise": "correlated", "kl_approx": "kingma"}),
        "A2": MappingProxyType({"noise": "correlated", "kl_approx": "kingma", "kl_scale": A2_KL_SCALE}),
        "gaussian-dropout": MappingProxyType({"noise": "correlated", "kl_approx": "kingma"}),
        "group": MappingProxyType({"noise": "group", "parameterization": "additive"}),
        "sbp": MappingProxyType({"noise": "sbp"}),
    }
)


def preset(name: str, **overrides: Any) -> VariationalDropoutOptions:
    """
    The options of a paper variant, with ``overrides`` on top::

        guide = AutoVariationalDropout(model, options=preset("A2"))
        guide = AutoVariationalDropout(model, options=preset("gaussian-dropout", dropout_rate=0.5))

    :param str name: One of :data:`PRESETS`: ``"sparse"``, ``"B"``, ``"A"``, ``"A2"``, ``"gaussian-dropout"``,
        ``"group"``, ``"sbp"``.
    :param overrides: Fields of :class:`~pyro_vdrop.infer.autoguide.VariationalDropoutOptions` (e.g.
        ``dropout_rate`` for ``"gaussian-dropout"``, ``init_loc_fn``).
    :rtype: VariationalDropoutOptions
    :raises ValueError: for an unknown name, or a combination of options that is not valid.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown variational-dropout preset {name!r}; choose one of {list(PRESETS)}")
    if name == "gaussian-dropout" and overrides.get("dropout_rate") is None:
        raise ValueError("preset 'gaussian-dropout' fixes α from a dropout rate: pass dropout_rate=p, 0 < p < 1")
    return VariationalDropoutOptions(**{**PRESETS[name], **overrides})


__all__ = ["A2_KL_SCALE", "PRESETS", "preset"]
