# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Sparse variational dropout on MNIST
#
# Molchanov, Ashukha & Vetrov (2017) noticed that when variational dropout learns one
# $\alpha$ *per weight* and is allowed $\alpha \gg 1$, most weights of a network end up
# with huge dropout rates: they are noise, and can be removed. On LeNet-300-100 they report
# 1.92% test error with 68× fewer weights.
#
# This tutorial walks through that recipe with pyro-vdrop:
#
# 1. pretrain LeNet-300-100 as an ordinary torch network;
# 2. make it Bayesian with `bayesianize` and fit sparse variational dropout
#    (`AutoVariationalDropout(parameterization="additive")`) with the local
#    reparameterization trick, annealing the KL term;
# 3. prune the weights with $\log\alpha > 3$ and measure the test error and the compression;
# 4. look at the $\log\alpha$ histogram and at the pruned first-layer masks.
#
# **Data.** If the environment variable `PYRO_VDROP_MNIST_DIR` names a folder with the
# four MNIST IDX files, the full data set is used; otherwise the 5,000-image subset that
# ships with the package. `PYRO_VDROP_SMOKE=1` uses a few hundred images and a couple of
# epochs (a smoke test: the numbers it prints mean nothing). Figures go to
# `tutorial_figures/03_sparse_mnist/`.
#
# On a laptop CPU the default (embedded data) run takes a few minutes. The paper's numbers
# need the full data and about 200 epochs: use the `pyro-vdrop` command for that.

# %%
import math
import os
import sys
from pathlib import Path

import matplotlib

INTERACTIVE = hasattr(sys, "ps1") or "ipykernel" in sys.modules
if not INTERACTIVE:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer import SVI, TraceMeanField_ELBO  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_value  # noqa: E402

from pyro_vdrop.datasets import load_dataset  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout, init_to_fan_in  # noqa: E402
from pyro_vdrop.nn import bayesianize, lenet_300_100, prune  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
MNIST_DIR = os.environ.get("PYRO_VDROP_MNIST_DIR")
FIGURES = Path("tutorial_figures") / "03_sparse_mnist"
FIGURES.mkdir(parents=True, exist_ok=True)
THRESHOLD = 3.0  # prune at log α > 3 (Molchanov et al. 2017)


def show(fig, name):
    """Saves a figure; shows it too when run interactively."""
    fig.savefig(FIGURES / f"{name}.png", dpi=100, bbox_inches="tight")
    if INTERACTIVE:
        plt.show()
    plt.close(fig)


pyro.set_rng_seed(0)

# %%
if MNIST_DIR and not SMOKE:
    source = dict(name="mnist", data_dir=MNIST_DIR)
else:
    source = dict(name="embedded")
x_train, y_train = load_dataset(split="train", flatten=True, **source)
x_test, y_test = load_dataset(split="test", flatten=True, **source)
if SMOKE:
    x_train, y_train, x_test, y_test = x_train[:500], y_train[:500], x_test[:200], y_test[:200]
num_train = len(x_train)
print(f"data: {source['name']}, {num_train} training and {len(x_test)} test images")

BATCH_SIZE = 100
PRETRAIN_EPOCHS = 1 if SMOKE else 5
EPOCHS = 2 if SMOKE else 30
ANNEAL_EPOCHS = (0, 2) if SMOKE else (3, 12)  # KL weight from 0 to 1 over these epochs


def batches(n, size=BATCH_SIZE):
    perm = torch.randperm(n)
    return [perm[i : i + size] for i in range(0, n, size)]


def error_rate(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(-1) != y).float().mean().item()


# %% [markdown]
# ## 1. Pretraining
#
# Sparse variational dropout works best from a trained network (Molchanov et al. §5): the
# means $\theta$ start at good values, and the dropout rates only have to find out which
# weights are superfluous. A few epochs of ordinary training suffice.

# %%
net = lenet_300_100()
optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
for _ in range(PRETRAIN_EPOCHS):
    for idx in batches(num_train):
        optimizer.zero_grad()
        F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
print(f"pretrained LeNet-300-100: test error {error_rate(net, x_test, y_test):.2%}")

# %% [markdown]
# ## 2. Sparse variational dropout
#
# `bayesianize` puts the log-uniform prior on the three weight matrices (`fc1.weight`,
# `fc2.weight`, `fc3.weight`; the biases stay point estimates) and observes the labels in
# `pyro.plate("data", size=num_train, subsample_size=batch)`.
#
# The additive parameterization learns $\theta$ and $\log\sigma^2$ (initialised at
# $-10$), with $\log\alpha = \log\sigma^2 - \log\theta^2$ unbounded and clipped to
# $[-8, 8]$ inside the KL only. The learning rate decays linearly to 0 and the KL weight
# rises linearly from 0 to 1, both as in the paper's recipe.

# %%
model = bayesianize(net, num_data=num_train)
guide = AutoVariationalDropout(
    model,
    parameterization="additive",
    init_loc_fn=init_to_value(values=model.initial_weights(), fallback=init_to_fan_in),
)
num_steps = EPOCHS * math.ceil(num_train / BATCH_SIZE)
optim = pyro.optim.LambdaLR(
    {"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-3}, "lr_lambda": lambda step: 1 - step / num_steps}
)
svi = SVI(model, guide, optim, TraceMeanField_ELBO())

history = []
with local_reparam():
    for epoch in range(EPOCHS):
        start, end = ANNEAL_EPOCHS
        guide.kl_scale = min(1.0, max(0.0, (epoch - start) / (end - start)))
        step_losses = []
        for idx in batches(num_train):
            step_losses.append(svi.step(x_train[idx], y_train[idx]))  # -ELBO estimate for all the data
            optim.step()  # the learning-rate schedule
        loss = float(np.mean(step_losses)) / num_train
        sparsity = guide.sparsity(THRESHOLD)["total"]["fraction_pruned"]
        history.append((epoch, loss, sparsity))
        if epoch % max(1, EPOCHS // 10) == 0 or epoch == EPOCHS - 1:
            print(f"epoch {epoch:3d}  kl weight {guide.kl_scale:.2f}  loss/example {loss:8.3f}  pruned {sparsity:.1%}")

# %% [markdown]
# ## 3. Pruning and compression
#
# `prune(model, guide)` returns a plain torch LeNet-300-100 whose weights are the means
# $\theta$, zeroed where $\log\alpha > 3$. Its test error is the figure to report; the
# compression is the number of weights over the number kept.

# %%
pruned = prune(model, guide, threshold=THRESHOLD)
stats = guide.sparsity(THRESHOLD)
print(f"pruned network: test error {error_rate(pruned, x_test, y_test):.2%}")
for site, s in stats["sites"].items():
    print(f"  {site:11s} kept {s['num_kept']:6d} of {s['num_weights']:6d}  ({s['compression']:.1f}×)")
print(
    f"  total       kept {stats['total']['num_kept']:6d} of {stats['total']['num_weights']:6d}  "
    f"({stats['total']['compression']:.1f}×)"
)

fig, ax1 = plt.subplots(figsize=(6, 3.5))
epochs, losses, sparsities = zip(*history)
ax1.plot(epochs, losses, color="C0")
ax1.set(xlabel="epoch", ylabel="loss per example", yscale="log")
ax2 = ax1.twinx()
ax2.plot(epochs, sparsities, color="C1")
ax2.set(ylabel="share of weights pruned", ylim=(0, 1))
ax1.set_title("training")
show(fig, "training")

# %% [markdown]
# ## 4. What the dropout rates look like
#
# The histogram of $\log\alpha$ is bimodal after training: a mode of weights that carry
# signal (small $\alpha$) and a large mode of weights that are pure noise, far beyond the
# threshold. Plotting $|\theta|$ against $\log\alpha$ shows that the pruned weights are
# also the small ones.

# %%
log_alpha = guide.log_alpha()
theta = guide.median()
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for site, la in log_alpha.items():
    axes[0].hist(la.flatten().numpy(), bins=80, histtype="step", label=site)
axes[0].axvline(THRESHOLD, color="k", ls="--", label="threshold")
axes[0].set(xlabel=r"$\log\alpha$", ylabel="weights", yscale="log", title=r"$\log\alpha$ per layer")
axes[0].legend()
la, th = log_alpha["fc1.weight"].flatten(), theta["fc1.weight"].flatten()
keep = torch.randperm(la.numel())[:20000]
axes[1].scatter(la[keep], th[keep].abs(), s=1, alpha=0.3)
axes[1].axvline(THRESHOLD, color="k", ls="--")
axes[1].set(xlabel=r"$\log\alpha$", ylabel=r"$|\theta|$", yscale="log", title="fc1: mean vs dropout rate")
show(fig, "log_alpha")

# %% [markdown]
# Each row of `fc1.weight` connects one hidden unit to the 784 pixels. Reshaped to
# 28 × 28, the kept weights show what the unit looks at; summing over units shows which
# pixels the network still reads at all (the border pixels of MNIST are always blank, so
# their weights go first).

# %%
mask = (log_alpha["fc1.weight"] <= THRESHOLD).float()  # (300, 784)
alive = mask.sum(1) > 0
print(
    f"fc1: {int(alive.sum())} of 300 hidden units keep an input weight; "
    f"{int((mask.sum(0) > 0).sum())} of 784 pixels are still read"
)

fig, axes = plt.subplots(3, 6, figsize=(11, 5.5))
axes[0, 0].imshow(mask.sum(0).reshape(28, 28).numpy(), cmap="viridis")
axes[0, 0].set_title("kept weights\nper pixel", fontsize=9)
units = torch.argsort(mask.sum(1), descending=True)[: axes.size - 1]
for ax, unit in zip(axes.flat[1:], units):
    w = (theta["fc1.weight"][unit] * mask[unit]).reshape(28, 28).numpy()
    bound = np.abs(w).max() or 1.0
    ax.imshow(w, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_title(f"unit {int(unit)}: {int(mask[unit].sum())} kept", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
show(fig, "fc1_masks")

# %% [markdown]
# ## Notes
#
# - Sparsity is not a Bayesian Occam effect: under the improper log-uniform prior the true
#   posterior is itself improper (Hron et al. 2018). Read the KL as a regulariser that
#   happens to prefer noise weights, and judge the pruned network by its test error.
# - The threshold 3 corresponds to a dropout rate $p = \alpha/(1+\alpha) \approx 0.95$.
# - For the full recipe (200 epochs on all of MNIST, checkpoints, metrics), use the
#   `pyro-vdrop` command line.
