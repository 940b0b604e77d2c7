# SPDX-License-Identifier: Apache-2.0
"""The fused LRT linear node: exact gradients, and the same training as autograd of the formula."""

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

import pyro_vdrop
import pyro_vdrop.poutine.lazy_weight as lazy_weight
from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.optim import JointOptim
from pyro_vdrop.poutine import local_reparam
from pyro_vdrop.poutine.lazy_ops import linear_lrt


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_linear_lrt_gradcheck(lead, bias, x_grad):
    x = torch.randn(*lead, 4, dtype=torch.float64, requires_grad=x_grad)
    loc = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    variance = torch.rand(3, 4, dtype=torch.float64).add(0.1).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if bias else None
    noise = torch.randn(*lead, 3, dtype=torch.float64)

    def fn(*args):
        return linear_lrt(*args, noise, fused=True)

    args = (x, loc, variance, b)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    # the same values as autograd of the formula
    assert torch.equal(fn(*args), linear_lrt(*args, noise, fused=False))


def test_fused_linear_lrt_transposed_weight():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    loc = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    variance = torch.rand(3, 4, dtype=torch.float64).add(0.1).requires_grad_()
    noise = torch.randn(6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, m, v: linear_lrt(x, m.t(), v.t(), None, noise, fused=True), (x, loc, variance)
    )


def test_fused_linear_lrt_draws_the_same_noise():
    x, loc, variance = torch.randn(5, 4), torch.randn(3, 4), torch.rand(3, 4)
    torch.manual_seed(1)
    fused = linear_lrt(x, loc, variance, fused=True)
    torch.manual_seed(1)
    assert torch.equal(fused, linear_lrt(x, loc, variance, fused=False))


def _train(fused, steps):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = pyro_vdrop.nn.bayesianize(pyro_vdrop.nn.lenet_300_100(), num_data=60000)
    guide = AutoVariationalDropout(model, parameterization="additive")
    svi = SVI(model, guide, JointOptim(torch.optim.Adam, {"lr": 1e-3}), TraceMeanField_ELBO())
    x = torch.rand(32, 784)
    y = torch.randint(0, 10, (32,))
    original = lazy_weight.linear_lrt
    lazy_weight.linear_lrt = lambda *args, **kwargs: original(*args, fused=fused, **kwargs)
    try:
        with local_reparam():
            losses = [svi.step(x, y) for _ in range(steps)]
    finally:
        lazy_weight.linear_lrt = original
    params = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    return losses, params


def test_fused_linear_lrt_trains_as_the_formula():
    """Losses and parameters after SVI steps on a fixed seed: float rounding apart, those of the formula."""
    losses, params = _train(True, 20)
    ref_losses, ref_params = _train(False, 20)
    assert losses[0] == ref_losses[0]  # the first forward pass is bitwise the same
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert params.keys() == ref_params.keys()
    for name in params:
        assert torch.allclose(params[name], ref_params[name], rtol=1e-4, atol=1e-6), name
    # the training moved the parameters, so the comparison can fail
    pyro.clear_param_store()
    assert any(not torch.allclose(params[name], _train(True, 1)[1][name]) for name in params)


def _saved_tensors(fn, *args):
    """The tensors that autograd keeps for the backward pass of ``fn(*args)``."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def _new(saved, *inputs):
    """The saved tensors that are none of ``inputs`` (by storage), each storage once."""
    known = {t.untyped_storage().data_ptr() for t in inputs}
    new = {}
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            new[ptr] = t
    return list(new.values())


@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_linear_lrt_keeps_no_x_squared(x_grad):
    """
    The fused LRT node keeps for the backward pass its inputs, the standard deviation and the noise: two tensors
    of the output's size, not x² (autograd of the formula, the default, keeps x² as well).
    """
    x = torch.rand(7, 5, requires_grad=x_grad)
    loc = torch.randn(3, 5, requires_grad=True)
    variance = torch.rand(3, 5).add(0.1).requires_grad_()
    out, saved = _saved_tensors(lambda *a: linear_lrt(*a, fused=True), x, loc, variance)
    new = _new(saved, x, loc, variance)
    assert sorted(tuple(t.shape) for t in new) == [(7, 3), (7, 3)]
    assert not any(t.shape == x.shape and torch.equal(t, x * x) for t in saved)
    _, saved_formula = _saved_tensors(lambda *a: linear_lrt(*a, fused=False), x, loc, variance)
    # the formula keeps x² (the reference: the test can tell the two apart)
    assert any(t.shape == x.shape and torch.equal(t, x * x) for t in _new(saved_formula, x, loc, variance))
    out.sum().backward()
    assert variance.grad is not None and (x.grad is not None) == x_grad
