# SPDX-License-Identifier: Apache-2.0
import os
from pathlib import Path

import pyro
import pytest
import torch


def pytest_runtest_setup(item):
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)


@pytest.fixture
def mnist_dir():
    """The real MNIST folder named by ``PYRO_VDROP_MNIST_DIR``; skips the test when it is absent."""
    path = os.environ.get("PYRO_VDROP_MNIST_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("real MNIST not available: set PYRO_VDROP_MNIST_DIR to a folder with the four IDX files")
    return Path(path)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
