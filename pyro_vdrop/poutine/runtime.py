# SPDX-License-Identifier: Apache-2.0
"""
The one reader of Pyro's effect-handler stack in pyro-vdrop.

Pyro keeps the active handlers in ``pyro.poutine.runtime._PYRO_STACK`` and has no public accessor for it;
every question about the active handlers (is :func:`~pyro_vdrop.poutine.local_reparam` active? is a
``poutine.trace`` outside it?) goes through this module, so that a change in Pyro is fixed in one place.
"""

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK


def handler_stack() -> list[Messenger]:
    """The active effect handlers, outermost first (a copy)."""
    return list(_PYRO_STACK)


def handlers_outside(handler: Messenger) -> list[Messenger]:
    """
    The active handlers entered before ``handler``, i.e. outside it, outermost first.

    :raises ValueError: if ``handler`` is not active.
    """
    stack = handler_stack()
    return stack[: stack.index(handler)]


def handlers_inside(handler: Messenger) -> list[Messenger]:
    """
    The active handlers entered after ``handler``, i.e. inside it, outermost first.

    :raises ValueError: if ``handler`` is not active.
    """
    stack = handler_stack()
    return stack[stack.index(handler) + 1 :]


def find_handler(cls: type) -> Messenger | None:
    """The outermost active handler that is an instance of ``cls``, or ``None``."""
    for frame in _PYRO_STACK:
        if isinstance(frame, cls):
            return frame
    return None


__all__ = ["find_handler", "handler_stack", "handlers_inside", "handlers_outside"]
