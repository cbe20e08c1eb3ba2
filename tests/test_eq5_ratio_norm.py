"""Eq. (5) GRPO-Guard RatioNorm: closed forms, a numpy re-derivation, official (and #244)
golden vectors."""

import numpy as np
import pytest
import torch

import _golden as golden
from losses import log_ratio, ratio_norm, ratio_norm_bias


def _setup(seed=0, B=3, shape=(4, 5), same_s=False):
    gen = torch.Generator().manual_seed(seed)
    mean_old = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    dmu = 0.02 * torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    s = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2
    if same_s:
        s = torch.full((B,), 0.4, dtype=torch.float64)
    std = s.reshape(B, *[1] * len(shape))
    log_r = 1e-3 * torch.randn(B, generator=gen, dtype=torch.float64)
    return log_r, mean_old + dmu, mean_old, std


# --- closed forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["sample", "batch"])
def test_unchanged_mean_only_rescales(bias):
    log_r, _, mean_old, std = _setup(same_s=True)
    got = ratio_norm(log_r, mean_old.clone(), mean_old, std, bias=bias)
    assert torch.allclose(got, log_r * 0.4, rtol=1e-14)


def test_gaussian_identity_removes_shift_and_scale():
    """With x' = mu_old + s z, log r = mean(z dmu/s - dmu^2/(2 s^2)), so RatioNorm gives exactly
    mean(z dmu)."""
    B = 4
    _, mean, mean_old, std = _setup(seed=1, B=B)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(mean.shape, generator=gen, dtype=torch.float64)
    dmu = mean - mean_old
    lr = (z * dmu / std - dmu**2 / (2 * std**2)).mean(dim=(1, 2))
    got = ratio_norm(lr, mean, mean_old, std, bias="sample")
    assert torch.allclose(got, (z * dmu).mean(dim=(1, 2)), rtol=1e-10, atol=1e-15)


def test_batch_and_sample_forms_agree_when_every_sample_is_alike():
    log_r, mean, mean_old, std = _setup(same_s=True)
    mean = mean_old + (mean - mean_old)[:1].expand_as(mean)           # same drift in every sample
    assert torch.allclose(ratio_norm(log_r, mean, mean_old, std, "sample"),
                          ratio_norm(log_r, mean, mean_old, std, "batch"), rtol=1e-14)


def test_bias_is_not_detached():
    """d/d mu of the normalised log-ratio through the bias is dmu / (s * M) per element
    (M = element count)."""
    log_r, mean, mean_old, std = _setup(seed=2)
    mean = mean.clone().requires_grad_(True)
    ratio_norm(log_r, mean, mean_old, std, "sample").sum().backward()
    M = mean[0].numel()
    assert torch.allclose(mean.grad, (mean - mean_old).detach() / (std * M), rtol=1e-12)


def test_window_steps_equal_per_step_calls():
    """log_r (B, K) with means (B, K, ...) is the same as K separate (B,) calls, for
    both bias forms."""
    B, K = 3, 2
    steps = [_setup(seed=10 + k, B=B) for k in range(K)]
    log_r = torch.stack([st[0] for st in steps], 1)
    mean, mean_old, std = (torch.stack([st[i] for st in steps], 1) for i in (1, 2, 3))
    for bias in ("sample", "batch"):
        got = ratio_norm(log_r, mean, mean_old, std, bias)
        expected = torch.stack([ratio_norm(*st, bias=bias) for st in steps], dim=1)
        assert got.shape == (B, K) and torch.allclose(got, expected, rtol=1e-13), bias


# --- independent re-derivation: numpy, one sample at a time ---------------------------------------
def test_matches_numpy_rederivation():
    log_r, mean, mean_old, std = _setup(seed=4, B=5)
    lr, mu, mu0, s = log_r.numpy(), mean.numpy(), mean_old.numpy(), std.reshape(-1).numpy()
    per_sample = np.array([lr[b] + np.mean((mu[b] - mu0[b]) ** 2) / (2 * s[b] ** 2)
                           for b in range(5)]) * s
    assert np.allclose(ratio_norm(log_r, mean, mean_old, std, "sample").numpy(),
                       per_sample, rtol=1e-12)
    s_bar = s.mean()
    b_batch = np.mean((mu - mu0) ** 2) / (2 * s_bar**2)
    assert np.allclose(ratio_norm(log_r, mean, mean_old, std, "batch").numpy(),
                       (lr + b_batch) * s_bar, rtol=1e-12)
    assert np.allclose(ratio_norm_bias(log_r, mean, mean_old, std, "batch").numpy(),
                       b_batch, rtol=1e-12)


# --- golden: official GRPO-Guard (bias="batch") and the #244 per-sample form ----------------------
GUARD_CASES = [c for c in golden.flow_cases() if c[1]["rationorm"]]


@pytest.mark.parametrize("case", GUARD_CASES, ids=golden.flow_case_id)
def test_golden_grpo_guard(case):
    variant, _, j = case
    chain = golden.chain_step(j)
    lr = log_ratio(golden.flow_step(variant, j, "log_prob_new"), chain["log_prob_old"])
    std = golden.transition_std(variant, j)
    args = (lr, chain["mean_new"], chain["mean_old"], std)
    ratio = torch.exp(ratio_norm(*args, bias="batch"))
    assert torch.allclose(ratio - 1, golden.flow_step(variant, j, "ratio") - 1, rtol=0, atol=1e-6)
    bias = ratio_norm_bias(*args, bias="batch")
    expected_bias = golden.flow_step(variant, j, "ratio_mean_bias")
    assert torch.allclose(bias.reshape(-1), expected_bias.reshape(-1), rtol=1e-5, atol=1e-9)
    key = f"{variant}/j{j}/UNOFFICIAL_ratio_issue244_per_sample_bias"
    if key in golden.load_tensors("flowgrpo_loss.safetensors"):
        per_sample = torch.exp(ratio_norm(*args, bias="sample"))
        assert torch.allclose(per_sample - 1, golden.flow(key) - 1, rtol=0, atol=1e-6)


def test_golden_cases_exist():
    assert GUARD_CASES, "flowgrpo_loss.json lists no rationorm variant"


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, word", [
    (dict(bias="mean"), "bias"),
    (dict(mean_old=torch.zeros(3, 4)), "mean_old"),
    (dict(mean=torch.zeros(2, 4, 5), mean_old=torch.zeros(2, 4, 5)), "mean"),
    (dict(std=torch.ones(3, 4, 5)), "std"),
    (dict(std=torch.ones(2, 1, 1)), "std"),
    (dict(std=torch.zeros(3, 1, 1)), "std"),
])
def test_errors(change, word):
    base = dict(log_r=torch.zeros(3), mean=torch.zeros(3, 4, 5), mean_old=torch.zeros(3, 4, 5),
                std=torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match=word):
        ratio_norm(**{**base, **change})
