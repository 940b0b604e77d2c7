# SPDX-License-Identifier: Apache-2.0
import dataclasses

import pytest
import torch

import pyro_vdrop.train as train
from pyro_vdrop.infer import AutoVariationalDropout, AutoVariationalDropoutMessenger
from pyro_vdrop.infer.autoguide import PRESETS, VariationalDropoutOptions, preset
from pyro_vdrop.nn import bayesianize


def test_defaults_are_resolved():
    options = VariationalDropoutOptions()
    assert (options.granularity, options.log_alpha_clip, options.max_log_alpha) == ("weight", None, 0.0)
    correlated = VariationalDropoutOptions(noise="correlated")
    assert correlated.granularity == "unit"
    additive = VariationalDropoutOptions(parameterization="additive")
    assert (additive.log_alpha_clip, additive.max_log_alpha) == ((-8.0, 8.0), None)


def test_options_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        VariationalDropoutOptions().noise = "correlated"
    with pytest.raises(ValueError, match="noise must be one of"):
        VariationalDropoutOptions(noise="dependent")
    with pytest.raises(ValueError, match="kl_scale must be a finite number"):
        VariationalDropoutOptions(kl_scale=-1.0)
    with pytest.raises(ValueError, match="granularity='unit', 'output' or 'layer'"):
        VariationalDropoutOptions(noise="correlated", granularity="weight")


# The papers' variants, spelled out: Kingma et al. 2015 §3.3/§5 (A, A2, B, Gaussian dropout) and Molchanov et al.
# 2017 §4.1 (sparse VD).
PAPER_VARIANTS = {
    "sparse": dict(noise="independent", parameterization="additive", log_alpha_clip=(-8.0, 8.0)),
    "B": dict(noise="independent", kl_approx="kingma"),
    "A": dict(noise="correlated", kl_approx="kingma"),
    "A2": dict(noise="correlated", kl_approx="kingma", kl_scale=1 / 3),
    "gaussian-dropout": dict(noise="correlated", kl_approx="kingma", dropout_rate=0.25),
    # group VD (Louizos et al. 2017's additive group noise) and structured Bayesian pruning (Neklyudov et al. 2017)
    "group": dict(noise="group", parameterization="additive"),
    "sbp": dict(noise="sbp"),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_the_paper_variants_and_the_training_loop_uses_them(name):
    overrides = {"dropout_rate": 0.25} if name == "gaussian-dropout" else {}
    assert preset(name, **overrides) == VariationalDropoutOptions(**PAPER_VARIANTS[name])
    model = train.build_model(torch.nn.Linear(3, 2), num_data=10, guide=name)
    guide = train.build_guide(model, train.TrainConfig(guide=name, dropout_p=0.25))
    assert guide.options == preset(name, **overrides)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    guide(x, y)
    assert set(guide.sparsity()["sites"]) == {"weight"}


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown variational-dropout preset 'C'"):
        preset("C")
    with pytest.raises(ValueError, match="pass dropout_rate=p"):
        preset("gaussian-dropout")
    assert preset("A2", kl_scale=0.5).kl_scale == 0.5


@pytest.mark.parametrize("guide_class", [AutoVariationalDropout, AutoVariationalDropoutMessenger])
def test_guides_take_options_or_keywords_not_both(guide_class):
    model = bayesianize(torch.nn.Linear(3, 2), num_data=10)
    guide = guide_class(model, options=preset("A"))
    assert guide.options == preset("A") and guide.noise == "correlated" and guide.kl_approx == "kingma"
    guide.kl_scale = 0.5  # annealing changes the guide's factor, not its options
    assert guide.options.kl_scale == 1.0
    with pytest.raises(TypeError, match="not both"):
        guide_class(model, options=preset("A"), kl_scale=0.5)
    with pytest.raises(TypeError, match="options must be a VariationalDropoutOptions"):
        guide_class(model, options={"noise": "correlated"})
