# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Quickstart: variational dropout in Pyro
#
# Variational dropout (Kingma, Salimans & Welling, 2015) puts the scale-invariant
# log-uniform prior $p(w) \propto 1/|w|$ on every weight and fits the Gaussian-dropout
# posterior
#
# $$q(w) = \mathcal{N}(w \mid \theta, \alpha\theta^2)$$
#
# by ordinary stochastic variational inference. The dropout rate $\alpha$ is learned per
# weight; a weight whose $\log\alpha$ grows large carries no signal and can be pruned
# (Molchanov et al. 2017 prune at $\log\alpha > 3$).
#
# This tutorial fits two models with plain `pyro.infer.SVI`:
#
# 1. a sparse Bayesian linear regression, written as a Pyro function;
# 2. a small neural-network classifier, made from a torch `nn.Module` with
#    `pyro_vdrop.nn.bayesianize` and trained with the local reparameterization trick;
#
# and reads both posteriors with ArviZ.
#
# Run it as a script (`python tutorials/01_quickstart.py`) or cell by cell in an editor
# that understands `# %%` cells. Figures go to `tutorial_figures/01_quickstart/`;
# `PYRO_VDROP_SMOKE=1` shrinks the data and the number of steps to a few seconds.

# %%
import os
import sys
from pathlib import Path

import matplotlib

INTERACTIVE = hasattr(sys, "ps1") or "ipykernel" in sys.modules
if not INTERACTIVE:
    matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, TraceMeanField_ELBO  # noqa: E402
from scipy.special import logsumexp  # noqa: E402
from torch import nn  # noqa: E402

from pyro_vdrop.arviz import to_inference_data  # noqa: E402
from pyro_vdrop.distributions import ImproperLogUniform  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.nn import bayesianize, prune  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
FIGURES = Path("tutorial_figures") / "01_quickstart"
FIGURES.mkdir(parents=True, exist_ok=True)


def show(fig, name):
    """Saves a figure; shows it too when run interactively."""
    fig.savefig(FIGURES / f"{name}.png", dpi=100, bbox_inches="tight")
    if INTERACTIVE:
        plt.show()
    plt.close(fig)


pyro.set_rng_seed(0)

# %% [markdown]
# ## 1. A sparse Bayesian linear regression
#
# Ten inputs, of which only the first two matter. The model puts the log-uniform prior on
# the weight vector; the likelihood is Gaussian. Observations go inside a `pyro.plate`, so
# that Pyro (and later ArviZ) knows they are conditionally independent.

# %%
NUM_FEATURES = 10
true_w = torch.zeros(NUM_FEATURES)
true_w[:2] = torch.tensor([2.0, -1.5])
num_data = 200 if SMOKE else 500
x = torch.randn(num_data, NUM_FEATURES)
y = x @ true_w + 0.5 * torch.randn(num_data)


def regression(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


# %% [markdown]
# `AutoVariationalDropout` builds $q(w) = \mathcal{N}(\theta, \alpha\theta^2)$ for every
# site with the log-uniform prior. We use the *additive* parameterization of sparse
# variational dropout: it learns $\theta$ and $\log\sigma^2$ and derives
# $\log\alpha = \log\sigma^2 - \log\theta^2$, which lets $\alpha$ grow without bound.
#
# `TraceMeanField_ELBO` uses the registered analytic approximation of
# $\mathrm{KL}(q \,\|\, p)$, which depends on $\alpha$ only.

# %%
guide = AutoVariationalDropout(regression, parameterization="additive")
num_steps = 200 if SMOKE else 2000
optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.01 ** (1 / num_steps)})  # lr decays 100×
svi = SVI(regression, guide, optim, TraceMeanField_ELBO())
losses = [svi.step(x, y) for _ in range(num_steps)]

theta = guide.median()["w"]
log_alpha = guide.log_alpha()["w"]
print("true w   ", " ".join(f"{v:6.2f}" for v in true_w))
print("theta    ", " ".join(f"{v:6.2f}" for v in theta))
print("log alpha", " ".join(f"{v:6.2f}" for v in log_alpha))
print(guide.sparsity()["total"])

# %% [markdown]
# The two relevant weights have a very negative $\log\alpha$ (they are almost
# deterministic); the irrelevant ones drift towards large $\log\alpha$, the dropout rate
# at which the weight is pure noise. With more steps they cross the pruning threshold 3.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot(losses)
axes[0].set(xlabel="step", ylabel="loss (−ELBO)", yscale="log", title="training")
axes[1].bar(range(NUM_FEATURES), log_alpha.numpy())
axes[1].axhline(3.0, color="k", ls="--", label="prune threshold")
axes[1].set(xlabel="input", ylabel=r"$\log\alpha$", title="learned dropout rates")
axes[1].legend()
show(fig, "regression")

# %% [markdown]
# ### The posterior in ArviZ
#
# `to_inference_data` draws from the guide, replays the model and returns an
# `arviz.InferenceData` with the usual groups (`posterior`, `posterior_predictive`,
# `log_likelihood`, `observed_data`, `constant_data`) plus a `variational` group holding
# $\theta$, $\log\alpha$ and the per-layer sparsity.

# %%
idata = to_inference_data(regression, guide, x, y, num_samples=50 if SMOKE else 1000, chains=2, elbo=losses)
print(idata)
print(az.summary(idata, var_names=["w"]))

# %% [markdown]
# $\log\alpha$ is a variational parameter, not a random quantity: it is stored in the
# posterior as a constant, so summarise it with `kind="stats"` (mean = the value).

# %%
print(az.summary(idata, var_names=["w_log_alpha"], kind="stats"))
print(idata.variational["sparsity"].to_series())

# %% [markdown]
# ## 2. A small Bayesian neural network
#
# Two interleaved half-moons in 2-D, plus eight inputs of pure noise. A torch network
# becomes a Pyro model with `bayesianize`: every `nn.Linear` weight gets the log-uniform
# prior, and the model observes the labels at site `"obs"` inside
# `pyro.plate("data", size=num_data, subsample_size=batch)`, which scales minibatch
# likelihoods by $N/M$.


# %%
def moons(n, noise=0.15, num_noise_inputs=8):
    label = torch.randint(0, 2, (n,))
    t = torch.rand(n) * torch.pi
    first = torch.stack([t.cos(), t.sin()], -1)
    second = torch.stack([1 - t.cos(), 0.5 - t.sin()], -1)
    xy = torch.where(label[:, None] == 0, first, second) + noise * torch.randn(n, 2)
    return torch.cat([xy, torch.randn(n, num_noise_inputs)], -1), label


num_train = 512 if SMOKE else 1024
x_train, y_train = moons(num_train)
x_test, y_test = moons(256 if SMOKE else 1000)

net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
model = bayesianize(net, num_data=num_train)
guide = AutoVariationalDropout(model, parameterization="additive")
print(model.random_sites)

# %% [markdown]
# Training is plain SVI over minibatches. Two practical points:
#
# - the `local_reparam()` effect handler makes the linear layers sample their
#   *pre-activations* instead of their weights (the local reparameterization trick): every
#   example gets its own noise, which lowers the variance of the gradient at the cost of a
#   second matrix product (see tutorial 02);
# - the KL term is annealed from 0 to 1 over the first epochs (`guide.kl_scale`), as in
#   Molchanov et al. (2017): with the full KL from the start, a network this size on
#   this little data prunes itself before it has learned anything.

# %%
num_epochs = 20 if SMOKE else 100
anneal_epochs = num_epochs // 3
batch_size = 128
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), TraceMeanField_ELBO())
epoch_losses = []
with local_reparam():
    for epoch in range(num_epochs):
        guide.kl_scale = min(1.0, epoch / anneal_epochs)
        perm = torch.randperm(num_train)
        step_losses = []
        for i in range(0, num_train, batch_size):
            idx = perm[i : i + batch_size]
            step_losses.append(svi.step(x_train[idx], y_train[idx]))  # -ELBO estimate for all the data
        epoch_losses.append(sum(step_losses) / len(step_losses) / num_train)
print(f"final loss per example {epoch_losses[-1]:.3f}")
for site, stats in guide.sparsity()["sites"].items():
    print(f"{site}: {stats['num_pruned']} of {stats['num_weights']} weights pruned")

# %% [markdown]
# `pyro_vdrop.nn.prune` turns the fit into a plain torch network: each weight set to its
# mean $\theta$, and to zero where $\log\alpha > 3$.

# %%
pruned = prune(model, guide)
with torch.no_grad():
    pruned_accuracy = (pruned(x_test).argmax(-1) == y_test).float().mean().item()
print(
    f"pruned network: test accuracy {pruned_accuracy:.3f}, compression {guide.sparsity()['total']['compression']:.1f}×"
)

# %% [markdown]
# The first layer's columns belong to the inputs. How much of each input does the network
# still read? Sum the magnitudes $|\theta|$ of the first-layer weights it keeps
# ($\log\alpha \le 3$), per input: the two informative inputs should dominate, the eight
# noise inputs keep little or nothing.

# %%
fc1_log_alpha = guide.log_alpha()["0.weight"]  # (32 out, 10 in)
fc1_theta = guide.median()["0.weight"]
kept = fc1_log_alpha <= 3.0
print("kept weights per input:    ", " ".join(f"{int(v):5d}" for v in kept.sum(0)))
print("kept |theta| mass per input:", " ".join(f"{v:5.2f}" for v in (fc1_theta.abs() * kept).sum(0)))

# %% [markdown]
# ### Predictions and their uncertainty
#
# `to_inference_data` under the same effect handler draws predictive labels with
# per-example noise, and says so in its attributes. The predictive probability of class 1
# is the share of draws that predict it.

# %%
with local_reparam():
    idata = to_inference_data(model, guide, x_test, y_test, num_samples=50 if SMOKE else 500)
print(idata.attrs["local_reparameterization"])
p1 = idata.posterior_predictive["obs"].mean(("chain", "draw")).values
accuracy = ((p1 > 0.5) == y_test.numpy()).mean()
print(f"test accuracy of the posterior predictive {accuracy:.3f}")
print(az.summary(idata, var_names=["4.weight"], kind="stats").head())

# %% [markdown]
# The `log_likelihood` group holds $\log p(y_i \mid w^{(s)})$ per test example and draw. On
# held-out data the log pointwise predictive density,
# $\sum_i \log \frac{1}{S}\sum_s p(y_i \mid w^{(s)})$, measures the quality of the predictive
# distribution (tutorial 04 uses the same group for `az.loo` on training data).

# %%
log_lik = idata.log_likelihood["obs"].stack(sample=("chain", "draw")).values  # (examples, draws)
lppd = float(np.sum(logsumexp(log_lik, axis=-1) - np.log(log_lik.shape[-1])))
print(f"test log predictive density {lppd:.1f} ({lppd / len(y_test):.3f} per example)")

# %%
# bayesianize's model accepts at most num_data points per call: a 20 × 12 grid
grid = torch.stack(torch.meshgrid(torch.linspace(-1.5, 2.5, 20), torch.linspace(-1, 1.5, 12), indexing="xy"), -1)
grid_x = torch.cat([grid.reshape(-1, 2), torch.zeros(grid.numel() // 2, 8)], -1)
with local_reparam():
    grid_idata = to_inference_data(
        model, guide, grid_x, num_samples=30 if SMOKE else 200, log_likelihood=False, var_names=[]
    )
grid_p1 = grid_idata.posterior_predictive["obs"].mean(("chain", "draw")).values.reshape(grid.shape[:2])
fig, ax = plt.subplots(figsize=(6, 4))
mesh = ax.pcolormesh(grid[..., 0], grid[..., 1], grid_p1, cmap="RdBu_r", vmin=0, vmax=1, shading="auto")
ax.scatter(x_test[:, 0], x_test[:, 1], c=y_test, cmap="RdBu_r", edgecolor="k", s=12)
fig.colorbar(mesh, label="predictive P(class 1)")
ax.set(title="posterior predictive (noise inputs at 0)", xlabel="$x_1$", ylabel="$x_2$")
show(fig, "moons")

# %% [markdown]
# ## Where next
#
# - `02_local_reparameterization.py`: why the local reparameterization trick matters;
# - `03_sparse_mnist.py`: sparse variational dropout on MNIST, pruning and compression;
# - `04_arviz.py`: model criticism with ArviZ: LOO, forest plots, calibration.
