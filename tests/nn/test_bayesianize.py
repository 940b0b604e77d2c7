# SPDX-License-Identifier: Apache-2.0
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.nn import PyroModule
from torch import nn

from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.infer import Predictive, init_to_fan_in
from pyro_vdrop.nn import BayesianModule, bayesianize, lenet5_caffe, mnist_mlp


def base_dist(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def conditioned_trace(model, *args, values=None):
    values = model.initial_weights() if values is None else values
    return poutine.trace(poutine.condition(model, data=values)).get_trace(*args)


class ConvNets(nn.Module):
    """Conv1d, Conv2d and Conv3d (with stride, padding, groups) feeding a Linear, plus a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(2, 4, 3, stride=2, groups=2)
        self.c3 = nn.Conv3d(2, 3, 2, bias=False)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 + 4 + 3, 5)

    def forward(self, x):
        a = self.norm(self.c1(x.flatten(2)[..., :6])).mean(-1)
        b = self.c2(x[:, :, 0]).mean((-1, -2))
        c = self.c3(x).mean((-1, -2, -3))
        return self.head(torch.cat([a, b, c], -1))


def test_sites_shapes_priors_and_names(device):
    net = mnist_mlp(16).to(device)
    model = bayesianize(net, num_data=100)
    assert isinstance(model, BayesianModule) and isinstance(model, PyroModule)
    assert isinstance(model, nn.Sequential)
    assert model.random_sites == ("fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight")
    x = torch.rand(7, 784, device=device)
    tr = conditioned_trace(model, x)
    for site in model.random_sites:
        w = net.get_parameter(site)
        fn = tr.nodes[site]["fn"]
        assert isinstance(base_dist(fn), ImproperLogUniform)
        assert fn.event_shape == w.shape and fn.batch_shape == ()
    # biases are deterministic parameters under their module paths
    params = {name for name, node in tr.nodes.items() if node["type"] == "param"}
    assert params == {"fc1.bias", "fc2.bias", "fc3.bias", "fc4.bias"}
    assert tr.nodes["obs"]["fn"].batch_shape == (7,)
    # the input network is untouched
    assert not isinstance(net, PyroModule) and isinstance(net.fc1.weight, nn.Parameter)


def test_forward_with_initial_weights_is_the_original_network(device):
    net = lenet5_caffe(dtype=torch.float64, device=device)
    model = bayesianize(net)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, device=device)
    values = model.initial_weights()
    assert all(v.dtype == torch.float64 and v.device.type == device.type for v in values.values())
    out = poutine.condition(model, data=values)(x)
    torch.testing.assert_close(out, net(x))


def test_conv_layers_and_deterministic_warning():
    net = ConvNets()
    with pytest.warns(UserWarning, match=r"deterministic .*: norm \(BatchNorm1d\)"):
        model = bayesianize(net, random_bias=True)
    assert model.deterministic_modules == ("norm",)
    assert set(model.random_sites) == {
        "c1.weight",
        "c1.bias",
        "c2.weight",
        "c2.bias",
        "c3.weight",
        "head.weight",
        "head.bias",
    }
    x = torch.rand(3, 2, 4, 5, 6)
    torch.testing.assert_close(poutine.condition(model, data=model.initial_weights())(x), net(x))
    tr = conditioned_trace(model, x)
    for site in model.random_sites:
        assert tr.nodes[site]["fn"].event_shape == net.get_parameter(site).shape
    params = {name for name, node in tr.nodes.items() if node["type"] == "param"}
    assert params == {"norm.weight", "norm.bias"}


def test_layers_selection_and_errors():
    net = mnist_mlp(8)
    model = bayesianize(net, layers=["fc2", "fc2"])
    assert model.random_sites == ("fc2.weight",)
    with pytest.raises(TypeError, match="use \\['fc2'\\]"):
        bayesianize(net, layers="fc2")
    tr = conditioned_trace(model, torch.rand(2, 784))
    assert tr.nodes["fc1.weight"]["type"] == "param"  # a deterministic parameter
    with pytest.raises(ValueError, match="no module named 'fc9'"):
        bayesianize(net, layers=["fc9"])
    with pytest.raises(TypeError, match="'relu1' is a ReLU"):
        bayesianize(net, layers=["relu1"])
    with pytest.raises(ValueError, match="no layer to make random"):
        bayesianize(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="likelihood must be one of"):
        bayesianize(net, likelihood="poisson")
    with pytest.raises(ValueError, match="obs_scale applies to likelihood='normal' only"):
        bayesianize(net, obs_scale=1.0)
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        bayesianize(net, num_data=0)
    with pytest.raises(TypeError, match="not already a PyroModule"):
        bayesianize(bayesianize(net))
    with pytest.raises(ValueError, match="prior must be a scalar distribution"):
        bayesianize(net, prior=pyro.distributions.Normal(torch.zeros(3), 1.0))
    model = bayesianize(net, num_data=4)
    with pytest.raises(ValueError, match="the minibatch has 5 data points but num_data=4"):
        conditioned_trace(model, torch.rand(5, 784))
    model = bayesianize(nn.Linear(3, 2), likelihood="normal", obs_scale=0.5)
    with pytest.raises(ValueError, match=r"y of the network's output shape \(4, 2\), got \(4,\)"):
        conditioned_trace(model, torch.rand(4, 3), torch.rand(4))


def test_custom_prior_callable():
    def prior(name, value):
        return pyro.distributions.Normal(torch.zeros_like(value), 0.1 if name == "fc1.weight" else 1.0)

    model = bayesianize(mnist_mlp(8), prior=prior)
    tr = conditioned_trace(model, torch.rand(2, 784))
    assert tr.nodes["fc1.weight"]["fn"].base_dist.scale.unique().tolist() == pytest.approx([0.1])
    assert tr.nodes["fc2.weight"]["fn"].base_dist.scale.unique().tolist() == [1.0]


@pytest.mark.parametrize("num_data", [None, 1000])
def test_minibatch_scaling(num_data):
    # the data term is scaled by N/M and the weights (the KL) are not
    model = bayesianize(mnist_mlp(8), num_data=num_data)
    x, y = torch.rand(10, 784), torch.randint(0, 10, (10,))
    tr = conditioned_trace(model, x, y)
    tr.compute_log_prob()
    logits = poutine.condition(model, data=model.initial_weights())(x)
    expected = torch.distributions.Categorical(logits=logits).log_prob(y).sum() * ((num_data or 10) / 10)
    torch.testing.assert_close(tr.nodes["obs"]["log_prob_sum"], expected)
    assert tr.nodes["obs"]["scale"] == (num_data or 10) / 10
    assert tr.nodes["fc1.weight"]["scale"] == 1.0


def test_to_dtype_moves_initial_weights():
    model = bayesianize(mnist_mlp(8))
    model.double()
    assert all(v.dtype == torch.float64 for v in model.initial_weights().values())
    assert model.fc1.bias.dtype == torch.float64


def test_svi_classification_loss_decreases(device):
    # three well-separated Gaussian blobs in 6-D
    n, k = 300, 3
    centres = 3.0 * torch.randn(k, 6, device=device)
    y = torch.arange(n, device=device) % k
    x = centres[y] + torch.randn(n, 6, device=device)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, k)).to(device)
    model = bayesianize(net, num_data=n)
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in, init_scale=1e-2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), TraceMeanField_ELBO())
    losses = []
    for _ in range(150):
        batch = torch.randperm(n, device=device)[:50]
        losses.append(svi.step(x[batch], y[batch]))
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.5 * first, (first, last)
    logits = poutine.condition(model, data=guide.median())(x)
    assert (logits.argmax(-1) == y).double().mean() > 0.9


def test_svi_regression_learns_noise_and_predicts():
    n, noise = 200, 0.3
    x = torch.randn(n, 4)
    y = (x @ torch.tensor([[1.5], [-2.0], [0.0], [0.5]])) + noise * torch.randn(n, 1)
    model = bayesianize(nn.Linear(4, 1), likelihood="normal")
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=model.initial_weights()), init_scale=1e-2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    losses = [svi.step(x, y) for _ in range(400)]
    assert sum(losses[-20:]) < sum(losses[:20])
    # the learned noise scale approaches the true one (200 points: a few standard errors of tolerance)
    assert abs(model.obs_scale.item() - noise) < 0.1
    # without y the model samples the observations around the returned mean
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    mean, obs = model_trace.nodes["_RETURN"]["value"], model_trace.nodes["obs"]["value"]
    assert obs.shape == mean.shape == (n, 1)
    assert abs((obs - mean).std().item() / model.obs_scale.item() - 1) < 0.25  # 200 draws: sd of ratio ~0.05
    # the documented Predictive recipe
    predictive = Predictive(model, guide=guide, num_samples=50, return_sites=["obs", "_RETURN"])
    draws = predictive(x)
    assert draws["obs"].shape == (50, n, 1)
    # draws of the likelihood, not a point estimate: their spread around the mean is the noise scale
    spread = (draws["obs"] - draws["_RETURN"]).std().item() / model.obs_scale.item()
    assert abs(spread - 1) < 0.1


def test_pickle_round_trip(tmp_path):
    net = mnist_mlp(8)
    model = bayesianize(net, likelihood="normal", num_data=50)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(loaded, BayesianModule) and isinstance(loaded, nn.Sequential)
    assert loaded.random_sites == model.random_sites and loaded.num_data == 50
    x = torch.rand(3, 784)
    values = model.initial_weights()
    torch.testing.assert_close(loaded.initial_weights(), values)
    torch.testing.assert_close(poutine.condition(loaded, data=values)(x), net(x))
