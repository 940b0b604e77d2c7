# SPDX-License-Identifier: Apache-2.0
r"""
The sparsity vocabulary of variational dropout [1]: the pruning threshold on :math:`\log\alpha`, the
:math:`\log\alpha` clip of sparse variational dropout, the sparsity statistics and the pruning of
:math:`\theta` by :math:`\log\alpha`. The guide (:meth:`~pyro_vdrop.infer.AutoVariationalDropout.sparsity`),
:func:`~pyro_vdrop.nn.prune`, the training loop and the ArviZ export all read them from here.

**References**

[1] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural Networks." ICML 2017.
[2] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative Noise."
    NeurIPS 2017.
"""

import math
from collections.abc import Mapping

import torch

#: The pruning threshold of [1, §4.3]: a weight with :math:`\log\alpha > 3` is set to 0 at test time.
PRUNE_LOG_ALPHA_THRESHOLD = 3.0

#: Structured Bayesian pruning [2, §4.3] removes a group whose noise has signal-to-noise ratio
#: :math:`\mathbb{E}s/\sqrt{\mathrm{Var}\,s} < 1`; in terms of :math:`\log\alpha = \log(\mathrm{Var}\,s/(\mathbb{E}s)^2)
#: = -2\log\mathrm{SNR}` (which is :math:`\log\alpha` for Gaussian noise :math:`\mathcal{N}(1, \alpha)`) that is
#: :math:`\log\alpha > 0`.
SBP_LOG_ALPHA_THRESHOLD = 0.0

#: Sparse variational dropout clips :math:`\log\alpha` to this interval inside the KL [1, §4.1].
SPARSE_VD_LOG_ALPHA_CLIP = (-8.0, 8.0)


def _stats(num_weights: int, num_pruned: int) -> dict:
    num_kept = num_weights - num_pruned
    return {
        "num_weights": num_weights,
        "num_pruned": num_pruned,
        "num_kept": num_kept,
        "fraction_pruned": num_pruned / num_weights if num_weights else 0.0,
        "compression": num_weights / num_kept if num_kept else math.inf,
    }


@torch.no_grad()
def sparsity_summary(log_alpha: Mapping[str, torch.Tensor], threshold: float = PRUNE_LOG_ALPHA_THRESHOLD) -> dict:
    r"""
    How many weights variational dropout prunes: those with :math:`\log\alpha > \text{threshold}` [1, §4.3].

    :param dict log_alpha: :math:`\log\alpha` per site, each of the site's full shape (every element counts
        as one weight).
    :param float threshold: The pruning threshold on :math:`\log\alpha` (default
        :data:`PRUNE_LOG_ALPHA_THRESHOLD`).
    :returns: ``{"sites": {name: stats}, "total": stats}``, where ``stats`` is a dict with ``num_weights``,
        ``num_pruned``, ``num_kept`` (ints), ``fraction_pruned`` and ``compression`` (``num_weights / num_kept``,
        ``inf`` if every weight is pruned).
    :rtype: dict
    """
    sites = {name: _stats(la.numel(), int((la > threshold).sum().item())) for name, la in log_alpha.items()}
    total = _stats(sum(s["num_weights"] for s in sites.values()), sum(s["num_pruned"] for s in sites.values()))
    return {"sites": sites, "total": total}


@torch.no_grad()
def unit_summary(
    log_alpha: Mapping[str, torch.Tensor],
    threshold: float = PRUNE_LOG_ALPHA_THRESHOLD,
    axes: Mapping[str, tuple[int, int]] | None = None,
) -> dict:
    r"""
    How many input and output units (channels) of each weight site keep at least one weight
    (:math:`\log\alpha \le` ``threshold``): a unit all of whose weights are pruned is removed from the network,
    whatever the noise. Sites with fewer than two dims are left out.

    :param dict log_alpha: :math:`\log\alpha` per site, each of the site's full shape.
    :param float threshold: The pruning threshold on :math:`\log\alpha`.
    :param dict axes: ``{site: (output_axis, input_axis)}``; default ``(0, 1)``, the torch layout ``(out, in, ...)``.
    :returns: ``{site: {"inputs": int, "inputs_kept": int, "outputs": int, "outputs_kept": int}}``.
    :rtype: dict
    """
    result = {}
    for name, la in log_alpha.items():
        if la.dim() < 2:
            continue
        out_axis, in_axis = (axes or {}).get(name, (0, 1))
        kept = la <= threshold
        counts = {}
        for key, axis in (("inputs", in_axis), ("outputs", out_axis)):
            axis = axis % la.dim()
            other = tuple(d for d in range(la.dim()) if d != axis)
            counts[key] = la.shape[axis]
            counts[key + "_kept"] = int(kept.any(dim=other).sum().item()) if other else int(kept.sum().item())
        result[name] = counts
    return result


@torch.no_grad()
def group_summary(group_log_alpha: Mapping[str, torch.Tensor], threshold: float = PRUNE_LOG_ALPHA_THRESHOLD) -> dict:
    r"""
    How many groups (noise variables shared by a unit or channel) are pruned: those with
    :math:`\log\alpha_g >` ``threshold``.

    :param dict group_log_alpha: :math:`\log\alpha` per group, per site (one element per noise variable).
    :returns: ``{site: {"groups": int, "groups_pruned": int, "groups_kept": int}}``.
    :rtype: dict
    """
    result = {}
    for name, la in group_log_alpha.items():
        pruned = int((la > threshold).sum().item())
        result[name] = {"groups": la.numel(), "groups_pruned": pruned, "groups_kept": la.numel() - pruned}
    return result


def prune_params(
    theta: Mapping[str, torch.Tensor],
    log_alpha: Mapping[str, torch.Tensor],
    threshold: float = PRUNE_LOG_ALPHA_THRESHOLD,
) -> dict[str, torch.Tensor]:
    r"""
    :math:`\theta` with the weights of :math:`\log\alpha >` ``threshold`` set to 0 [1, §4.3]:

    .. math::

        w_{ij} = \theta_{ij}\,\mathbb{1}[\log\alpha_{ij} \le \tau].

    :param dict theta: :math:`\theta` per site; sites without a ``log_alpha`` entry are returned unchanged.
    :param dict log_alpha: :math:`\log\alpha` per site, of the site's shape or broadcastable to it (per unit,
        per layer).
    :param float threshold: :math:`\tau`; ``math.inf`` keeps every weight.
    :returns: a new dict ``{site: pruned θ}``.
    :rtype: dict
    :raises ValueError: if a ``log_alpha`` does not broadcast to its site's θ.
    """
    out = dict(theta)
    for name, la in log_alpha.items():
        try:
            la = la.expand(theta[name].shape)
        except RuntimeError as e:
            raise ValueError(
                f"log_alpha[{name!r}] of shape {tuple(la.shape)} does not broadcast to the weight's shape "
                f"{tuple(theta[name].shape)}"
            ) from e
        out[name] = torch.where(la > threshold, torch.zeros_like(theta[name]), theta[name])
    return out


__all__ = [
    "PRUNE_LOG_ALPHA_THRESHOLD",
    "SBP_LOG_ALPHA_THRESHOLD",
    "SPARSE_VD_LOG_ALPHA_CLIP",
    "group_summary",
    "prune_params",
    "sparsity_summary",
    "unit_summary",
]
