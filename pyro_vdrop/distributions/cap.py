# SPDX-License-Identifier: Apache-2.0
"""``x.clamp(max=cap)`` as one autograd node whose gradient does not trap ``x`` above the cap."""

import torch


class Cap(torch.autograd.Function):
    r"""
    ``x.clamp(max=cap)``, with a gradient that lets an ``x`` above the cap come back.

    Below or at the cap the gradient is ``clamp``'s, 1. Above it ``clamp``'s gradient is 0, which makes the cap
    absorbing: a learned log α that steps over it (the KL of the α ≤ 1 variants pushes every log α up) never
    receives a gradient again, so α stays at the cap for the rest of training whatever the data say. Here, above
    the cap, a gradient that points back below it (positive: a descent step lowers ``x``) passes unchanged and one
    that would raise ``x`` further is 0. The value is ``clamp``'s in both cases, and so is every gradient of
    an ``x`` at or below the cap; the optimisation is that of the constrained problem ``x <= cap``, where a point
    on the boundary may move inward. For an objective that is minimised (Pyro's losses).

    The backward is computed without a comparison kernel where it can be: ``x - clamp(x) = max(x - cap, 0)``, whose
    sign marks the capped entries.
    """

    @staticmethod
    def forward(ctx, x, cap):
        y = x.clamp(max=cap)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: keep it differentiable
            return torch.where((x <= y) | (grad > 0), grad, torch.zeros_like(grad)), None
        # grad - grad * [x > cap] * [grad <= 0] = grad - min(grad, 0) * [x > cap]
        return torch.addcmul(grad, grad.clamp(max=0), x.sub(y).sign_(), value=-1.0), None


def cap(x: torch.Tensor, max: float) -> torch.Tensor:
    """``x.clamp(max=max)``, whose gradient lets an ``x`` above ``max`` come back (:class:`Cap`)."""
    return Cap.apply(x, max)


__all__ = ["Cap", "cap"]
