# SPDX-License-Identifier: Apache-2.0
"""Optimizer wrappers: gradient averaging across the processes of a torch.distributed run."""

from .distributed import DistributedOptimizer

__all__ = ["DistributedOptimizer"]
