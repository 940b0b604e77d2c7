# SPDX-License-Identifier: Apache-2.0
"""The group posteriors (group VD, structured Bayesian pruning), the SBP prior and their registered KLs."""

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_vdrop.distributions import (
    CorrelatedVariationalDropoutNormal,
    GroupVariationalDropoutNormal,
    ImproperLogUniform,
    LogUniformNoisePrior,
    TruncatedLogNormal,
    TruncatedLogNormalDropout,
)

from .test_kl import MOLCHANOV_CONSTANT, exact_kl_up_to_constant
from .test_truncated_log_normal import quadrature_kl


def test_group_kl_is_counted_once_per_group():
    torch.manual_seed(0)
    loc = torch.randn(5, 4, dtype=torch.float64)
    log_alpha = torch.tensor([[-3.0, -0.5, 1.0, 4.0]], dtype=torch.float64)  # per input unit (column)
    q = GroupVariationalDropoutNormal(loc, log_alpha).to_event(2)
    p = ImproperLogUniform().expand([5, 4]).to_event(2)
    kl = kl_divergence(q, p).item()
    # the group model's KL: one KL(N(1, α_g) || 1/|z|) per column, from quadrature of the exact expectation (the
    # constant of the improper prior as in Molchanov's fit, which the registered KL uses)
    expected = float((exact_kl_up_to_constant(log_alpha.flatten().tolist()) + MOLCHANOV_CONSTANT).sum())
    assert kl == pytest.approx(expected, abs=4 * 0.01)  # the fit's error is below 0.01 per group
    # the correlated posterior with the same noise counts every weight's marginal KL: 5 times as much
    marginal = kl_divergence(CorrelatedVariationalDropoutNormal(loc, log_alpha).to_event(2), p).item()
    assert marginal == pytest.approx(5 * kl, rel=1e-12)


def test_group_kl_spreads_over_the_group_and_follows_output_groups():
    log_alpha = torch.tensor([[-2.0], [1.0], [5.0]])  # per output unit (row)
    q = GroupVariationalDropoutNormal(torch.ones(3, 7), log_alpha)
    kl = kl_divergence(q, ImproperLogUniform().expand([3, 7]))
    assert kl.shape == (3, 7)
    per_group = kl.sum(-1)
    assert torch.allclose(kl, (per_group / 7).unsqueeze(-1).expand(3, 7))
    assert q.group_size == 7


def test_sbp_kl_is_the_noise_kl_once_per_group():
    noise_loc = torch.tensor([[-1.0, -4.0, 0.0]], dtype=torch.float64)
    noise_scale = torch.tensor([[0.3, 1.5, 0.05]], dtype=torch.float64)
    q = TruncatedLogNormalDropout(torch.randn(6, 3, dtype=torch.float64), noise_loc, noise_scale, -20.0, 0.0)
    p = LogUniformNoisePrior(-20.0, 0.0, dtype=torch.float64).expand([6, 3])
    kl = kl_divergence(q.to_event(2), p.to_event(2)).item()
    expected = sum(
        quadrature_kl(m, s, -20.0, 0.0) for m, s in zip(noise_loc.flatten().tolist(), noise_scale.flatten().tolist())
    )
    assert kl == pytest.approx(expected, abs=1e-3)


def test_sbp_kl_needs_the_prior_interval():
    q = TruncatedLogNormalDropout(torch.ones(2, 3), torch.zeros(1, 3), torch.ones(1, 3), -10.0, 0.0)
    with pytest.raises(ValueError, match="interval"):
        kl_divergence(q, LogUniformNoisePrior(-20.0, 0.0).expand([2, 3]))


def test_sbp_weight_moments_and_sampling():
    torch.manual_seed(0)
    loc = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    q = TruncatedLogNormalDropout(loc, torch.tensor([-0.5, -2.0]), torch.tensor([0.4, 1.0]), -20.0, 0.0)
    noise = TruncatedLogNormal(q.noise_loc, q.noise_scale, q.noise.low, q.noise.high)
    w = q.rsample((100_000,))
    # one noise variable per column: the ratio of the two weights of a column is constant
    assert torch.allclose(w[:, 0, :] / w[:, 1, :], (loc[0] / loc[1]).expand(100_000, 2))
    assert torch.allclose(w.mean(0), loc * noise.mean, rtol=0.02)
    assert torch.allclose(w.var(0), loc**2 * noise.variance, rtol=0.03)
    assert torch.allclose(q.noise_log_alpha, (noise.variance / noise.mean**2).log())


def test_sbp_prior_has_no_weight_density():
    p = LogUniformNoisePrior()
    assert (p.low, p.high) == (-20.0, 0.0)
    with pytest.raises(NotImplementedError, match="local_reparam"):
        p.log_prob(torch.ones(()))
    with pytest.raises(NotImplementedError, match="guide"):
        p.sample()
    with pytest.raises(ValueError, match="low < high"):
        LogUniformNoisePrior(0.0, -1.0)
