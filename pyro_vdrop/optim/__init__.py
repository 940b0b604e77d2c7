# SPDX-License-Identifier: Apache-2.0
"""
Optimizers for :class:`~pyro.infer.SVI`: one torch optimizer (and schedule) for all
parameters (:class:`JointOptim`, :class:`JointLRScheduler`), and
gradient averaging across the processes of a torch.distributed run (:class:`DistributedOptimizer`), and
whether torch's fused update runs here (:func:`supports_fused`).
"""

from .distributed import DistributedOptimizer
from .joint import JointLRScheduler, JointOptim, supports_fused

__all__ = ["DistributedOptimizer", "JointLRScheduler", "JointOptim", "supports_fused"]
