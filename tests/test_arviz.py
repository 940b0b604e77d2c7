# SPDX-License-Identifier: Apache-2.0
import importlib.util
import math
import os
import subprocess
import sys
from collections import OrderedDict

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_vdrop import metrics
from pyro_vdrop.arviz import MAX_POSTERIOR_SITE_SIZE, to_inference_data
from pyro_vdrop.distributions import ImproperLogUniform, VariationalDropoutNormal
from pyro_vdrop.infer import AutoVariationalDropout, AutoVariationalDropoutMessenger, init_to_fan_in
from pyro_vdrop.nn import bayesianize
from pyro_vdrop.poutine import local_reparam

matplotlib.use("Agg")

# arviz 0.23's plot_posterior passes a dict to matplotlib's normalize_kwargs, deprecated in matplotlib 3.11.
# az.loo warns when a Pareto k exceeds min(1 - 1/log10(S), 0.7); draws from q are not draws from the
# posterior, so a few high k are expected from variational fits. The tests check k themselves.
PARETO_K_WARNING = "ignore:Estimated shape parameter of Pareto distribution:UserWarning"
MPL_ALIAS_DEPRECATION = (
    "ignore:Passing a dict or None as alias_mapping:matplotlib._api.deprecation.MatplotlibDeprecationWarning"
)
NUM_FEATURES = 5
TRUE_W = [2.0, -1.5, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------
# models


def regression_model(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def regression_guide(x, y=None):
    theta = pyro.param("theta", lambda: 0.1 * torch.randn(x.shape[-1], dtype=x.dtype, device=x.device))
    log_sigma2 = pyro.param("log_sigma2", lambda: torch.full((x.shape[-1],), -10.0, dtype=x.dtype, device=x.device))
    pyro.sample("w", VariationalDropoutNormal.from_additive(theta, log_sigma2).to_event(1))


def regression_data(num_data=100, device="cpu", dtype=torch.float32):
    x = torch.randn(num_data, NUM_FEATURES, dtype=dtype, device=device)
    y = x @ torch.tensor(TRUE_W, dtype=dtype, device=device) + 0.5 * torch.randn(num_data, dtype=dtype, device=device)
    return x, y


def fit_regression(x, y, num_steps=300):
    svi = SVI(regression_model, regression_guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    return [svi.step(x, y) for _ in range(num_steps)]


def regression_posterior():
    theta = pyro.param("theta").detach()
    posterior = VariationalDropoutNormal.from_additive(theta, pyro.param("log_sigma2").detach())
    return theta, posterior.log_alpha, posterior.scale


class Classifier(PyroModule):
    def __init__(self, num_inputs=4, num_hidden=8, num_classes=3):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](num_inputs, num_hidden)
        self.fc1.weight = PyroSample(ImproperLogUniform().expand([num_hidden, num_inputs]).to_event(2))
        self.fc2 = PyroModule[nn.Linear](num_hidden, num_classes)
        self.fc2.weight = PyroSample(ImproperLogUniform().expand([num_classes, num_hidden]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def classification_data(num_data=120):
    x = torch.randn(num_data, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def fit_classifier(model, guide, x, y, num_steps=200):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    for _ in range(num_steps):
        svi.step(x, y)


# ---------------------------------------------------------------------------------------
# the groups


def test_groups_and_shapes():
    x, y = regression_data()
    losses = fit_regression(x, y, num_steps=50)
    idata = to_inference_data(regression_model, regression_guide, x, y, num_samples=7, chains=3, elbo=losses)
    for group in ["posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data"]:
        assert group in idata.groups()
    assert "variational" in idata.groups()
    assert idata.posterior["w"].dims == ("chain", "draw", "w_dim_0")
    assert idata.posterior["w"].shape == (3, 7, NUM_FEATURES)
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "data")
    assert idata.log_likelihood["y"].shape == (3, 7, len(y))
    assert idata.observed_data["y"].dims == ("data",)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    assert idata.constant_data["x"].dims == ("data", "x_dim_1")
    np.testing.assert_array_equal(idata.constant_data["x"].values, x.numpy())
    np.testing.assert_allclose(idata.variational["loss"].values, losses)
    assert idata.attrs["local_reparameterization"] == "none"
    assert idata.posterior.attrs["num_chains"] == 3


def test_posterior_draws_match_the_guide():
    # Monte Carlo vs the guide's closed form: mean θ and standard deviation sqrt(α)|θ|.
    x, y = regression_data()
    fit_regression(x, y)
    num_draws = 1000
    idata = to_inference_data(
        regression_model, regression_guide, x, y, num_samples=num_draws, predictive=False, log_likelihood=False
    )
    theta, log_alpha, scale = regression_posterior()
    draws = idata.posterior["w"].values.reshape(num_draws, -1)
    # 5 standard errors: a false failure has probability < 1e-5 per weight
    assert np.all(np.abs(draws.mean(0) - theta.numpy()) < 5 * scale.numpy() / math.sqrt(num_draws))
    # sd of the sample sd ≈ sd / sqrt(2 S) for a Normal
    np.testing.assert_allclose(draws.std(0, ddof=1), scale.numpy(), rtol=5 / math.sqrt(2 * num_draws))
    np.testing.assert_allclose(idata.variational["w_theta"].values, theta.numpy(), rtol=1e-6)
    np.testing.assert_allclose(idata.variational["w_log_alpha"].values, log_alpha.numpy(), rtol=1e-6)
    assert idata.variational["w_log_alpha"].attrs["source"] == "distribution"


def test_log_likelihood_and_predictive_follow_each_draw():
    # Without the effect handler each draw is one weight sample: recompute the pointwise
    # log-likelihood from the posterior draws of w and compare.
    x, y = regression_data()
    fit_regression(x, y)
    idata = to_inference_data(regression_model, regression_guide, x, y, num_samples=50, chains=2)
    w = torch.as_tensor(idata.posterior["w"].values)
    expected = dist.Normal(torch.einsum("nk,cdk->cdn", x, w), 0.5).log_prob(y)
    np.testing.assert_allclose(idata.log_likelihood["y"].values, expected.numpy(), rtol=1e-5, atol=1e-5)
    # predictive draws: residuals against x @ w_s are N(0, 0.5²); 5 standard errors on their sd
    residual = idata.posterior_predictive["y"].values - torch.einsum("nk,cdk->cdn", x, w).numpy()
    assert abs(residual.std() - 0.5) < 5 * 0.5 / math.sqrt(2 * residual.size)
    assert abs(residual.mean()) < 5 * 0.5 / math.sqrt(residual.size)


def test_layer_dims_are_named():
    x, y = classification_data()
    model = Classifier()
    guide = AutoVariationalDropout(model)
    fit_classifier(model, guide, x, y, num_steps=5)
    idata = to_inference_data(model, guide, x, y, num_samples=4)
    assert idata.posterior["fc1.weight"].dims == ("chain", "draw", "fc1_out", "fc1_in")
    assert idata.posterior["fc2.weight"].dims == ("chain", "draw", "fc2_out", "fc2_in")
    assert idata.variational["fc1.weight_log_alpha"].dims == ("fc1_out", "fc1_in")
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "data")


def test_conv_and_sequential_dims():
    net = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()),
            flatten=nn.Flatten(),
            head=nn.Linear(18, 3),
        )
    )
    model = bayesianize(net, random_bias=True)
    guide = AutoVariationalDropout(model)
    x, y = torch.randn(6, 1, 5, 5), torch.tensor([0, 1, 2, 1, 1, 0])
    idata = to_inference_data(model, guide, x, y, num_samples=3)
    assert idata.posterior["features.0.weight"].dims[2:] == (
        "features_0_out",
        "features_0_in",
        "features_0_k0",
        "features_0_k1",
    )
    assert idata.posterior["features.0.bias"].dims[2:] == ("features_0_out",)
    assert idata.posterior["head.weight"].dims[2:] == ("head_out", "head_in")
    assert idata.observed_data["obs"].dims == ("data",)
    assert idata.constant_data["x"].dims[0] == "data"


def test_user_dims_and_coords():
    x, y = regression_data()
    names = [f"feature{i}" for i in range(NUM_FEATURES)]
    idata = to_inference_data(
        regression_model,
        regression_guide,
        x,
        y,
        num_samples=3,
        dims={"w": ["feature"], "x": ["data", "feature"]},
        coords={"feature": names},
    )
    assert idata.posterior["w"].dims == ("chain", "draw", "feature")
    assert list(idata.posterior["feature"].values) == names
    assert idata.constant_data["x"].dims == ("data", "feature")
    with pytest.raises(ValueError, match=r"dims\['w'\]"):
        to_inference_data(regression_model, regression_guide, x, y, num_samples=2, dims={"w": ["a", "b"]})
    with pytest.raises(ValueError, match="coords"):
        to_inference_data(
            regression_model, regression_guide, x, y, num_samples=2, dims={"w": ["f"]}, coords={"f": [1, 2]}
        )


def test_large_sites_only_when_asked():
    def model(x, y=None):
        big = pyro.sample("big", ImproperLogUniform().expand([MAX_POSTERIOR_SITE_SIZE + 1]).to_event(1))
        w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w + big.mean(), 0.5), obs=y)

    guide = AutoVariationalDropout(model)
    x, y = regression_data()
    idata = to_inference_data(model, guide, x, y, num_samples=2)
    assert "big" not in idata.posterior and "w" in idata.posterior
    assert idata.posterior.attrs["posterior_omitted_sites"] == "big"
    # θ and log α of every site are always there
    assert idata.variational["big_log_alpha"].shape == (MAX_POSTERIOR_SITE_SIZE + 1,)
    idata = to_inference_data(model, guide, x, y, num_samples=2, var_names=["big"])
    assert "big" in idata.posterior and "w" not in idata.posterior
    with pytest.raises(ValueError, match="not latent or deterministic sites"):
        to_inference_data(model, guide, x, y, num_samples=2, var_names=["nope"])
    with pytest.raises(TypeError, match="var_names"):
        to_inference_data(model, guide, x, y, num_samples=2, var_names="w")


def test_deterministic_and_unobserved_sites():
    def model(x, y=None):
        w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
        pyro.deterministic("w_norm", w.norm())
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    x, _ = regression_data()
    idata = to_inference_data(model, regression_guide, x, num_samples=5)
    np.testing.assert_allclose(
        idata.posterior["w_norm"].values, np.linalg.norm(idata.posterior["w"].values, axis=-1), rtol=1e-5
    )
    # without observations, "y" is predicted and there is nothing to score
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "data")
    assert "log_likelihood" not in idata.groups() and "observed_data" not in idata.groups()


def test_bad_arguments():
    x, y = regression_data()
    for bad in [0, -1, 1.5, True]:
        with pytest.raises(ValueError, match="num_samples"):
            to_inference_data(regression_model, regression_guide, x, y, num_samples=bad)
    with pytest.raises(ValueError, match="chains"):
        to_inference_data(regression_model, regression_guide, x, y, num_samples=2, chains=0)
    with pytest.raises(ValueError, match="threshold"):
        to_inference_data(regression_model, regression_guide, x, y, num_samples=2, threshold=float("nan"))
    with pytest.raises(TypeError, match="elbo"):
        to_inference_data(regression_model, regression_guide, x, y, num_samples=2, elbo=["a"])


def test_observations_that_change_between_draws_are_an_error():
    def model(x, y):
        w = pyro.sample("w", ImproperLogUniform().expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=10) as idx:
            return pyro.sample("y", dist.Normal(x[idx] @ w, 0.5), obs=y[idx])

    x, y = regression_data()
    with pytest.raises(ValueError, match="differ between draws"):
        to_inference_data(model, regression_guide, x, y, num_samples=3)


# ---------------------------------------------------------------------------------------
# θ and log α from different guides, and the sparsity


@pytest.mark.parametrize("guide_class", [AutoVariationalDropout, AutoVariationalDropoutMessenger])
def test_variational_from_auto_variational_dropout(guide_class):
    x, y = classification_data()
    model = Classifier()
    guide = guide_class(model, parameterization="additive")
    fit_classifier(model, guide, x, y, num_steps=100)
    idata = to_inference_data(model, guide, x, y, num_samples=3, threshold=2.0)
    sparsity = guide.sparsity(threshold=2.0)
    for name, log_alpha in guide.log_alpha().items():
        var = idata.variational[f"{name}_log_alpha"]
        assert var.attrs["source"] == "guide.log_alpha"
        np.testing.assert_allclose(var.values, log_alpha.numpy())
        np.testing.assert_allclose(idata.variational[f"{name}_theta"].values, guide.median()[name].numpy())
        site = idata.variational.sel(site=name)
        assert int(site["num_pruned"]) == sparsity["sites"][name]["num_pruned"]
        assert float(site["sparsity"]) == pytest.approx(sparsity["sites"][name]["fraction_pruned"])
    assert idata.variational.attrs["compression"] == pytest.approx(sparsity["total"]["compression"])
    assert idata.variational.attrs["sparsity_threshold"] == 2.0


def test_variational_from_auto_normal_quantiles():
    x, y = regression_data()
    guide = AutoNormal(regression_model, init_loc_fn=init_to_fan_in, init_scale=0.05)
    SVI(regression_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()).step(x, y)
    idata = to_inference_data(regression_model, guide, x, y, num_samples=2)
    loc, scale = pyro.param("AutoNormal.locs.w").detach(), pyro.param("AutoNormal.scales.w").detach()
    var = idata.variational["w_log_alpha"]
    assert var.attrs["source"] == "guide.quantiles"
    np.testing.assert_allclose(var.values, (2 * (scale.log() - loc.abs().log())).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(idata.variational["w_theta"].values, loc.numpy(), rtol=1e-6)


def test_variational_from_moments():
    # A guide whose distribution is not Normal: θ and log α are estimated from the draws.
    scale = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.1])
    theta = torch.tensor([1.0, -2.0, 0.5, 0.2, -0.1])

    def guide(x, y=None):
        pyro.sample("w", dist.Laplace(theta, scale).to_event(1))

    x, y = regression_data()
    num_draws = 2000
    idata = to_inference_data(regression_model, guide, x, y, num_samples=num_draws, predictive=False)
    var = idata.variational["w_log_alpha"]
    assert var.attrs["source"] == "moments"
    expected = torch.log(2 * scale**2 / theta**2)  # Var Laplace(b) = 2 b²
    # log of a sample variance: sd ≈ sqrt((kurtosis - 1) / S) = sqrt(5 / S) for a Laplace
    np.testing.assert_allclose(var.values, expected.numpy(), atol=5 * math.sqrt(5 / num_draws))
    np.testing.assert_allclose(
        idata.variational["w_theta"].values, theta.numpy(), atol=5 * float(scale.max()) * math.sqrt(2 / num_draws)
    )


def test_sparsity_counts_only_log_uniform_weights():
    # A weight with the log-uniform prior, and two latents that are not weights variational dropout prunes: a bias
    # with a Normal prior and a noise scale. Only the weight counts in num_weights, num_pruned and compression.
    def model(x, y=None):
        w = pyro.sample("w", ImproperLogUniform().expand([NUM_FEATURES]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        noise = pyro.sample("noise", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(x @ w + b.sum(), noise), obs=y)

    w_log_alpha = torch.tensor([-5.0, -1.0, 0.0, 4.0, 6.0])  # 2 of the 5 above the threshold 3

    def guide(x, y=None):
        pyro.sample("w", VariationalDropoutNormal(torch.ones(NUM_FEATURES), w_log_alpha).to_event(1))
        # log α = 2 log(σ/|μ|) = 2 log 100 ≈ 9.2: every element would count as pruned if b were counted
        pyro.sample("b", dist.Normal(torch.full((3,), 0.01), 1.0).to_event(1))
        pyro.sample("noise", dist.LogNormal(-1.0, 0.1))

    x, y = regression_data()
    idata = to_inference_data(model, guide, x, y, num_samples=2)
    variational = idata.variational
    assert list(variational["site"].values) == ["w"]
    assert variational["num_weights"].values.tolist() == [5]
    assert variational["num_pruned"].values.tolist() == [2]
    assert variational["sparsity"].values.tolist() == [pytest.approx(2 / 5)]
    assert variational.attrs["compression"] == pytest.approx(5 / 3)
    # θ and log α are still there for every latent site
    np.testing.assert_allclose(variational["w_log_alpha"].values, w_log_alpha.numpy())
    np.testing.assert_allclose(variational["b_log_alpha"].values, np.full(3, 2 * math.log(100)), rtol=1e-5)
    assert variational["noise_log_alpha"].attrs["source"] == "moments"


# ---------------------------------------------------------------------------------------
# what users do with it


def test_summary_of_weights_and_log_alpha():
    x, y = regression_data()
    fit_regression(x, y)
    num_draws = 1000
    idata = to_inference_data(regression_model, regression_guide, x, y, num_samples=num_draws // 2, chains=2)
    theta, log_alpha, scale = regression_posterior()
    summary = az.summary(idata, var_names=["w"])
    assert list(summary.index) == [f"w[{i}]" for i in range(NUM_FEATURES)]
    assert np.all(np.abs(summary["mean"].values - theta.numpy()) < 5 * scale.numpy() / math.sqrt(num_draws) + 1e-3)
    assert np.all(summary["r_hat"].values < 1.05)
    stats = az.summary(idata, var_names=["w_log_alpha"], kind="stats", round_to="none")
    np.testing.assert_allclose(stats["mean"].values, log_alpha.numpy(), rtol=1e-4)  # a float32 mean
    np.testing.assert_allclose(stats["sd"].values, 0.0, atol=1e-4)
    # the pruned inputs (true weight 0) have much larger log α than the relevant ones
    assert stats["mean"].values[2:].min() > stats["mean"].values[:2].max() + 3


@pytest.mark.filterwarnings(PARETO_K_WARNING)
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_loo_and_waic(task):
    if task == "regression":
        x, y = regression_data()
        fit_regression(x, y)
        model, guide = regression_model, regression_guide
    else:
        x, y = classification_data()
        model = Classifier()
        guide = AutoVariationalDropout(model, parameterization="additive")
        fit_classifier(model, guide, x, y)
    idata = to_inference_data(model, guide, x, y, num_samples=200)
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo["elpd_loo"]) and np.isfinite(loo["se"])
    assert loo["pareto_k"].shape == (len(y),) and np.all(np.isfinite(loo["pareto_k"].values))
    assert np.mean(loo["pareto_k"].values < 0.7) > 0.9
    waic = az.waic(idata)
    assert np.isfinite(waic["elpd_waic"])
    # elpd is at most the log-likelihood at the best draw, and not absurdly below the average
    log_lik = idata.log_likelihood[list(idata.log_likelihood.data_vars)[0]].values.reshape(200, -1)
    assert loo["elpd_loo"] <= log_lik.sum(1).max() + 1e-6
    assert loo["elpd_loo"] >= log_lik.sum(1).mean() - 10 * loo["p_loo"] - 10


@pytest.mark.filterwarnings(MPL_ALIAS_DEPRECATION)
def test_plots_run_headless():
    import matplotlib.pyplot as plt

    x, y = regression_data()
    fit_regression(x, y, num_steps=50)
    idata = to_inference_data(regression_model, regression_guide, x, y, num_samples=50, chains=2)
    axes = az.plot_forest(idata, var_names=["w"], combined=True)
    assert len(np.ravel(axes)) >= 1
    axes = az.plot_posterior(idata, var_names=["w"])
    assert len([ax for ax in np.ravel(axes) if ax.get_title()]) == NUM_FEATURES
    plt.close("all")


# ---------------------------------------------------------------------------------------
# the local reparameterization


@pytest.mark.filterwarnings(PARETO_K_WARNING)
@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_under_local_reparam(estimator):
    x, y = regression_data()
    guide = AutoVariationalDropout(regression_model)
    svi = SVI(regression_model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    with local_reparam(estimator=estimator):
        for _ in range(100):
            svi.step(x, y)
        idata = to_inference_data(regression_model, guide, x, y, num_samples=400)
    assert idata.attrs["local_reparameterization"] == estimator
    assert idata.posterior.attrs["local_reparameterization"] == estimator
    # the weight draws come from the guide: N(θ, αθ²)
    theta, scale = guide.median()["w"], (0.5 * guide.log_alpha()["w"]).exp() * guide.median()["w"].abs()
    draws = idata.posterior["w"].values.reshape(400, -1)
    assert np.all(np.abs(draws.mean(0) - theta.numpy()) < 5 * scale.numpy() / math.sqrt(400))
    # per observation the predictive is y_i ~ N(x_i θ, 0.5² + Σ_k x_ik² α_k θ_k²) whichever estimator
    y_rep = idata.posterior_predictive["y"].values.reshape(400, -1)
    sd = torch.sqrt(0.25 + (x**2 * scale**2).sum(-1))
    z = (y_rep.mean(0) - (x @ theta).numpy()) / (sd.numpy() / math.sqrt(400))
    assert np.abs(z).max() < 5
    assert np.all(np.isfinite(idata.log_likelihood["y"].values))
    assert np.isfinite(az.loo(idata)["elpd_loo"])


def test_prediction_without_observations_under_local_reparam():
    # Inside the handler the unobserved Normal output is a lazy value too; it is drawn, not exported lazily.
    x, y = regression_data()
    guide = AutoVariationalDropout(regression_model)
    guide(x, y)
    with local_reparam():
        idata = to_inference_data(regression_model, guide, x, num_samples=300)
    y_rep = idata.posterior_predictive["y"].values.reshape(300, -1)
    theta, scale = guide.median()["w"], (0.5 * guide.log_alpha()["w"]).exp() * guide.median()["w"].abs()
    sd = torch.sqrt(0.25 + (x**2 * scale**2).sum(-1)).numpy()
    np.testing.assert_allclose(y_rep.std(0, ddof=1) / sd, 1.0, atol=5 / math.sqrt(2 * 300))
    assert np.abs((y_rep.mean(0) - (x @ theta).numpy()) / (sd / math.sqrt(300))).max() < 5


def test_predictive_variance_under_local_reparam_is_exact():
    # The closed form, pooled over many observations: under LRT every observation of every draw gets its own
    # noise, so the standardized residuals z = (y_rep - x θ) / sd with sd² = 0.5² + Σ_k x_k² α_k θ_k² are
    # independent N(0, 1) and mean(z²) has standard error sqrt(2 / (S N)) ≈ 0.002. The weight term is ~80% of
    # the variance here, so a doubled LRT variance (mean(z²) ≈ 1.8) or one off by 5% is far outside 5 SE.
    num_data, num_samples = 2000, 200
    x, y = regression_data(num_data)
    guide = AutoVariationalDropout(regression_model)
    guide(x, y)
    with torch.no_grad():
        guide.log_alphas.w.copy_(torch.tensor([-3.0, -1.0, 0.0, -0.5, -2.0]))
    with local_reparam(estimator="lrt"):
        idata = to_inference_data(regression_model, guide, x, num_samples=num_samples)
    theta = guide.median()["w"]
    variance = guide.log_alpha()["w"].exp() * theta**2
    weight_term = (x**2 * variance).sum(-1)
    assert (weight_term / (0.25 + weight_term)).mean() > 0.5, "the weight term should dominate the variance"
    sd = torch.sqrt(0.25 + weight_term).numpy()
    z = (idata.posterior_predictive["y"].values.reshape(num_samples, num_data) - (x @ theta).numpy()) / sd
    standard_error = math.sqrt(2 / z.size)
    assert abs(np.mean(z**2) - 1) < 5 * standard_error, np.mean(z**2)
    assert abs(np.mean(z)) < 5 / math.sqrt(z.size)


def test_local_latent_dims_follow_plates():
    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("groups", y.shape[0]):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            return pyro.sample("y", dist.Normal(z, 0.5), obs=y)

    guide = AutoNormal(model)
    idata = to_inference_data(model, guide, torch.randn(4), num_samples=3)
    assert idata.posterior["z"].dims == ("chain", "draw", "groups")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "groups")


# ---------------------------------------------------------------------------------------
# devices, dtypes and files


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype(device, dtype):
    x, y = regression_data(device=device, dtype=dtype)
    fit_regression(x, y, num_steps=20)
    assert pyro.param("theta").device.type == device.type
    idata = to_inference_data(regression_model, regression_guide, x, y, num_samples=4)
    expected = np.float32 if dtype == torch.float32 else np.float64
    for group in ["posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data"]:
        for name, var in idata[group].data_vars.items():
            assert isinstance(var.values, np.ndarray), (group, name)
            assert var.dtype == expected, (group, name)


HAS_NETCDF = importlib.util.find_spec("h5netcdf") is not None or importlib.util.find_spec("netCDF4") is not None


@pytest.mark.skipif(not HAS_NETCDF, reason="to_netcdf needs h5netcdf or netCDF4")
def test_cpu_reader_of_a_device_export(device, tmp_path):
    # Export a model fitted on `device` (CUDA where available), then read the file in a fresh process
    # that sees no GPU and never imports torch or Pyro.
    x, y = regression_data(device=device)
    fit_regression(x, y, num_steps=20)
    idata = to_inference_data(regression_model, regression_guide, x, y, num_samples=4)
    for group in idata.groups():
        for var in list(idata[group].data_vars.values()) + list(idata[group].coords.values()):
            assert isinstance(var.values, np.ndarray)
        for value in idata[group].attrs.values():
            assert isinstance(value, str | int | float)
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    reader = (
        "import sys, warnings; warnings.simplefilter('ignore'); import arviz as az; "
        f"d = az.from_netcdf({str(path)!r}); "
        "assert 'torch' not in sys.modules and 'pyro' not in sys.modules; "
        "print(float(d.posterior['w'].mean()), float(d.variational['w_log_alpha'].sum()))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    mean, log_alpha_sum = map(float, result.stdout.split())
    assert mean == pytest.approx(float(idata.posterior["w"].mean()), rel=1e-6)
    assert log_alpha_sum == pytest.approx(float(idata.variational["w_log_alpha"].sum()), rel=1e-6)


@pytest.mark.skipif(not HAS_NETCDF, reason="to_netcdf needs h5netcdf or netCDF4")
def test_netcdf_round_trip(tmp_path):
    x, y = classification_data()
    model = Classifier()
    guide = AutoVariationalDropout(model)
    fit_classifier(model, guide, x, y, num_steps=5)
    idata = to_inference_data(model, guide, x, y, num_samples=5, chains=2, elbo=[3.0, 2.0, 1.0])
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    assert set(loaded.groups()) == set(idata.groups())
    for group in idata.groups():
        xr_expected, xr_loaded = idata[group], loaded[group]
        assert set(xr_loaded.data_vars) == set(xr_expected.data_vars)
        for name in xr_expected.data_vars:
            np.testing.assert_array_equal(xr_loaded[name].values, xr_expected[name].values)
            assert xr_loaded[name].dims == xr_expected[name].dims
    assert loaded.variational.attrs["sparsity_threshold"] == 3.0
    assert loaded.posterior.attrs["local_reparameterization"] == "none"


@pytest.mark.filterwarnings(PARETO_K_WARNING)
def test_arviz_1_returns_a_datatree(monkeypatch):
    # ArviZ >= 1.0 has no InferenceData class: the result is an xarray.DataTree with one child per group.
    # (ArviZ 1.x needs Python >= 3.12; here we check the tree against arviz 0.23's own DataTree reader.)
    import xarray as xr

    x, y = regression_data()
    fit_regression(x, y, num_steps=50)
    monkeypatch.delattr(az, "InferenceData")
    tree = to_inference_data(regression_model, regression_guide, x, y, num_samples=20, chains=2)
    monkeypatch.undo()
    assert isinstance(tree, xr.DataTree)
    assert set(tree.children) >= {"posterior", "posterior_predictive", "log_likelihood", "variational"}
    assert tree.attrs["local_reparameterization"] == "none"
    assert tree["posterior"]["w"].dims == ("chain", "draw", "w_dim_0")
    idata = az.from_datatree(tree)
    assert np.isfinite(az.loo(idata)["elpd_loo"])


# ---------------------------------------------------------------------------------------
# importing


@pytest.mark.parametrize("module", ["pyro_vdrop", "pyro_vdrop.distributions"])
def test_import_does_not_load_arviz_or_xarray(module):
    # ArviZ and xarray are imported on the first call of to_inference_data, not by `import pyro_vdrop`.
    import pyro_vdrop

    root = os.path.dirname(os.path.dirname(pyro_vdrop.__file__))
    script = (
        f"import sys, {module}, pyro_vdrop; "
        "assert callable(pyro_vdrop.to_inference_data); "
        "print(pyro_vdrop.__file__, 'xarray' in sys.modules, 'arviz' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    path, xarray_loaded, arviz_loaded = result.stdout.split()
    assert path == pyro_vdrop.__file__
    assert (xarray_loaded, arviz_loaded) == ("False", "False")


def test_predictive_figures_in_the_attributes():
    # regression: the mean negative log predictive density, recomputed from the log_likelihood group
    x, y = regression_data()
    fit_regression(x, y)
    idata = to_inference_data(regression_model, regression_guide, x, y, num_samples=40)
    log_lik = torch.as_tensor(idata.log_likelihood["y"].values, dtype=torch.float64).flatten(0, 1)  # (S, N)
    expected = -(torch.logsumexp(log_lik, 0) - math.log(log_lik.shape[0])).mean()
    assert idata.attrs["y_nll"] == pytest.approx(float(expected), rel=1e-6)
    assert "y_brier" not in idata.attrs  # a Normal likelihood has no class probabilities

    # classification: error, Brier and ECE of the mean class probabilities, recomputed from the weight draws
    x, y = classification_data()
    model = Classifier()
    guide = AutoVariationalDropout(model)
    fit_classifier(model, guide, x, y, num_steps=100)
    idata = to_inference_data(model, guide, x, y, num_samples=30)
    w1 = torch.as_tensor(idata.posterior["fc1.weight"].values).flatten(0, 1)
    w2 = torch.as_tensor(idata.posterior["fc2.weight"].values).flatten(0, 1)
    with torch.no_grad():
        hidden = torch.relu(torch.einsum("nk,shk->snh", x, w1) + model.fc1.bias)
        probs = (torch.einsum("snh,sch->snc", hidden, w2) + model.fc2.bias).softmax(-1).mean(0)
    onehot = torch.nn.functional.one_hot(y, 3).to(probs.dtype)
    assert idata.attrs["obs_error"] == pytest.approx(float((probs.argmax(-1) != y).double().mean()))
    assert idata.attrs["obs_brier"] == pytest.approx(float(((probs - onehot) ** 2).sum(-1).mean()), rel=1e-5)
    assert idata.attrs["obs_ece"] == pytest.approx(float(metrics.expected_calibration_error(probs, y)), abs=1e-6)
    assert idata.attrs["obs_nll"] == pytest.approx(float(-probs.gather(1, y[:, None]).log().mean()), rel=1e-4)
