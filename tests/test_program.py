# SPDX-License-Identifier: Apache-2.0
"""The ``pyro-vdrop`` program's process-wide defaults (each case in a fresh interpreter)."""

import os
import subprocess
import sys

import pytest

_PROBE = """
import os, sys
import pyro_vdrop
assert "torch" not in sys.modules, "import pyro_vdrop imported torch"
from pyro_vdrop.program import main
try:
    main(["--version"])
except SystemExit as e:
    assert e.code == 0, e.code
assert "torch" in sys.modules  # the command itself ran
print("OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "<unset>"))
"""


def _run(env_update):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_update)
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "env, expected",
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"OMP_WAIT_POLICY": "passive"}, "passive")],
)
def test_program_sets_a_passive_openmp_wait_policy_unless_the_user_did(env, expected):
    out = _run(env)
    assert "pyro-vdrop" in out  # --version's output
    assert f"OMP_WAIT_POLICY={expected}" in out


def test_the_library_sets_nothing():
    probe = "import os, pyro_vdrop.cli, pyro_vdrop.train; print(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "<unset>"
