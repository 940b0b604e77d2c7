# SPDX-License-Identifier: Apache-2.0
import csv
import json
import math

import pyro
import pytest
import torch
from pyro import poutine

import pyro_vdrop.optim
from pyro_vdrop.nn import prune
from pyro_vdrop.train import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    METRIC_KEYS,
    METRICS_CSV,
    METRICS_JSONL,
    ObservedLogits,
    RunError,
    Session,
    TrainConfig,
    estimator_handler,
    evaluate,
    fit,
    kl_weight,
    load_checkpoint,
    open_run,
    predict_logits,
    predictive_probs,
    pruned_params,
    save_checkpoint,
)
from pyro_vdrop.train.config import LinearDecay

from .interrupt import Interrupt, interrupt_at

# A tiny run: 200 images, 4 steps per epoch, a 3 × 32 MLP; a few seconds on 2 cores.
TINY = dict(
    model="mlp", width=32, train_subset=200, test_subset=100, batch_size=50, epochs=3, kl_warmup=1.5, pretrain_epochs=0
)


def tiny(**options):
    return TrainConfig(**{**TINY, **options})


def _assert_same_state(a, b, atol=0.0):
    pa, pb = a["param_store"]["params"], b["param_store"]["params"]
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert torch.allclose(pa[name], pb[name], rtol=0, atol=atol), name
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    oa, ob = a["optim"], b["optim"]
    assert sorted(oa) == sorted(ob)
    for name in oa:
        for key, value in oa[name]["optimizer"]["state"][0].items():
            assert torch.allclose(value, ob[name]["optimizer"]["state"][0][key], rtol=0, atol=atol), (name, key)
    for ra, rb in zip(a["history"], b["history"]):
        for key in METRIC_KEYS:
            if key not in ("epoch_time", "time"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=atol), key


@pytest.mark.parametrize(
    "guide,estimator,pretrain,stop_step",
    [("sparse", "lrt", 0, 6), ("A2", "flipout", 1, 5), ("gaussian-dropout", "single-sample", 0, 9)],
)
def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, guide, estimator, pretrain, stop_step):
    config = tiny(guide=guide, estimator=estimator, pretrain_epochs=pretrain)
    fit(config, tmp_path / "full", progress=False)
    full = load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE)

    with pytest.raises(Interrupt):
        fit(config, tmp_path / "cut", progress=False, callback=interrupt_at(stop_step))
    cut = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    assert cut["epoch"] == stop_step // 4  # the last completed epoch, not the interrupted one
    assert len(cut["history"]) == cut["epoch"]
    with open(tmp_path / "cut" / METRICS_JSONL) as f:
        assert len(f.readlines()) == cut["epoch"]

    # something else runs in between and moves every random number generator
    torch.randn(10)
    pyro.clear_param_store()
    fit(None, tmp_path / "cut", resume=True, progress=False)
    resumed = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    _assert_same_state(full, resumed)  # bitwise


def test_checkpoint_of_pyro_lambda_lr_resumes_exactly(tmp_path, monkeypatch):
    # Checkpoints written before JointLRScheduler (pyro.optim.LambdaLR: one Adam and one schedule per parameter)
    # resume with it and end bitwise where an uninterrupted run does.
    config = tiny(epochs=2)
    fit(config, tmp_path / "full", progress=False)
    made = []

    def pyro_lambda_lr(ctor, args):
        made.append(pyro.optim.PyroLRScheduler(ctor, dict(args)))
        return made[-1]

    with monkeypatch.context() as m:
        m.setattr("pyro_vdrop.optim.JointLRScheduler", pyro_lambda_lr)
        with pytest.raises(Interrupt):
            fit(config, tmp_path / "cut", progress=False, callback=interrupt_at(5))
    assert len(made) == 1 and len(made[0].optim_objs) > 1  # the cut run had one optimizer per parameter
    optim_state = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)["optim"]
    assert all(set(entry) == {"scheduler", "optimizer"} for entry in optim_state.values())
    fit(None, tmp_path / "cut", resume=True, progress=False)
    _assert_same_state(
        load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE), load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    )


def test_fit_uses_fused_adam_where_torch_has_it(tmp_path, monkeypatch):
    # fit's Adam is torch's fused kernel where it runs; its training equals the loop's to float rounding
    config = tiny(epochs=2)
    fit(config, tmp_path / "fused", progress=False)
    fused = load_checkpoint(tmp_path / "fused" / CHECKPOINT_FILE)
    expected = pyro_vdrop.optim.supports_fused(torch.optim.Adam, "cpu")
    # torch writes "fused": None for an optimizer built without the argument
    assert all(bool(entry["optimizer"]["param_groups"][0]["fused"]) is expected for entry in fused["optim"].values())
    monkeypatch.setattr(pyro_vdrop.optim, "supports_fused", lambda *args, **kwargs: False)
    fit(config, tmp_path / "loop", progress=False)
    loop = load_checkpoint(tmp_path / "loop" / CHECKPOINT_FILE)
    assert not any(entry["optimizer"]["param_groups"][0]["fused"] for entry in loop["optim"].values())
    for name, value in loop["param_store"]["params"].items():
        torch.testing.assert_close(fused["param_store"]["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(fused["history"], loop["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_resume_differs_without_restored_rng(tmp_path, monkeypatch):
    # The equality above must be able to fail: without restoring the RNG, resume diverges.
    config = tiny(epochs=2)
    fit(config, tmp_path / "full", progress=False)
    with pytest.raises(Interrupt):
        fit(config, tmp_path / "cut", progress=False, callback=interrupt_at(5))
    monkeypatch.setattr("pyro_vdrop.train.loop.set_rng_state", lambda state: None)
    fit(None, tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE)["param_store"]["params"]
    b = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)["param_store"]["params"]
    assert any(not torch.equal(a[name], b[name]) for name in a)


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    fit(tiny(), tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    summary = fit(None, tmp_path, resume=True, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert summary["epochs"] == TINY["epochs"]


def test_metrics_files(tmp_path):
    config = tiny()
    fit(config, tmp_path, progress=False)
    with open(tmp_path / METRICS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / METRICS_JSONL) as f:
        records = [json.loads(line) for line in f]
    assert tuple(rows[0]) == METRIC_KEYS
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [4, 8, 12]
    for row, record in zip(rows, records):
        assert set(record) == set(METRIC_KEYS)
        for key in METRIC_KEYS:
            assert float(row[key]) == pytest.approx(record[key], rel=1e-12)
    for r in records:
        steps = r["step"]
        # the KL weight of the epoch's last step (warm-up over 1.5 epochs) and its learning rate (linear to 0)
        assert r["kl_weight"] == pytest.approx(min((steps - 1) / 4 / 1.5, 1.0))
        assert r["lr"] == pytest.approx(config.lr * (1 - (steps - 1) / 12))
        assert 0 <= r["sparsity"] <= 1 and 0 <= r["train_acc"] <= 1 and 0 <= r["test_error"] <= 1
        assert r["compression"] == pytest.approx(1 / (1 - r["sparsity"]))
        assert r["elbo"] == pytest.approx(r["expected_log_lik"] - r["kl"])
        assert r["kl"] > 0
    assert records[-1]["time"] == pytest.approx(sum(r["epoch_time"] for r in records))


def test_kl_weight_schedule():
    config = TrainConfig(kl_warmup=4, kl_warmup_start=2)
    assert [kl_weight(config, e) for e in (0, 2, 3, 5, 6, 100)] == [0.0, 0.0, 0.25, 0.75, 1.0, 1.0]
    assert kl_weight(TrainConfig(kl_warmup=0), 0) == 1.0
    assert kl_weight(TrainConfig(kl_warmup=0, kl_warmup_start=1), 0.5) == 0.0


def test_lr_decay_schedules():
    # 12 steps: "linear" falls from the first step, "hold-linear" holds for 6 steps and then falls to 0 at step 12
    linear, hold, none = (LinearDecay(12, d) for d in ("linear", "hold-linear", "none"))
    assert [linear(s) for s in (0, 3, 6, 9, 12, 13)] == pytest.approx([1, 0.75, 0.5, 0.25, 0, 0])
    assert [hold(s) for s in (0, 3, 6, 9, 12, 13)] == pytest.approx([1, 1, 1, 0.5, 0, 0])
    assert [none(s) for s in (0, 12, 13)] == [1, 1, 1]
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        LinearDecay(12, "cosine")


def test_hold_linear_lr_reaches_the_optimiser(tmp_path):
    config = tiny(lr_decay="hold-linear")
    fit(config, tmp_path, progress=False)
    with open(tmp_path / METRICS_JSONL) as f:
        lrs = [json.loads(line)["lr"] for line in f]
    # the lr of each epoch's last step (4, 8, 12 of 12): held at first, then falling linearly
    assert lrs == pytest.approx([config.lr, config.lr * (2 - 2 * 7 / 12), config.lr * (2 - 2 * 11 / 12)])


@pytest.mark.parametrize("guide,estimator", [("sparse", "lrt"), ("A2", "single-sample")])
def test_objective_is_scaled_data_term_minus_weighted_kl(guide, estimator):
    # The loss of one step is -(N/M Σ log p(y|x,w) - β · kl_scale · KL): data term scaled once, KL counted once.
    config = tiny(guide=guide, estimator=estimator)
    session = Session(config, device=torch.device("cpu"))
    beta = 0.3
    session.guide.kl_scale = session.kl_scale * beta
    x, y = session.x_train[:50], session.y_train[:50]
    kl = session.kl()
    with estimator_handler(estimator):
        loss = session.svi.evaluate_loss(x, y)
    logits = session.recorder.logits
    data = (200 / 50) * torch.distributions.Categorical(logits=logits).log_prob(y).sum().item()
    assert session.recorder.log_lik == pytest.approx(data, rel=1e-6)
    base = 1 / 3 if guide == "A2" else 1.0
    assert loss == pytest.approx(-data + beta * base * kl, rel=1e-5)


def test_mean_estimator_uses_the_posterior_means():
    # the noise-free diagnostic: the data term sees θ itself; with the LRT the same step sees noisy pre-activations
    session = Session(tiny(estimator="mean"), device=torch.device("cpu"))
    x, y = session.x_train[:50], session.y_train[:50]
    theta = {name: value.detach() for name, value in session.guide.median().items()}
    expected = predict_logits(session.model, x, y, params=theta).log_softmax(-1)  # Categorical normalizes logits
    for estimator, equal in (("mean", True), ("lrt", False)):
        with estimator_handler(estimator):
            session.svi.evaluate_loss(x, y)
        assert torch.allclose(session.recorder.logits, expected, atol=1e-5) == equal, estimator


def test_config_validation():
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="resnet")
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="dropout_p"):
        TrainConfig(dropout_p=1.0)
    with pytest.raises(ValueError, match="data_dir applies to dataset='mnist'"):
        TrainConfig(data_dir="/somewhere")
    with pytest.raises(ValueError, match="unknown configuration keys"):
        TrainConfig.from_dict({"model": "mlp", "colour": "red"})
    assert TrainConfig.from_dict(TrainConfig(model="mlp").to_dict()) == TrainConfig(model="mlp")


def test_out_with_a_run_needs_resume_or_overwrite(tmp_path):
    fit(tiny(epochs=1), tmp_path, progress=False)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != LOCK_FILE}  # the lock names its taker
    with pytest.raises(RunError, match="already holds a run"):
        fit(tiny(epochs=1), tmp_path, progress=False)
    with pytest.raises(RunError, match="trained with another configuration: model='lenet300'"):
        fit(None, tmp_path, resume=True, progress=False, overrides={"model": "lenet300"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != LOCK_FILE} == files
    fit(tiny(epochs=2), tmp_path, overwrite=True, progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == 2


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(RunError, match="holds no checkpoint.pt"):
        fit(None, tmp_path, resume=True, progress=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    fit(tiny(epochs=4, lr=0.01), run, progress=False)
    return run


def test_evaluate_pruned_error_equals_pruned_network(trained_run):
    session, _ = open_run(trained_run)
    log_alpha = session.guide.log_alpha()
    # a threshold that prunes about half the weights, so the comparison is not trivial
    threshold = torch.cat([v.flatten() for v in log_alpha.values()]).median().item()
    result = evaluate(trained_run, num_samples=2, threshold=threshold)
    assert 0.3 < result["sparsity"] < 0.7

    session, _ = open_run(trained_run)
    net = prune(session.model, session.guide, threshold=threshold)
    with torch.no_grad():
        net_logits = net(session.x_test)
    error = (net_logits.argmax(-1) != session.y_test).double().mean().item()
    assert result["test_error_pruned"] == error
    theta = session.guide.median()
    logits = predict_logits(
        session.model, session.x_test, session.y_test, params=pruned_params(theta, log_alpha, threshold=threshold)
    )
    assert torch.allclose(logits, net_logits, atol=1e-5)
    assert (trained_run / "evaluation.json").is_file()


@pytest.mark.parametrize("guide", ["A", "A2", "B"])
def test_init_log_alpha_reaches_the_guide(guide):
    from pyro_vdrop.train.components import build_guide, build_model, build_network, load_data

    config = tiny(guide=guide, init_log_alpha=-1.25)
    x, y, _, _ = load_data(config)
    model = build_model(build_network(config), num_data=len(x))
    guide_fn = build_guide(model, config)
    guide_fn(x[:10], y[:10])
    log_alpha = guide_fn.log_alpha()
    assert log_alpha and all(torch.all(v == -1.25) for v in log_alpha.values())
    default = build_guide(model, tiny(guide=guide))
    pyro.clear_param_store()
    default(x[:10], y[:10])
    assert all(torch.all(v == -4.0) for v in default.log_alpha().values())  # the guide's own default
    with pytest.raises(ValueError, match="init_log_alpha applies to the guides that learn log α directly"):
        tiny(guide="gaussian-dropout", init_log_alpha=0.0)


def test_train_clip_run_is_its_own_pruned_network(tmp_path):
    # with train_clip at the pruning threshold, the guide's means are the pruned network's weights
    fit(tiny(epochs=4, lr=0.01, train_clip=0.0), tmp_path, progress=False)
    session, _ = open_run(tmp_path)
    assert session.config.train_clip == 0.0 and session.guide.train_clip == 0.0
    log_alpha = session.guide.log_alpha()
    assert 0 < torch.cat([(v >= 0).flatten() for v in log_alpha.values()]).float().mean() < 1
    theta = session.guide.median()
    for name, la in log_alpha.items():
        assert torch.all(theta[name][la >= 0] == 0)
    result = evaluate(tmp_path, num_samples=2, threshold=0.0)
    assert result["test_error"] == result["test_error_pruned"]


def test_evaluate_mc_predictive(trained_run):
    result = evaluate(trained_run, num_samples=3)
    assert set(result) >= {"test_error", "test_error_pruned", "test_error_mc", "test_nll_mc", "compression"}
    with open(trained_run / "evaluation.json") as f:
        assert json.load(f)["test_error_mc"] == result["test_error_mc"]
    # the MC average of softmaxes is a distribution (its values against explicit weight draws:
    # tests/train/test_evaluation.py::test_predictive_probs_match_explicit_weight_draws)
    session, _ = open_run(trained_run)
    x, y = session.x_test[:20], session.y_test[:20]
    probs = predictive_probs(session.model, session.guide, x, y, num_samples=4, estimator="lrt")
    assert torch.allclose(probs.sum(-1), torch.ones(20, dtype=probs.dtype), atol=1e-6)
    assert (probs >= 0).all()


def test_evaluate_rejects_checkpoint_of_another_model(trained_run, tmp_path):
    # a checkpoint and config.json that agree with each other, but not with the parameters the checkpoint holds
    state = load_checkpoint(trained_run / CHECKPOINT_FILE)
    state["config"]["model"] = "lenet300"
    save_checkpoint(tmp_path / CHECKPOINT_FILE, state)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"config": state["config"]}))
    with pytest.raises(RunError, match="does not fit the model"):
        evaluate(tmp_path)


def test_recorder_picks_the_categorical_observation():
    recorder = ObservedLogits()
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])

    def model():
        w = pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", 20, subsample_size=5):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits + w), obs=y)

    with recorder:
        poutine.condition(model, data={"w": torch.tensor(0.5)})()
    assert recorder.name == "obs"
    expected = 4 * torch.distributions.Categorical(logits=logits).log_prob(y).sum().item()
    assert recorder.log_lik == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(recorder.log_lik)
