# SPDX-License-Identifier: Apache-2.0
import socket
from datetime import timedelta

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_vdrop.optim import DistributedOptimizer, JointOptim

WORLD_SIZE = 2
LR = 0.5
SHAPES = {
    "a": ((3, 2), torch.float32),
    "b": ((4,), torch.float64),
    "c": ((2,), torch.float32),
    "d": ((1,), torch.float32),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initial(name):
    shape, dtype = SHAPES[name]
    return torch.arange(1.0, 1.0 + torch.Size(shape).numel(), dtype=dtype).reshape(shape)


def _grads(rank):
    """Each process's gradients: different in every process; "c" has none in process 1, "d" none anywhere."""
    g = torch.Generator().manual_seed(100 + rank)
    grads = {name: torch.randn(shape, generator=g, dtype=dtype) for name, (shape, dtype) in SHAPES.items()}
    del grads["d"]
    if rank == 1:
        del grads["c"]
    return grads


def _mean_grad(name):
    """The mean over processes, a missing gradient counting as zero (None if no process has one)."""
    grads = [_grads(rank).get(name) for rank in range(WORLD_SIZE)]
    if all(g is None for g in grads):
        return None
    return sum(g for g in grads if g is not None) / WORLD_SIZE


def _set_grads(params, rank):
    grads = _grads(rank)
    for name, p in params.items():
        p.grad = grads[name].clone() if name in grads else None


def _fresh_params(rank):
    pyro.clear_param_store()
    params = {name: pyro.param(name, _initial(name)).unconstrained() for name in SHAPES}
    _set_grads(params, rank)
    return params


def _worker(rank, port, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        # 1. plain SGD; the processes pass their parameters in different orders
        params = _fresh_params(rank)
        order = list(params.values()) if rank == 0 else list(reversed(params.values()))
        optim = DistributedOptimizer(pyro.optim.SGD({"lr": LR}))
        optim(order)
        results["sgd"] = {name: (p.detach().clone(), p.grad) for name, p in params.items()}
        try:
            optim.step()
        except AttributeError as e:
            results["step_error"] = str(e)

        # 2. a learning-rate schedule: lr 1, then 1/2 after step(); its state carries over to a new wrapper
        def schedule():
            return pyro.optim.LambdaLR(
                {"optimizer": torch.optim.SGD, "optim_args": {"lr": 1.0}, "lr_lambda": lambda step: 0.5**step}
            )

        params = _fresh_params(rank)
        optim = DistributedOptimizer(schedule())
        optim(params.values())
        optim.step()
        _set_grads(params, rank)
        optim(params.values())
        optim.step()
        results["scheduled"] = {name: p.detach().clone() for name, p in params.items()}
        state = optim.get_state()
        resumed = DistributedOptimizer(schedule())
        resumed.set_state(state)
        _set_grads(params, rank)
        resumed(params.values())
        results["resumed"] = {name: p.detach().clone() for name, p in params.items()}

        # 3. wrapping JointOptim (one torch optimizer for all parameters)
        params = _fresh_params(rank)
        DistributedOptimizer(JointOptim(torch.optim.SGD, {"lr": LR}))(params.values())
        results["joint"] = {name: p.detach().clone() for name, p in params.items()}
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()  # both done communicating before either tears the group down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_gradients_are_averaged_over_processes(two_process_results):
    for rank, results in enumerate(two_process_results):
        for name, (value, grad) in results["sgd"].items():
            mean = _mean_grad(name)
            if mean is None:  # no gradient anywhere: untouched
                assert grad is None and torch.equal(value, _initial(name)), (rank, name)
                continue
            # the exact mean of the processes' gradients, also where one process had none
            assert torch.allclose(grad, mean, rtol=1e-6, atol=1e-7), (rank, name)
            assert value.dtype == _initial(name).dtype
            assert torch.allclose(value, _initial(name) - LR * mean, rtol=1e-6, atol=1e-7), (rank, name)
    # the processes' own gradients differed, so equal results are the averaging's doing
    assert not torch.allclose(_grads(0)["a"], _grads(1)["a"])


def test_wraps_joint_optim(two_process_results):
    for rank, results in enumerate(two_process_results):
        for name, value in results["joint"].items():
            mean = _mean_grad(name)
            expected = _initial(name) if mean is None else _initial(name) - LR * mean
            assert torch.allclose(value, expected, rtol=1e-6, atol=1e-7), (rank, name)


def test_schedule_steps_and_state_round_trip(two_process_results):
    for rank, results in enumerate(two_process_results):
        for name in SHAPES:
            mean = _mean_grad(name)
            if mean is None:
                assert torch.equal(results["scheduled"][name], _initial(name)), (rank, name)
                continue
            # lr 1 then 1/2; after the state round trip the schedule continues at 1/4
            expected = _initial(name) - 1.5 * mean
            assert torch.allclose(results["scheduled"][name], expected, rtol=1e-6, atol=1e-6), (rank, name)
            expected = _initial(name) - 1.75 * mean
            assert torch.allclose(results["resumed"][name], expected, rtol=1e-6, atol=1e-6), (rank, name)
        assert "wrap a pyro.optim.PyroLRScheduler" in results["step_error"]


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        DistributedOptimizer(pyro.optim.Adam({"lr": 1e-3}))
    with pytest.raises(TypeError, match="wraps a pyro.optim.PyroOptim"):
        DistributedOptimizer(torch.optim.Adam)


def test_single_process_group_is_an_error():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="has 1 process; there is nothing to average"):
            DistributedOptimizer(pyro.optim.Adam({"lr": 1e-3}))
    finally:
        dist.destroy_process_group()
