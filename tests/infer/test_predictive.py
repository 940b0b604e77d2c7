# SPDX-License-Identifier: Apache-2.0
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_vdrop.distributions import ImproperLogUniform
from pyro_vdrop.infer import AutoVariationalDropout, Predictive


def model(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def test_pyro_predictive_fails_on_the_improper_prior():
    guide = AutoVariationalDropout(model)
    x = torch.randn(10, 2)
    guide(x, torch.zeros(10))
    with pytest.raises(NotImplementedError, match="improper"):
        pyro.infer.Predictive(model, guide=guide, num_samples=3)(x)


def test_predictive_draws_the_likelihood():
    x = torch.randn(200, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(200)
    guide = AutoVariationalDropout(model, init_log_alpha=-8.0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(200):
        svi.step(x, y)
    samples = Predictive(model, guide=guide, num_samples=400)(x)
    assert samples["w"].shape == (400, 1, 2)  # Pyro's layout: a dim for the data plate
    assert samples["y"].shape == (400, 200)
    # y | w ~ N(x w, 0.25): the spread of the draws around their mean is the noise, not 0
    # (which is what a point-estimate initialisation of "y" would give). 400 × 200 draws: s.e. ~ 0.2%.
    resid = samples["y"] - torch.einsum("nd,sd->sn", x, samples["w"].squeeze(1))
    assert resid.var().item() == pytest.approx(0.25, rel=0.03)


def classifier(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([3, 4]).to_event(2))
    logits = torch.nn.functional.linear(x, w)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
    return logits


def test_predictive_under_local_reparam_samples_pre_activations(monkeypatch):
    from pyro_vdrop.distributions import VariationalDropoutNormal
    from pyro_vdrop.poutine import local_reparam

    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    guide = AutoVariationalDropout(classifier, init_log_alpha=-1.0)
    guide(x, y)
    monkeypatch.setattr(VariationalDropoutNormal, "rsample", lambda *a, **k: pytest.fail("weight sampled"))
    predictive = Predictive(classifier, guide=guide, num_samples=300, return_sites=["obs", "_RETURN"])
    with local_reparam():
        draws = predictive(x)
    assert draws["obs"].shape == (300, 30) and draws["_RETURN"].shape == (300, 30, 3)
    # per-example noise: the logits of two examples are uncorrelated across draws (300 draws: |r| < 4.5/sqrt(300))
    logits = draws["_RETURN"][:, :, 0]
    r = torch.corrcoef(torch.stack([logits[:, 0], logits[:, 1]]))[0, 1]
    assert r.abs() < 4.5 / 300**0.5
    # the default return sites are those the guide does not give; a weight cannot be returned
    with local_reparam():
        assert set(Predictive(classifier, guide=guide, num_samples=2)(x)) == {"obs"}
        with pytest.raises(ValueError, match="site 'w' is a weight under local_reparam"):
            Predictive(classifier, guide=guide, num_samples=2, return_sites=["w"])(x)
        with pytest.raises(ValueError, match="parallel=False"):
            Predictive(classifier, guide=guide, num_samples=2, parallel=True)(x)


def test_prediction_under_local_reparam_computes_no_kl(monkeypatch):
    """The analytic KL is an ELBO term: Predictive never asks for it; an ELBO on the same handler does."""
    from pyro_vdrop.poutine import local_reparam

    calls = []
    kl_divergence = torch.distributions.kl_divergence
    monkeypatch.setattr(
        "pyro_vdrop.poutine.local_reparam_site.kl_divergence", lambda q, p: calls.append(1) or kl_divergence(q, p)
    )
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    guide = AutoVariationalDropout(classifier, init_log_alpha=-1.0)
    guide(x, y)
    with local_reparam():
        Predictive(classifier, guide=guide, num_samples=5, return_sites=["obs"])(x)
        assert calls == []
        TraceMeanField_ELBO().loss(classifier, guide, x, y)
    assert len(calls) == 1  # one weight site, one KL
