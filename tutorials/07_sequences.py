# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Sparse variational dropout in an LSTM
#
# A Bayesian recurrent network draws its weights **once per sequence**: every time step of a
# sequence sees the same weight. The local reparameterization trick samples each
# pre-activation independently, which over time steps would be a new weight at every step — a
# different model. pyro-vdrop's recurrent layers (`pyro_vdrop.nn.LSTM`, `GRU`, `RNN`; `bayesianize`
# swaps them in for torch's) therefore run the recurrence with per-sequence noise:
#
# - **Flipout** with one sign vector per sequence (Wen et al. 2018), for a factorized posterior;
# - **correlated noise on the gate inputs** (variational dropout A: the Gaussian form of Gal &
#   Ghahramani's variational RNN dropout), for `noise="correlated"`;
#
# both exact for the model. `local_reparam(estimator="lrt")` on a recurrent weight with
# independent noise raises an error saying so.
#
# This tutorial follows Lobacheva, Chirkova & Vetrov (2017), "Bayesian sparsification of recurrent
# neural networks": sparse variational dropout on the gate weights of an LSTM that reads an MNIST
# digit one row at a time (28 steps of 28 pixels), then reports the accuracy and the share of
# weights pruned in every gate matrix.
#
# **Data.** The 5,000-image MNIST subset that ships with the package, or the full set if
# `PYRO_VDROP_MNIST_DIR` names a folder with the four IDX files. `PYRO_VDROP_SMOKE=1` uses a few
# hundred images and very few steps (a smoke test: its numbers mean nothing). Figures go to
# `tutorial_figures/07_sequences/`. The default run takes a few minutes on a 2-core CPU: the
# recurrence under `local_reparam` is a Python loop over time steps (see
# `benchmarks/recurrent_step.py` for its cost against `nn.LSTM`).

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
from torch import nn  # noqa: E402

from pyro_vdrop.datasets import load_dataset  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout, init_to_fan_in  # noqa: E402
from pyro_vdrop.nn import bayesianize, gate_sparsity, prune  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
MNIST_DIR = os.environ.get("PYRO_VDROP_MNIST_DIR")
FIGURES = Path("tutorial_figures") / "07_sequences"
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
source = dict(name="mnist", data_dir=MNIST_DIR) if MNIST_DIR and not SMOKE else dict(name="embedded")
x_train, y_train = load_dataset(split="train", **source)
x_test, y_test = load_dataset(split="test", **source)
x_train, x_test = x_train.squeeze(1), x_test.squeeze(1)  # (N, 28 rows, 28 pixels): a sequence of rows
if SMOKE:
    x_train, y_train, x_test, y_test = x_train[:300], y_train[:300], x_test[:200], y_test[:200]
num_train = len(x_train)
print(f"data: {source['name']}, {num_train} training and {len(x_test)} test sequences of {x_train.shape[1]} rows")

HIDDEN = 16 if SMOKE else 64
BATCH_SIZE = 100
PRETRAIN_EPOCHS = 6 if SMOKE else 8
EPOCHS = 2 if SMOKE else 15
ANNEAL_EPOCHS = (0, 1) if SMOKE else (2, 8)  # KL weight from 0 to 1 over these epochs


class RowLSTM(nn.Module):
    """An LSTM over the rows of an image; the last hidden state gives the class logits."""

    def __init__(self, hidden=HIDDEN):
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def batches(n, size=BATCH_SIZE):
    perm = torch.randperm(n)
    return [perm[i : i + size] for i in range(0, n, size)]


def accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(-1) == y).float().mean().item()


# %% [markdown]
# ## 1. Pretraining
#
# As for feed-forward nets, sparse VD starts best from a trained network: a few epochs of
# ordinary training with torch's fused `nn.LSTM`.

# %%
net = RowLSTM()
optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
for _ in range(PRETRAIN_EPOCHS):
    for idx in batches(num_train):
        optimizer.zero_grad()
        F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
print(f"pretrained LSTM: test accuracy {accuracy(net, x_test, y_test):.2%}")

# %% [markdown]
# ## 2. Sparse VD on the gate weights
#
# `bayesianize` makes `lstm.weight_ih_l0` (4·hidden × 28: the input, forget, cell and output
# gates' weights stacked in torch's order) and `lstm.weight_hh_l0` (4·hidden × hidden) random, and
# `fc.weight` too; biases stay point estimates. The guide is sparse VD (additive
# parameterization). Training runs under `local_reparam(estimator="flipout")`: the `Linear` layer
# gets Flipout per example, the LSTM Flipout with one sign vector per sequence, shared by its 28
# steps.

# %%
model = bayesianize(net, num_data=num_train)
print("random sites:", ", ".join(model.random_sites))
guide = AutoVariationalDropout(
    model,
    parameterization="additive",
    init_loc_fn=init_to_value(values=model.initial_weights(), fallback=init_to_fan_in),
)
num_steps = EPOCHS * math.ceil(num_train / BATCH_SIZE)
optim = pyro.optim.LambdaLR(
    {"optimizer": torch.optim.Adam, "optim_args": {"lr": 3e-3}, "lr_lambda": lambda step: 1 - step / num_steps}
)
svi = SVI(model, guide, optim, TraceMeanField_ELBO())

history = []
with local_reparam(estimator="flipout"):
    for epoch in range(EPOCHS):
        start, end = ANNEAL_EPOCHS
        guide.kl_scale = min(1.0, max(0.0, (epoch - start) / (end - start)))
        step_losses = []
        for idx in batches(num_train):
            step_losses.append(svi.step(x_train[idx], y_train[idx]))
            optim.step()
        loss = float(np.mean(step_losses)) / num_train
        sparsity = guide.sparsity(THRESHOLD)["total"]["fraction_pruned"]
        history.append((epoch, loss, sparsity))
        print(f"epoch {epoch:3d}  kl weight {guide.kl_scale:.2f}  loss/example {loss:8.3f}  pruned {sparsity:.1%}")

# %% [markdown]
# ## 3. Accuracy and sparsity per gate matrix
#
# `prune` returns a plain torch `RowLSTM` (with torch's fused `nn.LSTM`) whose weights are the
# means $\theta$, zeroed where $\log\alpha > 3$. `gate_sparsity` splits each recurrent weight
# matrix into its gate blocks. Lobacheva et al. find the hidden-to-hidden weights sparser than the
# input-to-hidden ones, and whole input pixels (the blank border rows' columns) switched off.

# %%
pruned = prune(model, guide, threshold=THRESHOLD)
stats = guide.sparsity(THRESHOLD)
print(f"pruned network: test accuracy {accuracy(pruned, x_test, y_test):.2%}")
for site, s in stats["sites"].items():
    print(f"  {site:16s} pruned {s['fraction_pruned']:6.1%}  kept {s['num_kept']:6d} of {s['num_weights']:6d}")
print(f"  {'total':16s} pruned {stats['total']['fraction_pruned']:6.1%}  ({stats['total']['compression']:.1f}×)")
gates = gate_sparsity(guide.log_alpha(), model, THRESHOLD)
print("gate sparsity (share of weights pruned):")
print(f"  {'':16s}" + "".join(f"{gate:>9s}" for gate in next(iter(gates.values()))))
for site, row in gates.items():
    print(f"  {site:16s}" + "".join(f"{v:9.1%}" for v in row.values()))

# %%
log_alpha = guide.log_alpha()
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
epochs, losses, sparsities = zip(*history)
axes[0].plot(epochs, losses, color="C0")
axes[0].set(xlabel="epoch", ylabel="loss per example", title="training")
ax = axes[0].twinx()
ax.plot(epochs, sparsities, color="C1")
ax.set(ylabel="share pruned", ylim=(0, 1))
for ax, site in zip(axes[1:], ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]):
    kept = (log_alpha[site] <= THRESHOLD).float().numpy()
    ax.imshow(kept, aspect="auto", cmap="Greys", interpolation="nearest")
    for k in range(1, 4):
        ax.axhline(k * kept.shape[0] / 4 - 0.5, color="C3", lw=0.8)
    ax.set(title=f"{site}: kept weights (black)", xlabel="input unit", ylabel="gate rows: i, f, g, o")
show(fig, "gates")
