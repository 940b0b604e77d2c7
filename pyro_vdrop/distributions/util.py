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
