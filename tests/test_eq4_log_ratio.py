"""Eq. (4) importance log-ratio of one denoising step: closed forms, re-derivation,
FlowGRPO golden vectors."""

import math

import numpy as np
import pytest
import torch

import _golden as golden
from losses import approx_kl, log_ratio


def _gaussian_log_prob_mean(x, mu, s):
    """Per-element Gaussian log-density averaged over non-batch dims (FlowGRPO's reduction),
    written out."""
    B = x.shape[0]
    out = []
    for b in range(B):
        xb, mb = x[b].reshape(-1).tolist(), mu[b].reshape(-1).tolist()
        terms = [-((xi - mi) ** 2) / (2 * s[b] ** 2) - math.log(s[b]) - 0.5 * math.log(2 * math.pi)
                 for xi, mi in zip(xb, mb)]
        out.append(sum(terms) / len(terms))
    return torch.tensor(out, dtype=torch.float64)


# --- closed forms ---------------------------------------------------------------------------------
def test_same_policy_gives_zero():
    lp = torch.randn(4, 3)
    assert torch.equal(log_ratio(lp, lp.clone()), torch.zeros(4, 3))


def test_gaussian_transition_log_ratio_closed_form():
    """x' = mu_old + s z  =>  per-element log r = z dmu / s - dmu^2 / (2 s^2)
    (averaged over elements)."""
    gen = torch.Generator().manual_seed(11)
    B, N, D = 3, 4, 5
    mu_old = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    dmu = 0.01 * torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    z = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    s = [0.3, 0.7, 1.5]
    s_t = torch.tensor(s, dtype=torch.float64)[:, None, None]
    x_next = mu_old + s_t * z
    lr = log_ratio(_gaussian_log_prob_mean(x_next, mu_old + dmu, s),
                   _gaussian_log_prob_mean(x_next, mu_old, s))
    expected = (z * dmu / s_t - dmu**2 / (2 * s_t**2)).mean(dim=(1, 2))
    assert torch.allclose(lr, expected, rtol=1e-9, atol=1e-12)


def test_gradient_is_one_and_minus_one():
    new = torch.randn(5, dtype=torch.float64, requires_grad=True)
    old = torch.randn(5, dtype=torch.float64, requires_grad=True)
    log_ratio(new, old).sum().backward()
    assert torch.equal(new.grad, torch.ones(5, dtype=torch.float64))
    assert torch.equal(old.grad, -torch.ones(5, dtype=torch.float64))


# --- independent re-derivation: numpy ratio -------------------------------------------------------
def test_exp_matches_numpy_ratio_of_probabilities():
    gen = torch.Generator().manual_seed(2)
    p_new, p_old = torch.rand(2, 6, generator=gen, dtype=torch.float64) + 0.1
    got = torch.exp(log_ratio(torch.log(p_new), torch.log(p_old)))
    assert np.allclose(got.numpy(), p_new.numpy() / p_old.numpy(), rtol=1e-12)


# --- golden: FlowGRPO ratio and approx_kl at every variant and step -------------------------------
@pytest.mark.parametrize("case", golden.flow_cases(), ids=golden.flow_case_id)
def test_golden_flowgrpo(case):
    variant, cfg, j = case
    lr = log_ratio(golden.flow_step(variant, j, "log_prob_new"),
                   golden.chain_step(j)["log_prob_old"])
    # approx_kl is logged on the raw log-ratio, RatioNorm or not
    assert torch.allclose(approx_kl(lr).reshape(1), golden.flow_step(variant, j, "info_approx_kl"),
                          rtol=1e-5, atol=1e-12)
    if not cfg["rationorm"]:                               # RatioNorm ratios are tested in test_eq5
        ratio = golden.flow_step(variant, j, "ratio")
        assert torch.allclose(torch.exp(lr) - 1, ratio - 1, rtol=0, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="log_prob_old"):
        log_ratio(torch.zeros(3), torch.zeros(4))
