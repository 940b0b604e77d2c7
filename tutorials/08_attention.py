# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Embeddings and attention: a sparse Bayesian transformer block
#
# `pyro_vdrop.nn.bayesianize` makes the weights of embeddings, multi-head attention (the packed input
# projection and the output projection), transformer layers and transposed convolutions random, and
# `local_reparam()` samples their outputs instead of their weights. What each layer's noise means:
#
# - `nn.Embedding`: one weight per *example*, dim 0 of the token ids (a sequence of a `(batch, length)`
#   batch), drawn only at the looked-up rows; a token that occurs twice in a sequence is one draw. `lrt` and
#   `per-example` coincide (the looked-up rows are the pre-activations); `flipout` shares one perturbation per
#   call with random signs per sequence; `mean` has no noise; correlated noise per row, column or layer.
# - `nn.Linear`, the feed-forward layers of a transformer, and the input and output projections of
#   `nn.MultiheadAttention`: independent noise per *token* (every leading index of a linear op's input), for
#   every estimator. The packed `in_proj_weight` is one site; its query, key and value slices are
#   independent parts of one Gaussian weight.
# - `nn.Conv*`, `nn.ConvTranspose*`: `lrt` noise per output element (exact marginals), `flipout`,
#   `per-example` and correlated noise per example.
#
# An operation that cannot be sampled exactly raises a `LazyWeightError` naming the site and the operation —
# for example an output layer tied to the embedding (the lookup's noise cannot be shared with a matmul).
#
# This tutorial trains a one-block transformer classifier on a toy task that needs attention, then makes it
# Bayesian with sparse variational dropout (Molchanov et al. 2017) and prunes it.
#
# Run it as a script (`python tutorials/08_attention.py`) or cell by cell. Figures go to
# `tutorial_figures/08_attention/`; `PYRO_VDROP_SMOKE=1` shrinks the data and the number of steps to a few
# seconds (the numbers it prints then mean little).

# %%
import os
import sys
import warnings
from pathlib import Path

import matplotlib

INTERACTIVE = hasattr(sys, "ps1") or "ipykernel" in sys.modules
if not INTERACTIVE:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer import SVI, TraceMeanField_ELBO  # noqa: E402
from pyro.infer.autoguide import init_to_value  # noqa: E402
from torch import nn  # noqa: E402

from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.nn import bayesianize, prune  # noqa: E402
from pyro_vdrop.poutine import LazyWeightError, local_reparam  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
FIGURES = Path("tutorial_figures") / "08_attention"
FIGURES.mkdir(parents=True, exist_ok=True)


def show(fig, name):
    """Saves a figure; shows it too when run interactively."""
    fig.savefig(FIGURES / f"{name}.png", dpi=100, bbox_inches="tight")
    if INTERACTIVE:
        plt.show()
    plt.close(fig)


pyro.set_rng_seed(0)

# %% [markdown]
# ## 1. A task that needs attention
#
# Each sequence has `LENGTH` tokens. The first token is a pointer $k \in \{1, \dots, L-1\}$; the label is
# the token at position $k$, modulo `CLASSES`. Reading the label off position 0 needs attention from the
# first position to position $k$ (and position embeddings, so that the network knows where $k$ is).

# %%
LENGTH, VOCAB, CLASSES, EMBED = 8, 16, 4, 32


def make_data(n):
    tokens = torch.randint(LENGTH, VOCAB, (n, LENGTH))  # content tokens never collide with pointers
    pointer = torch.randint(1, LENGTH, (n,))
    tokens[:, 0] = pointer
    labels = tokens[torch.arange(n), pointer] % CLASSES
    return tokens, labels


num_train = 512 if SMOKE else 4000
x_train, y_train = make_data(num_train)
x_test, y_test = make_data(500 if SMOKE else 2000)
print(f"{num_train} training sequences of {LENGTH} tokens, {CLASSES} classes")

# %% [markdown]
# ## 2. A one-block transformer
#
# Token and position embeddings, one `nn.TransformerEncoderLayer` (multi-head self-attention and a
# feed-forward layer, with LayerNorms), and a linear read-out of position 0. First we train it as an
# ordinary torch network: sparse variational dropout works best from a pretrained network.

# %%


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, EMBED)
        self.positions = nn.Embedding(LENGTH, EMBED)
        self.block = nn.TransformerEncoderLayer(EMBED, 4, 2 * EMBED, dropout=0.0, batch_first=True)
        self.head = nn.Linear(EMBED, CLASSES)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        h = self.block(self.tokens(tokens) + self.positions(positions))
        return self.head(h[:, 0])


def accuracy(logits, labels):
    return (logits.argmax(-1) == labels).float().mean().item()


torch.manual_seed(0)
net = Transformer()
optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
pretrain_steps = 60 if SMOKE else 1500
for _ in range(pretrain_steps):
    batch = torch.randint(0, num_train, (128,))
    loss = F.cross_entropy(net(x_train[batch]), y_train[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
net.eval()
with torch.no_grad():
    print(f"deterministic transformer: test accuracy {accuracy(net(x_test), y_test):.3f}")

# %% [markdown]
# ## 3. Making it Bayesian
#
# `bayesianize` gives every embedding, attention projection and linear weight the log-uniform prior; the
# LayerNorms stay deterministic (a warning lists them). The attention's input projection is one site,
# `block.self_attn.in_proj_weight`, of shape `(3 E, E)`: the queries, keys and values are its slices.

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # the LayerNorms stay deterministic
    model = bayesianize(net, num_data=num_train)
for site in model.random_sites:
    print(f"{site:36s} {tuple(net.get_parameter(site).shape)}")
print("deterministic:", ", ".join(model.deterministic_modules))

# %% [markdown]
# Sparse variational dropout: the additive parameterization, the guide's means start at the pretrained
# weights, and the KL term is annealed from 0 to 1 over the first half of training. `local_reparam()` draws
# one weight per sequence for the embeddings and independent noise per token for the linear layers.

# %%
guide = AutoVariationalDropout(
    model, parameterization="additive", init_loc_fn=init_to_value(values=model.initial_weights())
)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
steps = 40 if SMOKE else 3000
losses = []
with local_reparam():
    for step in range(steps):
        guide.kl_scale = min(1.0, 2 * step / steps)
        batch = torch.randint(0, num_train, (128,))
        losses.append(svi.step(x_train[batch], y_train[batch]) / len(batch))
print(f"final loss/example {sum(losses[-10:]) / 10:.3f} (the data term scaled by N/M, plus the KL / M)")

# %% [markdown]
# ## 4. Sparsity, pruning and the predictive
#
# Weights with $\log\alpha > 3$ are pruned. The pruned network is a plain torch `Transformer` again (the
# torch fast path of `TransformerEncoderLayer` applies to it). The Monte Carlo predictive averages the
# class probabilities of several noisy forward passes under `local_reparam()`.

# %%
sparsity = guide.sparsity()
for site, stats in sparsity["sites"].items():
    print(f"{site:36s} pruned {100 * stats['fraction_pruned']:5.1f}%")
total = sparsity["total"]
print(f"pruned {100 * total['fraction_pruned']:.1f}% of the weights ({total['compression']:.2f}× compression)")
pruned = prune(model, guide).eval()
with torch.no_grad():
    pruned_accuracy = accuracy(pruned(x_test), y_test)
    num_draws = 4 if SMOKE else 20
    probs = 0
    with local_reparam():
        for _ in range(num_draws):
            guide_trace = pyro.poutine.trace(guide).get_trace(x_test)
            probs = probs + pyro.poutine.replay(model, trace=guide_trace)(x_test).softmax(-1) / num_draws
print(f"pruned network: test accuracy {pruned_accuracy:.3f}")
print(f"MC predictive ({num_draws} draws): test accuracy {accuracy(probs, y_test):.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
log_alpha = guide.log_alpha()
for site in model.random_sites:
    axes[0].hist(log_alpha[site].flatten().clamp(-8, 8).numpy(), bins=40, histtype="step", label=site)
axes[0].axvline(3, color="k", ls="--")
axes[0].set(xlabel=r"$\log\alpha$ (clipped to ±8)", ylabel="weights", title="log α per site")
axes[0].legend(fontsize=6)
with torch.no_grad():
    h = pruned.tokens(x_test[:1]) + pruned.positions(torch.arange(LENGTH)[None])
    _, attention = pruned.block.self_attn(h, h, h, need_weights=True)
axes[1].imshow(attention[0].numpy(), cmap="viridis")
axes[1].set(xlabel="key position", ylabel="query position", title=f"attention, pointer = {x_test[0, 0].item()}")
show(fig, "log_alpha_and_attention")

# %% [markdown]
# ## 5. What raises
#
# An operation that local reparameterization cannot sample exactly raises instead of silently drawing
# something else. Tying an output layer to the token embedding is one: the lookup draws the looked-up rows
# of each sequence's weight, and a matmul with the whole weight cannot reuse that draw.

# %%


class Tied(nn.Module):
    """Mean-pooled token embeddings, read out by the embeddings of the first CLASSES tokens (tied weights)."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, EMBED)

    def forward(self, tokens):
        return self.tokens(tokens).mean(1) @ self.tokens.weight[:CLASSES].T


with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    tied = bayesianize(Tied(), num_data=num_train)
tied_guide = AutoVariationalDropout(tied)
try:
    with local_reparam():
        SVI(tied, tied_guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO()).step(x_train[:8], y_train[:8])
except LazyWeightError as e:
    print("LazyWeightError:", str(e).split(". ")[0])
