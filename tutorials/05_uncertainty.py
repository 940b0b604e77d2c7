# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Reading the uncertainty
#
# The point of a Bayesian network is its predictive uncertainty. This tutorial trains the default
# `pyro-vdrop fit` job (sparse variational dropout on LeNet-300-100, embedded MNIST), then reads its
# uncertainty with `pyro_vdrop.metrics`:
#
# 1. **which numbers to trust**: test error, negative log-likelihood (NLL), Brier score and expected
#    calibration error (ECE), for the θ network, the pruned network and the Monte Carlo predictive;
# 2. the **reliability diagram**;
# 3. **aleatoric and epistemic** uncertainty: the predictive entropy split into the expected data entropy and
#    the mutual information (MI), on the test images and on images unlike them;
# 4. how **pruning** changes calibration;
# 5. **saving** the fitted model and loading it back (`pyro_vdrop.save` / `pyro_vdrop.load`).
#
# `PYRO_VDROP_SMOKE=1` shrinks the data and the model so that the tutorial runs in seconds (the numbers it
# prints then mean nothing). Figures go to `tutorial_figures/05_uncertainty/`. `pyro-vdrop evaluate` prints
# the same figures for any run, and `python -m benchmarks.uncertainty` compares them with plain Gaussian dropout
# and the deterministic network.

# %%
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

INTERACTIVE = hasattr(sys, "ps1") or "ipykernel" in sys.modules
if not INTERACTIVE:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

import pyro_vdrop  # noqa: E402
from pyro_vdrop import metrics  # noqa: E402
from pyro_vdrop.nn import lenet_300_100, mnist_mlp, prune  # noqa: E402
from pyro_vdrop.train import TrainConfig, fit, open_run, predict_logits  # noqa: E402
from pyro_vdrop.train.evaluation import posterior, predictive_draws, pruned_params, shifted_inputs  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
FIGURES = Path("tutorial_figures") / "05_uncertainty"
FIGURES.mkdir(parents=True, exist_ok=True)
NUM_SAMPLES = 10  # draws of the MC predictive, as pyro-vdrop evaluate


def show(fig, name):
    """Saves a figure; shows it too when run interactively."""
    fig.savefig(FIGURES / f"{name}.png", dpi=100, bbox_inches="tight")
    if INTERACTIVE:
        plt.show()
    plt.close(fig)


# %% [markdown]
# ## Training
#
# `pyro_vdrop.train.fit` is what `pyro-vdrop fit` runs: 5 epochs of plain pretraining, then 30 epochs of sparse
# variational dropout with the local reparameterization trick and a KL warm-up. `open_run` rebuilds the model
# and guide from the run's checkpoint.

# %%
if SMOKE:
    config = TrainConfig(model="mlp", width=32, train_subset=300, test_subset=200, epochs=2, kl_warmup=1)
    config = TrainConfig(**{**config.to_dict(), "pretrain_epochs": 1})
else:
    config = TrainConfig()  # the defaults of pyro-vdrop fit
run_dir = Path(tempfile.mkdtemp()) / "run"
summary = fit(config, run_dir, progress=False)
session, _ = open_run(run_dir)
model, guide, x, y = session.model, session.guide, session.x_test, session.y_test
print(f"{config.model}, {config.guide} guide: {summary['compression']:.0f}× compression in {summary['time']:.0f} s")

# %% [markdown]
# ## 1. Which numbers to trust
#
# Three predictors come out of one fit:
#
# - the **θ network**: every weight at its posterior mean; one forward pass, no uncertainty about the weights;
# - the **pruned network**: θ with the weights of $\log\alpha > 3$ set to 0 — what you would deploy;
# - the **MC predictive**: $\frac1S\sum_s p(y\mid x, w_s)$ over $S$ weight draws $w_s \sim q(w)$ — the
#   Bayesian answer, $S$ times the cost.
#
# For each we compute:
#
# - **error**: says nothing about the probabilities;
# - **NLL** $-\frac1N\sum_i\log p_{i,y_i}$: a proper scoring rule, the figure to trust first — it punishes a
#   confident mistake without bound. Compute it from the *mean* of the draws' probabilities;
# - **Brier score** $\frac1N\sum_i\sum_c(p_{ic}-[y_i=c])^2$: also proper, but bounded, so a few confident
#   mistakes weigh less than in the NLL;
# - **ECE**: the gap between confidence and accuracy, averaged over bins of confidence. Easy to read, but *not*
#   a proper score (a predictor that always says "10% each" has ECE ≈ 0 on balanced data), it depends on the
#   binning, and on 1,000 test images it is biased upward by a few tenths of a percent. Report both binnings:
#   equal-width (the usual) and equal-mass (every bin equally full; more stable when most confidences are
#   near 1).

# %%
theta, log_alpha = posterior(guide)
probs = {
    "θ network": predict_logits(model, x, y, params=theta).softmax(-1),
    "pruned": predict_logits(model, x, y, params=pruned_params(theta, log_alpha)).softmax(-1),
}
pyro.set_rng_seed(0)
draws = predictive_draws(model, guide, x, y, num_samples=NUM_SAMPLES, estimator=config.estimator)
probs[f"MC predictive (S={NUM_SAMPLES})"] = draws.mean(0)

print(f"{'':<24} {'error':>7} {'NLL':>7} {'Brier':>7} {'ECE':>7} {'ECE (mass)':>10}")
for name, p in probs.items():
    error = float((p.argmax(-1) != y).double().mean())
    nll = metrics.negative_log_likelihood(p, y)
    brier = metrics.brier_score(p, y)
    ece = metrics.expected_calibration_error(p, y)
    ece_mass = metrics.expected_calibration_error(p, y, binning="equal-mass")
    print(f"{name:<24} {error:7.2%} {nll:7.4f} {brier:7.4f} {ece:7.4f} {ece_mass:10.4f}")

# %% [markdown]
# ## 2. The reliability diagram
#
# Group the test images by confidence (the top-class probability) and compare each bin's accuracy with its mean
# confidence: points below the diagonal are over-confident, above it under-confident. Most images sit in the
# last bin, so the points at lower confidence rest on few images — read the bar chart with them.

# %%
fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 4))
ax.plot([0, 1], [0, 1], ":", color="gray", label="calibrated")
for name, p in probs.items():
    diagram = metrics.reliability_diagram(p, y)
    keep = diagram.count > 0
    ax.plot(diagram.confidence[keep], diagram.accuracy[keep], "o-", markersize=4, label=name)
ax.set_xlabel("confidence")
ax.set_ylabel("accuracy")
ax.legend(fontsize=8)
diagram = metrics.reliability_diagram(draws.mean(0), y)
bars.bar(diagram.lower, diagram.count, width=diagram.upper - diagram.lower, align="edge")
bars.set_yscale("log")
bars.set_xlabel("confidence (MC predictive)")
bars.set_ylabel("test images")
show(fig, "reliability")

# %% [markdown]
# ## 3. Aleatoric and epistemic uncertainty
#
# The entropy of the predictive mean splits into two parts:
#
# $$H\Bigl[\tfrac1S\textstyle\sum_s p_s\Bigr] = \underbrace{\tfrac1S\textstyle\sum_s H[p_s]}_{\text{aleatoric}}
# + \underbrace{I[y; w\mid x]}_{\text{epistemic (MI)}} .$$
#
# The **aleatoric** part is what every single network of the posterior finds ambiguous (a digit that could be a
# 4 or a 9): more data of the same kind does not remove it. The **mutual information** is how much the draws
# *disagree*: it is large where the weights are uncertain, which is where the model has seen no data, and it is
# the number to use to flag inputs unlike the training set. It is 0 for a deterministic network, so only a
# Bayesian predictive has it; its size depends on $S$ and on how much noise the posterior keeps, so compare MI
# between models by how well it *ranks* inputs (an AUROC), not by its raw size.
#
# The shifted sets need no download: the test digits rotated by 90°, the test digits under heavy pixel noise, and
# uniform noise images.

# %%
x_in, y_in, shifts = shifted_inputs(x, y, seed=0)
sets = {"test": x_in, **{name: inputs for name, (inputs, _) in shifts.items()}}
parts = {}
pyro.set_rng_seed(1)
for name, inputs in sets.items():
    sample_probs = predictive_draws(model, guide, inputs, num_samples=NUM_SAMPLES, estimator=config.estimator)
    parts[name] = metrics.decompose_uncertainty(sample_probs)

print(f"{'set':<14} {'entropy':>8} {'aleatoric':>9} {'MI':>8} {'AUROC(MI)':>9} {'AUROC(H)':>9}")
for name, d in parts.items():
    row = f"{name:<14} {d.total.mean():8.4f} {d.aleatoric.mean():9.4f} {d.epistemic.mean():8.5f}"
    if name != "test":
        is_out = torch.cat([torch.zeros(len(x_in), dtype=torch.bool), torch.ones(len(sets[name]), dtype=torch.bool)])
        auroc_mi = metrics.auroc(torch.cat([parts["test"].epistemic, d.epistemic]), is_out)
        auroc_h = metrics.auroc(torch.cat([parts["test"].total, d.total]), is_out)
        row += f" {auroc_mi:9.3f} {auroc_h:9.3f}"
    print(row)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for name, d in parts.items():
    axes[0].hist(d.total.numpy(), bins=30, histtype="step", density=True, label=name)
    axes[1].hist(d.epistemic.numpy(), bins=30, histtype="step", density=True, label=name)
axes[0].set_xlabel("predictive entropy (nats)")
axes[1].set_xlabel("mutual information (nats)")
axes[0].legend(fontsize=8)
show(fig, "entropy")

# %% [markdown]
# An AUROC of 0.5 is chance; 1 means every shifted image has a higher score than every test image. On the default
# run (embedded data, `python -m benchmarks.uncertainty`) the MI tells uniform noise from test digits with an AUROC
# of about 0.9 and rotated or noisy digits with about 0.8: useful for ranking inputs to check, far from a reliable
# detector. The entropy does about as well, and on this small data set the deterministic pretrained network's
# entropy does as well too: the mutual information is the part of the uncertainty only a Bayesian predictive has,
# not a guarantee of a better detector. Measure it on your own shifts before relying on it.
#
# ## 4. Pruning and calibration
#
# Pruning removes the weights whose posterior is mostly noise. Lowering the threshold removes more: watch the
# NLL and ECE, not only the error. The pruned network is also *deterministic*: it keeps θ's calibration and has
# no mutual information, so deploy it for accuracy and size, and keep the MC predictive where you need to flag
# unfamiliar inputs. Note that the MC predictive is not automatically the best calibrated: on the default run its
# NLL and ECE are slightly *worse* than the θ network's (0.212 vs 0.204, 0.027 vs 0.023), and with a fixed dropout
# rate (`--guide gaussian-dropout`) its ECE triples (0.061 vs 0.013, under-confident). Check, don't assume.

# %%
print(f"{'threshold':>9} {'kept':>7} {'error':>7} {'NLL':>7} {'ECE':>7}")
for threshold in (-1.0, 0.0, 1.0, 2.0, 3.0, 4.0):
    pruned = pruned_params(theta, log_alpha, threshold=threshold)
    p = predict_logits(model, x, y, params=pruned).softmax(-1)
    kept = sum(int((la.expand(theta[k].shape) <= threshold).sum()) for k, la in log_alpha.items())
    total = sum(v.numel() for v in theta.values())
    error = float((p.argmax(-1) != y).double().mean())
    nll, ece = metrics.negative_log_likelihood(p, y), metrics.expected_calibration_error(p, y)
    print(f"{threshold:9.1f} {kept / total:7.2%} {error:7.2%} {nll:7.4f} {ece:7.4f}")

# %% [markdown]
# ## 5. Saving and loading the fitted model
#
# `pyro_vdrop.save` writes the model and guide as plain data (tensors, numbers, strings), so the file loads with
# `torch.load(weights_only=True)` and cannot run code. A file cannot hold the network's code, so `load` asks for
# the architecture: a fresh torch network of the same class. It rebuilds the Bayesian model and the guide, creates
# the guide's parameters (Pyro autoguides otherwise create them lazily, on their first call) and restores them
# bitwise.

# %%
path = run_dir.parent / "lenet300-vd.pt"
pyro_vdrop.save(path, model, guide)
network = mnist_mlp(32) if SMOKE else lenet_300_100()
model2, guide2 = pyro_vdrop.load(path, network)
with torch.no_grad():
    same = torch.equal(prune(model, guide)(x), prune(model2, guide2)(x))
print(f"saved {path.stat().st_size / 1e6:.1f} MB; the reloaded pruned network gives the same logits: {same}")
