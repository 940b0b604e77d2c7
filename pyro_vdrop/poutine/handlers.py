# SPDX-License-Identifier: Apache-2.0

from collections.abc import Callable, Collection

from pyro.poutine.handlers import _make_handler

from .local_reparam_messenger import LocalReparamMessenger


@_make_handler(LocalReparamMessenger, __name__)
def local_reparam(  # type: ignore[empty-body]
    fn: Callable | None = None,
    *,
    estimator: str = "lrt",
    sites: Collection[str] | Callable[[str, dict], bool] | None = None,
    fallback: bool = False,
) -> LocalReparamMessenger | Callable: ...
