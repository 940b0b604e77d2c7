# SPDX-License-Identifier: Apache-2.0
"""prune with the project's own guide, trained under the local reparameterization effect."""

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.nn import bayesianize, prune
from pyro_vdrop.poutine import local_reparam


def test_prune_auto_variational_dropout(device):
    x = torch.randn(40, 1, 6, 6, device=device)
    y = (x.mean((1, 2, 3)) > 0).long()
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).to(device)
    model = bayesianize(net, num_data=40)
    guide = AutoVariationalDropout(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    with local_reparam():
        for _ in range(5):
            svi.step(x, y)
    theta, log_alpha = guide.median(), guide.log_alpha()
    threshold = torch.cat([v.flatten() for v in log_alpha.values()]).median().item()
    pruned = prune(model, guide, threshold=threshold)
    masked = {s: theta[s] * (log_alpha[s] <= threshold) for s in model.random_sites}
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), poutine.condition(model, data=masked)(x))
    kept = sum(int((pruned.get_parameter(s) != 0).sum()) for s in model.random_sites)
    assert 0 < kept < sum(v.numel() for v in theta.values())
