# SPDX-License-Identifier: Apache-2.0
"""
The configuration of a training run (:class:`TrainConfig`), the KL warm-up and the learning-rate decay.
"""

import dataclasses
import math

from pyro_vdrop.infer.autoguide.presets import A2_KL_SCALE
from pyro_vdrop.infer.sparsity import PRUNE_LOG_ALPHA_THRESHOLD, SPARSE_VD_LOG_ALPHA_CLIP
from pyro_vdrop.poutine.estimators import FLIPOUT, LRT, MEAN, SINGLE_SAMPLE
from pyro_vdrop.train.errors import RunError

MODELS = ("mlp", "lenet300", "lenet5")
DATASETS = ("embedded", "mnist")
#: The guides: the paper variants of :data:`pyro_vdrop.infer.autoguide.PRESETS`.
GUIDES = ("sparse", "A", "A2", "B", "gaussian-dropout", "group", "sbp")
#: The guides whose parameter is log α itself (the paper's variants, α ≤ 1), which ``init_log_alpha`` sets
LEARNED_ALPHA_GUIDES = ("A", "A2", "B")
#: The estimators the training loop offers (:mod:`pyro_vdrop.poutine.estimators`; "per-example" is a diagnostic).
ESTIMATORS = (LRT, FLIPOUT, SINGLE_SAMPLE, MEAN)
DEVICES = ("auto", "cpu", "cuda")
LR_DECAYS = ("linear", "hold-linear", "none")

#: Weights with :math:`\log\alpha` above this are pruned (:mod:`pyro_vdrop.infer.sparsity`).
PRUNE_THRESHOLD = PRUNE_LOG_ALPHA_THRESHOLD
#: Sparse VD clips :math:`\log\alpha` to this interval inside the KL (:mod:`pyro_vdrop.infer.sparsity`).
SPARSE_LOG_ALPHA_CLIP = SPARSE_VD_LOG_ALPHA_CLIP

#: The recipe of each data set: the options :meth:`TrainConfig.for_dataset` (and ``pyro-vdrop fit --dataset D``)
#: take where none is given. ``"embedded"``: the :class:`TrainConfig` defaults (about a minute on two CPU cores).
#: ``"mnist"``: sparse VD at the scale of [2] (200 epochs, Adam 1e-3, KL weight 0 until epoch 5, 1 at epoch 20,
#: 5 epochs of pretraining), with the schedule and ``train_clip`` chosen by ``benchmarks/sparse_ablation.py``
#: (``benchmarks/results/sparse_ablation-lenet300-40ep.json``); ``train_clip`` applies to ``guide="sparse"`` only.
RECIPES = {
    "embedded": {},
    "mnist": {
        "epochs": 200,
        "lr": 1e-3,
        "lr_decay": "hold-linear",
        "kl_warmup_start": 5.0,
        "kl_warmup": 15.0,
        "pretrain_epochs": 5,
        "train_clip": 3.0,
    },
}

#: Options that may differ when a run is resumed or evaluated (where the data is, where to compute).
RUNTIME_FIELDS = ("data_dir", "device")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The kinds of value an option takes: a test and the words for it (shared by :class:`TrainConfig` and the command).
VALUE_KINDS = {
    "positive_int": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "non_negative_int": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "positive_number": (lambda v: _is_number(v) and v > 0, "a number in (0, ∞)"),
    "non_negative_number": (lambda v: _is_number(v) and v >= 0, "a number in [0, ∞)"),
    "probability": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "finite_number": (_is_number, "a finite number"),
}


def option(default, help: str, *, choices=None, kind=None, metavar=None, group: str):
    """
    A field of :class:`TrainConfig` with what the command line needs to offer it: ``help``, the allowed
    ``choices`` or the ``kind`` of value (a key of :data:`VALUE_KINDS`), a ``metavar`` and the help ``group``.
    :meth:`TrainConfig.__post_init__` validates with the same ``choices`` and ``kind``, so the two never disagree.
    """
    metadata = {"help": help, "choices": choices, "kind": kind, "metavar": metavar, "group": group}
    return dataclasses.field(default=default, metadata=metadata)


def check_option(field: dataclasses.Field, value) -> None:
    """Raises a ``ValueError`` naming the option unless ``value`` is allowed for ``field`` of :class:`TrainConfig`
    (None is allowed where the default is None)."""
    if value is None and field.default is None:
        return
    choices, kind = field.metadata.get("choices"), field.metadata.get("kind")
    if choices is not None and value not in choices:
        raise ValueError(f"{field.name} must be one of {', '.join(choices)}; got {value!r}")
    if kind is not None:
        test, words = VALUE_KINDS[kind]
        if not test(value):
            raise ValueError(f"{field.name} must be {words}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    r"""
    Everything that determines a training run. The defaults train LeNet-300-100 with sparse variational
    dropout [2] and the local reparameterization trick [1] on the embedded MNIST subset in about a minute
    on two CPU cores: 5 epochs of plain pretraining, then 30 epochs with Adam at 3e-3 decayed linearly to 0 and the
    KL weight annealed over the first 10. Molchanov et al.'s full recipe [2] (200 epochs, lr 1e-3, warm-up over
    epochs 5-20) needs ``epochs=200, lr=1e-3, kl_warmup_start=5, kl_warmup=15``; the larger default learning rate
    makes up for the short run.

    :param str model: ``"mlp"`` (the paper's 3-hidden-layer ReLU net, ``width`` units per layer),
        ``"lenet300"`` (LeNet-300-100) or ``"lenet5"`` (LeNet-5-Caffe).
    :param int width: Hidden units per layer of ``"mlp"``.
    :param str dataset: ``"embedded"`` (5,000/1,000 images shipped with the package) or ``"mnist"``.
    :param str data_dir: Folder of the MNIST IDX files (``dataset="mnist"``; default ``$PYRO_VDROP_MNIST_DIR``).
    :param int train_subset: Train on a seeded random subset of this many training images.
    :param int test_subset: Evaluate on a seeded random subset of this many test images.
    :param str guide: ``"sparse"`` (additive parameterization, α per weight, unbounded [2]), ``"A"``
        (correlated noise [1]), ``"A2"`` (A with the KL scaled by 1/3 [1]), ``"B"`` (independent noise [1]) or
        ``"gaussian-dropout"`` (fixed :math:`\alpha = p/(1-p)`, the Bernoulli-equivalent Gaussian dropout),
        ``"group"`` (group variational dropout: noise per input unit or channel, prunes units) or ``"sbp"``
        (structured Bayesian pruning: log-normal noise per unit, proper truncated log-uniform prior; pruned at
        SNR < 1, i.e. log α > 0).
    :param float dropout_p: The Bernoulli-equivalent dropout rate of ``"gaussian-dropout"``.
    :param str estimator: ``"lrt"`` (local reparameterization), ``"flipout"``, ``"single-sample"``
        (one weight sample per minibatch) or ``"mean"``: a noise-free diagnostic that uses the posterior means θ
        in the data term (:func:`~pyro_vdrop.poutine.local_reparam` with ``estimator="mean"``), so training is
        deterministic given the data order; it does not learn α from the data, so it is not variational dropout.
    :param float train_clip: ``guide="sparse"`` only: the mean of every weight whose log α is at or above this is
        0 in the guide's distribution, so the network trains without the weights pruning will remove (the
        ``train_clip`` of [2]'s reference code, at 3; see
        :class:`~pyro_vdrop.infer.autoguide.VariationalDropoutOptions`). Default None: off.
    :param float init_log_alpha: ``guide="A"``, ``"A2"`` or ``"B"`` only: the initial log α of every weight (or
        input unit). Default None: the guide's default, -4 (weak noise, so α rises while training); 0 starts at
        α = 1, the Gaussian equivalent of Bernoulli dropout p = 0.5, which is also the cap on α.
    :param int epochs: Passes over the training data.
    :param int batch_size: Minibatch size :math:`M` (the data term is scaled by :math:`N/M`); the global
        minibatch when training in several processes, each of which takes :math:`M/P` examples per step.
    :param float lr: Adam's learning rate.
    :param str lr_decay: ``"linear"`` (from the first step to 0 at the end of training), ``"hold-linear"``
        (constant for the first half of the steps, then linear to 0: the schedule of [2]'s reference code) or
        ``"none"``.
    :param float kl_warmup: Epochs over which the KL weight rises linearly from 0 to 1 (0: no warm-up).
    :param float kl_warmup_start: Epoch at which the warm-up starts (the KL weight is 0 before).
    :param int pretrain_epochs: Epochs of plain (deterministic) training of the network before variational
        training; its weights initialise the posterior means :math:`\theta` [2].
    :param int seed: Seed of every random number generator (initialisation, shuffling, noise).
    :param str device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
    """

    model: str = option(
        "lenet300",
        "network: the paper's MLP (--width units per layer), LeNet-300-100 or LeNet-5-Caffe",
        choices=MODELS,
        group="network and data",
    )
    width: int = option(1024, "hidden units per layer of --model mlp", kind="positive_int", group="network and data")
    dataset: str = option(
        "embedded",
        "data set; with mnist, every option not given comes from the MNIST recipe (200 epochs, lr 1e-3 held then "
        "linear, --train-clip 3: pyro_vdrop.train.RECIPES)",
        choices=DATASETS,
        group="network and data",
    )
    data_dir: str | None = option(
        None, "folder of the MNIST IDX files (default: $PYRO_VDROP_MNIST_DIR)", metavar="DIR", group="network and data"
    )
    train_subset: int | None = option(
        None, "train on a seeded subset of N images", kind="positive_int", metavar="N", group="network and data"
    )
    test_subset: int | None = option(
        None, "test on a seeded subset of N images", kind="positive_int", metavar="N", group="network and data"
    )
    guide: str = option(
        "sparse",
        "posterior: sparse (Molchanov et al. 2017), A / A2 / B (Kingma et al. 2015), gaussian-dropout with fixed "
        "alpha = p/(1-p), group (group VD: prunes units/channels) or sbp (structured Bayesian pruning, Neklyudov et "
        "al. 2017)",
        choices=GUIDES,
        group="variational dropout",
    )
    dropout_p: float = option(
        0.5,
        "Bernoulli-equivalent dropout rate of --guide gaussian-dropout",
        kind="probability",
        metavar="P",
        group="variational dropout",
    )
    estimator: str = option(
        "lrt",
        "gradient estimator: local reparameterization, Flipout, one weight sample per minibatch, or mean (a "
        "noise-free diagnostic: the posterior means, no dropout noise)",
        choices=ESTIMATORS,
        group="variational dropout",
    )
    train_clip: float | None = option(
        None,
        "--guide sparse: the mean of every weight with log alpha at or above this is 0 while training (the "
        "train_clip of Molchanov et al.'s code, at the pruning threshold 3)",
        kind="finite_number",
        metavar="LOG_ALPHA",
        group="variational dropout",
    )
    init_log_alpha: float | None = option(
        None,
        "--guide A, A2 or B: the initial log alpha (default -4, weak noise; 0 is alpha = 1, the Gaussian "
        "equivalent of Bernoulli dropout p = 0.5 and the cap on alpha)",
        kind="finite_number",
        metavar="LOG_ALPHA",
        group="variational dropout",
    )
    epochs: int = option(30, "passes over the training data", kind="positive_int", group="optimisation")
    batch_size: int = option(100, "minibatch size", kind="positive_int", metavar="M", group="optimisation")
    lr: float = option(3e-3, "Adam's learning rate", kind="positive_number", group="optimisation")
    lr_decay: str = option(
        "linear",
        "learning-rate schedule (linear: to 0 at the end; hold-linear: constant for the first half, then linear to 0)",
        choices=LR_DECAYS,
        group="optimisation",
    )
    kl_warmup: float = option(
        10.0,
        "epochs over which the KL weight rises from 0 to 1 (0: none)",
        kind="non_negative_number",
        metavar="EPOCHS",
        group="optimisation",
    )
    kl_warmup_start: float = option(
        0.0,
        "epoch at which the KL warm-up starts",
        kind="non_negative_number",
        metavar="EPOCH",
        group="optimisation",
    )
    pretrain_epochs: int = option(
        5,
        "epochs of plain training whose weights initialise the posterior means",
        kind="non_negative_int",
        metavar="N",
        group="optimisation",
    )
    seed: int = option(0, "random seed", kind="non_negative_int", group="optimisation")
    device: str = option("auto", "where to compute", choices=DEVICES, group="optimisation")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_option(field, getattr(self, field.name))
        if self.data_dir is not None and self.dataset != "mnist":
            raise ValueError(f"data_dir applies to dataset='mnist' only; got dataset={self.dataset!r}")
        if self.train_clip is not None and self.guide != "sparse":
            raise ValueError(
                f"train_clip applies to guide='sparse' (σ² per weight) only; got guide={self.guide!r}: leave "
                "train_clip unset"
            )
        if self.init_log_alpha is not None and self.guide not in LEARNED_ALPHA_GUIDES:
            raise ValueError(
                f"init_log_alpha applies to the guides that learn log α directly ({', '.join(LEARNED_ALPHA_GUIDES)}); "
                f"got guide={self.guide!r}: leave init_log_alpha unset"
            )
        if self.guide == "sbp" and self.estimator == SINGLE_SAMPLE:
            raise ValueError(
                "guide='sbp' needs the local reparameterization (its prior has no density of the weights, only the "
                f"KL of the noise): use estimator {LRT!r} or {FLIPOUT!r}, not {SINGLE_SAMPLE!r}"
            )

    @classmethod
    def for_dataset(cls, dataset: str = "embedded", **options) -> "TrainConfig":
        """
        The configuration for ``dataset`` with its recipe (:data:`RECIPES`) for every option not in ``options``:
        ``TrainConfig.for_dataset("mnist")`` trains sparse VD LeNet-300-100 on MNIST the way that reached the
        paper's compression; ``TrainConfig.for_dataset("mnist", epochs=20)`` changes one option of it. The recipe's
        ``train_clip`` is left out for guides other than ``"sparse"``. ``pyro-vdrop fit`` builds its configuration
        this way.

        :raises ValueError: for an unknown data set or option value, as :class:`TrainConfig` does.
        """
        if dataset not in RECIPES:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
        recipe = dict(RECIPES[dataset])
        if options.get("guide", cls.guide) != "sparse":
            recipe.pop("train_clip", None)
        return cls(dataset=dataset, **{**recipe, **options})

    def to_dict(self) -> dict:
        """The configuration as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def kl_weight(config: TrainConfig, epoch_progress: float) -> float:
    r"""
    The KL weight :math:`\beta` at a (fractional) epoch: 0 before ``kl_warmup_start``, rising linearly to 1 over
    ``kl_warmup`` epochs, then 1 [2]. Only the KL term is weighted; the data term keeps its :math:`N/M` scale.

    :param TrainConfig config: The run's configuration.
    :param float epoch_progress: Completed epochs, e.g. ``step / steps_per_epoch``.
    :rtype: float
    """
    if config.kl_warmup == 0:
        return 0.0 if epoch_progress < config.kl_warmup_start else 1.0
    return min(max((epoch_progress - config.kl_warmup_start) / config.kl_warmup, 0.0), 1.0)


class LinearDecay:
    """
    ``lr_lambda`` for :class:`torch.optim.lr_scheduler.LambdaLR`: the factor of the learning rate at ``step`` of
    ``total`` steps. ``"linear"``: 1 at step 0, falling linearly to 0 after ``total`` steps; ``"hold-linear"``: 1 for
    the first half, then falling linearly to 0 after ``total`` steps; ``"none"``: 1 throughout.
    """

    def __init__(self, total: int, decay: str):
        if decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}; got {decay!r}")
        self.total = total
        self.decay = decay

    def __call__(self, step: int) -> float:
        if self.decay == "none":
            return 1.0
        if self.decay == "hold-linear":
            return min(max(2.0 - 2.0 * step / self.total, 0.0), 1.0)
        return max(1.0 - step / self.total, 0.0)


def replace_config(config: TrainConfig, changes: dict) -> TrainConfig:
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:
        raise RunError(str(e)) from e


__all__ = [
    "A2_KL_SCALE",
    "RECIPES",
    "DATASETS",
    "DEVICES",
    "ESTIMATORS",
    "GUIDES",
    "LR_DECAYS",
    "LinearDecay",
    "MODELS",
    "PRUNE_THRESHOLD",
    "RUNTIME_FIELDS",
    "SPARSE_LOG_ALPHA_CLIP",
    "TrainConfig",
    "VALUE_KINDS",
    "check_option",
    "kl_weight",
    "option",
    "replace_config",
]
