# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Why the local reparameterization trick
#
# Stochastic variational inference for a network's weights estimates the ELBO on a
# minibatch of $M$ of the $N$ training points:
#
# $$\widehat{\mathcal{L}} = \frac{N}{M}\sum_{i \in \text{batch}} \log p(y_i \mid x_i, w = f(\epsilon, \phi))
#   - \mathrm{KL}(q_\phi \,\|\, p).$$
#
# Kingma, Salimans & Welling (2015, §2) split the variance of the data term:
#
# $$\mathrm{Var}\,\widehat{\mathcal{L}}_{\text{data}} = N^2\Big(\frac{1}{M}\mathrm{Var}[L_i]
#   + \frac{M-1}{M}\mathrm{Cov}[L_i, L_j]\Big).$$
#
# With **one weight sample shared by the whole minibatch** (what plain Pyro does: the guide
# draws $w$ once per step), the examples are correlated through $w$, and the covariance
# term does not shrink as $M$ grows. With noise that is **independent per example**, the
# covariance vanishes and the variance falls as $1/M$. Drawing a separate weight matrix for
# every example does that, but costs $M \times$ the memory of the weights. The **local
# reparameterization trick** (LRT) gets the same effect for free: for a factorized Gaussian
# $q(w)$ the pre-activations $b = a W$ are Gaussian too,
#
# $$b_{mj} \sim \mathcal{N}\Big(\sum_i a_{mi}\mu_{ij},\; \sum_i a_{mi}^2\sigma_{ij}^2\Big),$$
#
# so one samples $b$ (an $M \times J$ matrix) instead of $W$. Flipout (Wen et al. 2018) is
# another per-example estimator, based on random sign flips.
#
# In pyro-vdrop the estimator is an effect handler around the SVI step:
#
# ```python
# with pyro_vdrop.poutine.local_reparam(estimator="lrt"):   # or "flipout", "per-example", "mean"
#     svi.step(x, y)
# ```
#
# This tutorial measures, at small scale, the two things the paper's Table 1 shows: the
# variance of the gradient with respect to the bottom and top layers' weights for each
# estimator, and the time per step. `PYRO_VDROP_SMOKE=1` makes it a seconds-long smoke
# test (then the numbers mean little). Figures go to
# `tutorial_figures/02_local_reparameterization/`.

# %%
import contextlib
import os
import sys
import time
from pathlib import Path

import matplotlib

INTERACTIVE = hasattr(sys, "ps1") or "ipykernel" in sys.modules
if not INTERACTIVE:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, TraceMeanField_ELBO  # noqa: E402

from pyro_vdrop.datasets import load_embedded_mnist  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.infer.gradient_variance import GRADIENT_ESTIMATORS, gradient_variance  # noqa: E402
from pyro_vdrop.nn import bayesianize, mnist_mlp  # noqa: E402
from pyro_vdrop.optim import JointOptim  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
FIGURES = Path("tutorial_figures") / "02_local_reparameterization"
FIGURES.mkdir(parents=True, exist_ok=True)


def show(fig, name):
    """Saves a figure; shows it too when run interactively."""
    fig.savefig(FIGURES / f"{name}.png", dpi=100, bbox_inches="tight")
    if INTERACTIVE:
        plt.show()
    plt.close(fig)


pyro.set_rng_seed(0)

# %% [markdown]
# ## The model
#
# The paper's MNIST network is a ReLU MLP with three hidden layers; we use
# `pyro_vdrop.nn.mnist_mlp` with narrower layers, on the MNIST subset that ships with the
# package. `AutoVariationalDropout` gives every weight the posterior
# $\mathcal{N}(\theta, \alpha\theta^2)$ (variational dropout "B"); we start at
# $\log\alpha = -1$ ($\alpha \approx 0.37$, the noise of Gaussian dropout with rate
# $p \approx 0.27$), where the estimators differ visibly.

# %%
WIDTH = 32 if SMOKE else 100
BATCH_SIZE = 50 if SMOKE else 100
NUM_DRAWS = 5 if SMOKE else 50  # gradient draws per variance estimate
TRAIN_EPOCHS = 1 if SMOKE else 10

x_train, y_train = load_embedded_mnist("train", flatten=True)
if SMOKE:
    x_train, y_train = x_train[:500], y_train[:500]
num_train = len(x_train)
model = bayesianize(mnist_mlp(WIDTH), num_data=num_train)
guide = AutoVariationalDropout(model, init_log_alpha=-1.0)
guide(x_train[:BATCH_SIZE], y_train[:BATCH_SIZE])  # creates the parameters
bottom, top = "AutoVariationalDropout.locs.fc1.weight", "AutoVariationalDropout.locs.fc4.weight"
print(f"{num_train} training images; sites {model.random_sites}")


def minibatches(batch_size=BATCH_SIZE, count=NUM_DRAWS):
    perm = torch.randperm(num_train)[: batch_size * count]
    return [(x_train[idx], y_train[idx]) for idx in perm.split(batch_size)]


def measure():
    """Gradient variance w.r.t. the bottom and top weight means, for every estimator."""
    batches = minibatches()
    result = {}
    for estimator in GRADIENT_ESTIMATORS:
        variances = gradient_variance(
            model, guide, params=[bottom, top], estimator=estimator, num_draws=NUM_DRAWS, batches=batches
        )
        result[estimator] = (variances[bottom]["variance"], variances[top]["variance"])
    return result


# %% [markdown]
# ## Gradient variance
#
# `pyro_vdrop.infer.gradient_variance` draws the ELBO gradient `num_draws` times — each time
# on another minibatch and with fresh noise, as in the paper — and returns the variance of
# each element of the gradient, averaged over the elements. We measure it for the weight
# means $\theta$ of the bottom layer (`fc1`) and the top layer (`fc4`), once at
# initialisation and once after a few epochs of training with the LRT.
#
# The estimators: `lrt` and `flipout` (per-example noise, cheap), `per-example weights` (a
# separate weight sample for every example: per-example noise, expensive), `single weight
# sample` (one weight sample per minibatch: Pyro without the handler) and `no noise` (the
# mean weights: the variance left is the minibatch sampling alone, a lower bound).

# %%
variance_at_init = measure()

# JointOptim: one torch Adam for all parameters (pyro.optim.Adam keeps one per parameter); the same updates, faster
svi = SVI(model, guide, JointOptim(torch.optim.Adam, {"lr": 1e-3}), TraceMeanField_ELBO())
with local_reparam():
    for _ in range(TRAIN_EPOCHS):
        for x, y in minibatches(count=num_train // BATCH_SIZE):
            svi.step(x, y)
variance_trained = measure()

header = f"{'estimator':22s} {'bottom, init':>13s} {'bottom, trained':>16s} {'top, init':>10s} {'top, trained':>13s}"
print(header)
print("-" * len(header))
for estimator in GRADIENT_ESTIMATORS:
    b0, t0 = variance_at_init[estimator]
    b1, t1 = variance_trained[estimator]
    print(f"{estimator:22s} {b0:13.3g} {b1:16.3g} {t0:10.3g} {t1:13.3g}")

# %% [markdown]
# The shape to look for (the paper's Table 1: LRT 7.8e3 / 1.9e2, separate weight samples
# 1.4e4 / 4.3e2, one weight sample per minibatch 4.9e4 / 8.5e2, no noise 2.8e3 / 1.3e2 for
# top / bottom after 10 epochs): the per-example estimators (LRT, Flipout, separate
# samples) have a lower variance than a single weight sample per minibatch, and no noise is
# lowest. LRT can even beat separate weight samples, since it samples $b$ directly and has
# fewer random numbers in play. Our network and batches are smaller than the paper's, so
# the gaps are smaller, but the order is the same.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
names = list(GRADIENT_ESTIMATORS)
positions = np.arange(len(names))
for ax, layer, index in [(axes[0], "bottom layer (fc1)", 0), (axes[1], "top layer (fc4)", 1)]:
    ax.bar(positions - 0.2, [variance_at_init[n][index] for n in names], width=0.4, label="at init")
    ax.bar(positions + 0.2, [variance_trained[n][index] for n in names], width=0.4, label="trained")
    ax.set_xticks(positions, names, rotation=30, ha="right")
    ax.set(yscale="log", title=f"gradient variance, {layer}")
axes[0].legend()
show(fig, "gradient_variance")

# %% [markdown]
# ## Why per-example noise matters more for larger minibatches
#
# The covariance term does not shrink with $M$: with a single weight sample, doubling the
# batch size barely reduces the variance of the gradient of the (per-example) loss, while
# with LRT it falls roughly as $1/M$. We divide the variance by $N^2$ to put the batch sizes
# on the same scale.

# %%
batch_sizes = [10, 50] if SMOKE else [10, 30, 100, 300]
by_size = {name: [] for name in ("lrt", "single weight sample")}
for m in batch_sizes:
    batches = minibatches(batch_size=m)
    for estimator in by_size:
        v = gradient_variance(model, guide, params=[bottom], estimator=estimator, num_draws=NUM_DRAWS, batches=batches)
        by_size[estimator].append(v[bottom]["variance"] / num_train**2)
fig, ax = plt.subplots(figsize=(5, 3.5))
for estimator, values in by_size.items():
    ax.plot(batch_sizes, values, "o-", label=estimator)
ax.plot(batch_sizes, by_size["lrt"][0] * batch_sizes[0] / np.array(batch_sizes), "k:", label=r"$\propto 1/M$")
ax.set(xscale="log", yscale="log", xlabel="minibatch size M", ylabel=r"Var$[\nabla]$ / $N^2$", title="bottom layer")
ax.legend()
show(fig, "variance_vs_batch_size")

# %% [markdown]
# ## Speed
#
# Variance is only half of the story: an estimator must also be cheap. LRT costs a second
# matrix product (of $a^2$ with $\sigma^2$) and $M \times J$ normal draws per layer;
# Flipout costs about twice the deterministic forward pass; separate weight samples cost
# $M$ weight matrices. We time one SVI step (forward, backward, Adam) for each.

# %%
NUM_TIMED = 3 if SMOKE else 30


def handler(estimator):
    mode = GRADIENT_ESTIMATORS[estimator]
    return contextlib.nullcontext() if mode is None else local_reparam(estimator=mode)


x, y = x_train[:BATCH_SIZE], y_train[:BATCH_SIZE]
timings = {}
for estimator in GRADIENT_ESTIMATORS:
    with handler(estimator):
        svi.step(x, y)  # warm-up
        start = time.perf_counter()
        for _ in range(NUM_TIMED):
            svi.step(x, y)
        timings[estimator] = (time.perf_counter() - start) / NUM_TIMED
for estimator, seconds in timings.items():
    print(f"{estimator:22s} {1e3 * seconds:8.1f} ms per step  ({seconds / timings['no noise']:.1f}× no noise)")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.barh(list(timings), [1e3 * s for s in timings.values()])
ax.set(xlabel="ms per SVI step", title=f"784-{WIDTH}-{WIDTH}-{WIDTH}-10, batch {BATCH_SIZE}")
show(fig, "speed")

# %% [markdown]
# What to expect: separate weight samples are by far the slowest, since they build $M$
# weight matrices. LRT costs two matrix products per layer instead of one; on the paper's
# large layers on a GPU it runs at about the speed of noise-free training. On a small
# network on a CPU, like this one, the fixed costs per step — deriving $\sigma^2$ from
# $\theta$ and $\log\alpha$, the analytic KL, Pyro's tracing and the guide — weigh more,
# and the printout above shows how much on your machine (on a busy 2-core CPU we measured
# about 0.22 s per step for LRT, 0.10 s for one weight sample per minibatch and 1.1 s for
# separate weight samples). See `benchmarks/step_time.py` for timings on the paper's
# network sizes.
#
# **Take-away.** Use `local_reparam()` (LRT) for training whenever the weights only enter
# linear layers and convolutions: per-example noise at the price of a second matrix
# product. `"flipout"` is the other per-example estimator (for the same Gaussian
# posteriors here). The handler raises an error naming the site and the operation when a
# weight is used in a way neither supports.
