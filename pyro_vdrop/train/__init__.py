# SPDX-License-Identifier: Apache-2.0
"""
The training loop behind the ``pyro-vdrop`` command: variational dropout on MNIST with
:class:`~pyro.infer.SVI`, a progress bar, per-epoch metrics, atomic checkpoints and exact resume.

A *run directory* holds everything about one training run:

====================  =====================================================================
``config.json``       the :class:`TrainConfig`, the command, versions and machine
``checkpoint.pt``     the latest end-of-epoch checkpoint (see :func:`save_checkpoint`)
``metrics.csv``       one row per epoch (also as ``metrics.jsonl``)
``summary.json``      the final figures, written when training completes
``evaluation.json``   written by :func:`evaluate`
``report.md``         written by :func:`write_report`, with its PNG figures
``.pyro-vdrop.lock``  locked by the process that trains the run (see :func:`lock_run`)
====================  =====================================================================

Example::

    from pyro_vdrop.train import TrainConfig, fit, evaluate

    summary = fit(TrainConfig(epochs=5), "runs/demo")
    print(summary["test_error_pruned"], summary["compression"])
    print(evaluate("runs/demo", num_samples=10))

    # the same in 2 local processes with torch.distributed (the global batch stays 100)
    summary = launch(fit, TrainConfig(epochs=5), "runs/demo-2", nproc=2)

Under ``torchrun`` (or any launcher that initialises the default :mod:`torch.distributed` process group),
:func:`fit` trains data-parallel by itself; see its docstring.

The package keeps one concern per module: :mod:`~pyro_vdrop.train.config` (the configuration),
:mod:`~pyro_vdrop.train.components` (data, network, model, guide), :mod:`~pyro_vdrop.train.run_dir` (atomic
files, metrics, the lock), :mod:`~pyro_vdrop.train.checkpoint` (plain-data checkpoints),
:mod:`~pyro_vdrop.train.session` (the live objects of a run),
:mod:`~pyro_vdrop.train.loop` (:func:`fit`), :mod:`~pyro_vdrop.train.evaluation`, :mod:`~pyro_vdrop.train.export`,
:mod:`~pyro_vdrop.train.distributed` and :mod:`~pyro_vdrop.train.report`.

**References**

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local
    Reparameterization Trick." NeurIPS 2015.
[2] Molchanov, Ashukha, Vetrov. "Variational Dropout Sparsifies Deep Neural
    Networks." ICML 2017.
"""

from pyro_vdrop.train.checkpoint import CHECKPOINT_VERSION, convert_checkpoint, load_checkpoint, save_checkpoint
from pyro_vdrop.train.components import (
    build_guide,
    build_model,
    build_network,
    estimator_handler,
    load_data,
    select_device,
)
from pyro_vdrop.train.config import (
    A2_KL_SCALE,
    DEVICES,
    ESTIMATORS,
    GUIDES,
    LR_DECAYS,
    MODELS,
    PRUNE_THRESHOLD,
    RECIPES,
    SPARSE_LOG_ALPHA_CLIP,
    TrainConfig,
    kl_weight,
)
from pyro_vdrop.train.distributed import DISTRIBUTED_TIMEOUT, Rank0Error, launch, process_group
from pyro_vdrop.train.errors import RunError
from pyro_vdrop.train.evaluation import (
    evaluate,
    open_run,
    predict_logits,
    predictive_probs,
    pruned_params,
    sparsity_stats,
)
from pyro_vdrop.train.export import export_run
from pyro_vdrop.train.loop import check_batch_size, fit
from pyro_vdrop.train.report import write_report
from pyro_vdrop.train.run_dir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    EVALUATION_FILE,
    LOCK_FILE,
    METRIC_KEYS,
    METRICS_CSV,
    METRICS_JSONL,
    REPORT_FIGURES,
    REPORT_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    lock_run,
    read_metrics,
    run_in_progress,
    write_metrics,
)
from pyro_vdrop.train.session import ObservedLogits, Session
from pyro_vdrop.util import environment

__all__ = [
    "A2_KL_SCALE",
    "CHECKPOINT_FILE",
    "CHECKPOINT_VERSION",
    "CONFIG_FILE",
    "DEVICES",
    "DISTRIBUTED_TIMEOUT",
    "ESTIMATORS",
    "EVALUATION_FILE",
    "GUIDES",
    "LOCK_FILE",
    "LR_DECAYS",
    "METRICS_CSV",
    "METRICS_JSONL",
    "METRIC_KEYS",
    "MODELS",
    "PRUNE_THRESHOLD",
    "REPORT_FIGURES",
    "REPORT_FILE",
    "RUN_FILES",
    "SPARSE_LOG_ALPHA_CLIP",
    "SUMMARY_FILE",
    "ObservedLogits",
    "Rank0Error",
    "RECIPES",
    "RunError",
    "Session",
    "TrainConfig",
    "build_guide",
    "build_model",
    "build_network",
    "check_batch_size",
    "convert_checkpoint",
    "environment",
    "estimator_handler",
    "evaluate",
    "export_run",
    "fit",
    "kl_weight",
    "launch",
    "load_checkpoint",
    "load_data",
    "lock_run",
    "open_run",
    "predict_logits",
    "predictive_probs",
    "process_group",
    "pruned_params",
    "read_metrics",
    "run_in_progress",
    "save_checkpoint",
    "select_device",
    "sparsity_stats",
    "write_metrics",
    "write_report",
]
