# SPDX-License-Identifier: Apache-2.0
"""Small models shared by the autoguide tests."""

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_vdrop.distributions import ImproperLogUniform


class BNN(PyroModule):
    """A Bayesian linear layer (log-uniform weight and bias priors) with a Gaussian likelihood."""

    def __init__(self, d_in=4, d_out=3):
        super().__init__()
        self.fc = PyroModule[nn.Linear](d_in, d_out)
        self.fc.weight = PyroSample(ImproperLogUniform().expand([d_out, d_in]).to_event(2))
        self.fc.bias = PyroSample(ImproperLogUniform().expand([d_out]).to_event(1))

    def forward(self, x, y=None):
        mean = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, 0.5).to_event(1), obs=y)
