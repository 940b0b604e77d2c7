# SPDX-License-Identifier: Apache-2.0
"""The ``pyro-vdrop`` program's process-wide defaults."""

import multiprocessing
import os
import subprocess
import sys

import pytest

from pyro_vdrop.program import BUSY_CPUS, OMP_WAIT_POLICY, busy_cpus, wait_policy

_PROBE = """
import os, sys
import pyro_vdrop
assert "torch" not in sys.modules, "import pyro_vdrop imported torch"
import pyro_vdrop.program as program
program.busy_cpus = lambda: {busy}
try:
    program.main(["--version"])
except SystemExit as e:
    assert e.code == 0, e.code
assert "torch" in sys.modules  # the command itself ran
print("OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "<unset>"))
"""


def _run(env_update, busy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_update)
    probe = _PROBE.format(busy=busy)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "env, busy, expected",
    [
        ({}, 1.0, "PASSIVE"),  # another process keeps a CPU busy: idle threads sleep
        ({}, 0.0, "<unset>"),  # a quiet machine: OpenMP's own default (spin a while), the fastest there
        ({}, None, "<unset>"),  # unknown (no /proc/stat)
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 1.0, "ACTIVE"),  # the user's choice is kept
        ({"OMP_WAIT_POLICY": "passive"}, 0.0, "passive"),
    ],
)
def test_program_chooses_the_openmp_wait_policy_before_torch_loads(env, busy, expected):
    out = _run(env, busy)
    assert "pyro-vdrop" in out  # --version's output
    assert f"OMP_WAIT_POLICY={expected}" in out


def test_wait_policy_threshold():
    assert wait_policy({}, BUSY_CPUS) == OMP_WAIT_POLICY
    assert wait_policy({}, 0.9 * BUSY_CPUS) is None
    assert wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, 2.0) is None


def _spin(stop):
    while not stop.is_set():
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")
def test_busy_cpus_sees_a_spinning_process():
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,))
    spinner.start()
    try:
        busy = busy_cpus(0.3)
    finally:
        stop.set()
        spinner.join()
    assert busy is not None and busy >= 0.7  # one process spinning on one of the CPUs


def test_the_library_sets_nothing():
    probe = "import os, pyro_vdrop.cli, pyro_vdrop.train; print(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "<unset>"
