# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Posterior analysis with ArviZ
#
# A fitted variational-dropout network is a posterior like any other: ArviZ can summarise
# it, estimate its out-of-sample predictive accuracy with PSIS-LOO, compare models, and
# check calibration. `pyro_vdrop.arviz.to_inference_data` is the bridge. This tutorial
#
# 1. fits two Bayesian MLPs on (a subset of) MNIST: sparse variational dropout (additive
#    parameterization, $\alpha$ unbounded) and the paper's variational dropout "B"
#    ($\alpha \le 1$);
# 2. exports them with `to_inference_data` and walks through the groups;
# 3. compares them with `az.loo` / `az.compare`;
# 4. draws forest and posterior plots with named dims;
# 5. checks calibration with a reliability diagram of the predictive probabilities.
#
# Figures go to `tutorial_figures/04_arviz/`; `PYRO_VDROP_SMOKE=1` makes it a smoke test.

# %%
import os
import sys
import warnings
from pathlib import Path

import matplotlib

INTERACTIVE = hasattr(sys, "ps1") or "ipykernel" in sys.modules
if not INTERACTIVE:
    matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, TraceMeanField_ELBO  # noqa: E402
from torch import nn  # noqa: E402

from pyro_vdrop.arviz import to_inference_data  # noqa: E402
from pyro_vdrop.datasets import load_embedded_mnist  # noqa: E402
from pyro_vdrop.infer import AutoVariationalDropout  # noqa: E402
from pyro_vdrop.nn import bayesianize  # noqa: E402
from pyro_vdrop.poutine import local_reparam  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
FIGURES = Path("tutorial_figures") / "04_arviz"
FIGURES.mkdir(parents=True, exist_ok=True)
# arviz 0.23's plot_posterior trips a deprecation in matplotlib >= 3.11; harmless here.
warnings.filterwarnings("ignore", message="Passing a dict or None as alias_mapping")


def show(fig, name):
    """Saves a figure; shows it too when run interactively."""
    fig.savefig(FIGURES / f"{name}.png", dpi=100, bbox_inches="tight")
    if INTERACTIVE:
        plt.show()
    plt.close(fig)


pyro.set_rng_seed(0)

# %% [markdown]
# ## Data and models
#
# The MNIST subset shipped with the package (5,000 training and 1,000 test images). The
# network is a 784–100–10 ReLU MLP (784–32–10 in smoke mode) made Bayesian with `bayesianize`; its weight sites are
# named after the torch modules (`fc1.weight`, `fc2.weight`).

# %%
x_train, y_train = load_embedded_mnist("train", flatten=True)
x_test, y_test = load_embedded_mnist("test", flatten=True)
if SMOKE:
    x_train, y_train, x_test, y_test = x_train[:500], y_train[:500], x_test[:200], y_test[:200]
num_train = len(x_train)
num_hidden = 32 if SMOKE else 100


def make_model():
    net = nn.Sequential()
    net.add_module("fc1", nn.Linear(784, num_hidden))
    net.add_module("relu", nn.ReLU())
    net.add_module("fc2", nn.Linear(num_hidden, 10))
    return bayesianize(net, num_data=num_train)


def fit(model, guide, *, num_epochs, batch_size=100, lr=1e-3):
    """SVI with the local reparameterization trick and the KL annealed over the first third."""
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO())
    losses = []
    with local_reparam():
        for epoch in range(num_epochs):
            guide.kl_scale = min(1.0, epoch / max(1, num_epochs // 3))
            perm = torch.randperm(num_train)
            for i in range(0, num_train, batch_size):
                idx = perm[i : i + batch_size]
                losses.append(svi.step(x_train[idx], y_train[idx]))
    return losses


num_epochs = 3 if SMOKE else 30
num_samples = 20 if SMOKE else 100
idatas, test_idatas = {}, {}
for name, options in [("sparse VD", {"parameterization": "additive"}), ("VD (alpha <= 1)", {})]:
    # Pyro keeps parameters in one global store, by name, and both guides use the same names:
    # fit and export each model before the next one replaces its parameters.
    pyro.clear_param_store()
    model = make_model()
    guide = AutoVariationalDropout(model, **options)
    losses = fit(model, guide, num_epochs=num_epochs)
    print(f"{name}: final loss {losses[-1]:.1f}, {guide.sparsity()['total']['fraction_pruned']:.1%} pruned")
    with local_reparam():
        idatas[name] = to_inference_data(model, guide, x_train, y_train, num_samples=num_samples, chains=2, elbo=losses)
        # the test set, for the calibration check below (no weight draws needed)
        test_idatas[name] = to_inference_data(model, guide, x_test, y_test, num_samples=num_samples, var_names=[])

# %% [markdown]
# ## Export
#
# `to_inference_data(model, guide, *data)` (in the loop above) draws `chains × num_samples`
# times from the guide, replays the model, and collects the draws in ArviZ's groups. We
# called it inside `local_reparam()`, so the predictive draws use per-example noise, just
# as in training; the attribute `local_reparameterization` records it.
#
# The first layer (78,400 weights) is larger than
# `pyro_vdrop.arviz.MAX_POSTERIOR_SITE_SIZE` (1,000 elements): its draws are left out of
# `posterior` unless named in `var_names` (1,000 draws would be 78 million numbers), but its
# $\theta$ and $\log\alpha$ are always in the `variational` group.

# %%
idata = idatas["sparse VD"]
print(idata)
print(idata.posterior)
print("left out of the posterior:", idata.posterior.attrs["posterior_omitted_sites"])
print(idata.variational[["num_weights", "num_pruned", "sparsity"]].to_dataframe())

# %% [markdown]
# The dims carry names taken from the layers (`fc2_out`, `fc2_in`) and from the plate of
# the observations (`data`), so selections read naturally:

# %%
print(az.summary(idata, var_names=["fc2.weight"], coords={"fc2_out": [3], "fc2_in": list(range(5))}))
print(az.summary(idata, var_names=["fc2.weight_log_alpha"], coords={"fc2_out": [3]}, kind="stats").head())

# %% [markdown]
# ## Model comparison with PSIS-LOO
#
# The `log_likelihood` group holds $\log p(y_i \mid w^{(s)})$ for every training example
# $i$ and draw $s$, which is what `az.loo` needs. Two cautions: the draws come from the
# variational approximation $q$, not from the exact posterior, so LOO here estimates the
# predictive accuracy *of $q$*, and high Pareto $k$ values flag examples where $q$ and the
# leave-one-out posterior differ much (ArviZ warns about them); and with the local
# reparameterization each example sees its own weight noise, which leaves each
# per-example log-likelihood distributed as without it.

# %%
loo = az.loo(idata, pointwise=True)
print(loo)
print(az.compare(idatas))

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
az.plot_khat(loo, ax=ax, show_bins=True)
ax.set(title="Pareto k per training example (sparse VD)")
show(fig, "khat")

# %% [markdown]
# ## Forest and posterior plots
#
# Named dims and `coords` select a block of weights: the weights from the first ten hidden
# units into the output unit of digit 3, for both models.

# %%
selection = {"fc2_out": [3], "fc2_in": list(range(10))}
axes = az.plot_forest(
    list(idatas.values()),
    model_names=list(idatas),
    var_names=["fc2.weight"],
    coords=selection,
    combined=True,
    figsize=(6, 6),
)
show(axes.ravel()[0].figure, "forest")

axes = az.plot_posterior(idata, var_names=["fc2.weight"], coords={"fc2_out": [3], "fc2_in": [0, 1, 2]})
show(np.ravel(axes)[0].figure, "posterior")

# %% [markdown]
# The dropout rates of the first layer, from the `variational` group: sparse variational
# dropout sends most of them far above the pruning threshold, the capped variant cannot.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, data in idatas.items():
    ax.hist(data.variational["fc1.weight_log_alpha"].values.ravel(), bins=60, alpha=0.6, label=name)
ax.axvline(3.0, color="k", ls="--", label="prune threshold")
ax.set(xlabel=r"$\log\alpha$ (fc1)", ylabel="weights", yscale="log")
ax.legend()
show(fig, "log_alpha")

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, data in idatas.items():
    ax.plot(data.variational["loss"].values, label=name)
ax.set(xlabel="SVI step", ylabel="loss (−ELBO)", yscale="log")
ax.legend()
show(fig, "elbo")

# %% [markdown]
# ## Calibration on the test set
#
# For held-out data we exported again, with the test images. The predictive probability of
# class $k$ is the share of posterior-predictive draws that predict $k$ (a Monte Carlo
# estimate of $\mathbb{E}_q[p(y = k \mid x, w)]$). A reliability diagram bins the test
# images by the confidence of the predicted class and compares it with the accuracy in
# each bin: a calibrated model lies on the diagonal.


# %%
def predictive_probs(data, num_classes=10):
    draws = data.posterior_predictive["obs"].values.reshape(-1, data.posterior_predictive.sizes["data"])
    return np.stack([(draws == k).mean(0) for k in range(num_classes)], -1)


def reliability(probs, labels, num_bins=10):
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    correct = predicted == labels
    edges = np.linspace(0, 1, num_bins + 1)
    which = np.clip(np.digitize(confidence, edges) - 1, 0, num_bins - 1)
    rows = []
    for b in range(num_bins):
        chosen = which == b
        if chosen.any():
            rows.append((confidence[chosen].mean(), correct[chosen].mean(), chosen.sum()))
    rows = np.array(rows)
    ece = np.sum(rows[:, 2] * np.abs(rows[:, 0] - rows[:, 1])) / len(labels)
    return rows, ece


fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.plot([0, 1], [0, 1], "k:", label="calibrated")
for name, test_idata in test_idatas.items():
    probs = predictive_probs(test_idata)
    rows, ece = reliability(probs, y_test.numpy())
    accuracy = (probs.argmax(-1) == y_test.numpy()).mean()
    print(f"{name}: test accuracy {accuracy:.3f}, expected calibration error {ece:.3f}")
    ax.plot(rows[:, 0], rows[:, 1], "o-", label=f"{name} (ECE {ece:.3f})")
ax.set(xlabel="confidence", ylabel="accuracy", title="reliability diagram (test set)", xlim=(0, 1), ylim=(0, 1))
ax.legend()
show(fig, "reliability")

# %% [markdown]
# ## Saving
#
# An InferenceData is plain numpy inside (tensors from any device are moved to the CPU), so
# it can be written to netCDF and read on a machine without a GPU, or without Pyro.

# %%
try:
    idata.to_netcdf(str(FIGURES / "sparse_vd.nc"))
    print("written", FIGURES / "sparse_vd.nc", "->", az.from_netcdf(str(FIGURES / "sparse_vd.nc")).groups())
except (ImportError, ValueError) as error:  # neither h5netcdf nor netCDF4 installed
    print("netCDF not available:", error)
