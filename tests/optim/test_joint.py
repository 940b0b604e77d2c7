# SPDX-License-Identifier: Apache-2.0
import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

import pyro_vdrop
from pyro_vdrop.optim import JointLRScheduler, JointOptim

NUM_DATA = 200


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_DATA, 5, generator=g).to(dtype)
    y = (x[:, 0] - 2 * x[:, 1] > 0).long()
    return x, y


def _make_svi(optim):
    """A bayesianized 5-4-2 net, AutoVariationalDropout, LRT: a realistic set of parameters (locs, log α, biases)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = pyro_vdrop.nn.bayesianize(net, num_data=NUM_DATA)
    guide = pyro_vdrop.infer.AutoVariationalDropout(model)
    return SVI(model, guide, optim, TraceMeanField_ELBO())


def _train(svi, steps, x, y, *, start=0, seed=1, schedule=None):
    if seed is not None:
        pyro.set_rng_seed(seed)
    with pyro_vdrop.poutine.local_reparam():
        for i in range(start, start + steps):
            batch = slice(20 * (i % 10), 20 * (i % 10) + 20)
            svi.step(x[batch], y[batch])
            if schedule is not None:
                schedule.step()


def _params():
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("optimizer, args", [(torch.optim.Adam, {"lr": 0.01}), (torch.optim.SGD, {"lr": 1e-3})])
def test_same_trajectory_as_pyro_optim(optimizer, args):
    # Elementwise optimizers give bitwise the same updates with one torch optimizer as with one per parameter.
    x, y = _data()
    _train(_make_svi(pyro.optim.PyroOptim(optimizer, args)), 30, x, y)
    expected = _params()
    optim = JointOptim(optimizer, args)
    _train(_make_svi(optim), 30, x, y)
    actual = _params()
    _assert_equal(actual, expected)
    assert len(optim.optimizer.param_groups) == 1
    assert set(optim.optim_objs.values()) == {optim.optimizer}
    # the step moved every parameter (the comparison is not between untouched initial values)
    with pyro_vdrop.poutine.local_reparam():
        _make_svi(pyro.optim.PyroOptim(optimizer, args)).evaluate_loss(x, y)  # creates the initial parameters
    initial = _params()
    assert all(not torch.equal(initial[n], actual[n]) for n in actual)


def test_gradients_are_none_after_step_unless_asked():
    x, y = _data()
    _train(_make_svi(JointOptim(torch.optim.Adam, {"lr": 0.01})), 2, x, y)
    assert all(p.grad is None for _, p in pyro.get_param_store().named_parameters())
    _train(_make_svi(JointOptim(torch.optim.Adam, {"lr": 0.01}, set_to_none=False)), 2, x, y)
    grads = [p.grad for _, p in pyro.get_param_store().named_parameters()]
    assert all(g is not None and not g.any() for g in grads)  # SVI's zero_grads filled them


@pytest.mark.parametrize("direction", ["pyro_to_joint", "joint_to_pyro"])
def test_state_interchangeable_with_pyro_optim(direction, tmp_path):
    # 10 steps with one optimizer, save, load into the other, 10 more: the same as 20 steps with pyro.optim.Adam.
    x, y = _data()
    _train(_make_svi(pyro.optim.Adam({"lr": 0.01})), 20, x, y)
    expected = _params()

    first, second = pyro.optim.Adam({"lr": 0.01}), JointOptim(torch.optim.Adam, {"lr": 0.01})
    if direction == "joint_to_pyro":
        first, second = second, first
    _assert_equal(_interrupted_run(first, second, 10, x, y, tmp_path), expected)


def _interrupted_run(first, second, steps, x, y, tmp_path, schedule=False):
    """``steps`` steps with the optimizer ``first``, save its state, load it into ``second``, ``steps`` more steps
    (same noise as an uninterrupted run): the parameters at the end."""
    _train(_make_svi(first), steps, x, y, schedule=first if schedule else None)
    params = _params()
    rng = pyro.util.get_rng_state()
    first.save(tmp_path / "optim.pt")

    svi = _make_svi(second)
    with pyro_vdrop.poutine.local_reparam():
        svi.evaluate_loss(x, y)  # creates the parameters; then copy in place, as pyro-vdrop fit --resume does
    with torch.no_grad():
        for name, p in pyro.get_param_store().named_parameters():
            p.copy_(params[name])
    second.load(tmp_path / "optim.pt")
    pyro.util.set_rng_state(rng)
    _train(svi, steps, x, y, start=steps, seed=None, schedule=second if schedule else None)
    return _params()


def test_state_waits_for_its_parameters():
    # set_state before the parameters exist: get_state keeps it (nothing loaded is lost), the first step uses it.
    x, y = _data()
    source = pyro.optim.Adam({"lr": 0.01})
    _train(_make_svi(source), 3, x, y)
    saved = source.get_state()
    optim = JointOptim(torch.optim.Adam, {"lr": 0.01})
    optim.set_state(saved)
    assert optim.get_state().keys() == saved.keys()
    _train(_make_svi(optim), 1, x, y)
    steps = {name: s["state"][0]["step"].item() for name, s in optim.get_state().items()}
    assert steps == {name: 4.0 for name in saved}


def test_callable_optim_args_give_param_groups():
    x, y = _data()

    def args(name):
        return {"lr": 0.1 if "log_alpha" in name else 0.01}

    optim = JointOptim(torch.optim.Adam, args)
    _train(_make_svi(optim), 1, x, y)
    store = pyro.get_param_store()
    lrs = {store.param_name(p): group["lr"] for group in optim.optimizer.param_groups for p in group["params"]}
    assert len(optim.optimizer.param_groups) == 2
    assert lrs and all(lr == (0.1 if "log_alpha" in name else 0.01) for name, lr in lrs.items())
    # the same per-parameter arguments as pyro.optim.Adam(args)
    _train(_make_svi(optim := JointOptim(torch.optim.Adam, args)), 5, x, y)
    actual = _params()
    _train(_make_svi(pyro.optim.Adam(args)), 5, x, y)
    _assert_equal(actual, _params())


def test_gradient_clipping_matches_pyro():
    x, y = _data()
    _train(_make_svi(JointOptim(torch.optim.SGD, {"lr": 0.1}, {"clip_norm": 0.01})), 5, x, y)
    clipped = _params()
    _train(_make_svi(pyro.optim.SGD({"lr": 0.1}, {"clip_norm": 0.01})), 5, x, y)
    _assert_equal(clipped, _params())
    _train(_make_svi(pyro.optim.SGD({"lr": 0.1})), 5, x, y)
    unclipped = _params()
    assert any(not torch.equal(clipped[n], unclipped[n]) for n in clipped)


def test_only_passed_parameters_are_updated():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    optim = JointOptim(torch.optim.SGD, {"lr": 0.5}, set_to_none=False)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    optim([a, b])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    optim([a])  # b has a gradient but is not passed: unchanged, and its gradient is kept
    assert torch.equal(a.detach(), torch.zeros(3))
    assert torch.equal(b.detach(), torch.full((3,), 0.5))
    assert torch.equal(b.grad, torch.ones(3))


def test_float64_parameters():
    x, y = _data(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    net = torch.nn.Linear(5, 2).double()
    model = pyro_vdrop.nn.bayesianize(net, num_data=NUM_DATA)
    guide = pyro_vdrop.infer.AutoVariationalDropout(model)
    optim = JointOptim(torch.optim.Adam, {"lr": 0.01})
    _train(SVI(model, guide, optim, TraceMeanField_ELBO()), 3, x, y)
    assert all(p.dtype == torch.float64 for g in optim.optimizer.param_groups for p in g["params"])
    assert all(s["exp_avg"].dtype == torch.float64 for s in optim.optimizer.state.values())


def test_errors():
    with pytest.raises(TypeError, match="optim_constructor"):
        JointOptim("adam", {"lr": 0.1})
    with pytest.raises(TypeError, match="optim_args"):
        JointOptim(torch.optim.Adam, [0.1])
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    optim = JointOptim(lambda params, **kw: torch.optim.lr_scheduler.StepLR(torch.optim.SGD(params), 1), {})
    with pytest.raises(TypeError, match="scheduler"):
        optim([p])


def test_scheduler_state_is_refused():
    x, y = _data()
    sched = pyro.optim.StepLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.01}, "step_size": 1})
    _train(_make_svi(sched), 1, x, y)
    optim = JointOptim(torch.optim.Adam, {"lr": 0.01})
    optim.set_state(sched.get_state())
    with pytest.raises(ValueError, match="JointLRScheduler"):
        _train(_make_svi(optim), 1, x, y)


def _lambda_lr(kind, lr=0.01):
    """pyro.optim.LambdaLR or JointLRScheduler with the same arguments: lr halves every 5 steps."""
    args = {"optimizer": torch.optim.Adam, "optim_args": lr if isinstance(lr, dict) or callable(lr) else {"lr": lr}}
    args["lr_lambda"] = lambda step: 0.5 ** (step // 5)
    if kind == "pyro":
        return pyro.optim.LambdaLR(args)
    return JointLRScheduler(torch.optim.lr_scheduler.LambdaLR, args)


def test_scheduler_same_trajectory_as_pyro():
    x, y = _data()
    sched = _lambda_lr("pyro")
    _train(_make_svi(sched), 12, x, y, schedule=sched)
    expected = _params()
    sched = _lambda_lr("joint")
    _train(_make_svi(sched), 12, x, y, schedule=sched)
    _assert_equal(_params(), expected)
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)  # the schedule ran: 12 steps
    # without the schedule the parameters differ, so the comparison above sees the schedule
    _train(_make_svi(JointOptim(torch.optim.Adam, {"lr": 0.01})), 12, x, y)
    assert any(not torch.equal(expected[n], v) for n, v in _params().items())


def test_scheduler_callable_args_give_one_schedule_per_group():
    x, y = _data()

    def args(name):
        return {"lr": 0.1 if "log_alpha" in name else 0.01}

    sched = _lambda_lr("pyro", args)
    _train(_make_svi(sched), 7, x, y, schedule=sched)
    expected = _params()
    sched = _lambda_lr("joint", args)
    _train(_make_svi(sched), 7, x, y, schedule=sched)
    _assert_equal(_params(), expected)
    assert sorted(g["lr"] for g in sched.optimizer.param_groups) == pytest.approx([0.005, 0.05])


@pytest.mark.parametrize("direction", ["pyro_to_joint", "joint_to_pyro"])
def test_scheduler_state_interchangeable_with_pyro(direction, tmp_path):
    x, y = _data()
    sched = _lambda_lr("pyro")
    _train(_make_svi(sched), 16, x, y, schedule=sched)
    expected = _params()

    first, second = _lambda_lr("pyro"), _lambda_lr("joint")
    if direction == "joint_to_pyro":
        first, second = second, first
    # 8 steps: it stops between two halvings of the learning rate
    _assert_equal(_interrupted_run(first, second, 8, x, y, tmp_path, schedule=True), expected)


def test_scheduler_errors():
    with pytest.raises(ValueError, match="'optimizer'"):
        JointLRScheduler(torch.optim.lr_scheduler.LambdaLR, {"optim_args": {"lr": 0.1}})
    with pytest.raises(TypeError, match="scheduler_constructor"):
        JointLRScheduler("LambdaLR", {"optimizer": torch.optim.Adam, "optim_args": {}})
    sched = _lambda_lr("joint")
    with pytest.raises(RuntimeError, match="no schedule yet"):
        sched.step()
    # a parameter that needs a group of its own after the schedule started
    pyro.clear_param_store()
    a, b = (pyro.param(name, torch.ones(2)).unconstrained() for name in "ab")
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    sched = JointLRScheduler(
        torch.optim.lr_scheduler.LambdaLR,
        {"optimizer": torch.optim.SGD, "optim_args": lambda name: {"lr": 0.1}, "lr_lambda": lambda step: 1.0},
    )
    sched([a])
    sched.pt_optim_args = lambda name: {"lr": 0.2}
    with pytest.raises(ValueError, match="appeared after the schedule started"):
        sched([a, b])
    # a plain optimizer's state is refused, and a scheduler's state by JointOptim
    x, y = _data()
    plain = pyro.optim.Adam({"lr": 0.01})
    _train(_make_svi(plain), 1, x, y)
    sched = _lambda_lr("joint")
    sched.set_state(plain.get_state())
    with pytest.raises(ValueError, match="not a scheduler's"):
        _train(_make_svi(sched), 1, x, y)


def test_no_parameters_is_a_no_op():
    # SVI passes an empty set when the model and guide have no parameters, as pyro.optim accepts
    optim = JointOptim(torch.optim.Adam, {"lr": 0.1})
    optim([])
    assert optim.optimizer is None and optim.get_state() == {}


@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_foreach_and_fused_adam_pass_through(flag, tmp_path):
    # torch's multi-tensor (foreach) and fused Adam reach the one torch optimizer and follow the default's trajectory
    # to float rounding (not bitwise: their ops are ordered differently); their state loads into pyro.optim.Adam.
    x, y = _data()
    _train(_make_svi(JointOptim(torch.optim.Adam, {"lr": 0.01})), 20, x, y)
    expected = _params()
    optim = JointOptim(torch.optim.Adam, {"lr": 0.01, flag: True})
    _train(_make_svi(optim), 20, x, y)
    assert [g[flag] for g in optim.optimizer.param_groups] == [True]
    actual = _params()
    assert actual.keys() == expected.keys()
    for name in actual:
        assert torch.allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6), name
    first = JointOptim(torch.optim.Adam, {"lr": 0.01, flag: True})
    _assert_equal_close(_interrupted_run(first, pyro.optim.Adam({"lr": 0.01}), 10, x, y, tmp_path), expected)


def _assert_equal_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


class _NoFused(torch.optim.SGD):
    """An optimizer whose fused path this torch build refuses, as torch < 2.4 does on CPU."""

    def __init__(self, params, fused=False):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        super().__init__(params, lr=0.1)


def test_supports_fused():
    fused_cpu = torch.__version__ >= "2.4"  # torch's fused CPU kernels of Adam and SGD came in 2.4
    assert pyro_vdrop.optim.supports_fused(torch.optim.Adam, "cpu") is fused_cpu
    assert pyro_vdrop.optim.supports_fused(torch.optim.Adam, torch.device("cpu"), torch.float64) is fused_cpu
    assert pyro_vdrop.optim.supports_fused(_NoFused, "cpu") is False
    assert pyro_vdrop.optim.supports_fused(torch.optim.LBFGS, "cpu") is False  # no `fused` argument at all
