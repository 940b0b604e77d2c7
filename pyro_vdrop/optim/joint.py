# SPDX-License-Identifier: Apache-2.0

from collections.abc import Callable, ValuesView

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.optim.optim import is_scheduler


def _same_hyperparameters(a: dict, b: dict) -> bool:
    # tensors (e.g. a tensor lr) count as equal only if they are the same object
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if x is y:
            continue
        if torch.is_tensor(x) or torch.is_tensor(y) or type(x) is not type(y) or x != y:
            return False
    return True


def supports_fused(optimizer: Callable, device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
    """
    Whether ``optimizer(params, fused=True)`` (torch's one-kernel update over all parameters, e.g. of
    :class:`torch.optim.Adam`) runs with this torch build for parameters of ``dtype`` on ``device``: CUDA since torch
    2.0, CPU since torch 2.4. It builds the optimizer for one scalar parameter and takes a step to find out.

    Example::

        args = {"lr": 1e-3, "fused": supports_fused(torch.optim.Adam, "cpu")}
        optim = pyro_vdrop.optim.JointOptim(torch.optim.Adam, args)

    :param optimizer: A :class:`torch.optim.Optimizer` class with a ``fused`` argument.
    :param device: The parameters' device.
    :param dtype: The parameters' floating dtype.
    """
    p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    try:
        probe = optimizer([p], fused=True)
        p.grad = torch.ones_like(p)
        probe.step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


class JointOptim(PyroOptim):
    r"""
    A :class:`~pyro.optim.PyroOptim` that keeps **one** torch optimizer for all the parameters it is given,
    where :class:`~pyro.optim.PyroOptim` (hence ``pyro.optim.Adam`` and friends) keeps one torch optimizer per
    parameter. It computes the same updates (Adam, SGD, ... are elementwise, so the trajectories are bitwise the
    same) in one ``optimizer.step()`` call per SVI step instead of one per parameter, and, with
    ``set_to_none=True``, leaves the gradients at ``None`` after the step (as :meth:`torch.optim.Optimizer.zero_grad`
    does by default) so that the next backward pass writes them instead of adding to zeros that
    :class:`~pyro.infer.SVI` filled in. Both save time in every step: 1.0–1.8 ms (7–12%) of an MLP
    784-300-100-10 step at batch 100 on CPU (``python benchmarks/step_time.py``).

    Parameters are added as they appear, as with :class:`~pyro.optim.PyroOptim`: each new parameter joins the
    param group of the same hyperparameters (one group for a dict ``optim_args``; one per distinct result of a
    callable ``optim_args``), so per-parameter learning rates work as in Pyro. Only the parameters passed in a
    call are updated (the gradients of the others are hidden from the step). Gradient clipping (``clip_args``)
    is per parameter, as in Pyro.

    :meth:`get_state` returns, for every parameter, the state dict a one-parameter torch optimizer would have:
    exactly the format of :meth:`pyro.optim.PyroOptim.get_state`, so states (and checkpoints) move freely between
    ``JointOptim(torch.optim.Adam, args)`` and ``pyro.optim.Adam(args)``. State set by :meth:`set_state` for
    parameters that have not appeared yet waits for them and is kept by :meth:`get_state` meanwhile.

    Example::

        optim = pyro_vdrop.optim.JointOptim(torch.optim.Adam, {"lr": 1e-3})
        svi = SVI(model, guide, optim, TraceMeanField_ELBO())

    :param optim_constructor: A :class:`torch.optim.Optimizer` class (e.g. ``torch.optim.Adam``), called once
        with a list of param groups and the keyword arguments of the first parameter.
    :param optim_args: The optimizer's keyword arguments: a dict, or a callable that takes a parameter's name
        (as :meth:`torch.nn.Module.named_parameters` writes it) and returns a dict, as in Pyro.
    :param clip_args: Optional ``clip_norm`` / ``clip_value`` per parameter (a dict or a callable), as in Pyro.
    :param bool set_to_none: Set the gradients of the stepped parameters to ``None`` after the step (default).
        ``False`` leaves them to :class:`~pyro.infer.SVI`, which fills them with zeros.
    """

    def __init__(
        self,
        optim_constructor: Callable,
        optim_args: dict | Callable[..., dict],
        clip_args: dict | Callable[..., dict] | None = None,
        *,
        set_to_none: bool = True,
    ):
        if not callable(optim_constructor):
            raise TypeError(
                f"JointOptim: optim_constructor must be a torch.optim.Optimizer class such as torch.optim.Adam, "
                f"got {optim_constructor!r}"
            )
        if not (callable(optim_args) or isinstance(optim_args, dict)):
            raise TypeError(
                "JointOptim: optim_args must be a dict of the optimizer's keyword arguments or a callable that "
                f"returns one, got {type(optim_args).__name__}"
            )
        super().__init__(optim_constructor, optim_args, clip_args)
        self.set_to_none = set_to_none
        #: The torch optimizer of all parameters (``None`` until the first call).
        self.optimizer: torch.optim.Optimizer | None = None

    def __call__(self, params: list | ValuesView, *args, **kwargs) -> None:
        """
        Takes one step of the torch optimizer for ``params``, adding those it has not seen yet.

        :param params: The unconstrained parameters to update (as :class:`~pyro.infer.SVI` passes them).
        """
        params = list(params)
        new = [p for p in params if p not in self.optim_objs]
        if new:
            self._add_params(new)
        if not params:  # a model and guide without parameters: nothing to step (as with pyro.optim)
            return
        for p in params:
            clip = self.grad_clip[p]
            if clip is not None:
                clip(p)
        hidden = []
        if len(params) != len(self.optim_objs):  # hide the gradients of parameters not passed in this call
            passed = set(params)
            for p in self.optim_objs:
                if p not in passed and p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            self.optimizer.step(*args, **kwargs)
        finally:
            for p, grad in hidden:
                p.grad = grad
        if self.set_to_none:
            for p in params:
                p.grad = None

    def _add_params(self, params: list) -> None:
        store = pyro.get_param_store()
        for p in params:
            args = self._get_optim_args(p)
            name = store.param_name(p)
            saved = self._state_waiting_to_be_consumed.pop(name, None) if name is not None else None
            saved = self._optimizer_part(p, name, saved)
            state = {}
            if saved is None:
                hyper = dict(args)
            else:
                # torch's own load_state_dict casts the saved state to the parameter's dtype and device
                one = self._make_optimizer([p], args)
                one.load_state_dict(saved)
                state = one.state.get(p, {})
                hyper = {k: v for k, v in one.param_groups[0].items() if k != "params"}
            if self.optimizer is None:
                self.optimizer = self._make_optimizer([{"params": [p], **hyper}], args)
            else:
                self._join_group(p, hyper)
            if state:
                self.optimizer.state[p] = state
            self.optim_objs[p] = self.optimizer
            self.grad_clip[p] = self._get_grad_clip(p)

    def _make_optimizer(self, params: list, args: dict) -> torch.optim.Optimizer:
        optimizer = self.pt_optim_constructor(params, **args)
        if is_scheduler(optimizer) or not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"{type(self).__name__} needs a torch.optim.Optimizer class (e.g. torch.optim.Adam); the constructor "
                f"returned {type(optimizer).__name__}, a learning-rate scheduler"
            )
        return optimizer

    def _optimizer_part(self, p, name, saved):
        """The one-parameter optimizer state dict in a parameter's saved state (``None`` if there is none)."""
        if saved is not None and "scheduler" in saved:
            raise ValueError(
                f"{type(self).__name__}: the saved state of parameter {name!r} is a learning-rate scheduler's "
                "(pyro.optim.PyroLRScheduler); use pyro_vdrop.optim.JointLRScheduler to load it"
            )
        return saved

    @staticmethod
    def _signature(hyper: dict) -> dict:
        """What makes two param groups one: their hyperparameters."""
        return {k: v for k, v in hyper.items() if k != "params"}

    def _join_group(self, p: torch.Tensor, hyper: dict) -> None:
        hyper = {**self.optimizer.defaults, **hyper}  # as torch fills a new group
        signature = self._signature(hyper)
        for group in self.optimizer.param_groups:
            if _same_hyperparameters(self._signature(group), signature):
                group["params"].append(p)
                return
        self._new_group(p, hyper)

    def _new_group(self, p: torch.Tensor, hyper: dict) -> None:
        self.optimizer.add_param_group({"params": [p], **hyper})

    def get_state(self) -> dict:
        """
        The state of every parameter, by param-store name, as the state dict of a one-parameter torch
        optimizer (the format of :meth:`pyro.optim.PyroOptim.get_state`), plus any state set by
        :meth:`set_state` whose parameters have not appeared yet.
        """
        states = dict(self._state_waiting_to_be_consumed)
        for name, _, entry in self._param_states():
            states[name] = entry
        return states

    def _param_states(self):
        """(name, group index, one-parameter optimizer state dict) of every parameter still in the param store."""
        if self.optimizer is None:
            return
        store = pyro.get_param_store()
        for index, group in enumerate(self.optimizer.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                name = store.param_name(p)
                if name is None:  # removed from the param store: nothing can ask for it again
                    continue
                state = self.optimizer.state.get(p)
                yield name, index, {"state": {0: state} if state else {}, "param_groups": [{**hyper, "params": [0]}]}


class JointLRScheduler(JointOptim):
    r"""
    :class:`JointOptim` with a learning-rate schedule: one torch optimizer and one
    :mod:`torch.optim.lr_scheduler` scheduler for all parameters, where :class:`~pyro.optim.PyroLRScheduler`
    (``pyro.optim.LambdaLR`` and friends) keeps a pair per parameter. It takes the same arguments as
    :class:`~pyro.optim.PyroLRScheduler`, gives the same updates when every parameter appears at the first step (as
    with :class:`~pyro.infer.SVI` and an autoguide), and its :meth:`get_state` has Pyro's per-parameter
    ``{"scheduler": ..., "optimizer": ...}`` format, so states and checkpoints move freely between the two.

    Calling it steps the optimizer (as :class:`JointOptim`); :meth:`step` advances the schedule. The scheduler is
    created at the first call and acts on param groups: a parameter that appears after the first step joins the
    group of its hyperparameters at the group's current learning rate (in Pyro it would start a schedule of its
    own); one that needs a new group then raises a :class:`ValueError`.

    Example::

        scheduler = pyro_vdrop.optim.JointLRScheduler(
            torch.optim.lr_scheduler.LambdaLR,
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-3}, "lr_lambda": lambda step: 0.99**step},
        )
        svi = SVI(model, guide, scheduler, TraceMeanField_ELBO())
        for x, y in batches:
            svi.step(x, y)
            scheduler.step()

    :param scheduler_constructor: A :mod:`torch.optim.lr_scheduler` class, e.g. ``LambdaLR``.
    :param dict optim_args: ``{"optimizer": torch optimizer class, "optim_args": its keyword arguments (a dict or a
        callable of the parameter name, as in :class:`JointOptim`), **the scheduler's keyword arguments}``.
    :param clip_args: As in :class:`JointOptim`.
    :param bool set_to_none: As in :class:`JointOptim`.
    """

    def __init__(
        self,
        scheduler_constructor: Callable,
        optim_args: dict,
        clip_args: dict | Callable[..., dict] | None = None,
        *,
        set_to_none: bool = True,
    ):
        if not isinstance(optim_args, dict) or "optimizer" not in optim_args or "optim_args" not in optim_args:
            raise ValueError(
                "JointLRScheduler: optim_args must be a dict with the keys 'optimizer' (a torch optimizer class) "
                "and 'optim_args' (its arguments), plus the scheduler's arguments, as for pyro.optim.PyroLRScheduler"
            )
        if not callable(scheduler_constructor):
            raise TypeError(
                "JointLRScheduler: scheduler_constructor must be a torch.optim.lr_scheduler class such as LambdaLR, "
                f"got {scheduler_constructor!r}"
            )
        optim_args = dict(optim_args)
        optimizer = optim_args.pop("optimizer")
        optimizer_args = optim_args.pop("optim_args")
        super().__init__(optimizer, optimizer_args, clip_args, set_to_none=set_to_none)
        self.pt_scheduler_constructor = scheduler_constructor
        self.kwargs = optim_args
        #: The torch scheduler of :attr:`optimizer` (``None`` until the first call).
        self.scheduler = None
        self._saved_schedules: list = []  # (param, name, scheduler state, optimizer param group) of loaded ones

    def step(self, *args, **kwargs) -> None:
        """Advances the schedule (the arguments of the torch scheduler's ``step``, e.g. a metric)."""
        if self.scheduler is None:
            raise RuntimeError(
                "JointLRScheduler.step: there is no schedule yet; take an SVI step (which creates the optimizer and "
                "its scheduler) before advancing the schedule"
            )
        self.scheduler.step(*args, **kwargs)

    def _add_params(self, params: list) -> None:
        super()._add_params(params)
        if self.scheduler is None:  # the first call: the scheduler takes the groups made so far
            self._start_schedule()

    def _optimizer_part(self, p, name, saved):
        if saved is None:
            return None
        if "scheduler" not in saved or "optimizer" not in saved:
            raise ValueError(
                f"JointLRScheduler: the saved state of parameter {name!r} is not a scheduler's (it has no "
                "'scheduler' and 'optimizer' entries); load it with pyro_vdrop.optim.JointOptim"
            )
        if self.scheduler is None:  # once the schedule runs, a late parameter follows its group's schedule
            self._saved_schedules.append((p, name, saved["scheduler"], saved["optimizer"]["param_groups"][0]))
        return saved["optimizer"]

    @staticmethod
    def _signature(hyper: dict) -> dict:
        # the schedule moves "lr": a group is known by its initial learning rate
        signature = {k: v for k, v in hyper.items() if k not in ("params", "initial_lr")}
        if "initial_lr" in hyper:
            signature["lr"] = hyper["initial_lr"]
        return signature

    def _new_group(self, p: torch.Tensor, hyper: dict) -> None:
        if self.scheduler is not None:
            name = pyro.get_param_store().param_name(p)
            raise ValueError(
                f"JointLRScheduler: parameter {name!r} appeared after the schedule started and needs a param group "
                f"of its own ({self._signature(hyper)}), which a running torch scheduler cannot take; create every "
                "parameter before the first step (e.g. call the guide once) or use pyro.optim.PyroLRScheduler"
            )
        super()._new_group(p, hyper)

    def _start_schedule(self) -> None:
        groups = self.optimizer.param_groups
        self.scheduler = self.pt_scheduler_constructor(self.optimizer, **self.kwargs)
        if not self._saved_schedules:
            return
        # one saved scheduler state per group (they agree within a group), merged into the joint scheduler's
        by_group: dict[int, tuple] = {}
        index_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        for p, name, state, group in self._saved_schedules:
            by_group.setdefault(index_of[id(p)], (name, state, group))
        self._saved_schedules = []
        if len(by_group) != len(groups):
            raise ValueError(
                "JointLRScheduler: a saved state was loaded for some param groups but not others; load the state of "
                "every parameter, or of none"
            )
        merged = {}
        first_name, first_state, _ = by_group[0]
        for key, value in first_state.items():
            if isinstance(value, list) and len(value) == 1:  # per-group entries (base_lrs, _last_lr, lr_lambdas)
                merged[key] = [by_group[i][1][key][0] for i in range(len(groups))]
                continue
            for name, state, _ in by_group.values():
                if state.get(key) != value:
                    raise ValueError(
                        f"JointLRScheduler: the saved schedules of {first_name!r} and {name!r} differ in {key!r} "
                        f"({value!r} vs {state.get(key)!r}); one torch scheduler cannot continue both"
                    )
            merged[key] = value
        self.scheduler.load_state_dict(merged)
        for i, group in enumerate(groups):  # the scheduler's construction reset the learning rates
            group["lr"] = by_group[i][2]["lr"]

    def get_state(self) -> dict:
        """
        Pyro's :class:`~pyro.optim.PyroLRScheduler` format: for every parameter, ``{"scheduler": the state dict of a
        one-group scheduler, "optimizer": the state dict of a one-parameter optimizer}``, plus any state set by
        :meth:`set_state` whose parameters have not appeared yet.
        """
        states = dict(self._state_waiting_to_be_consumed)
        if self.scheduler is None:
            return states
        joint = self.scheduler.state_dict()
        num_groups = len(self.optimizer.param_groups)
        for name, index, entry in self._param_states():
            one = {k: [v[index]] if isinstance(v, list) and len(v) == num_groups else v for k, v in joint.items()}
            states[name] = {"scheduler": one, "optimizer": entry}
        return states
