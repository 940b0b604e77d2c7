# SPDX-License-Identifier: Apache-2.0
"""Pruning a trained variational-dropout model to a plain, sparse torch network."""

import math

import torch
from torch import nn

from pyro_vdrop.infer.sparsity import PRUNE_LOG_ALPHA_THRESHOLD, prune_params

from .bayesian_module import BayesianModule

#: The pruning threshold, :data:`pyro_vdrop.infer.sparsity.PRUNE_LOG_ALPHA_THRESHOLD` (3), under its older name.
LOG_ALPHA_THRESHOLD = PRUNE_LOG_ALPHA_THRESHOLD


def prune(
    model: BayesianModule,
    guide=None,
    *,
    params: dict[str, torch.Tensor] | None = None,
    log_alpha: dict[str, torch.Tensor] | None = None,
    threshold: float | None = None,
) -> nn.Module:
    r"""
    The deterministic, sparse torch network of a trained variational-dropout model [2, §4]: each random
    weight is set to its posterior mean :math:`\theta`, zeroed where :math:`\log\alpha` exceeds ``threshold``,

    .. math::

        w_{ij} = \theta_{ij}\,\mathbb{1}[\log\alpha_{ij} \le \tau],

    and the deterministic parameters and buffers are copied from the model. The result is an instance of the
    original network's class with no Pyro in it; its test accuracy is the figure to report.

    Either a guide with ``median()`` (:math:`\{\text{site}: \theta\}`) and ``log_alpha()``
    (:math:`\{\text{site}: \log\alpha\}`), such as :class:`~pyro_vdrop.infer.AutoVariationalDropout`, or the two
    dicts ``params`` and ``log_alpha`` (which override the guide's) must cover every random site. For a plain
    Normal posterior :math:`\mathcal{N}(\mu, \sigma^2)`, :math:`\log\alpha = 2\log(\sigma/|\mu|)`.

    :param BayesianModule model: A model made by :func:`~pyro_vdrop.nn.bayesianize`.
    :param guide: A trained guide with ``median()`` and ``log_alpha()``; optional if both dicts are given.
    :param dict params: :math:`\theta` per random site.
    :param dict log_alpha: :math:`\log\alpha` per random site, of the site's shape (or broadcastable to it,
        e.g. per unit or per layer).
    :param float threshold: :math:`\tau`; ``math.inf`` keeps every weight. Default: the guide's
        ``prune_threshold`` (3, or 0, i.e. SNR < 1, for structured Bayesian pruning), 3 without a guide.
    :returns: the pruned network, in the model's training/eval mode, on the model's device and dtype.
    :rtype: torch.nn.Module

    **References**

    [2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
    """
    if not isinstance(model, BayesianModule):
        raise TypeError(f"model must be made by pyro_vdrop.nn.bayesianize, got {type(model).__name__}")
    if threshold is None:
        threshold = getattr(guide, "prune_threshold", LOG_ALPHA_THRESHOLD)
    if math.isnan(threshold):
        raise ValueError("threshold must be a number (math.inf keeps every weight), got nan")
    if params is None or log_alpha is None:
        if guide is None:
            raise ValueError("pass a guide with median() and log_alpha(), or both params= and log_alpha= dicts")
        for method in ("median",) * (params is None) + ("log_alpha",) * (log_alpha is None):
            if not callable(getattr(guide, method, None)):
                raise TypeError(
                    f"the guide ({type(guide).__name__}) has no {method}() method; pass "
                    f"{'params' if method == 'median' else 'log_alpha'}= as a dict {{site name: tensor}} instead"
                )
        with torch.no_grad():
            params = guide.median() if params is None else params
            log_alpha = guide.log_alpha() if log_alpha is None else log_alpha

    net = model.to_deterministic()
    with torch.no_grad():
        for site in model.random_sites:
            for name, values in (("params", params), ("log_alpha", log_alpha)):
                if site not in values:
                    raise KeyError(f"{name} has no entry for the random site {site!r}; it has {sorted(values)}")
            target = net.get_parameter(site)
            theta = torch.as_tensor(params[site]).detach()
            la = torch.as_tensor(log_alpha[site]).detach()
            if theta.shape != target.shape:
                raise ValueError(f"params[{site!r}] has shape {tuple(theta.shape)}, expected {tuple(target.shape)}")
            pruned = prune_params({site: theta.to(target)}, {site: la.to(target.device)}, threshold)[site]
            if torch.isnan(la).any():
                raise ValueError(f"log_alpha[{site!r}] contains NaN; the guide diverged")
            target.copy_(pruned)
    return net


__all__ = ["LOG_ALPHA_THRESHOLD", "prune"]
