# SPDX-License-Identifier: Apache-2.0
"""
Optimizers for :class:`~pyro.infer.SVI`: one torch optimizer for all parameters (:class:`JointOptim`), and
gradient averaging across the processes of a torch.distributed run (:class:`DistributedOptimizer`).
"""

from .distributed import DistributedOptimizer
from .joint import JointOptim

__all__ = ["DistributedOptimizer", "JointOptim"]
