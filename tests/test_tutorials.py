# SPDX-License-Identifier: Apache-2.0
"""Runs every tutorial end to end in its smoke mode (``PYRO_VDROP_SMOKE=1``: little data, few steps) and checks
the headline figures it prints."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
SCRIPTS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
# Each tutorial takes well under 20 s in smoke mode on an idle 2-core machine; the limit leaves room for a busy one.
TIMEOUT = 300
NUMBER = r"(-?[\d.]+(?:e[-+]?\d+)?|nan|inf)"


def _find(pattern, text, count=1):
    """The numbers that ``pattern`` (``NUMBER`` in it) captures in the tutorial's printout, as floats."""
    matches = re.findall(pattern.replace("NUMBER", NUMBER), text, re.MULTILINE)
    assert len(matches) == count, f"expected {count} lines matching {pattern!r}, found {len(matches)}:\n{text[-3000:]}"
    rows = [[float(v) for v in ((m,) if isinstance(m, str) else m)] for m in matches]
    for row in rows:
        assert all(math.isfinite(v) for v in row), f"{pattern!r}: {row}"
    return rows if count > 1 else rows[0]


# The headline figures of each tutorial in smoke mode (seeded: pyro.set_rng_seed), with bounds loose enough for a
# few seconds of training but tight enough to catch a model that learns nothing or an estimator that is broken.
def _check_quickstart(out):
    theta = [float(v) for v in re.search(r"^theta\s+(.*)$", out, re.M).group(1).split()]
    log_alpha = [float(v) for v in re.search(r"^log alpha\s+(.*)$", out, re.M).group(1).split()]
    assert abs(theta[0] - 2.0) < 0.2 and abs(theta[1] + 1.5) < 0.2, theta  # the true weights 2, -1.5, 0, ...
    assert max(abs(t) for t in theta[2:]) < 0.1, theta
    assert max(log_alpha[:2]) < -5 < 0 < min(log_alpha[2:]), log_alpha  # relevant inputs kept, noise dropped out
    accuracy, compression = _find(r"pruned network: test accuracy NUMBER, compression NUMBER×", out)
    assert accuracy > 0.75 and compression > 2  # two moons: chance is 0.5
    assert _find(r"test accuracy of the posterior predictive NUMBER", out)[0] > 0.75
    assert -math.log(2) < _find(r"test log predictive density \S+ \(NUMBER per example\)", out)[0] < 0


def _check_local_reparameterization(out):
    names = ["lrt", "flipout", "per-example weights", "single weight sample", "no noise"]
    rows = {name: _find(rf"^{name}\s+NUMBER\s+NUMBER\s+NUMBER\s+NUMBER$", out) for name in names}
    for name, row in rows.items():
        assert all(v > 0 for v in row), (name, row)
    # the tutorial's point: the LRT's gradient variance (bottom layer, at init and trained) is below the single
    # weight sample's (by ~4× here; 1 when the LRT's noise is as correlated as one weight sample's)
    assert rows["lrt"][0] < 0.5 * rows["single weight sample"][0], rows
    assert rows["lrt"][1] < 0.5 * rows["single weight sample"][1], rows
    assert all(row[0] > 0 for row in _find(r"ms per step  \(NUMBER× no noise\)", out, count=5))


def _check_sparse_mnist(out):
    chance = 90.0
    assert _find(r"pretrained LeNet-300-100: test error NUMBER%", out)[0] < chance - 20
    assert _find(r"pruned network: test error NUMBER%", out)[0] < chance - 20
    pruned = _find(r"loss/example\s+NUMBER  pruned NUMBER%", out, count=2)
    assert 0 < pruned[-1][1] < 100, pruned
    kept, total, compression = _find(r"total\s+kept\s+NUMBER of\s+NUMBER\s+\(NUMBER×\)", out)
    assert 0 < kept < total and compression >= 1


def _check_arviz(out):
    sparse_loss, sparse_pruned = _find(r"sparse VD: final loss NUMBER, NUMBER% pruned", out)
    _, vd_pruned = _find(r"VD \(alpha <= 1\): final loss NUMBER, NUMBER% pruned", out)
    assert 0 < sparse_pruned < 100 and vd_pruned == 0  # α ≤ 1 keeps every weight
    assert _find(r"obs_error:\s+NUMBER", out)[0] < 0.8  # the training set's posterior predictive; chance 0.9
    assert _find(r"elpd_loo\s+NUMBER\s+NUMBER", out)[0] < 0
    for accuracy, ece in _find(r"test accuracy NUMBER, expected calibration error NUMBER", out, count=2):
        assert 0 <= accuracy <= 1 and 0 <= ece <= 1


def _check_uncertainty(out):
    assert _find(r"NUMBER× compression", out)[0] >= 1
    scores = _find(
        r"^(?:θ network|pruned|MC predictive \(S=\d+\))\s+NUMBER%\s+NUMBER\s+NUMBER\s+NUMBER\s+NUMBER$", out, 3
    )
    for error, nll, brier, ece, ece_mass in scores:
        # a few seconds of training: better than the uniform prediction (NLL log 10, Brier 0.9) but not by much
        assert error < 90 and nll < math.log(10) and brier < 0.9 and 0 <= ece <= 1 and 0 <= ece_mass <= 1
    entropy, aleatoric, mutual_information = _find(r"^test\s+NUMBER\s+NUMBER\s+NUMBER$", out)
    assert 0 <= mutual_information <= entropy <= math.log(10) and aleatoric <= entropy + 1e-4
    kept = [row[1] for row in _find(r"^\s+NUMBER\s+NUMBER%\s+NUMBER%\s+NUMBER\s+NUMBER$", out, 6)]
    assert kept == sorted(kept) and 0 < kept[0] and kept[-1] <= 100, kept  # a higher threshold keeps more
    assert "the reloaded pruned network gives the same logits: True" in out


def _check_compress(out):
    widths = re.search(r"^units: masked ([\d-]+), compressed ([\d-]+)$", out, re.M)
    masked, small = ([int(v) for v in w.split("-")] for w in widths.groups())
    assert len(masked) == len(small) and all(0 < s <= m for s, m in zip(small, masked)), (masked, small)
    assert masked[-1] == small[-1] == 10  # the classes are never removed
    assert sum(small) < sum(masked)  # smoke mode prunes at log α > -3: units and inputs go
    kept, total = _find(r"compressed network: NUMBER parameters of NUMBER", out.replace(",", ""))
    assert kept < total
    masked_error, compressed_error = _find(r"test error: masked NUMBER%, compressed NUMBER%", out)
    assert masked_error == compressed_error  # log α > -3 in smoke mode prunes too much to beat chance
    assert _find(r"largest logit difference NUMBER", out)[0] < 1e-4
    sizes = [row[0] for row in _find(r"^(?:masked|compressed)[a-z, ]*\s+NUMBER kB$", out, 3)]
    assert sizes[1] <= sizes[0] * 1.001 and sizes[2] <= sizes[1] * 1.001, sizes
    assert "the reloaded network gives the same logits: True" in out
    for row in _find(r"^\s+(?:1|100)\s+NUMBER\s+NUMBER$", out, 2):
        assert all(v > 0 for v in row)


def _check_sequences(out):
    assert _find(r"pretrained LSTM: test accuracy NUMBER%", out)[0] > 15  # 6 smoke epochs of 3 steps; chance 10%
    assert _find(r"pruned network: test accuracy NUMBER%", out)[0] > 15
    rows = {
        site: _find(rf"^  {site}\s+NUMBER%\s+NUMBER%\s+NUMBER%\s+NUMBER%$", out)
        for site in ("lstm.weight_ih_l0", "lstm.weight_hh_l0")
    }
    for site, shares in rows.items():
        assert all(0 <= v <= 100 for v in shares), (site, shares)
    total = _find(r"^  total\s+pruned\s+NUMBER%", out)[0]
    assert 0 < total < 100


def _check_attention(out):
    chance = 0.25
    assert _find(r"deterministic transformer: test accuracy NUMBER", out)[0] > chance + 0.1
    assert _find(r"pruned network: test accuracy NUMBER", out)[0] > chance + 0.1
    assert _find(r"MC predictive \(\d+ draws\): test accuracy NUMBER", out)[0] > chance + 0.1
    fraction, compression = _find(r"pruned NUMBER% of the weights \(NUMBER× compression\)", out)
    assert 0 <= fraction < 100 and compression >= 1
    assert len(re.findall(r"^block\.self_attn\.in_proj_weight\s+pruned", out, re.M)) == 1  # attention is random
    assert "LazyWeightError: local_reparam: the weight of site 'tokens.weight' is used twice" in out


CHECKS = {
    "01_quickstart": _check_quickstart,
    "02_local_reparameterization": _check_local_reparameterization,
    "03_sparse_mnist": _check_sparse_mnist,
    "04_arviz": _check_arviz,
    "05_uncertainty": _check_uncertainty,
    "06_compress": _check_compress,
    "07_sequences": _check_sequences,
    "08_attention": _check_attention,
}


def test_tutorials_are_indexed():
    assert SCRIPTS, f"no tutorials found in {TUTORIALS}"
    assert sorted(CHECKS) == [s.stem for s in SCRIPTS], "every tutorial has its headline figures checked"
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
    CHECKS[script.stem](result.stdout)
    figures = list((tmp_path / "tutorial_figures" / script.stem).glob("*.png"))
    assert figures, f"{script.name} saved no figure"
