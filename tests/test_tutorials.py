# SPDX-License-Identifier: Apache-2.0
"""Runs every tutorial end to end in its smoke mode (``PYRO_VDROP_SMOKE=1``: little data, few steps)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
SCRIPTS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
# Each tutorial takes well under 20 s in smoke mode on an idle 2-core machine; the limit leaves room for a busy one.
TIMEOUT = 300


def test_tutorials_are_indexed():
    assert SCRIPTS, f"no tutorials found in {TUTORIALS}"
    index = (TUTORIALS / "README.md").read_text()
    for script in SCRIPTS:
        assert script.name in index, f"{script.name} is missing from tutorials/README.md"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_tutorial_runs(script, tmp_path):
    text = script.read_text()
    assert text.count("# %% [markdown]") >= 3, "a tutorial explains itself in markdown cells"
    env = {**os.environ, "PYRO_VDROP_SMOKE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    figures = list((tmp_path / "tutorial_figures" / script.stem).glob("*.png"))
    assert figures, f"{script.name} saved no figure"
