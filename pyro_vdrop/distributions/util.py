# SPDX-License-Identifier: Apache-2.0

import torch

#: The approximations of KL(N(θ, αθ²) ‖ log-uniform) offered by :func:`~pyro_vdrop.distributions.log_uniform_kl`.
KL_APPROXIMATIONS = ("molchanov", "kingma")


def base_distribution(fn, wrappers: type | tuple[type, ...] | None = None):
    """
    The distribution inside ``fn``'s wrappers: follows ``base_dist`` through every wrapper that has one
    (``Independent``, ``MaskedDistribution``, ``ExpandedDistribution``, ``TransformedDistribution``, ...),
    or only through instances of ``wrappers`` when given.

    :param fn: A distribution.
    :param wrappers: A class or tuple of classes to unwrap; default: every distribution with a ``base_dist``.
    :returns: The innermost distribution reached.
    """
    while hasattr(fn, "base_dist") if wrappers is None else isinstance(fn, wrappers):
        fn = fn.base_dist
    return fn


def check_kl_approx(kl_approx):
    """
    Returns ``kl_approx`` if it names a known KL approximation, else raises a
    :class:`ValueError` that lists the choices.
    """
    if kl_approx not in KL_APPROXIMATIONS:
        raise ValueError(f"kl_approx must be one of {KL_APPROXIMATIONS}, got {kl_approx!r}")
    return kl_approx


def safe_log_abs(x):
    """
    ``log|x|`` with ``|x|`` clamped at the smallest positive normal number of its
    dtype, so that ``x = 0`` gives a large finite value and a zero (not NaN) gradient.
    """
    return x.abs().clamp(min=torch.finfo(x.dtype).tiny).log()


class _ClampedExp(torch.autograd.Function):
    """
    ``exp(x)`` clamped at the dtype's largest finite number, with the gradient of ``exp`` at the clamped value
    (``grad * y``, finite, where autograd of ``exp().clamp()`` gives ``0 * inf = NaN`` where ``exp`` overflows).
    The backward pass is itself differentiable (``y`` is a saved output).
    """

    @staticmethod
    def forward(ctx, x):
        y = x.exp().clamp_(max=torch.finfo(x.dtype).max)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y


def clamped_exp(x):
    """
    ``exp(x)`` clamped at the largest finite number of its dtype, so that where it overflows (``x`` above about
    88.7 in float32, 709.8 in float64) its product with 0 is 0, not ``inf * 0 = NaN``, and so is the gradient
    through such a product. Equal to ``exp(x)``, with the same gradient, wherever that is finite; NaN stays NaN.
    """
    return _ClampedExp.apply(x)


def floor_scale(scale):
    """
    A standard deviation floored where its square is still a normal number of its dtype, so that a zero
    scale (θ = 0 with the multiplicative posterior) does not make a Normal ``log_prob`` NaN.
    """
    return scale.clamp(min=torch.finfo(scale.dtype).tiny ** 0.5)


def normal_log_alpha(loc, scale):
    r"""
    The dropout rate of a factorized Normal read as a variational-dropout posterior:
    :math:`\log\alpha = \log\sigma^2 - \log\mu^2`, finite (via :func:`safe_log_abs`) at μ = 0 or σ = 0.
    """
    return 2 * (safe_log_abs(scale) - safe_log_abs(loc))
