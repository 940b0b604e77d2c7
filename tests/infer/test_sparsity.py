# SPDX-License-Identifier: Apache-2.0
import math

import pytest
import torch

from pyro_vdrop.infer.sparsity import PRUNE_LOG_ALPHA_THRESHOLD, prune_params, sparsity_summary


def test_sparsity_summary_counts_and_vocabulary():
    log_alpha = {"a": torch.tensor([[-1.0, 4.0], [3.0, 3.5]]), "b": torch.tensor([5.0, 6.0])}
    summary = sparsity_summary(log_alpha)
    assert summary["sites"]["a"] == {
        "num_weights": 4,
        "num_pruned": 2,  # 3.0 is not above the threshold
        "num_kept": 2,
        "fraction_pruned": 0.5,
        "compression": 2.0,
    }
    assert summary["sites"]["b"]["compression"] == math.inf
    assert summary["total"] == {
        "num_weights": 6,
        "num_pruned": 4,
        "num_kept": 2,
        "fraction_pruned": 4 / 6,
        "compression": 3.0,
    }


def test_sparsity_summary_empty_and_threshold():
    assert sparsity_summary({})["total"] == {
        "num_weights": 0,
        "num_pruned": 0,
        "num_kept": 0,
        "fraction_pruned": 0.0,
        "compression": math.inf,
    }
    assert sparsity_summary({"a": torch.tensor([0.5, 1.5])}, threshold=1.0)["total"]["num_pruned"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prune_params_broadcasts_log_alpha(dtype):
    theta = {"w": torch.arange(1.0, 7.0, dtype=dtype).reshape(2, 3), "b": torch.ones(2, dtype=dtype)}
    log_alpha = {"w": torch.tensor([[-1.0, PRUNE_LOG_ALPHA_THRESHOLD + 1, 0.0]])}  # per input unit
    out = prune_params(theta, log_alpha)
    assert torch.equal(out["w"], torch.tensor([[1.0, 0.0, 3.0], [4.0, 0.0, 6.0]], dtype=dtype))
    assert out["b"] is theta["b"]
    assert torch.equal(theta["w"], torch.arange(1.0, 7.0, dtype=dtype).reshape(2, 3))  # not modified
    assert torch.equal(prune_params(theta, log_alpha, math.inf)["w"], theta["w"])


def test_prune_params_names_the_site_whose_log_alpha_does_not_broadcast():
    with pytest.raises(ValueError, match="log_alpha\\['w'\\] of shape \\(3,\\) does not broadcast"):
        prune_params({"w": torch.ones(2, 4)}, {"w": torch.zeros(3)})
