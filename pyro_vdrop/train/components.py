# SPDX-License-Identifier: Apache-2.0
"""
The pieces of a run built from its :class:`~pyro_vdrop.train.TrainConfig`: data, network, model, guide, estimator.
"""

from typing import Any

import numpy as np
import torch

from pyro_vdrop.poutine.handlers import estimator_handler
from pyro_vdrop.train.config import DEVICES, TrainConfig
from pyro_vdrop.train.errors import RunError


def select_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) as a :class:`torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but torch sees no CUDA device; use --device cpu or auto")
    if name not in DEVICES:
        raise RunError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    return torch.device(name)


def derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*keys))


def load_data(config: TrainConfig, *, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """
    The training and test tensors of a run, as ``(x_train, y_train, x_test, y_test)``, flattened for the
    fully connected models, with the seeded subsets of ``train_subset`` / ``test_subset`` applied.

    :raises RunError: if the data cannot be loaded (the message says where it was looked for).
    """
    from pyro_vdrop.datasets import load_dataset

    flatten = config.model != "lenet5"
    tensors = []
    for split, subset in (("train", config.train_subset), ("test", config.test_subset)):
        try:
            x, y = load_dataset(config.dataset, split, data_dir=config.data_dir, flatten=flatten)
        except (OSError, ValueError) as e:
            raise RunError(f"cannot load the {config.dataset!r} {split} data: {e}") from e
        if subset is not None:
            if subset > x.shape[0]:
                raise RunError(f"{split}_subset={subset} exceeds the {x.shape[0]} {split} images of {config.dataset}")
            keep = torch.randperm(x.shape[0], generator=seeded_generator(config.seed, 1 if split == "train" else 2))
            x, y = x[keep[:subset]], y[keep[:subset]]
        tensors += [x.to(device), y.to(device)]
    return tuple(tensors)


def build_network(config: TrainConfig) -> torch.nn.Module:
    """The deterministic torch network named by ``config.model``."""
    from pyro_vdrop import nn as vnn

    if config.model == "mlp":
        return vnn.mnist_mlp(config.width)
    if config.model == "lenet300":
        return vnn.lenet_300_100()
    return vnn.lenet5_caffe()


def build_model(network: torch.nn.Module, *, num_data: int, guide: str | None = None):
    """
    The Bayesian model of ``network`` (log-uniform weight priors, Categorical likelihood over ``num_data``); for
    ``guide="sbp"`` the weights' prior is structured Bayesian pruning's
    :class:`~pyro_vdrop.distributions.LogUniformNoisePrior` on its interval (-20, 0).
    """
    from pyro_vdrop import nn as vnn
    from pyro_vdrop.distributions import SBP_LOG_NOISE_INTERVAL, LogUniformNoisePrior

    prior = LogUniformNoisePrior(*SBP_LOG_NOISE_INTERVAL) if guide == "sbp" else None
    return vnn.bayesianize(network, prior=prior, num_data=num_data)


def build_guide(model, config: TrainConfig, *, init_values: dict | None = None):
    """
    The :class:`~pyro_vdrop.infer.AutoVariationalDropout` variant named by ``config.guide``: ``"sparse"``
    (additive parameterization, α per weight [2]), ``"B"`` (independent noise, α per weight, α ≤ 1 [1]),
    ``"A"`` / ``"A2"`` (correlated noise, α per input unit, α ≤ 1, A2 with the KL scaled by 1/3 [1]) or
    ``"gaussian-dropout"`` (correlated noise with α = p/(1-p) fixed [1, §3]), ``"group"`` (group variational
    dropout, noise per input unit or channel) or ``"sbp"`` (structured Bayesian pruning; the model must come from
    :func:`build_model` with ``guide="sbp"``). The paper's variants use its own KL fit (``kl_approx="kingma"``),
    sparse VD and group VD Molchanov's.

    :param dict init_values: Initial θ per site (e.g. a pretrained network's weights); default fan-in init.
    """
    from pyro_vdrop.infer.autoguide import AutoVariationalDropout, preset

    overrides: dict[str, Any] = {}
    if init_values is not None:
        overrides["init_loc_fn"] = _init_to_values(init_values)
    if config.guide == "gaussian-dropout":
        overrides["dropout_rate"] = config.dropout_p
    if config.train_clip is not None:
        overrides["train_clip"] = config.train_clip
    if config.init_log_alpha is not None:
        overrides["init_log_alpha"] = config.init_log_alpha
    return AutoVariationalDropout(model, options=preset(config.guide, **overrides))


def _init_to_values(values: dict):
    from pyro.infer.autoguide.initialization import init_to_value

    from pyro_vdrop.infer import init_to_fan_in

    return init_to_value(values=values, fallback=init_to_fan_in)


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


__all__ = [
    "batches",
    "build_guide",
    "build_model",
    "build_network",
    "derived_seed",
    "estimator_handler",
    "load_data",
    "seeded_generator",
    "select_device",
]
