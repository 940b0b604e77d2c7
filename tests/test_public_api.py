# SPDX-License-Identifier: Apache-2.0
"""Every public name that was importable before the "one concept, one home" refactoring still imports."""

import importlib

import pytest

# From every ``__all__`` and the public constants, classes and functions of each module, and the README's code
# blocks, as of the start of the refactoring.
PUBLIC_API = {
    "pyro_vdrop": [
        "__version__",
        "datasets",
        "distributions",
        "infer",
        "local_reparam",
        "nn",
        "optim",
        "poutine",
        "to_inference_data",
    ],
    "pyro_vdrop.arviz": [
        "LOG_ALPHA_THRESHOLD",
        "MAX_CONSTANT_DATA_SIZE",
        "MAX_POSTERIOR_SITE_SIZE",
        "to_inference_data",
    ],
    "pyro_vdrop.datasets": [
        "DATASETS",
        "MNISTFileError",
        "MNIST_FILES",
        "MNIST_MD5",
        "MNIST_MIRRORS",
        "default_cache_dir",
        "download_mnist",
        "load_dataset",
        "load_embedded_mnist",
        "load_mnist",
        "read_mnist_file",
    ],
    "pyro_vdrop.datasets.embedded_mnist": ["load_embedded_mnist"],
    "pyro_vdrop.datasets.load_dataset": ["DATASETS", "load_dataset"],
    "pyro_vdrop.datasets.mnist": [
        "MNISTFileError",
        "MNIST_FILES",
        "MNIST_MD5",
        "MNIST_MIRRORS",
        "default_cache_dir",
        "download_mnist",
        "load_mnist",
        "load_mnist_arrays",
        "read_mnist_file",
    ],
    "pyro_vdrop.distributions": [
        "CorrelatedVariationalDropoutNormal",
        "ImproperLogUniform",
        "KL_APPROXIMATIONS",
        "VariationalDropoutNormal",
        "log_uniform_kl",
    ],
    "pyro_vdrop.distributions.correlated_variational_dropout_normal": ["CorrelatedVariationalDropoutNormal"],
    "pyro_vdrop.distributions.improper_log_uniform": ["ImproperLogUniform"],
    "pyro_vdrop.distributions.kl": [
        "KINGMA_C1",
        "KINGMA_C2",
        "KINGMA_C3",
        "MOLCHANOV_K1",
        "MOLCHANOV_K2",
        "MOLCHANOV_K3",
        "log_uniform_kl",
    ],
    "pyro_vdrop.distributions.util": [
        "KL_APPROXIMATIONS",
        "check_kl_approx",
        "floor_scale",
        "normal_log_alpha",
        "safe_log_abs",
    ],
    "pyro_vdrop.distributions.variational_dropout_normal": ["VariationalDropoutNormal"],
    "pyro_vdrop.infer": [
        "AutoVariationalDropout",
        "AutoVariationalDropoutMessenger",
        "GRADIENT_ESTIMATORS",
        "Predictive",
        "gradient_variance",
        "init_to_fan_in",
    ],
    "pyro_vdrop.infer.effect": [
        "AutoVariationalDropoutMessenger",
        "DEFAULT_INIT_LOG_ALPHA",
        "SPARSE_VD_INIT_LOG_SIGMA2",
    ],
    "pyro_vdrop.infer.gradient_variance": ["GRADIENT_ESTIMATORS", "gradient_variance"],
    "pyro_vdrop.infer.initialization": ["init_to_fan_in"],
    "pyro_vdrop.infer.predictive": ["Predictive"],
    "pyro_vdrop.infer.variational_dropout": [
        "AutoVariationalDropout",
        "DEFAULT_INIT_LOG_ALPHA",
        "GRANULARITIES",
        "NOISES",
        "PAPER_MAX_LOG_ALPHA",
        "PARAMETERIZATIONS",
        "PRUNE_LOG_ALPHA_THRESHOLD",
        "SPARSE_VD_INIT_LOG_SIGMA2",
        "SPARSE_VD_LOG_ALPHA_CLIP",
    ],
    "pyro_vdrop.nn": [
        "BayesianModule",
        "LOG_ALPHA_THRESHOLD",
        "SUPPORTED_LAYERS",
        "bayesianize",
        "lenet5_caffe",
        "lenet_300_100",
        "mnist_mlp",
        "prune",
    ],
    "pyro_vdrop.nn.bayesian_module": ["BayesianModule", "LIKELIHOODS", "bayesian_class"],
    "pyro_vdrop.nn.bayesianize": ["LIKELIHOODS", "SUPPORTED_LAYERS", "bayesianize"],
    "pyro_vdrop.nn.prune": ["LOG_ALPHA_THRESHOLD", "prune"],
    "pyro_vdrop.nn.reference_nets": ["lenet5_caffe", "lenet_300_100", "mnist_mlp"],
    "pyro_vdrop.optim": ["DistributedOptimizer", "JointLRScheduler", "JointOptim"],
    "pyro_vdrop.optim.distributed": ["DistributedOptimizer"],
    "pyro_vdrop.optim.joint": ["JointLRScheduler", "JointOptim"],
    "pyro_vdrop.poutine": [
        "LazyWeight",
        "LazyWeightError",
        "LocalReparamKL",
        "LocalReparamMessenger",
        "LocalReparamSite",
        "local_reparam",
    ],
    "pyro_vdrop.poutine.handlers": ["local_reparam"],
    "pyro_vdrop.poutine.lazy_weight": [
        "ESTIMATORS",
        "LazyWeight",
        "LazyWeightError",
        "lazy_conv",
        "lazy_conv_transpose",
        "lazy_embedding",
        "lazy_linear",
        "lazy_multi_head_attention_forward",
    ],
    "pyro_vdrop.poutine.local_reparam_messenger": ["ESTIMATORS", "LocalReparamMessenger"],
    "pyro_vdrop.poutine.local_reparam_site": ["LocalReparamKL", "LocalReparamSite"],
    "pyro_vdrop.train": [
        "DEVICES",
        "DISTRIBUTED_TIMEOUT",
        "ESTIMATORS",
        "GUIDES",
        "METRIC_KEYS",
        "MODELS",
        "PRUNE_THRESHOLD",
        "RunError",
        "TrainConfig",
        "build_guide",
        "build_model",
        "build_network",
        "environment",
        "estimator_handler",
        "evaluate",
        "fit",
        "kl_weight",
        "launch",
        "load_checkpoint",
        "load_data",
        "open_run",
        "predict_logits",
        "predictive_probs",
        "process_group",
        "pruned_params",
        "read_metrics",
        "save_checkpoint",
        "select_device",
        "sparsity_stats",
        "write_metrics",
        "write_report",
    ],
    "pyro_vdrop.cli": ["main"],
}


@pytest.mark.parametrize("module,names", sorted(PUBLIC_API.items()), ids=sorted(PUBLIC_API))
def test_public_names_import(module, names):
    mod = importlib.import_module(module)
    missing = [name for name in names if not hasattr(mod, name)]
    assert not missing, f"{module} no longer has {missing}"


def test_all_lists_importable_names():
    for module in PUBLIC_API:
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", ()):
            assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it does not define"


def test_pruning_threshold_is_one_constant():
    from pyro_vdrop import arviz, infer, nn
    from pyro_vdrop.infer import sparsity, variational_dropout

    assert nn.LOG_ALPHA_THRESHOLD == arviz.LOG_ALPHA_THRESHOLD == infer.PRUNE_LOG_ALPHA_THRESHOLD == 3.0
    assert variational_dropout.PRUNE_LOG_ALPHA_THRESHOLD is sparsity.PRUNE_LOG_ALPHA_THRESHOLD
    assert variational_dropout.SPARSE_VD_LOG_ALPHA_CLIP is sparsity.SPARSE_VD_LOG_ALPHA_CLIP
