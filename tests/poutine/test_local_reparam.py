# SPDX-License-Identifier: Apache-2.0
"""Pyro integration of the local-reparameterization handler: SVI, ELBO accounting, plates, autoguides."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn
from torch.distributions import kl_divergence

from pyro_vdrop.distributions import (
    CorrelatedVariationalDropoutNormal,
    ImproperLogUniform,
    VariationalDropoutNormal,
)
from pyro_vdrop.infer import init_to_fan_in
from pyro_vdrop.poutine import LazyWeight, LazyWeightError, LocalReparamSite, local_reparam

N, D, H, C = 12, 5, 4, 3
# b1 has a plain Normal guide, which local_reparam makes lazy only when named
SITES = ["w1", "b1", "w2"]


def model(x, y=None, size=None, subsample_size=None):
    w1 = pyro.sample("w1", ImproperLogUniform().expand([H, D]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = pyro.sample("w2", ImproperLogUniform().expand([C, H]).to_event(2))
    with pyro.plate("data", size or x.shape[0], subsample_size=subsample_size) as idx:
        xb = x[idx] if subsample_size else x
        logits = F.linear(torch.relu(F.linear(xb, w1, b1)), w2)
        pyro.sample("obs", dist.Categorical(logits=logits), obs=None if y is None else y[idx])
    return logits


def make_guide(kind="independent", additive=False, scale=1.0):
    def guide(x, y=None, size=None, subsample_size=None):
        with poutine.scale(scale=scale):
            for name, shape in (("w1", (H, D)), ("b1", None), ("w2", (C, H))):
                if name == "b1":
                    b_loc = pyro.param("b1_loc", torch.zeros(H))
                    b_scale = pyro.param("b1_scale", torch.full((H,), 0.1), constraint=dist.constraints.positive)
                    pyro.sample("b1", dist.Normal(b_loc, b_scale).to_event(1))
                    continue
                loc = pyro.param(f"{name}_loc", lambda shape=shape: torch.randn(shape) / 2)
                if kind == "correlated":
                    la = pyro.param(f"{name}_log_alpha", torch.full((1, shape[1]), -1.0))
                    fn = CorrelatedVariationalDropoutNormal(loc, la)
                elif additive:
                    fn = VariationalDropoutNormal.from_additive(loc, pyro.param(f"{name}_ls2", torch.full(shape, -4.0)))
                else:
                    fn = VariationalDropoutNormal(loc, pyro.param(f"{name}_log_alpha", torch.full(shape, -1.0)))
                pyro.sample(name, fn.to_event(2))

    return guide


def data():
    return torch.randn(N, D), torch.randint(0, C, (N,))


def _kl_sum(guide_trace, model_trace, names=("w1", "b1", "w2")):
    total = 0.0
    for n in names:
        q = guide_trace.nodes[n]["fn"]
        assert isinstance(q, LocalReparamSite)  # the guide's distribution is recorded as q.base
        total = total + kl_divergence(q.base, model_trace.nodes[n]["fn"].base).sum() * guide_trace.nodes[n]["scale"]
    return total


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
@pytest.mark.parametrize("kind", ["independent", "additive", "correlated"])
@pytest.mark.parametrize("Elbo", [TraceMeanField_ELBO, Trace_ELBO])
def test_elbo_is_data_term_minus_analytic_kl(Elbo, kind, estimator):
    """Both ELBOs give -(log p(y | LRT pre-activations) - KL): the KL is never dropped."""
    x, y = data()
    guide = make_guide("correlated" if kind == "correlated" else "independent", additive=kind == "additive")
    with local_reparam(sites=SITES, estimator=estimator):
        guide(x, y)  # initialise the parameters, so that both runs below draw the same noise
        pyro.set_rng_seed(1)
        loss = Elbo(max_plate_nesting=1).loss(model, guide, x, y)
        pyro.set_rng_seed(1)
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    assert isinstance(guide_trace.nodes["w1"]["value"], LazyWeight)
    log_lik = model_trace.nodes["obs"]["fn"].log_prob(y).sum()
    expected = -(log_lik - _kl_sum(guide_trace, model_trace))
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_trace_elbo_and_mean_field_agree_with_scaled_kl():
    x, y = data()
    guide = make_guide(scale=0.25)  # KL annealing: the guide site's scale weights the KL
    with local_reparam(sites=SITES):
        guide(x, y)
    losses = []
    for Elbo in (TraceMeanField_ELBO, Trace_ELBO):
        with local_reparam(sites=SITES):
            pyro.set_rng_seed(3)
            losses.append(Elbo(max_plate_nesting=1).loss(model, guide, x, y))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    with local_reparam(sites=SITES):
        pyro.set_rng_seed(3)
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    model_trace.compute_log_prob()
    kl = _kl_sum(guide_trace, model_trace)
    log_p = sum(model_trace.nodes[n]["log_prob_sum"] for n in ("w1", "b1", "w2"))
    assert log_p.item() == pytest.approx(-kl.item(), rel=1e-6)


def test_no_weight_sample_or_log_density(monkeypatch):
    """The LRT path never draws a weight-sized sample nor evaluates a per-weight log-density."""

    def fail(*args, **kwargs):
        raise AssertionError("a weight was sampled or its density evaluated")

    for cls in (VariationalDropoutNormal, dist.Normal, torch.distributions.Normal, ImproperLogUniform):
        monkeypatch.setattr(cls, "rsample", fail)
        monkeypatch.setattr(cls, "sample", fail)
        monkeypatch.setattr(cls, "log_prob", fail)
    x, y = data()
    guide = make_guide()
    for Elbo in (TraceMeanField_ELBO, Trace_ELBO):
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Elbo())
        with local_reparam(sites=SITES):
            losses = [svi.step(x, y) for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses)))


def test_svi_learns_and_subsample_scales_data_term_only():
    torch.manual_seed(0)
    x = torch.randn(200, D)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    guide = make_guide()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    with local_reparam(sites=SITES):
        first = sum(svi.step(x, y, 200, 50) for _ in range(10))
        for _ in range(200):
            svi.step(x, y, 200, 50)
        last = sum(svi.step(x, y, 200, 50) for _ in range(10))
    assert last < 0.7 * first
    # with subsampling, the data term is scaled by N / M and the KL counted once
    with local_reparam(sites=SITES):
        pyro.set_rng_seed(5)
        loss = TraceMeanField_ELBO(max_plate_nesting=1).loss(model, guide, x, y, 200, 50)
        pyro.set_rng_seed(5)
        guide_trace = poutine.trace(guide).get_trace(x, y, 200, 50)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y, 200, 50)
    obs = model_trace.nodes["obs"]
    assert obs["value"].shape == (50,) and obs["scale"] == 4.0
    expected = -(4.0 * obs["fn"].log_prob(obs["value"]).sum() - _kl_sum(guide_trace, model_trace))
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_mask_on_guide_masks_kl():
    x, y = data()
    guide = poutine.mask(make_guide(), mask=False)
    with local_reparam(sites=SITES):
        guide(x, y)
        pyro.set_rng_seed(2)
        masked = Trace_ELBO(max_plate_nesting=1).loss(model, guide, x, y)
        pyro.set_rng_seed(2)
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    assert masked == pytest.approx(-model_trace.nodes["obs"]["fn"].log_prob(y).sum().item(), rel=1e-5)


def test_autonormal():
    """AutoNormal's auxiliary Normal becomes the lazy weight; the KL against the prior is analytic."""
    x, y = data()
    guide = AutoNormal(model, init_loc_fn=init_to_fan_in)
    for Elbo in (TraceMeanField_ELBO, Trace_ELBO):
        with local_reparam(sites=SITES):
            guide(x, y)
            pyro.set_rng_seed(4)
            loss = Elbo(max_plate_nesting=1).loss(model, guide, x, y)
            pyro.set_rng_seed(4)
            guide_trace = poutine.trace(guide).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
        assert isinstance(guide_trace.nodes["w1_unconstrained"]["value"], LazyWeight)
        assert guide_trace.nodes["w1"]["value"] is guide_trace.nodes["w1_unconstrained"]["value"]
        q = guide_trace.nodes["w1"]["fn"]
        assert torch.equal(q.base.base_dist.loc, guide.locs.w1)
        expected = -(model_trace.nodes["obs"]["fn"].log_prob(y).sum() - _kl_sum(guide_trace, model_trace))
        assert loss == pytest.approx(expected.item(), rel=1e-5)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    with local_reparam(sites=SITES):
        assert torch.isfinite(torch.tensor(svi.step(x, y)))


def mixed_model(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([1, D]).to_event(2))
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))  # a latent used elementwise
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))  # a positive latent
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(F.linear(x, w).squeeze(-1) + shift, sigma), obs=y)


def test_mixed_model_with_autonormal_and_default_handler():
    """
    Only auxiliary sites with real support are lazy: ``w`` (a weight) and ``shift`` (added as a bias) are; the
    positive ``sigma`` is transformed by the guide (exp) and so becomes an ordinary sample with its ordinary
    log-density, as without the handler.
    """
    x, y = torch.randn(N, D), torch.randn(N)
    guide = AutoNormal(mixed_model, init_loc_fn=init_to_fan_in)
    svi = SVI(mixed_model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    with local_reparam():
        for _ in range(3):
            loss = svi.step(x, y)
        pyro.set_rng_seed(6)
        elbo_loss = Trace_ELBO().loss(mixed_model, guide, x, y)
        pyro.set_rng_seed(6)
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(mixed_model, trace=guide_trace)).get_trace(x, y)
    assert torch.isfinite(torch.tensor(loss))
    assert isinstance(guide_trace.nodes["w"]["value"], LazyWeight)
    assert isinstance(guide_trace.nodes["shift"]["value"], LazyWeight)
    sigma = guide_trace.nodes["sigma"]["value"]
    assert type(sigma) is torch.Tensor
    # an independent reference for the ELBO: the data term with the drawn pre-activations, the analytic KL of
    # w and shift, and for sigma the Monte Carlo term log p(sigma) - log q(sigma) of plain Pyro, computed here
    # from the guide's parameters
    u = sigma.log()
    q_u = dist.Normal(guide.locs.sigma, guide.scales.sigma)
    log_q_sigma = q_u.log_prob(u) - u  # change of variables: log q(sigma) = log q(u) - log |d sigma / d u|
    kl = 0.0
    for name, prior in (("w", ImproperLogUniform().expand([1, D]).to_event(2)), ("shift", dist.Normal(0.0, 1.0))):
        q = dist.Normal(getattr(guide.locs, name), getattr(guide.scales, name))
        kl = kl + kl_divergence(q.to_event(q.batch_shape.__len__()), prior).sum()
    log_lik = model_trace.nodes["obs"]["fn"].log_prob(y).sum()
    expected = -(log_lik + dist.LogNormal(0.0, 1.0).log_prob(sigma) - log_q_sigma - kl)
    assert elbo_loss == pytest.approx(expected.item(), rel=1e-5)


def test_autoguide_errors_say_sites_selects_and_fallback_is_honoured():
    def model_mul(x, y=None):
        w = pyro.sample("w", ImproperLogUniform().expand([D]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal((x * w).sum(-1), 1.0), obs=y)

    x, y = torch.randn(N, D), torch.randn(N)
    guide = AutoNormal(model_mul, init_loc_fn=init_to_fan_in)
    with pytest.raises(
        LazyWeightError,
        match=r"site 'w_unconstrained'.*'mul' is not supported.*local_reparam\(sites=\[...\]\) \(it selects: sites "
        r"left out stay ordinary samples\).*fallback=True",
    ):
        with local_reparam():
            Trace_ELBO().loss(model_mul, guide, x, y)
    # fallback=True: one ordinary sample of w for the unsupported use; the KL stays analytic
    with local_reparam(fallback=True):
        guide(x, y)
        pyro.set_rng_seed(8)
        loss = Trace_ELBO().loss(model_mul, guide, x, y)
        pyro.set_rng_seed(8)
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model_mul, trace=guide_trace)).get_trace(x, y)
    w = guide_trace.nodes["w"]["value"].materialize()
    q = dist.Normal(guide.locs.w, guide.scales.w).to_event(1)
    kl = kl_divergence(q, ImproperLogUniform().expand([D]).to_event(1))
    expected = -(dist.Normal((x * w).sum(-1), 1.0).log_prob(y).sum() - kl)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert model_trace.nodes["obs"]["fn"].loc.shape == (N,)


def regression_model(x, y=None):
    """Pyro's Bayesian-regression tutorial, with a positive bias and a LogNormal (or Uniform) noise scale."""
    w = pyro.sample("w", dist.Normal(0.0, 10.0).expand([1, x.shape[-1]]).to_event(2))
    b = pyro.sample("b", dist.LogNormal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(F.linear(x, w).squeeze(-1) + b, sigma), obs=y)


def regression_model_uniform(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 10.0).expand([1, x.shape[-1]]).to_event(2))
    b = pyro.sample("b", dist.HalfNormal(5.0))
    sigma = pyro.sample("sigma", dist.Uniform(0.0, 5.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(F.linear(x, w).squeeze(-1) + b, sigma), obs=y)


@pytest.mark.parametrize("model", [regression_model, regression_model_uniform])
def test_autonormal_with_constrained_latents_trains_and_recovers_weights(model):
    torch.manual_seed(1)
    true_w, true_b, true_sigma = torch.tensor([[1.0, -2.0, 0.5]]), 1.5, 0.3
    x = torch.randn(500, 3)
    y = F.linear(x, true_w).squeeze(-1) + true_b + true_sigma * torch.randn(500)
    guide = AutoNormal(model, init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    with local_reparam():
        for _ in range(1500):
            svi.step(x, y)
        guide_trace = poutine.trace(guide).get_trace(x, y)
    assert isinstance(guide_trace.nodes["w"]["value"], LazyWeight)
    assert type(guide_trace.nodes["b"]["value"]) is torch.Tensor
    median = guide.median()
    assert torch.allclose(median["w"], true_w, atol=0.1)
    assert median["b"].item() == pytest.approx(true_b, abs=0.1)
    assert median["sigma"].item() == pytest.approx(true_sigma, abs=0.05)


@pytest.mark.parametrize("Guide", ["AutoDiagonalNormal", "AutoNormal"])
def test_autoguide_on_constrained_sites_is_plain_pyro(Guide):
    """Sites whose transform is not the identity give exactly plain Pyro's ELBO (same draws, same terms)."""

    def model(y):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        rate = pyro.sample("rate", dist.Uniform(0.0, 2.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("obs", dist.Gamma(scale, rate), obs=y)

    y = torch.rand(N) + 0.5
    guide = getattr(pyro.infer.autoguide, Guide)(model)
    guide(y)
    losses = []
    for handler in (local_reparam(), poutine.block(hide=[])):
        with handler:
            pyro.set_rng_seed(9)
            losses.append(TraceMeanField_ELBO().loss(model, guide, y))
    assert losses[0] == losses[1]


def tied_autoencoder(x, y=None):
    w = pyro.sample("w", ImproperLogUniform().expand([3, D]).to_event(2))
    with pyro.plate("data", x.shape[0]):
        recon = F.linear(torch.tanh(F.linear(x, w)), w.t())  # the decoder is the encoder's transpose
        pyro.sample("obs", dist.Normal(recon, 1.0).to_event(1), obs=y)
    return recon


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
def test_tied_weights_in_a_model_share_one_sample(estimator):
    """Through the handler: both uses see one weight per example, against explicit weight draws."""
    S = 4000
    x = torch.randn(1, D).expand(S, D)
    loc, log_alpha = torch.randn(3, D) / 2, torch.full((3, D), -0.5)

    def guide(x, y=None):
        pyro.sample("w", VariationalDropoutNormal(loc, log_alpha).to_event(2))

    with local_reparam(estimator=estimator), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x)
        if estimator == "flipout":  # one perturbation per model run: many runs of a few examples
            recon = torch.cat([poutine.replay(tied_autoencoder, trace=guide_trace)(x[:10]) for _ in range(S // 10)])
        else:
            recon = poutine.replay(tied_autoencoder, trace=guide_trace)(x)
    ws = VariationalDropoutNormal(loc, log_alpha).sample((S,))
    reference = torch.einsum("soi,so->si", ws, torch.tanh(ws @ x[0]))
    var = reference.var(0)
    assert ((recon.mean(0) - reference.mean(0)).abs() <= 4.5 * (2 * var / S).sqrt()).all()
    assert ((recon.var(0) / var - 1).abs() <= 0.15).all()


def test_tied_weight_that_cannot_share_noise_names_site_and_ops():
    def model_conv(x):
        w = pyro.sample("w", ImproperLogUniform().expand([1, 1, 3]).to_event(3))
        h = F.conv1d(x, w)
        return F.conv1d(h, w)

    def guide(x):
        pyro.sample("w", VariationalDropoutNormal(torch.randn(1, 1, 3), torch.full((1, 1, 3), -1.0)).to_event(3))

    message = r"site 'w' is used twice in one model run, by 'conv1d' and then 'conv1d'"
    with pytest.raises(LazyWeightError, match=message):
        with local_reparam():
            TraceMeanField_ELBO().loss(model_conv, guide, torch.randn(4, 1, 9))


class BNN(PyroModule):
    def __init__(self):
        super().__init__()
        self.conv = PyroModule[nn.Conv2d](2, 4, 3, stride=2, padding=1, groups=2)
        self.conv.weight = PyroSample(ImproperLogUniform().expand([4, 1, 3, 3]).to_event(4))
        self.conv.bias = PyroSample(dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        self.fc = PyroModule[nn.Linear](4 * 3 * 3, C)
        self.fc.weight = PyroSample(ImproperLogUniform().expand([C, 36]).to_event(2))

    def forward(self, x, y=None):
        logits = self.fc(torch.relu(self.conv(x)).flatten(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def pyro_module_guide(x, y=None):
    for name, shape in (("conv.weight", (4, 1, 3, 3)), ("conv.bias", None), ("fc.weight", (C, 36))):
        if shape is None:
            pyro.sample(name, dist.Normal(pyro.param(name + ".loc", torch.zeros(4)), 0.1).to_event(1))
            continue
        loc = pyro.param(name + ".loc", lambda shape=shape: torch.randn(shape) / 3)
        la = pyro.param(name + ".la", torch.full(shape, -2.0))
        pyro.sample(name, VariationalDropoutNormal(loc, la).to_event(len(shape)))


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_pyro_module_layers(estimator):
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, C, (6,))
    bnn = BNN()
    svi = SVI(bnn, pyro_module_guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    with local_reparam(estimator=estimator):
        losses = [svi.step(x, y) for _ in range(3)]
        guide_trace = poutine.trace(pyro_module_guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(bnn, trace=guide_trace)).get_trace(x, y)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert isinstance(model_trace.nodes["conv.weight"]["value"], LazyWeight)
    assert model_trace.nodes["obs"]["fn"].logits.shape == (6, C)


def test_decorator_and_trace_order():
    x, y = data()
    guide = make_guide()
    # as a decorator around a function that runs the ELBO
    step = local_reparam(lambda: TraceMeanField_ELBO().loss(model, guide, x, y), estimator="flipout")
    assert torch.isfinite(torch.tensor(step()))
    # inside a trace whose records the ELBO would use: a clear error
    with pytest.raises(RuntimeError, match="outside the trace"):
        poutine.trace(local_reparam(guide)).get_trace(x, y)


def test_bad_options():
    with pytest.raises(ValueError, match="estimator"):
        local_reparam(estimator="single")
    with pytest.raises(TypeError, match="sites"):
        local_reparam(sites="w1")


def test_missing_kl_is_an_error():
    def model_t(x):
        w = pyro.sample("w", dist.StudentT(3.0, 0.0, 1.0).expand([H, D]).to_event(2))
        return F.linear(x, w)

    def guide_t(x):
        pyro.sample("w", dist.Normal(torch.zeros(H, D), 1.0).to_event(2))

    with pytest.raises(NotImplementedError, match=r"site 'w'.*KL"):
        with local_reparam(sites=["w"]):
            TraceMeanField_ELBO().loss(model_t, guide_t, torch.randn(3, D))


def test_fallback_option_samples_weight_for_unsupported_use():
    def model_f(x):
        w = pyro.sample("w", ImproperLogUniform().expand([H, D]).to_event(2))
        pyro.sample("obs", dist.Normal(F.linear(x, w.abs()), 1.0).to_event(2), obs=torch.zeros(3, H))

    def guide_f(x):
        loc = pyro.param("loc", torch.randn(H, D))
        pyro.sample("w", VariationalDropoutNormal(loc, torch.full((H, D), -2.0)).to_event(2))

    x = torch.randn(3, D)
    with pytest.raises(LazyWeightError, match=r"'abs'"):
        with local_reparam():
            TraceMeanField_ELBO().loss(model_f, guide_f, x)
    with local_reparam(fallback=True):
        assert torch.isfinite(torch.tensor(TraceMeanField_ELBO().loss(model_f, guide_f, x)))


def test_kl_computed_once_per_site(monkeypatch):
    import pyro_vdrop.distributions.kl as kl_module

    calls = []
    original = kl_module.log_uniform_kl

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kl_module, "log_uniform_kl", counting)
    x, y = data()
    with local_reparam(sites=SITES):
        TraceMeanField_ELBO(max_plate_nesting=1).loss(model, make_guide(), x, y)
    assert len(calls) == 2  # w1 and w2 (b1 has a Normal prior)


def test_posterior_predictive_by_replay_without_weight_samples(monkeypatch):
    """Replaying the model against one guide trace draws fresh pre-activation noise on every run."""
    x, y = data()
    guide = make_guide()
    with local_reparam(sites=SITES):
        guide(x, y)
    monkeypatch.setattr(VariationalDropoutNormal, "rsample", lambda *a, **k: pytest.fail("weight sampled"))
    with local_reparam(sites=SITES), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x)
        logits = torch.stack([poutine.replay(model, trace=guide_trace)(x) for _ in range(200)])
    assert logits.shape == (200, N, C)
    assert (logits.std(0) > 0).all()
    # Predictive stacks guide values, which a lazy weight refuses with a clear error
    with pytest.raises(LazyWeightError, match=r"site 'w1'.*'stack'"):
        with local_reparam(sites=SITES):
            pyro.infer.Predictive(model, guide=guide, num_samples=2, return_sites=["obs"])(x)


def test_plain_normal_sites_are_not_lazy_unless_named():
    """A regression's unobserved Normal likelihood must stay an ordinary sample under the handler."""

    def regression(x, y=None):
        w = pyro.sample("w", ImproperLogUniform().expand([1, D]).to_event(2))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(F.linear(x, w).squeeze(-1) + b, 0.5), obs=y)

    def guide(x, y=None):
        loc = pyro.param("loc", torch.full((1, D), 0.5))
        pyro.sample("w", VariationalDropoutNormal(loc, torch.full((1, D), -2.0)).to_event(2))
        pyro.sample("b", dist.Normal(pyro.param("b_loc", torch.tensor(0.0)), 0.1))

    x = torch.randn(N, D)
    with local_reparam(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(regression, trace=guide_trace)).get_trace(x)
    assert isinstance(guide_trace.nodes["w"]["value"], LazyWeight)
    assert not isinstance(guide_trace.nodes["b"]["value"], LazyWeight)
    y = model_trace.nodes["y"]["value"]
    assert not isinstance(y, LazyWeight) and y.shape == (N,)
    with local_reparam(sites=["w", "b"]), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x)
    assert isinstance(guide_trace.nodes["b"]["value"], LazyWeight)


@pytest.mark.parametrize("estimator", ["lrt", "flipout", "per-example"])
@pytest.mark.parametrize("Elbo", [TraceMeanField_ELBO, Trace_ELBO])
def test_elbo_against_closed_form(Elbo, estimator):
    """
    An independent reference for the handler's ELBO: for y ~ N(x w, s^2) with q(w) = N(mu, sigma^2) and
    p(w) = N(0, 1) both terms have closed forms, written out here:
    E_q[log p(y | x, w)] = sum_n -log(s sqrt(2 pi)) - ((y_n - x_n mu)^2 + x_n^2 . sigma^2) / (2 s^2) and
    KL = sum_i log(1 / sigma_i) + (sigma_i^2 + mu_i^2 - 1) / 2. The mean of the loss over noise draws matches.
    """
    s = 0.7
    x, y = torch.randn(N, D, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    mu, sigma = torch.randn(1, D, dtype=torch.float64), torch.rand(1, D, dtype=torch.float64) + 0.2

    def model_n(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(1, D, dtype=torch.float64), 1.0).to_event(2))
        with pyro.plate("data", N):
            pyro.sample("obs", dist.Normal(F.linear(x, w).squeeze(-1), s), obs=y)

    def guide_n(x, y):
        pyro.sample("w", dist.Normal(mu, sigma).to_event(2))

    expected_log_lik = (
        -torch.log(torch.tensor(s * (2 * torch.pi) ** 0.5, dtype=torch.float64))
        - ((y - (x @ mu.T).squeeze(-1)) ** 2 + (x**2 @ (sigma**2).T).squeeze(-1)) / (2 * s**2)
    ).sum()
    kl = (torch.log(1 / sigma) + (sigma**2 + mu**2 - 1) / 2).sum()
    expected = -(expected_log_lik - kl).item()
    with local_reparam(sites=["w"], estimator=estimator):
        losses = torch.tensor([Elbo().loss(model_n, guide_n, x, y) for _ in range(2000)], dtype=torch.float64)
    assert abs(losses.mean().item() - expected) <= Z_ELBO * losses.std().item() / len(losses) ** 0.5


Z_ELBO = 4.5  # standard errors of the mean loss (fixed seed)


def test_unregistered_kl_is_an_error_when_the_elbo_asks():
    def model(x):  # no KL(VariationalDropoutNormal || StudentT) is registered
        w = pyro.sample("w", dist.StudentT(3.0, torch.zeros(3), 1.0).to_event(1))
        return x @ w

    def guide(x):
        pyro.sample("w", VariationalDropoutNormal(torch.ones(3), torch.zeros(3)).to_event(1))

    x = torch.randn(5, 3)
    with local_reparam():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)  # prediction: fine
        message = "site 'w'.*none is registered for q = VariationalDropoutNormal, p = StudentT"
        with pytest.raises(NotImplementedError, match=message):
            model_trace.compute_log_prob()
