# SPDX-License-Identifier: Apache-2.0

import contextlib
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager

from pyro.poutine.handlers import _make_handler

from .estimators import ALL_ESTIMATORS, LRT, SINGLE_SAMPLE
from .local_reparam_messenger import LocalReparamMessenger
from .runtime import find_handler


@_make_handler(LocalReparamMessenger, __name__)
def local_reparam(  # type: ignore[empty-body]
    fn: Callable | None = None,
    *,
    estimator: str = LRT,
    sites: Collection[str] | Callable[[str, dict], bool] | None = None,
    fallback: bool = False,
) -> LocalReparamMessenger | Callable: ...


def active_local_reparam() -> LocalReparamMessenger | None:
    """The active :func:`local_reparam` handler (the outermost, if several are nested), or ``None``."""
    return find_handler(LocalReparamMessenger)


def estimator_handler(estimator: str) -> AbstractContextManager:
    """
    The context in which SVI steps use ``estimator``: :func:`local_reparam` with that estimator, or no handler
    for ``"single-sample"`` (plain Pyro: one weight sample per step).

    :param str estimator: One of :data:`pyro_vdrop.poutine.estimators.ALL_ESTIMATORS`.
    :raises ValueError: for an unknown estimator.
    """
    if estimator not in ALL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ALL_ESTIMATORS}, got {estimator!r}")
    if estimator == SINGLE_SAMPLE:
        return contextlib.nullcontext()
    return local_reparam(estimator=estimator)


__all__ = ["active_local_reparam", "estimator_handler", "local_reparam"]
