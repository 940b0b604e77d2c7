# SPDX-License-Identifier: Apache-2.0
# %% [markdown]
# # Compressing a network
#
# `pyro_vdrop.nn.prune` zeroes the weights whose $\log\alpha$ exceeds 3 and returns a network of the original
# size: at "54× compression" LeNet-300-100 is still a 1 MB file that runs as fast as before. This tutorial turns
# the sparsity into real savings:
#
# 1. **train** the default `pyro-vdrop fit` job (sparse variational dropout on LeNet-300-100, embedded MNIST);
# 2. **compress**: `pyro_vdrop.nn.compress` removes every unit that no kept weight connects — smaller `Linear`
#    layers, the same predictions;
# 3. **which inputs survive**: the pixels the first layer still reads, as a 28 × 28 image;
# 4. **save and load** with `save_compressed` / `load_compressed` (plain data, `torch.load(weights_only=True)`),
#    with dense or sparse storage of the remaining weights, and compare the file sizes;
# 5. **time** the compressed network against the dense one on the CPU.
#
# `PYRO_VDROP_SMOKE=1` shrinks the data and the model so that the tutorial runs in seconds (the numbers it
# prints then mean nothing). Figures go to `tutorial_figures/06_compress/`. `pyro-vdrop export --run DIR --out
# model.pt` does steps 2, 4 and 5 for any run.

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
import torch  # noqa: E402

from pyro_vdrop.nn import (  # noqa: E402
    SelectInputs,
    compress,
    count_parameters,
    layer_widths,
    load_compressed,
    prune,
    save_compressed,
)
from pyro_vdrop.train import TrainConfig, fit, open_run  # noqa: E402
from pyro_vdrop.train.export import latency  # noqa: E402

SMOKE = os.environ.get("PYRO_VDROP_SMOKE") == "1"
FIGURES = Path("tutorial_figures") / "06_compress"
FIGURES.mkdir(parents=True, exist_ok=True)


def show(fig, name):
    """Saves a figure; shows it too when run interactively."""
    fig.savefig(FIGURES / f"{name}.png", dpi=100, bbox_inches="tight")
    if INTERACTIVE:
        plt.show()
    plt.close(fig)


def widths(net):
    return "-".join(map(str, layer_widths(net)))


# %% [markdown]
# ## 1. Training
#
# `pyro_vdrop.train.fit` is what `pyro-vdrop fit` runs; `open_run` rebuilds the model and guide from the run's
# checkpoint. `prune` gives the masked network: the posterior means with the weights of $\log\alpha > 3$ set to 0.

# %%
if SMOKE:
    config = TrainConfig(model="mlp", width=32, train_subset=300, test_subset=200, epochs=2, kl_warmup=1)
    config = TrainConfig(**{**config.to_dict(), "pretrain_epochs": 1})
else:
    config = TrainConfig()  # the defaults of pyro-vdrop fit
# two epochs of smoke-mode training leave log α low: a lower threshold shows the mechanics there
THRESHOLD = -3.0 if SMOKE else 3.0
run_dir = Path(tempfile.mkdtemp()) / "run"
summary = fit(config, run_dir, progress=False)
session, _ = open_run(run_dir, device="cpu")
x, y = session.x_test, session.y_test
masked = prune(session.model, session.guide, threshold=THRESHOLD).eval()
kept = sum(int((p != 0).sum()) for name, p in masked.named_parameters() if name.endswith("weight"))
total = sum(p.numel() for name, p in masked.named_parameters() if name.endswith("weight"))
print(f"{config.model}, log α > {THRESHOLD:g} pruned: {kept:,} of {total:,} weights kept ({total / kept:.1f}×)")

# %% [markdown]
# ## 2. Removing the dead units
#
# A hidden unit is dead when no kept weight reads its output (all its outgoing weights are zero), or when it has
# no kept incoming weight: then it outputs the constant $\mathrm{relu}(b_j)$ whatever the input, and `compress`
# adds that constant's contribution $\sum_i W_{ij}\,\mathrm{relu}(b_j)$ to the next layer's bias before removing
# it. Inputs that no kept weight reads are dropped by a `SelectInputs` layer in front, so the compressed network
# still takes 784 pixels. Removing units can kill others, so `compress` repeats until nothing changes. The result
# is exact: the same logits to float rounding.
#
# Sparse VD prunes single weights, not units; yet on the default run only 283-50-75 units of 784-300-100 keep a
# weight: a dense network 14× smaller. Group (structured) variational dropout prunes whole units and leaves even
# fewer; `compress` works on any pruned network.

# %%
small = compress(masked)
with torch.no_grad():
    logits_masked, logits_small = masked(x), small(x)
errors = [float((logits.argmax(-1) != y).double().mean()) for logits in (logits_masked, logits_small)]
print(f"units: masked {widths(masked)}, compressed {widths(small)}")
print(f"compressed network: {count_parameters(small):,} parameters of {count_parameters(masked):,}")
print(f"test error: masked {100 * errors[0]:.2f}%, compressed {100 * errors[1]:.2f}%")
print(f"largest logit difference {float((logits_masked - logits_small).abs().max()):.3g}")
print(small)

# %% [markdown]
# ## 3. Which pixels survive
#
# The `SelectInputs` layer holds the indices of the pixels the compressed network reads: the digits' middle. The
# border pixels are 0 in almost every MNIST image, so their weights carry no information and variational
# dropout drops them all.

# %%
mask = torch.ones(784, dtype=torch.bool)
select = next((m for m in small.children() if isinstance(m, SelectInputs)), None)
if select is not None:
    mask = torch.zeros(784, dtype=torch.bool)
    mask[select.index] = True
fig, ax = plt.subplots(figsize=(3.2, 3.4))
ax.imshow(mask.reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
ax.set_title(f"pixels read: {int(mask.sum())} of 784", fontsize=9)
ax.axis("off")
show(fig, "input_mask")

# %% [markdown]
# ## 4. Saving, loading and file size
#
# `save_compressed` writes a dict of plain data: a format tag and version, the layers as
# `{"name", "type", "args"}` (the constructor arguments) and the tensors of the `state_dict`; with `sparse=True`
# each weight that is smaller so is stored in compressed sparse rows (row pointers, int16 column indices and the
# non-zero values), so the file shrinks with the kept weights. `load_compressed` reads it with
# `torch.load(weights_only=True)` — a file from a stranger cannot run code — and rebuilds the `nn.Sequential`.

# %%
folder = run_dir.parent
sizes = {
    "masked, dense storage": save_compressed(folder / "masked.pt", masked),
    "compressed": save_compressed(folder / "small.pt", small),
    "compressed, sparse storage": save_compressed(folder / "small-sparse.pt", small, sparse=True),
}
for name, size in sizes.items():
    print(f"{name:<28} {size / 1e3:9.1f} kB")
record = torch.load(folder / "small-sparse.pt", weights_only=True)
print("layers in the file:", ", ".join(f"{layer['type']}" for layer in record["layers"]))
reloaded = load_compressed(folder / "small-sparse.pt")
with torch.no_grad():
    same = torch.equal(reloaded(x), logits_small)
print(f"the reloaded network gives the same logits: {same}")

# %% [markdown]
# ## 5. Speed
#
# The median time of a forward pass on the CPU (one thread per process here), one image and 100 images at a time.
# The dense masked network multiplies by all its zeros; the compressed one skips the dead units. At batch 1 the
# fixed cost of a call dominates either way. Times depend on the machine and its load: compare the two in one run.

# %%
torch.set_num_threads(1)
repeats = 5 if SMOKE else 50
print(f"{'batch':>5} {'masked (ms)':>12} {'compressed (ms)':>16}")
for batch in (1, 100):
    inputs = x[:batch]
    times = [1e3 * latency(net, inputs, repeats=repeats) for net in (masked, reloaded)]
    print(f"{batch:>5} {times[0]:12.3f} {times[1]:16.3f}")
