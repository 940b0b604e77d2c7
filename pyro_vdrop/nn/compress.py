# SPDX-License-Identifier: Apache-2.0
"""
Turning the sparsity of a pruned network into real savings: :func:`compress` removes the units that the network
does not use (smaller ``Linear`` / ``Conv`` layers, the same outputs), :func:`save_compressed` writes a network as
plain data with optional packed sparse storage of its weights, and :func:`load_compressed` rebuilds it.
"""

import io
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: The format of a file written by :func:`save_compressed` (its ``"format"`` and ``"version"`` entries).
COMPRESSED_FORMAT = "pyro-vdrop-compressed"
COMPRESSED_VERSION = 1


class SelectInputs(nn.Module):
    """
    Keeps the entries ``index`` of its input along ``dim`` (:func:`torch.index_select`): the first layer of a
    :func:`compress` ed network whose first weighted layer no longer reads every input (e.g. the MNIST pixels that
    no kept weight looks at), so that the network still takes the original input.

    :param torch.Tensor index: The kept positions, increasing, in ``[0, size)`` (int64).
    :param int dim: The dimension they index (``-1`` before a ``Linear``, the channel dimension before a ``Conv``).
    :param int size: The size of ``dim`` in the original input.
    """

    def __init__(self, index: torch.Tensor, *, dim: int, size: int):
        super().__init__()
        self.dim = int(dim)
        self.size = int(size)
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < abs(self.dim) or x.shape[self.dim] != self.size:
            raise ValueError(
                f"SelectInputs: the input must have size {self.size} in dimension {self.dim} (the original network's "
                f"input), got shape {tuple(x.shape)}"
            )
        return x.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, kept={self.index.numel()}"


_ACTIVATIONS = {
    cls.__name__: (cls, args)
    for cls, args in (
        (nn.ReLU, ()),
        (nn.ReLU6, ()),
        (nn.LeakyReLU, ("negative_slope",)),
        (nn.ELU, ("alpha",)),
        (nn.CELU, ("alpha",)),
        (nn.SELU, ()),
        (nn.GELU, ("approximate",)),
        (nn.SiLU, ()),
        (nn.Mish, ()),
        (nn.Tanh, ()),
        (nn.Sigmoid, ()),
        (nn.Softplus, ("beta", "threshold")),
        (nn.Hardtanh, ("min_val", "max_val")),
        (nn.Hardswish, ()),
        (nn.Hardsigmoid, ()),
        (nn.Identity, ()),
    )
}
_DROPOUTS = {cls.__name__: (cls, ("p",)) for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d)}
_POOLS = {
    cls.__name__: (cls, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"))
    for cls in (nn.MaxPool1d, nn.MaxPool2d)
}
_NORMS = {
    cls.__name__: (cls, ("num_features", "eps", "momentum", "affine", "track_running_stats"))
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d)
}
_CONV_ARGS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)
_WEIGHTED = {
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "Conv1d": (nn.Conv1d, _CONV_ARGS),
    "Conv2d": (nn.Conv2d, _CONV_ARGS),
}
_LAYERS = {
    **_WEIGHTED,
    **_ACTIVATIONS,
    **_DROPOUTS,
    **_POOLS,
    **_NORMS,
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "SelectInputs": (SelectInputs, ("dim", "size")),
}
#: The layer types that :func:`compress`, :func:`save_compressed` and :func:`load_compressed` handle.
COMPRESSIBLE_LAYERS = tuple(cls for cls, _ in _LAYERS.values())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _entry(name: str, module: nn.Module) -> dict:
    """A layer as plain data: ``{"name", "type", "args", "tensors"}``."""
    kind = type(module).__name__
    if kind not in _LAYERS or type(module) is not _LAYERS[kind][0]:
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}, which compress / save_compressed cannot handle exactly; "
            f"supported: {', '.join(sorted(_LAYERS))} in one nn.Sequential"
        )
    if getattr(module, "return_indices", False):
        raise TypeError(f"layer {name!r}: a max-pool with return_indices=True is not supported")
    args = {}
    for arg in _LAYERS[kind][1]:
        value = getattr(module, arg)
        if arg == "bias" and kind in _WEIGHTED:
            value = module.bias is not None
        args[arg] = _plain(value)
    tensors = {k: v.detach() for k, v in module.state_dict().items()}
    return {"name": name, "type": kind, "args": args, "tensors": tensors}


def _entries(module: nn.Module) -> list[dict]:
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        raise TypeError(
            f"compress needs an nn.Sequential (its layers run in order), got {type(module).__name__}; write the "
            "network as one nn.Sequential of " + ", ".join(sorted(_LAYERS))
        )
    entries = [_entry(name, m) for name, m in module.named_children()]
    if not any(e["type"] in _WEIGHTED for e in entries):
        raise ValueError("the network has no Linear or Conv1d/Conv2d layer")
    return entries


def _build_layer(entry: dict, *, device, dtype) -> nn.Module:
    cls, names = _LAYERS[entry["type"]]
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["args"].items()}
    if set(args) != set(names):
        raise ValueError(f"layer {entry['name']!r} ({entry['type']}): expected the arguments {sorted(names)}")
    if cls is SelectInputs:
        count = entry["tensors"]["index"].shape[0] if "index" in entry.get("tensors", {}) else 0
        return SelectInputs(torch.empty(count, dtype=torch.long, device=device), **args)
    if entry["type"] in _WEIGHTED or entry["type"] in _NORMS:
        return cls(**args, device=device, dtype=dtype)
    return cls(**args)


def _build(entries: list[dict], *, device, dtype) -> nn.Sequential:
    """The network of ``entries``, with their tensors loaded (shapes checked against the layers' first)."""
    net = nn.Sequential(OrderedDict((e["name"], _build_layer(e, device="meta", dtype=dtype)) for e in entries))
    state = {f"{e['name']}.{k}": v for e in entries for k, v in e["tensors"].items()}
    expected = net.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"the tensors do not fit the layers: missing {missing}, unexpected {extra}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{key} has shape {tuple(state[key].shape)}, but its layer needs {tuple(value.shape)}")
    for e in entries:
        if e["type"] == "SelectInputs":
            index, size = e["tensors"]["index"], e["args"]["size"]
            if (
                index.dtype != torch.long
                or index.dim() != 1
                or (len(index) and not 0 <= int(index.min()) <= int(index.max()) < size)
            ):
                raise ValueError(f"{e['name']}.index must be a 1-d int64 tensor of positions in [0, {size})")
    net = net.to_empty(device=device)
    net.load_state_dict(state)
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------
# compress


def _constant_through(chain: list[dict], values: torch.Tensor) -> torch.Tensor | None:
    """The output of the layers ``chain`` (between two weighted layers) for units whose every input is the constant
    ``values`` (one per unit); None when a layer makes it not constant or unknown."""
    for e in chain:
        kind = e["type"]
        if kind in _ACTIVATIONS:
            values = _build_layer(e, device=values.device, dtype=values.dtype)(values)
        elif kind in _NORMS:
            t = e["tensors"]
            if t.get("running_mean") is None:
                return None
            values = F.batch_norm(
                values[None],
                t["running_mean"],
                t["running_var"],
                t.get("weight"),
                t.get("bias"),
                training=False,
                eps=e["args"]["eps"],
            )[0]
        elif kind not in _DROPOUTS and kind not in _POOLS and kind != "Flatten":
            return None  # a max-pool of a constant is the constant (its padding is -inf); dropout is the identity
    return values


def _boundary_layout(a: dict, chain: list[dict], b: dict) -> int | None:
    """How many of ``b``'s input columns each unit of ``a`` feeds (1, or H·W after a Flatten of a conv), or None
    when the boundary cannot be shrunk exactly (then it is left as it is)."""
    n = a["tensors"]["weight"].shape[0]
    conv_a, conv_b = a["type"] != "Linear", b["type"] != "Linear"
    if (conv_a and a["args"]["groups"] != 1) or (conv_b and b["args"]["groups"] != 1):
        return None
    flattened = False
    for e in chain:
        if e["type"] == "Flatten":
            if flattened or not conv_a or e["args"]["start_dim"] != 1 or e["args"]["end_dim"] != -1:
                return None
            flattened = True
        elif e["type"] in _NORMS:
            if flattened or e["args"]["num_features"] != n:
                return None
        elif e["type"] == "SelectInputs":
            return None
    width = b["tensors"]["weight"].shape[1]
    if conv_a and not conv_b:
        return width // n if flattened and width % n == 0 else None
    if conv_b:
        return 1 if conv_a and not flattened and width == n else None
    return 1 if not flattened and width == n else None


def _folds_constants(b: dict) -> bool:
    """Whether a constant input channel adds a constant to every output of ``b``: a Linear, or a conv without
    padding (with zero padding the border outputs see less of it)."""
    if b["type"] == "Linear":
        return True
    padding = b["args"]["padding"]
    return padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))


def _shrink_boundary(a: dict, chain: list[dict], b: dict) -> bool:
    """Removes the dead units between the weighted layers ``a`` and ``b``; whether any was removed."""
    block = _boundary_layout(a, chain, b)
    if block is None:
        return False
    wa, wb = a["tensors"]["weight"], b["tensors"]["weight"]
    n, out_b = wa.shape[0], wb.shape[0]
    wb3 = wb.reshape(out_b, n, -1)  # Linear: out × units × block; conv: out × units × kernel
    out_zero = (wb3 == 0).all(-1).all(0)
    in_zero = (wa.reshape(n, -1) == 0).all(-1)
    bias_a = a["tensors"].get("bias")
    constant = _constant_through(
        chain, bias_a if bias_a is not None else torch.zeros(n, dtype=wa.dtype, device=wa.device)
    )
    remove = out_zero.clone()
    fold = torch.zeros_like(remove)
    if constant is not None:
        constant = constant.detach()
        zero_constant = in_zero & (constant == 0)
        fold = in_zero & ~out_zero & (constant != 0) & torch.isfinite(constant)
        if not _folds_constants(b):
            fold = torch.zeros_like(fold)
        remove |= zero_constant | fold
    if remove.all():  # keep one unit: a layer of width 0 is not a torch layer
        remove[0] = False
        fold[0] = False
    if not remove.any():
        return False
    if fold.any():
        # a dead unit outputs the constant c_j at each of its block's columns: b's outputs gain sum_k W[:, j, k] c_j
        shift = (wb3[:, fold, :].sum(-1) * constant[fold]).sum(-1)
        if b["tensors"].get("bias") is None:
            b["tensors"]["bias"] = torch.zeros(out_b, dtype=wb.dtype, device=wb.device)
            b["args"]["bias"] = True
        b["tensors"]["bias"] = b["tensors"]["bias"] + shift
    keep = (~remove).nonzero().squeeze(-1)
    a["tensors"]["weight"] = wa[keep].clone()
    if bias_a is not None:
        a["tensors"]["bias"] = bias_a[keep].clone()
    a["args"]["out_features" if a["type"] == "Linear" else "out_channels"] = len(keep)
    for e in chain:
        if e["type"] in _NORMS:
            e["args"]["num_features"] = len(keep)
            for key in ("weight", "bias", "running_mean", "running_var"):
                if e["tensors"].get(key) is not None:
                    e["tensors"][key] = e["tensors"][key][keep].clone()
    wb3 = wb3[:, keep, :]
    if b["type"] == "Linear":
        b["tensors"]["weight"] = wb3.reshape(out_b, -1).clone()
        b["args"]["in_features"] = len(keep) * block
    else:
        b["tensors"]["weight"] = wb3.reshape(out_b, len(keep), *wb.shape[2:]).clone()
        b["args"]["in_channels"] = len(keep)
    return True


def _select_inputs(entries: list[dict], first: int) -> list[dict]:
    """Puts a :class:`SelectInputs` before the first weighted layer for the inputs that none of its kept weights
    reads (composed with one already there)."""
    e = entries[first]
    w = e["tensors"]["weight"]
    if e["type"] != "Linear" and e["args"]["groups"] != 1:
        return entries
    used = ~(w.transpose(0, 1).reshape(w.shape[1], -1) == 0).all(-1)
    if used.all():
        return entries
    if not used.any():
        used[0] = True
    keep = used.nonzero().squeeze(-1)
    e["tensors"]["weight"] = w[:, keep].clone()
    e["args"]["in_features" if e["type"] == "Linear" else "in_channels"] = len(keep)
    dim = -1 if e["type"] == "Linear" else -(w.dim() - 1)
    previous = entries[first - 1] if first > 0 else None
    if previous is not None and previous["type"] == "SelectInputs" and previous["args"]["dim"] == dim:
        previous["tensors"]["index"] = previous["tensors"]["index"][keep].clone()
        return entries
    names = {x["name"] for x in entries}
    name = "select_inputs"
    while name in names:
        name += "_"
    select = {
        "name": name,
        "type": "SelectInputs",
        "args": {"dim": dim, "size": w.shape[1]},
        "tensors": {"index": keep},
    }
    return entries[:first] + [select] + entries[first:]


def compress(module: nn.Module) -> nn.Sequential:
    r"""
    Removes the units that a pruned network does not use, exactly: a network with smaller ``Linear`` / ``Conv``
    layers that computes what ``module.eval()`` computes, to float rounding.

    Between two weighted layers :math:`A` and :math:`B` (and the layers between them: elementwise activations,
    dropout, max-pooling, ``BatchNorm``, a ``Flatten`` of a conv's output), a unit :math:`j` of :math:`A` goes when

    - all its outgoing weights in :math:`B` are zero: it does not reach :math:`B`; or
    - all its incoming weights in :math:`A` are zero: it outputs the constant
      :math:`c_j = g(b^A_j)` (:math:`g` the layers between), whose contribution
      :math:`\sum_k W^B_{:,j,k}\, c_j` is folded into :math:`B`'s bias. A ``Linear`` :math:`B` always takes it;
      a conv :math:`B` with padding does not (its border outputs see less of the constant), so there such units
      stay unless :math:`c_j = 0`.

    Inputs of the first weighted layer that no kept weight reads are dropped by a :class:`SelectInputs` layer in
    front of it, so the result takes the original inputs. Removing units can make others dead; this repeats until
    nothing changes. ``BatchNorm`` layers are sliced with their channels and use their running statistics. A
    boundary that cannot be shrunk exactly (grouped convolutions, a ``BatchNorm`` after a ``Flatten``, a ``Flatten``
    of a non-conv output) is left as it is.

    This is what turns sparse or group-sparse variational dropout into smaller, faster networks: apply it to the
    result of :func:`~pyro_vdrop.nn.prune`.

    :param torch.nn.Sequential module: A deterministic network, one ``nn.Sequential`` of the layers in
        :data:`COMPRESSIBLE_LAYERS`.
    :returns: a new ``nn.Sequential`` (the input is not changed) in eval mode, on the module's device and dtype,
        with the module's layer names (plus ``select_inputs``).
    :rtype: torch.nn.Sequential
    :raises TypeError: for a module that is not an ``nn.Sequential`` of supported layers (nothing is guessed).
    """
    with torch.no_grad():
        entries = _entries(module)
        reference = next(v for e in entries for v in e["tensors"].values() if v.is_floating_point())
        for e in entries:
            e["tensors"] = {k: v.clone() for k, v in e["tensors"].items()}
        weighted = [i for i, e in enumerate(entries) if e["type"] in _WEIGHTED]
        changed = True
        while changed:
            changed = False
            for i, j in zip(weighted, weighted[1:]):
                changed |= _shrink_boundary(entries[i], entries[i + 1 : j], entries[j])
        entries = _select_inputs(entries, weighted[0])
        return _build(entries, device=reference.device, dtype=reference.dtype)


def layer_widths(module: nn.Sequential) -> list[int]:
    """
    The widths of a network of :data:`COMPRESSIBLE_LAYERS`: the inputs its first weighted layer reads (after a
    :class:`SelectInputs`: those it keeps), then the outputs of each ``Linear`` / ``Conv`` layer — e.g.
    ``[784, 300, 100, 10]`` for LeNet-300-100.

    :rtype: list[int]
    """
    widths = []
    for layer in module.children():
        if isinstance(layer, nn.Linear):
            widths += ([] if widths else [layer.in_features]) + [layer.out_features]
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            widths += ([] if widths else [layer.in_channels]) + [layer.out_channels]
    return widths


def count_parameters(module: nn.Module) -> int:
    """The number of parameter entries of ``module`` (zeros included)."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# files


def _index_dtype(size: int) -> torch.dtype:
    return torch.int16 if size <= torch.iinfo(torch.int16).max else torch.int32


def _pack(weight: torch.Tensor) -> dict:
    """A weight in compressed sparse row form over ``(rows, rest)``: row pointers, column indices in the smallest
    integer type that holds them, and the non-zero values."""
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = matrix.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=matrix.shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return {
        "shape": list(weight.shape),
        "crow": crow,
        "col": cols.to(_index_dtype(matrix.shape[1])),
        "values": matrix[rows, cols].clone(),
    }


def _packed_bytes(packed: dict) -> int:
    return sum(packed[k].numel() * packed[k].element_size() for k in ("crow", "col", "values"))


def _unpack(packed, key: str) -> torch.Tensor:
    if not isinstance(packed, dict) or set(packed) != {"shape", "crow", "col", "values"}:
        raise ValueError(f"packed weight {key!r}: expected the entries shape, crow, col, values")
    shape, crow, col, values = packed["shape"], packed["crow"], packed["col"], packed["values"]
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"packed weight {key!r}: shape must be a list of positive integers, got {shape!r}")
    if not all(torch.is_tensor(t) for t in (crow, col, values)):
        raise ValueError(f"packed weight {key!r}: crow, col and values must be tensors")
    if crow.is_floating_point() or col.is_floating_point() or crow.dim() != 1 or col.dim() != 1 or values.dim() != 1:
        raise ValueError(f"packed weight {key!r}: crow and col must be 1-d integer tensors, values 1-d")
    rows, width = shape[0], 1
    for s in shape[1:]:
        width *= s
    crow, col = crow.long(), col.long()
    if (
        len(crow) != rows + 1
        or int(crow[0]) != 0
        or bool((crow.diff() < 0).any())
        or int(crow[-1]) != len(col)
        or len(values) != len(col)
    ):
        raise ValueError(
            f"packed weight {key!r}: row pointers must start at 0, not decrease, have {rows + 1} entries and end at "
            "the number of values"
        )
    if len(col) and (int(col.min()) < 0 or int(col.max()) >= width):
        raise ValueError(f"packed weight {key!r}: a column index is outside [0, {width})")
    row = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
    flat = row * width + col
    if len(flat.unique()) != len(flat):
        raise ValueError(f"packed weight {key!r}: an entry is stored twice")
    dense = values.new_zeros(rows * width)
    dense[flat] = values
    return dense.reshape(shape)


def _record(module: nn.Sequential, sparse: bool) -> dict:
    from pyro_vdrop import __version__

    entries = _entries(module)
    state, packed = {}, {}
    for e in entries:
        for k, v in e["tensors"].items():
            key = f"{e['name']}.{k}"
            v = v.detach().cpu().clone()  # a slice would otherwise save its whole storage
            if sparse and k == "weight" and e["type"] in _WEIGHTED:
                p = _pack(v)
                if _packed_bytes(p) < v.numel() * v.element_size():
                    packed[key] = p
                    continue
            state[key] = v
    return {
        "format": COMPRESSED_FORMAT,
        "version": COMPRESSED_VERSION,
        "pyro_vdrop": __version__,
        "layers": [{"name": e["name"], "type": e["type"], "args": e["args"]} for e in entries],
        "state": state,
        "packed": packed,
    }


def compressed_bytes(module: nn.Sequential, *, sparse: bool = False) -> bytes:
    """The bytes that :func:`save_compressed` writes for ``module`` (e.g. to compare file sizes)."""
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.save(_record(module, sparse), buffer)
    return buffer.getvalue()


def save_compressed(path: str | os.PathLike, module: nn.Sequential, *, sparse: bool = False) -> int:
    """
    Writes a deterministic network (e.g. the result of :func:`compress`) to ``path`` as plain data, atomically
    (temporary file, ``fsync``, rename): a dict ``{"format", "version", "pyro_vdrop", "layers", "state", "packed"}``
    whose ``layers`` describe the architecture as a list of ``{"name", "type", "args"}`` (``args`` the layer's
    constructor arguments), ``state`` holds the tensors of its ``state_dict`` and, with ``sparse=True``, ``packed``
    holds each ``Linear`` / ``Conv`` weight that is smaller so in compressed sparse row form
    (``{"shape", "crow", "col", "values"}``, column indices as int16 where they fit), so the file size falls with
    the kept weights. :func:`load_compressed` reads it with ``torch.load(weights_only=True)``.

    :param path: The file to write.
    :param torch.nn.Sequential module: A network of :data:`COMPRESSIBLE_LAYERS`.
    :param bool sparse: Store the weights' non-zeros only, where that is smaller.
    :returns: the size of the file in bytes.
    :rtype: int
    """
    from pyro_vdrop.serialization import write_plain

    with torch.no_grad():
        return write_plain(path, _record(module, sparse))


def _check_args(layer: dict, index: int) -> None:
    name = layer.get("name")
    where = f"layer {index} ({name!r})"
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{where}: its name must be a non-empty string without '.'")
    if layer.get("type") not in _LAYERS:
        raise ValueError(f"{where}: unknown layer type {layer.get('type')!r}; known: {', '.join(sorted(_LAYERS))}")
    args = layer.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"{where}: 'args' must be a dict")

    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str))

    for k, v in args.items():
        if not (plain(v) or (isinstance(v, list) and all(plain(x) for x in v))):
            raise ValueError(f"{where}: argument {k!r} must be a number, string, bool or list of them, got {v!r}")


#: The most weight entries that :func:`load_compressed` unpacks from sparse storage by default (a guard against a
#: small file that declares a huge, all-zero layer).
MAX_UNPACKED_ELEMENTS = 10**9


def load_compressed(
    path: str | os.PathLike, *, map_location=None, max_unpacked_elements: int = MAX_UNPACKED_ELEMENTS
) -> nn.Sequential:
    """
    Rebuilds the network of a :func:`save_compressed` file, reading it with ``torch.load(weights_only=True)``: a
    file from a stranger cannot run code. The layers are built on the ``meta`` device and checked against the
    file's tensors before any memory is taken.

    :param path: The file.
    :param map_location: As for :func:`torch.load` (default: where the tensors were saved, i.e. the CPU).
    :param int max_unpacked_elements: The most weight entries the sparse-stored weights may expand to.
    :returns: the network, in eval mode.
    :rtype: torch.nn.Sequential
    :raises ValueError: for a file that is not of this format, of another version, or malformed (the message
        names the part).
    """
    from pyro_vdrop.serialization import read_plain

    path = Path(path)
    record = read_plain(
        path,
        map_location=map_location,
        file_format=COMPRESSED_FORMAT,
        version=COMPRESSED_VERSION,
        writer="pyro_vdrop.nn.save_compressed",
    )
    layers, state, packed = record.get("layers"), record.get("state"), record.get("packed", {})
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) for x in layers):
        raise ValueError(f"{path}: 'layers' must be a non-empty list of layer descriptions")
    if not isinstance(state, dict) or not isinstance(packed, dict):
        raise ValueError(f"{path}: 'state' and 'packed' must be dicts of tensors")
    try:
        for i, layer in enumerate(layers):
            _check_args(layer, i)
        if len({x["name"] for x in layers}) != len(layers):
            raise ValueError("two layers have one name")
        tensors = {}
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise ValueError(f"state[{key!r}] is not a tensor")
            tensors[key] = value
        declared = 0
        for key, value in packed.items():
            shape = value.get("shape") if isinstance(value, dict) else None
            declared += math.prod(shape) if isinstance(shape, list) and all(isinstance(v, int) for v in shape) else 0
            if declared > max_unpacked_elements:
                raise ValueError(
                    f"the sparse weights expand to more than max_unpacked_elements={max_unpacked_elements:,} entries; "
                    "raise it if you trust the file"
                )
            if key in tensors:
                raise ValueError(f"{key!r} is both in 'state' and in 'packed'")
            tensors[key] = _unpack(value, key)
        floats = [v for v in tensors.values() if v.is_floating_point()]
        entries = []
        for layer in layers:
            prefix = layer["name"] + "."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            entries.append({**layer, "tensors": own})
        return _build(
            entries,
            device=floats[0].device if floats else "cpu",
            dtype=floats[0].dtype if floats else torch.get_default_dtype(),
        )
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: malformed pyro_vdrop.nn.save_compressed file: {e}") from e


__all__ = [
    "COMPRESSED_FORMAT",
    "COMPRESSED_VERSION",
    "COMPRESSIBLE_LAYERS",
    "MAX_UNPACKED_ELEMENTS",
    "SelectInputs",
    "compress",
    "compressed_bytes",
    "count_parameters",
    "layer_widths",
    "load_compressed",
    "save_compressed",
]
