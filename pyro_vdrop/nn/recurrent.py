# SPDX-License-Identifier: Apache-2.0
r"""
Recurrent layers (:class:`~torch.nn.LSTM`, :class:`~torch.nn.GRU`, :class:`~torch.nn.RNN`) with random weights: one
weight sample per sequence, shared by all its time steps, as the Bayesian model says [1, 2].

:class:`LSTM`, :class:`GRU` and :class:`RNN` are the torch layers as :class:`~pyro.nn.PyroModule`\ s (same
constructor, parameters, state dict and outputs) whose weights may be :class:`~pyro.nn.PyroSample` sites with any
prior, including the improper :class:`~pyro_vdrop.distributions.ImproperLogUniform`. Pyro's own idiom
``PyroModule[nn.GRU]`` reads *every* weight whenever one is set or the module is moved (``.to()``,
``.double()``, ``copy.deepcopy``), outside any model run, which samples the priors there and fails for a prior that
cannot be sampled; these classes read the weights only in ``forward``::

    rnn = pyro_vdrop.nn.GRU(28, 64, batch_first=True)
    rnn.weight_ih_l0 = PyroSample(ImproperLogUniform().expand([192, 28]).to_event(2))
    rnn.weight_hh_l0 = PyroSample(ImproperLogUniform().expand([192, 64]).to_event(2))

:func:`~pyro_vdrop.nn.bayesianize` turns every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` of a network into one of these.

**Forward.** When every weight is an ordinary tensor (a deterministic parameter, or one weight sample drawn by plain
Pyro sampling, shared by the minibatch) the layer runs torch's fused kernel. Under
:func:`~pyro_vdrop.poutine.local_reparam` a weight is a :class:`~pyro_vdrop.poutine.LazyWeight`, and the layer runs
the recurrence as a Python loop over time steps in which every gate pre-activation
:math:`x_t W_{ih}^\top + h_{t-1} W_{hh}^\top` uses the weight of its sequence, drawn once per sequence
(:class:`~pyro_vdrop.poutine.PerSequenceWeight`): correlated noise on the gate inputs (variational dropout A, the
Gaussian form of Gal and Ghahramani's variational RNN dropout [1]), Flipout with per-sequence sign vectors [3], an
explicit weight per sequence (``"per-example"``) or the mean. All are exact for the model. ``"lrt"`` with independent
noise is not (it would draw a new weight at every step) and raises. Inputs: padded tensors (``PackedSequence``
only with the fused kernel).

**References**

[1] Gal, Ghahramani. "A Theoretically Grounded Application of Dropout in Recurrent Neural Networks." NeurIPS 2016.
[2] Lobacheva, Chirkova, Vetrov. "Bayesian Sparsification of Recurrent Neural Networks." ICML workshop 2017.
[3] Wen, Vicol, Ba, Tran, Grosse. "Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches."
    ICLR 2018.
"""

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from pyro_vdrop.infer.sparsity import PRUNE_LOG_ALPHA_THRESHOLD
from pyro_vdrop.poutine import LazyWeight, PerSequenceWeight

#: The torch recurrent layers :func:`~pyro_vdrop.nn.bayesianize` makes random, and the number of gate blocks
#: stacked in the rows of their weights (torch's order: LSTM i, f, g, o; GRU r, z, n; RNN one block).
RECURRENT_LAYERS = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}

GATE_NAMES = {nn.LSTM: ("input", "forget", "cell", "output"), nn.GRU: ("reset", "update", "new"), nn.RNN: ("all",)}


class _RecurrentMixin:
    """Overrides of :class:`torch.nn.RNNBase` that keep weights unread outside ``forward``, and the Python loop."""

    # ----- torch's flat-weights cache: never read the weights outside forward -----

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_flat_weights_names", ()):
            PyroModule.__setattr__(self, name, value)  # skips RNNBase.__setattr__, which reads every weight
        else:
            super().__setattr__(name, value)

    def _init_flat_weights(self):
        self._flat_weight_refs = [None] * len(self._flat_weights_names)

    def _weights_have_changed(self):
        return False

    def flatten_parameters(self):
        pass

    def __reduce__(self):
        # pickling and deepcopy: rebuild this class (PyroModule's __reduce__ would rebuild PyroModule[nn.LSTM])
        state = getattr(self, "__getstate__", self.__dict__.copy)()
        return _New, (type(self),), state

    def __setstate__(self, state):
        super(nn.RNNBase, self).__setstate__(state)  # RNNBase's reads every weight
        self._init_flat_weights()

    # ----- forward -----

    def forward(self, input, hx=None):
        """The torch layer's forward (same inputs and outputs), with one weight per sequence under ``local_reparam``."""
        weights = {name: getattr(self, name) for name in self._flat_weights_names}
        if not any(isinstance(w, LazyWeight) for w in weights.values()):
            return super().forward(input, hx)  # the fused kernel; PyroModule caches the weights read above
        if isinstance(input, PackedSequence):
            site = next(w.site for w in weights.values() if isinstance(w, LazyWeight))
            raise TypeError(
                f"{self._op}: a PackedSequence input is not supported with the lazy weight of site {site!r} (under "
                "local_reparam); pass a padded tensor and select each sequence's last valid output"
            )
        if self.proj_size:
            raise NotImplementedError(f"{self._op}: proj_size > 0 is not supported under local_reparam")
        return self._loop_forward(input, hx, weights)

    @property
    def _op(self):
        return type(self).__name__

    def _loop_forward(self, x, hx, weights):
        batched = x.dim() == 3
        if x.dim() not in (2, 3):
            raise ValueError(f"{self._op}: expected input to be 2D or 3D, got {x.dim()}D")
        if not batched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (B, T, F)
        B, T = x.shape[:2]
        D = 2 if self.bidirectional else 1
        is_lstm = self.mode == "LSTM"
        if hx is None:
            zeros = x.new_zeros(self.num_layers * D, B, self.hidden_size)
            hx = (zeros, zeros) if is_lstm else zeros
        elif not batched:
            hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
        h0, c0 = hx if is_lstm else (hx, None)
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(D):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh, b_ih, b_hh = (
                    self._per_sequence(weights, name + suffix, B)
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                )
                gi = w_ih.linear(layer_input, b_ih)  # every time step at once: (B, T, gates * H)
                index = layer * D + direction
                h = h0[index]
                c = c0[index] if is_lstm else None
                steps = range(T - 1, -1, -1) if direction else range(T)
                out = [None] * T
                for t in steps:
                    h, c = self._cell(gi[:, t], w_hh.linear(h, b_hh), h, c)
                    out[t] = h
                outputs.append(torch.stack(out, 1))
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        output = layer_input if self.batch_first else layer_input.transpose(0, 1)
        h_n = torch.stack(h_n)
        hidden = (h_n, torch.stack(c_n)) if is_lstm else h_n
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = tuple(h.squeeze(1) for h in hidden) if is_lstm else hidden.squeeze(1)
        return output, hidden

    def _per_sequence(self, weights, name, batch_size):
        w = weights.get(name)
        return None if w is None else PerSequenceWeight(w, (batch_size,), op=f"{self._op}.{name}")

    def _cell(self, gi, gh, h, c):
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            r_i, z_i, n_i = gi.chunk(3, -1)
            r_h, z_h, n_h = gh.chunk(3, -1)
            r = torch.sigmoid(r_i + r_h)
            z = torch.sigmoid(z_i + z_h)
            n = torch.tanh(n_i + r * n_h)
            return (1 - z) * n + z * h, None
        act = torch.tanh if self.mode == "RNN_TANH" else torch.relu
        return act(gi + gh), None


class LSTM(_RecurrentMixin, PyroModule[nn.LSTM]):
    """:class:`torch.nn.LSTM` as a :class:`~pyro.nn.PyroModule` whose weights may be random (see the module's doc)."""


class GRU(_RecurrentMixin, PyroModule[nn.GRU]):
    """:class:`torch.nn.GRU` as a :class:`~pyro.nn.PyroModule` whose weights may be random (see the module's doc)."""


class RNN(_RecurrentMixin, PyroModule[nn.RNN]):
    """:class:`torch.nn.RNN` as a :class:`~pyro.nn.PyroModule` whose weights may be random (see the module's doc)."""


_CLASSES = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


class _New:
    """Unpickling helper: an empty instance of ``cls`` (as Pyro does for PyroModule)."""

    def __init__(self, cls):
        self.__class__ = cls


def to_bayesian_recurrent_(module: nn.Module) -> nn.Module:
    """
    Turns a torch (or ``PyroModule[...]``) ``nn.LSTM``/``nn.GRU``/``nn.RNN`` into the matching class of this module
    in place, keeping its parameters and any :class:`~pyro.nn.PyroSample` sites already set.

    :param module: The recurrent layer.
    :returns: the same object.
    :raises TypeError: for any other module.
    """
    torch_class = next((c for c in _CLASSES if type(module) is c or type(module) is PyroModule[c]), None)
    if torch_class is None:
        raise TypeError(f"expected an nn.LSTM, nn.GRU or nn.RNN (or its PyroModule), got {type(module).__name__}")
    if not isinstance(module, PyroModule):
        from pyro.nn.module import to_pyro_module_

        to_pyro_module_(module, recurse=False)
    module.__class__ = _CLASSES[torch_class]
    module._init_flat_weights()
    return module


def gate_sparsity(log_alpha: dict, model: nn.Module, threshold: float = PRUNE_LOG_ALPHA_THRESHOLD) -> dict:
    r"""
    The share of pruned weights (:math:`\log\alpha >` ``threshold``) in each gate matrix of the model's recurrent
    layers: torch stacks the gates' weights in the rows of ``weight_ih``/``weight_hh`` (LSTM: input, forget, cell,
    output; GRU: reset, update, new) [2].

    :param dict log_alpha: ``{site: log α}`` of the weights, e.g. ``guide.log_alpha()``.
    :param model: The model holding the recurrent layers (site names are module paths).
    :param float threshold: The pruning threshold on :math:`\log\alpha` (3, Molchanov et al. 2017).
    :returns: ``{site: {gate: fraction pruned}}`` for every recurrent weight site in ``log_alpha``.
    """
    result = {}
    for path, module in model.named_modules():
        torch_class = next((c for c in RECURRENT_LAYERS if isinstance(module, c)), None)
        if torch_class is None:
            continue
        for name in module._flat_weights_names:
            site = f"{path}.{name}" if path else name
            if site not in log_alpha or not name.startswith("weight_") or name.startswith("weight_hr"):
                continue
            blocks = log_alpha[site].chunk(RECURRENT_LAYERS[torch_class], 0)
            result[site] = {
                gate: (block > threshold).double().mean().item() for gate, block in zip(GATE_NAMES[torch_class], blocks)
            }
    return result


__all__ = ["GATE_NAMES", "GRU", "LSTM", "RECURRENT_LAYERS", "RNN", "gate_sparsity", "to_bayesian_recurrent_"]
