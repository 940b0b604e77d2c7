# SPDX-License-Identifier: Apache-2.0
import contextlib

import pytest

from pyro_vdrop.poutine import (
    ALL_ESTIMATORS,
    ESTIMATORS,
    LocalReparamMessenger,
    active_local_reparam,
    estimator_handler,
    local_reparam,
)
from pyro_vdrop.poutine.estimators import SINGLE_SAMPLE


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_handler_is_local_reparam(estimator):
    handler = estimator_handler(estimator)
    assert isinstance(handler, LocalReparamMessenger) and handler.estimator == estimator
    assert active_local_reparam() is None
    with handler:
        assert active_local_reparam() is handler
    assert active_local_reparam() is None


def test_estimator_handler_single_sample_is_no_handler():
    assert SINGLE_SAMPLE in ALL_ESTIMATORS
    handler = estimator_handler(SINGLE_SAMPLE)
    assert isinstance(handler, contextlib.nullcontext)
    with handler:
        assert active_local_reparam() is None


def test_estimator_handler_rejects_unknown_names():
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimator_handler("lrtt")


def test_active_local_reparam_is_the_outermost():
    with local_reparam(estimator="flipout") as outer, local_reparam():
        assert active_local_reparam() is outer
