# SPDX-License-Identifier: Apache-2.0

from collections.abc import Iterable, ValuesView

import pyro
import torch
import torch.distributed as dist
from pyro.optim import PyroOptim


class DistributedOptimizer(PyroOptim):
    r"""
    Averages the gradients of the parameters over the processes of a :mod:`torch.distributed` process group, then
    lets a wrapped :class:`~pyro.optim.PyroOptim` take its step: data-parallel training with the semantics of
    :class:`~torch.nn.parallel.DistributedDataParallel`, for :class:`~pyro.infer.SVI`. Modelled on Pyro's
    :class:`~pyro.optim.HorovodOptimizer`, with :func:`torch.distributed.all_reduce` in place of Horovod.

    Each process :math:`r` of :math:`P` computes the gradient :math:`g_r` of its own loss; every process then
    steps with

    .. math::

        \bar g = \frac1P \sum_{r=1}^P g_r .

    With each process taking :math:`M/P` examples of a global minibatch of :math:`M` (its ``pyro.plate``
    subsampled to its local batch, so its ELBO is :math:`\frac{N}{M/P}\sum_{i \in B_r}\log p(y_i|x_i,w) -
    \mathrm{KL}`), :math:`\bar g` is exactly the gradient of the global minibatch ELBO
    :math:`\frac{N}{M}\sum_{i \in B}\log p(y_i|x_i,w) - \mathrm{KL}`. The wrapped optimizer starts from the same
    parameters and sees the same gradients in every process, so the parameters stay identical across processes;
    broadcast them from one process before the first step (as DDP does) if their initialisations may differ.

    The parameters are sorted by their param-store name, so that every process reduces them in the same order
    whatever order :class:`~pyro.infer.SVI` passes them in, and their gradients are reduced in one flat buffer per
    dtype and device (one :func:`~torch.distributed.all_reduce` each). A parameter without a gradient counts as a
    zero gradient; it stays without one (and unchanged) only if it has none in every process. Every process must
    pass the same parameters, as SVI does when every process runs the same model and guide.

    Learning-rate schedules work as usual: wrap a :class:`~pyro.optim.PyroLRScheduler` (e.g.
    :func:`pyro.optim.LambdaLR`); :meth:`step`, :meth:`get_state` and :meth:`set_state` (hence ``save`` and ``load``)
    act on the wrapped optimizer, so checkpoints are interchangeable with those of the wrapped optimizer.

    Example (in every process, e.g. under ``torchrun``)::

        torch.distributed.init_process_group("gloo")
        optim = DistributedOptimizer(pyro.optim.Adam({"lr": 1e-3}))
        svi = SVI(model, guide, optim, TraceMeanField_ELBO())
        for x, y in shard_of_the_data:  # e.g. with torch.utils.data.DistributedSampler
            svi.step(x, y)

    :param ~pyro.optim.PyroOptim pyro_optim: The optimizer to wrap.
    :param process_group: The process group to average over (default: the default group).
    :raises RuntimeError: if torch.distributed has no initialised process group, or the group has a single process
        (use ``pyro_optim`` itself there: averaging over one process would only cost time).
    """

    def __init__(self, pyro_optim: PyroOptim, *, process_group: "dist.ProcessGroup | None" = None):
        if not isinstance(pyro_optim, PyroOptim):
            raise TypeError(
                f"DistributedOptimizer wraps a pyro.optim.PyroOptim (e.g. pyro.optim.Adam({{...}})); "
                f"got {type(pyro_optim).__name__}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedOptimizer needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group first (e.g. under torchrun), or use the wrapped optimizer "
                "directly in a single process"
            )
        world_size = dist.get_world_size(process_group)
        if world_size < 2:
            raise RuntimeError(
                f"DistributedOptimizer: the process group has {world_size} process; there is nothing to average "
                "over, so use the wrapped optimizer directly"
            )
        # Deliberately no PyroOptim.__init__: every per-parameter optimizer lives in the wrapped optimizer.
        self.pyro_optim = pyro_optim
        self.process_group = process_group
        self.world_size = world_size

    def __call__(self, params: list | ValuesView, *args, **kwargs) -> None:
        """
        Averages the gradients of ``params`` over the processes, then steps the wrapped optimizer.

        :param params: The unconstrained parameters to update (as :class:`~pyro.infer.SVI` passes them).
        """
        params = sorted(params, key=pyro.get_param_store().param_name)
        self._average_gradients(params)
        self.pyro_optim(params, *args, **kwargs)

    def _average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        groups: dict[tuple, list] = {}  # ordered by the first parameter of each dtype and device: same everywhere
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), group in groups.items():
            grads = [torch.zeros(p.numel(), dtype=dtype, device=device) if p.grad is None else p.grad for p in group]
            has_grad = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=device)
            flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            # counts of processes with a gradient are small integers: exact in any floating dtype
            has_grad = flat[-len(group) :] > 0
            flat = flat[: -len(group)].div_(self.world_size)
            for p, value, present in zip(group, flat.split([p.numel() for p in group]), has_grad.tolist()):
                if not present:
                    continue
                value = value.view(p.shape)
                if p.grad is None:
                    p.grad = value.clone()
                else:
                    p.grad.copy_(value)

    def step(self, *args, **kwargs) -> None:
        """Steps the wrapped learning-rate scheduler (:meth:`pyro.optim.PyroLRScheduler.step`)."""
        if not hasattr(self.pyro_optim, "step"):
            raise AttributeError(
                f"DistributedOptimizer.step advances a learning-rate schedule, and the wrapped "
                f"{type(self.pyro_optim).__name__} has none: wrap a pyro.optim.PyroLRScheduler (e.g. "
                "pyro.optim.LambdaLR) to schedule the learning rate"
            )
        self.pyro_optim.step(*args, **kwargs)

    def get_state(self) -> dict:
        """The wrapped optimizer's state (:meth:`pyro.optim.PyroOptim.get_state`)."""
        return self.pyro_optim.get_state()

    def set_state(self, state_dict: dict) -> None:
        """Sets the wrapped optimizer's state (:meth:`pyro.optim.PyroOptim.set_state`)."""
        self.pyro_optim.set_state(state_dict)

    @property
    def optim_objs(self) -> dict:
        """The wrapped optimizer's per-parameter torch optimizers (or schedulers)."""
        return self.pyro_optim.optim_objs
