# SPDX-License-Identifier: Apache-2.0
"""``pyro_vdrop.save`` / ``pyro_vdrop.load``: bitwise round trips, plain data only, atomic, in a fresh process."""

import os
import pickle
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

import pyro_vdrop
from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.nn import bayesianize, mnist_mlp, prune

VARIANTS = {
    "sparse": dict(parameterization="additive"),
    "B": dict(),
    "A-unit": dict(noise="correlated", kl_approx="kingma"),
    "dropout": dict(noise="correlated", dropout_rate=0.3),
    "layer": dict(granularity="layer", max_log_alpha=None),
}


def fitted(options=None, *, likelihood="categorical", steps=3, width=8, dtype=torch.float32):
    pyro.set_rng_seed(0)
    net = mnist_mlp(width).to(dtype)
    model = bayesianize(net, num_data=100, likelihood=likelihood)
    guide = AutoVariationalDropout(model, **(options or {}))
    x = torch.rand(20, 784, dtype=dtype)
    y = torch.randint(10, (20,)) if likelihood == "categorical" else torch.randn(20, 10, dtype=dtype)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return model, guide, x, y


def assert_same(model, guide, model2, guide2, x):
    params, params2 = dict(guide.named_parameters()), dict(guide2.named_parameters())
    assert sorted(params) == sorted(params2)
    for name, value in params.items():
        assert torch.equal(value, params2[name]) and value.dtype == params2[name].dtype, name
    for name, value in model.state_dict().items():
        assert torch.equal(value, model2.state_dict()[name]), name
    assert {k: v for k, v in vars(guide2.options).items() if k != "init_loc_fn"} == {
        k: v for k, v in vars(guide.options).items() if k != "init_loc_fn"
    }
    assert guide2.kl_scale == guide.kl_scale
    with torch.no_grad():
        assert torch.equal(prune(model, guide)(x), prune(model2, guide2)(x))
        pyro.set_rng_seed(5)
        draw = guide(x)
        pyro.set_rng_seed(5)
        draw2 = guide2(x)
    assert all(torch.equal(draw[k], draw2[k]) for k in draw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_bitwise(variant, tmp_path):
    model, guide, x, _ = fitted(VARIANTS[variant])
    guide.kl_scale = 0.25
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    model2, guide2 = pyro_vdrop.load(tmp_path / "model.pt", mnist_mlp(8))
    assert_same(model, guide, model2, guide2, x)
    assert type(model2).__name__ == type(model).__name__ and model2.random_sites == model.random_sites


def test_normal_likelihood_with_learned_noise_and_float64(tmp_path):
    model, guide, x, y = fitted(likelihood="normal", dtype=torch.float64)
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    model2, guide2 = pyro_vdrop.load(tmp_path / "model.pt", mnist_mlp(8))
    assert_same(model, guide, model2, guide2, x)
    assert model2.likelihood == "normal" and torch.equal(model2.obs_scale, model.obs_scale)
    assert guide2.median()["fc1.weight"].dtype == torch.float64


def test_file_is_plain_data_and_hostile_files_are_refused(tmp_path):
    model, guide, _, _ = fitted()
    path = tmp_path / "model.pt"
    pyro_vdrop.save(path, model, guide)
    record = torch.load(path, weights_only=True)  # no code needed to read it
    assert record["format"] == "pyro-vdrop-model" and record["model"]["kind"] == "bayesianize"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "pyro-vdrop-model", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="could run code"):
        pyro_vdrop.load(tmp_path / "evil.pt", mnist_mlp(8))
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a file"):
        pyro_vdrop.load(tmp_path / "junk.pt", mnist_mlp(8))
    torch.save({"format": "pyro-vdrop-model", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 99"):
        pyro_vdrop.load(tmp_path / "future.pt", mnist_mlp(8))


def test_save_is_atomic_and_replaces_symlinks(tmp_path):
    model, guide, _, _ = fitted()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "model.pt").symlink_to(victim)
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    assert victim.read_text() == "keep me" and not (tmp_path / "model.pt").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "victim.txt"]  # no temporary file left


def test_load_in_a_fresh_process(tmp_path):
    model, guide, x, _ = fitted(VARIANTS["sparse"])
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        """
        import sys, torch, pyro
        import pyro_vdrop
        from pyro_vdrop.nn import mnist_mlp, prune
        model, guide = pyro_vdrop.load(sys.argv[1] + "/model.pt", mnist_mlp(8))
        x = torch.load(sys.argv[1] + "/x.pt", weights_only=True)
        with torch.no_grad():
            out = {"pruned": prune(model, guide)(x), "median": guide.median(), "log_alpha": guide.log_alpha()}
        torch.save(out, sys.argv[1] + "/out.pt")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(out["pruned"], prune(model, guide)(x))
        assert all(torch.equal(v, guide.median()[k]) for k, v in out["median"].items())
        assert all(torch.equal(v, guide.log_alpha()[k]) for k, v in out["log_alpha"].items())


def test_stale_param_store_values_do_not_leak_in(tmp_path):
    # Pyro modules adopt the value the global param store holds under their names (the lazily created parameters of
    # an autoguide included): loading after training another model of the same names must still give the saved
    # values, and must leave the other model's tensors alone
    model, guide, x, _ = fitted(steps=3)
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["guide"]["params"]
    _, other_guide, _, _ = fitted(steps=6)  # same names, other values, now in the param store
    other_params = {k: v.detach().clone() for k, v in other_guide.named_parameters()}
    _, guide2 = pyro_vdrop.load(tmp_path / "model.pt", mnist_mlp(8))
    assert all(torch.equal(v, saved[k]) for k, v in guide2.named_parameters())
    assert not torch.equal(saved["locs.fc1.weight_unconstrained"], other_params["locs.fc1.weight_unconstrained"])
    assert all(torch.equal(v, other_params[k]) for k, v in other_guide.named_parameters())
    with torch.no_grad():  # and the loaded guide keeps its values when it runs (it reads the param store)
        guide2(x)
    assert all(torch.equal(v, saved[k]) for k, v in guide2.named_parameters())


def test_load_leaves_the_random_state_alone_and_training_continues(tmp_path):
    model, guide, x, y = fitted()
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    network = mnist_mlp(8)
    pyro.set_rng_seed(1)
    state = torch.get_rng_state()
    model2, guide2 = pyro_vdrop.load(tmp_path / "model.pt", network)
    assert torch.equal(torch.get_rng_state(), state)
    svi = SVI(model2, guide2, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    before = guide2.median()["fc1.weight"].clone()
    svi.step(x, y)
    assert not torch.equal(before, guide2.median()["fc1.weight"])


def test_a_hand_written_model(tmp_path):
    def model(x, y=None):
        w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    x, y = torch.randn(30, 4), torch.randn(30)
    guide = AutoVariationalDropout(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(5):
        svi.step(x, y)
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    with pytest.raises(TypeError, match="pass that model"):
        pyro_vdrop.load(tmp_path / "model.pt")
    model2, guide2 = pyro_vdrop.load(tmp_path / "model.pt", model)
    assert torch.equal(guide2.median()["w"], guide.median()["w"])
    assert torch.equal(guide2.log_alpha()["w"], guide.log_alpha()["w"])


def test_errors_say_what_to_do(tmp_path):
    model = bayesianize(mnist_mlp(8), num_data=100)
    guide = AutoVariationalDropout(model)
    with pytest.raises(ValueError, match="create them on their first call"):
        pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    with pytest.raises(TypeError, match="must be a pyro_vdrop.infer.AutoVariationalDropout"):
        pyro_vdrop.save(tmp_path / "model.pt", model, pyro.infer.autoguide.AutoDelta(model))
    model, guide, _, _ = fitted()
    pyro_vdrop.save(tmp_path / "model.pt", model, guide)
    with pytest.raises(ValueError, match="does not have the architecture"):
        pyro_vdrop.load(tmp_path / "model.pt", mnist_mlp(16))
    with pytest.raises(TypeError, match="pass a plain torch network of the same architecture"):
        pyro_vdrop.load(tmp_path / "model.pt", model)
    with pytest.raises(FileNotFoundError):
        pyro_vdrop.load(tmp_path / "nowhere.pt", mnist_mlp(8))


@pytest.mark.parametrize("name", ["group", "sbp"])
def test_group_guides_round_trip(name, tmp_path):
    from pyro_vdrop.infer.autoguide import preset
    from pyro_vdrop.train import build_model

    def net():
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = build_model(net(), num_data=8, guide=name)
    guide = AutoVariationalDropout(model, options=preset(name))
    guide(x, y)
    with torch.no_grad():
        for value in pyro.get_param_store().values():
            value.add_(0.1 * torch.randn_like(value))
    expected = guide.group_log_alpha(), guide.median()
    pyro_vdrop.save(tmp_path / "m.pt", model, guide)
    pyro.clear_param_store()
    _, loaded = pyro_vdrop.load(tmp_path / "m.pt", net())
    assert loaded.options == guide.options
    for before, after in zip(expected, (loaded.group_log_alpha(), loaded.median())):
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
