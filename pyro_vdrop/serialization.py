# SPDX-License-Identifier: Apache-2.0
"""
Saving a fitted model and guide to one file of plain data, and loading it back in any process.

A file holds tensors, numbers, strings, lists and dicts only, so :func:`load` reads it with
``torch.load(weights_only=True)``: a file from a stranger cannot run code. It cannot hold the torch network's
*code* either, so :func:`load` needs the network's architecture from the user (see there).
"""

import dataclasses
import io
import os
from pathlib import Path

import pyro
import torch
from torch import nn

from pyro_vdrop.infer.autoguide.options import VariationalDropoutOptions

#: The format of a file written by :func:`save` (its ``"format"`` and ``"version"`` entries).
FORMAT = "pyro-vdrop-model"
VERSION = 1

#: The option fields of the guide that a file stores; ``init_loc_fn`` (code) is not stored: θ is restored instead.
_STORED_OPTIONS = tuple(f.name for f in dataclasses.fields(VariationalDropoutOptions) if f.name != "init_loc_fn")


def _check_guide(guide):
    from pyro_vdrop.infer import AutoVariationalDropout

    if not isinstance(guide, AutoVariationalDropout):
        raise TypeError(
            f"guide must be a pyro_vdrop.infer.AutoVariationalDropout, got {type(guide).__name__}; for another guide "
            "save its parameters with torch.save(guide.state_dict(), path) and call the guide once on data before "
            "guide.load_state_dict(torch.load(path, weights_only=True))"
        )
    if guide.prototype_trace is None:
        raise ValueError(
            "the guide has no parameters yet: Pyro autoguides create them on their first call. Train it (or call "
            "guide(x, y) once) before saving"
        )


def _input_spec(guide) -> list:
    """The tensor arguments the guide was set up with, as ``{"shape", "dtype"}`` (other arguments as None)."""
    node = guide.prototype_trace.nodes.get("_INPUT", {})
    if node.get("kwargs"):
        raise ValueError(
            "the guide was set up with keyword arguments, which save() cannot record; call the model with positional "
            "arguments, e.g. guide(x, y)"
        )
    return [
        {"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")} if torch.is_tensor(a) else None
        for a in node.get("args", ())
    ]


def _prior_kl_approx(guide) -> str:
    from pyro_vdrop.distributions.util import base_distribution

    for _, site in guide.prototype_trace.iter_stochastic_nodes():
        return getattr(base_distribution(site["fn"]), "kl_approx", "molchanov")
    return "molchanov"


def _prior_noise_interval(guide) -> list[float] | None:
    """The interval (a, b) of log s of structured Bayesian pruning's prior, or None for the log-uniform prior."""
    from pyro_vdrop.distributions import LogUniformNoisePrior
    from pyro_vdrop.distributions.util import base_distribution

    for _, site in guide.prototype_trace.iter_stochastic_nodes():
        prior = base_distribution(site["fn"])
        return [prior.low, prior.high] if isinstance(prior, LogUniformNoisePrior) else None
    return None


def _options(guide) -> dict:
    options = {name: getattr(guide.options, name) for name in _STORED_OPTIONS}
    if options["log_alpha_clip"] is not None:
        options["log_alpha_clip"] = list(options["log_alpha_clip"])
    return options


def save(path: str | os.PathLike, model, guide) -> None:
    r"""
    Saves a fitted :func:`~pyro_vdrop.nn.bayesianize` model and its
    :class:`~pyro_vdrop.infer.AutoVariationalDropout` guide to ``path``, atomically (a temporary file in the same
    folder, ``fsync``, then a rename: a crash never leaves a truncated file, and a symlink at ``path`` is replaced,
    not written through).

    The file holds plain data only: the weights of the network the model was made from, the model's deterministic
    parameters and buffers (biases, a learned ``obs_scale``), how it was made (``likelihood``, ``num_data``, random
    sites), the guide's options (:class:`~pyro_vdrop.infer.autoguide.VariationalDropoutOptions`, without
    ``init_loc_fn``, which is code) and current ``kl_scale``, its parameters (θ and log α or log σ², unconstrained),
    and the shapes of the inputs it was set up with. :func:`load` rebuilds both.

    :param path: The file to write.
    :param model: A model made by :func:`~pyro_vdrop.nn.bayesianize`, or any Pyro model (then :func:`load` needs the
        model itself).
    :param guide: Its :class:`~pyro_vdrop.infer.AutoVariationalDropout`, after training (Pyro autoguides create their
        parameters on their first call).
    :raises TypeError: for another kind of guide (the message says how to save its parameters instead).
    :raises ValueError: if the guide has no parameters yet.
    """
    from pyro_vdrop.nn import BayesianModule

    _check_guide(guide)
    with torch.no_grad():
        record = {
            "format": FORMAT,
            "version": VERSION,
            "pyro_vdrop": __import__("pyro_vdrop").__version__,
            "guide": {
                "class": type(guide).__name__,
                "options": _options(guide),
                "kl_scale": guide.kl_scale,
                "params": {name: value.detach().clone() for name, value in guide.named_parameters()},
                "inputs": _input_spec(guide),
            },
        }
        if isinstance(model, BayesianModule):
            template = model.__dict__["_bayesianize_template"]
            record["model"] = {
                "kind": "bayesianize",
                "network_class": f"{type(template).__module__}.{type(template).__qualname__}",
                "network": {k: v.detach().clone() for k, v in template.state_dict().items()},
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "likelihood": model.likelihood,
                "num_data": model.num_data,
                "random_sites": list(model.random_sites),
                "learned_obs_scale": "obs_scale_unconstrained" in model.state_dict(),
                "prior_kl_approx": _prior_kl_approx(guide),
                "prior_noise_interval": _prior_noise_interval(guide),
            }
        else:
            state = model.state_dict() if isinstance(model, nn.Module) else {}
            record["model"] = {"kind": "callable", "state": {k: v.detach().clone() for k, v in state.items()}}
    write_plain(path, record)


def write_plain(path: str | os.PathLike, record: dict) -> int:
    """
    Writes ``record`` (plain data: tensors, numbers, strings, lists, dicts) with :func:`torch.save`, atomically
    (temporary file, ``fsync``, rename): the file format of :func:`save` and
    :func:`~pyro_vdrop.nn.save_compressed`.

    :returns: the size of the file in bytes.
    """
    from pyro_vdrop.train.run_dir import atomic_write

    buffer = io.BytesIO()
    torch.save(record, buffer)
    atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()), binary=True)
    return buffer.getbuffer().nbytes


def read_plain(path: str | os.PathLike, *, map_location, file_format: str, version: int, writer: str) -> dict:
    """
    Reads a file of :func:`write_plain` with ``torch.load(weights_only=True)`` (nothing in it can run code) and checks
    that it is a dict of ``file_format`` at ``version``.

    :param str writer: The function that writes such files, for the error messages.
    :raises FileNotFoundError: if there is no file.
    :raises ValueError: for a file that is not plain data, of another format or of another version.
    """
    path = Path(path)
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load raises many types for a file that is not plain data or is corrupt
        raise ValueError(
            f"{path}: not a file of {writer}, or it holds objects other than plain data, which are not loaded "
            f"because loading them could run code ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(record, dict) or record.get("format") != file_format:
        raise ValueError(f"{path}: not a file written by {writer} (no format {file_format!r})")
    if record.get("version") != version:
        raise ValueError(
            f"{path}: format version {record.get('version')!r}; this pyro-vdrop reads version {version}: load it "
            f"with the pyro-vdrop that wrote it ({record.get('pyro_vdrop')!r})"
        )
    return record


def _read(path: Path, map_location) -> dict:
    record = read_plain(path, map_location=map_location, file_format=FORMAT, version=VERSION, writer="pyro_vdrop.save")
    try:
        _ = record["guide"]["params"], record["guide"]["options"], record["model"]["kind"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: an incomplete pyro_vdrop.save file (missing {e})") from None
    return record


def _rebuild_model(record: dict, network, path: Path):
    from pyro_vdrop.distributions import ImproperLogUniform, LogUniformNoisePrior
    from pyro_vdrop.nn import BayesianModule, bayesianize

    spec = record["model"]
    if spec["kind"] == "callable":
        if network is None or isinstance(network, type):
            raise TypeError(f"{path} holds a guide for a model that is not a bayesianize() network: pass that model")
        if spec["state"]:
            network.load_state_dict(spec["state"])
        return network
    if not isinstance(network, nn.Module) or isinstance(network, BayesianModule):
        raise TypeError(
            f"{path} holds a bayesianize()d {spec['network_class']}: pass a plain torch network of the same "
            f"architecture, e.g. load(path, {spec['network_class'].rsplit('.', 1)[-1]}(...)) (its weights are "
            f"replaced by the saved ones); got {type(network).__name__}"
        )
    try:
        network.load_state_dict(spec["network"], assign=True)  # assign: the saved dtype and device too
    except RuntimeError as e:
        raise ValueError(
            f"{path}: the network passed does not have the architecture of the saved one ({spec['network_class']}): {e}"
        ) from None
    layers = list(dict.fromkeys(site.rsplit(".", 1)[0] for site in spec["random_sites"]))
    random_bias = any(site.endswith(".bias") for site in spec["random_sites"])
    model = bayesianize(
        network,
        prior=ImproperLogUniform(kl_approx=spec["prior_kl_approx"])
        if spec.get("prior_noise_interval") is None
        else LogUniformNoisePrior(*spec["prior_noise_interval"]),
        layers=layers,
        random_bias=random_bias,
        likelihood=spec["likelihood"],
        num_data=spec["num_data"],
        obs_scale=None if spec["learned_obs_scale"] or spec["likelihood"] != "normal" else spec["state"]["obs_scale"],
    )
    model.load_state_dict(spec["state"])
    return model


def _rebuild_options(saved: dict, path: Path) -> VariationalDropoutOptions:
    """The guide's options from their resolved values (the saved ones), checked by constructing them again."""
    options = dict(saved)
    if options.get("log_alpha_clip") is not None:
        options["log_alpha_clip"] = tuple(options["log_alpha_clip"])
    if options.get("dropout_rate") is not None:  # these two are resolved from dropout_rate and may not be passed
        options["granularity"], options["max_log_alpha"] = None, "auto"
    try:
        rebuilt = VariationalDropoutOptions(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the saved guide options are not valid: {e}") from None
    resolved = {name: getattr(rebuilt, name) for name in _STORED_OPTIONS}
    if resolved != {**saved, "log_alpha_clip": options["log_alpha_clip"]}:
        raise ValueError(f"{path}: the saved guide options do not resolve to themselves: {saved}")
    return rebuilt


def _dummy_inputs(spec: list, batch_of_one: bool) -> list:
    args = []
    for arg in spec:
        if arg is None:
            args.append(None)
            continue
        shape = list(arg["shape"])
        if batch_of_one and shape:
            shape[0] = 1
        args.append(torch.zeros(shape, dtype=getattr(torch, arg["dtype"])))
    return args


def _fullname(module, name: str) -> str:
    """The param-store name of a PyroModule's parameter ``name`` (a ``named_parameters()`` key): Pyro prefixes the
    root module's ``_pyro_name`` (``PyroModule._pyro_get_fullname``, which works only inside a call)."""
    name = name.removesuffix("_unconstrained")
    prefix = module._pyro_name
    return f"{prefix}.{name}" if prefix else name


def load(path: str | os.PathLike, network=None, *, map_location=None):
    r"""
    Loads a model and guide written by :func:`save`, in any process (nothing but plain data is read:
    ``torch.load(weights_only=True)``).

    **What it needs from you.** A file cannot hold code, so pass the network's architecture:

    - for a :func:`~pyro_vdrop.nn.bayesianize` model, a plain torch network of the same architecture, e.g.
      ``load(path, lenet_300_100())``: its weights are replaced by the saved ones (with their dtype and device, or
      ``map_location``), and it is made Bayesian again with
      the saved ``likelihood``, ``num_data`` and random sites;
    - for any other Pyro model, the model itself (its ``state_dict``, if it is a module, is restored).

    The guide is rebuilt from its saved options (its ``init_loc_fn`` is not saved: θ is) and its parameters are
    created at once — Pyro autoguides otherwise create them on their first call — by one call on zero inputs of the
    saved shapes (under :func:`torch.random.fork_rng`, so the global random state is not touched), then overwritten
    with the saved values, bitwise. The loaded guide is ready for :func:`~pyro_vdrop.infer.Predictive`, ``median()``,
    :func:`~pyro_vdrop.nn.prune` or more training.

    The parameters also enter Pyro's global param store under their names, as when training; a parameter of that
    name already there is replaced (so a stale value from an earlier model cannot leak in). Two models with the same
    parameter names therefore cannot live in one param store: load the second after ``pyro.clear_param_store()``,
    or use ``pyro.settings.set(module_local_params=True)`` (Pyro's module-local parameters).

    :param path: A file written by :func:`save`.
    :param network: The torch network (architecture) or the Pyro model, see above.
    :param map_location: As for :func:`torch.load` (e.g. ``"cpu"`` for a file saved on a GPU).
    :returns: ``(model, guide)``.
    :raises ValueError: if the file is not one of :func:`save`'s, holds anything but plain data, or does not fit the
        network passed (the message names the missing and unexpected parameters).
    :raises TypeError: if ``network`` is not what the file needs.
    """
    from pyro_vdrop.infer import AutoVariationalDropout

    path = Path(path)
    record = _read(path, map_location)
    model = _rebuild_model(record, network, path)
    saved = record["guide"]
    guide = AutoVariationalDropout(model, options=_rebuild_options(saved["options"], path))
    guide.kl_scale = saved["kl_scale"]
    # A PyroModule adopts the value that Pyro's global param store holds under a parameter's name: drop any such
    # value left by an earlier model, so that the loaded modules keep their own (saved) tensors.
    names = [_fullname(guide, k) for k in saved["params"]]
    if isinstance(model, pyro.nn.PyroModule):
        names += [_fullname(model, k) for k, _ in model.named_parameters()]
    store = pyro.get_param_store()
    for name in names:
        if name in store:
            del store[name]
    args = _dummy_inputs(saved["inputs"], batch_of_one=record["model"]["kind"] == "bayesianize")
    reference = next(iter(saved["params"].values()), None)
    if reference is not None:
        args = [a.to(reference.device) if torch.is_tensor(a) else a for a in args]
    with torch.random.fork_rng(devices=[reference.device] if reference is not None and reference.is_cuda else []):
        with torch.no_grad():
            guide(*args)
    current = dict(guide.named_parameters())
    if sorted(current) != sorted(saved["params"]):
        missing = sorted(set(current) - set(saved["params"]))
        unexpected = sorted(set(saved["params"]) - set(current))
        raise ValueError(
            f"{path} does not fit the model passed: parameters missing from the file {missing[:5]}, unexpected in it "
            f"{unexpected[:5]}; pass the network (or model) that was saved"
        )
    with torch.no_grad():
        for name, value in saved["params"].items():
            if current[name].shape != value.shape:
                raise ValueError(
                    f"{path} does not fit the model passed: {name!r} has shape {tuple(value.shape)} in the file but "
                    f"{tuple(current[name].shape)} in the model"
                )
            current[name].copy_(value)
    return model, guide


__all__ = ["FORMAT", "VERSION", "load", "read_plain", "save", "write_plain"]
