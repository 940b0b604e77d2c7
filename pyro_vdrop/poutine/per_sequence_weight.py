# SPDX-License-Identifier: Apache-2.0
r"""
A weight drawn once per sequence: the linear op of a recurrent layer, whose weight a Bayesian RNN samples once per
sequence and shares across its time steps [1, 2].

The local reparameterization trick samples every pre-activation independently; applied at each time step it would
draw a new weight at every step, which is a different model. :class:`PerSequenceWeight` instead fixes the noise of a
:class:`~pyro_vdrop.poutine.LazyWeight` once per sequence and applies it at every step:

- correlated noise (variational dropout A [3, §3.3]): :math:`\xi \sim \mathcal{N}(1, \alpha)` on the op's inputs
  (outputs), one draw per sequence: the Gaussian form of the variational RNN dropout of Gal and Ghahramani [1];
- ``"flipout"``: :math:`W_b = \mu + \Delta W \odot r_b s_b^\top` with one perturbation :math:`\Delta W` and sign
  vectors :math:`r_b, s_b` per sequence :math:`b` [2];
- ``"per-example"``: an explicit weight sample per sequence;
- ``"mean"``: the posterior mean.

Each is exact: sequence :math:`b` sees one weight, distributed as the posterior, at all its time steps. ``"lrt"``
with independent noise cannot be exact and raises a :class:`~pyro_vdrop.poutine.LazyWeightError` (unless the
handler has ``fallback=True``: then one ordinary weight sample is shared by the minibatch).

It lives beside :class:`~pyro_vdrop.poutine.LazyWeight` because it reads and records the lazy weight's noise
bookkeeping (a recurrent use ends the weight's tying: a later use of the same weight in the run raises).

**References**

[1] Gal, Ghahramani. "A Theoretically Grounded Application of Dropout in Recurrent Neural Networks." NeurIPS 2016.
[2] Wen, Vicol, Ba, Tran, Grosse. "Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches."
    ICLR 2018.
[3] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import torch
import torch.nn.functional as F

from .estimators import FLIPOUT, LRT, MEAN, PER_EXAMPLE
from .lazy_ops import _rademacher, linear_correlated, linear_flipout
from .lazy_weight import LazyWeight, LazyWeightError, _draw_like, _record_untied_use

#: The estimators that :class:`PerSequenceWeight` runs exactly for a weight with independent noise (a weight with
#: correlated noise is exact under every estimator).
RECURRENT_ESTIMATORS = (FLIPOUT, PER_EXAMPLE, MEAN)


class PerSequenceWeight:
    r"""
    A weight (a plain tensor, or the :class:`~pyro_vdrop.poutine.LazyWeight` of a site under
    :func:`~pyro_vdrop.poutine.local_reparam`) with its noise drawn once per sequence, for ops applied at every
    time step. A plain tensor is one weight shared by the whole batch (ordinary Pyro sampling).

    Example (one step of a recurrence)::

        w_hh = PerSequenceWeight(weight_hh, batch_shape=(B,), op="lstm")
        for t in range(T):
            gates = w_hh.linear(h)          # h of shape (B, H): the same weight per sequence at every step

    :param weight: A tensor of shape ``(out, in)`` (a weight) or ``(out,)`` (a bias), lazy or not.
    :param batch_shape: The sequences' batch shape: the leading dims of every input.
    :param str op: The layer's name, for error messages.
    :raises LazyWeightError: for a lazy weight with independent noise under ``"lrt"`` (not exact over time steps),
        or a weight already used by another op in this model run.
    """

    def __init__(self, weight: torch.Tensor, batch_shape, *, op: str = "recurrent"):
        self.batch_shape = torch.Size(batch_shape)
        self.op = op
        self.kind = "plain"
        self.tensor = weight
        if not isinstance(weight, LazyWeight):
            return
        root = weight.root
        if root._sample is not None:  # an ordinary sample was drawn (fallback=True, or the guide's transform)
            self.tensor = weight.materialize()
            return
        tie = None
        if root._tracking:
            reason = "a recurrent layer's per-sequence noise is not shared with other uses"
            _record_untied_use(weight, op, "recurrent", reason)
            tie = root._ties[-1]
        loc = weight.loc
        self.tensor = loc
        if weight.dim() == 1:  # a bias: one sample per sequence, any estimator but "mean"
            if weight.estimator == MEAN and not weight.is_correlated:
                return
            self.kind = "bias"
            self.tensor = _draw_like(weight, self.batch_shape + loc.shape)
            return
        if weight.dim() != 2:
            raise LazyWeightError(
                f"{op}: the weight of site {weight.site!r} has shape {tuple(weight.shape)}; a recurrent layer's "
                "weight has 2 dims (out, in)"
            )
        if weight.is_correlated:
            self.kind = "correlated"
            self.noise_scale = weight.noise_scale
            self.noise_fn = weight.noise_fn  # None: Gaussian N(1, α); else log-normal (structured Bayesian pruning)
            self.noise = torch.randn(self.batch_shape + self.noise_scale.shape, dtype=loc.dtype, device=loc.device)
        elif weight.estimator == MEAN:
            return
        elif weight.estimator == FLIPOUT:
            self.kind = "flipout"
            self.perturbation = weight.scale * torch.randn_like(loc)
            self.sign_in = _rademacher(self.batch_shape + loc.shape[1:], loc)
            self.sign_out = _rademacher(self.batch_shape + loc.shape[:1], loc)
        elif weight.estimator == PER_EXAMPLE:
            self.kind = "per-example"
            self.weights = loc + weight.scale * torch.randn(
                self.batch_shape + loc.shape, dtype=loc.dtype, device=loc.device
            )
        elif weight.fallback:
            if tie is not None:
                root._ties.remove(tie)  # one ordinary sample for every use instead
            self.tensor = weight.materialize()
        else:
            assert weight.estimator == LRT
            raise LazyWeightError(
                f"local_reparam: the weight of site {weight.site!r} is used by the recurrent layer {op!r}, whose "
                "weight is one sample per sequence shared by all its time steps; the estimator 'lrt' draws "
                "independent noise for every pre-activation, i.e. a new weight at every step, which is a different "
                f"model. Use local_reparam(estimator=...) with one of {RECURRENT_ESTIMATORS}, a correlated-noise "
                "guide (AutoVariationalDropout(model, noise='correlated'): exact under any estimator), or "
                "local_reparam(sites=...) to leave the site an ordinary sample (one weight per minibatch)."
            )

    def _expand(self, t, x_dim):
        """``t`` of shape ``batch_shape + trailing`` made broadcastable over the middle dims of an input of ``x_dim``
        dims (``batch_shape + middle + (in,)``)."""
        lead = len(self.batch_shape)
        middle = x_dim - lead - 1
        return t.reshape(t.shape[:lead] + (1,) * middle + t.shape[lead:])

    def sample(self, x_dim: int) -> torch.Tensor:
        """A bias: its value per sequence, broadcastable to an output of ``x_dim`` dims (or the plain tensor)."""
        if self.kind == "bias":
            return self._expand(self.tensor, x_dim)
        return self.tensor

    def linear(self, x: torch.Tensor, bias: "PerSequenceWeight | torch.Tensor | None" = None) -> torch.Tensor:
        """
        ``F.linear(x, W_b, bias)`` with the weight :math:`W_b` of sequence :math:`b` for ``x[b]``.

        :param torch.Tensor x: Inputs of shape ``batch_shape + (...) + (in,)``; the middle dims (e.g. time
            steps) share their sequence's weight.
        :param bias: ``None``, a tensor of shape ``(out,)``, or a :class:`PerSequenceWeight` bias.
        """
        if x.shape[: len(self.batch_shape)] != self.batch_shape:
            raise ValueError(
                f"{self.op}: input of shape {tuple(x.shape)} does not start with the batch shape "
                f"{tuple(self.batch_shape)} whose per-sequence noise was drawn"
            )
        if isinstance(bias, PerSequenceWeight):
            bias = bias.sample(x.dim())
        plain_bias = bias if bias is not None and bias.dim() == 1 else None
        if self.kind == "plain":
            out = F.linear(x, self.tensor, plain_bias)
        elif self.kind == "correlated":
            out = linear_correlated(x, self.tensor, self.noise_scale, self._expand(self.noise, x.dim()), self.noise_fn)
            if plain_bias is not None:
                out = out + plain_bias
        elif self.kind == "flipout":
            out = linear_flipout(
                x,
                self.tensor,
                None,
                plain_bias,
                perturbation=self.perturbation,
                sign_in=self._expand(self.sign_in, x.dim()),
                sign_out=self._expand(self.sign_out, x.dim()),
            )
        else:  # per-example
            ws = self._expand(self.weights, x.dim())
            out = (x.unsqueeze(-2) @ ws.transpose(-1, -2)).squeeze(-2)
            if plain_bias is not None:
                out = out + plain_bias
        if bias is not None and plain_bias is None:
            out = out + bias
        return out


__all__ = ["RECURRENT_ESTIMATORS", "PerSequenceWeight"]
