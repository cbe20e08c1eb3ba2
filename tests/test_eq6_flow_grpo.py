"""Eq. (6) clipped FlowGRPO objective: closed forms, gradients, a numpy re-derivation, official
golden vectors."""

import math

import numpy as np
import pytest
import torch

import _golden as golden
from losses import (approx_kl, clamp_advantages, clip_fraction, clipped_surrogate, flow_grpo_loss,
                    log_ratio, ratio_norm, ratio_summary)

BOUNDARY = 1e-6   # README: clipping decisions are exact except where |ratio - 1 - clip| < 1e-6


# --- closed forms ---------------------------------------------------------------------------------
def test_on_policy_loss_is_minus_mean_advantage():
    A = torch.tensor([6.5, 1.0, -2.0, 0.5])
    assert torch.allclose(flow_grpo_loss(torch.zeros(4), A, 1e-4), -A.mean())
    assert torch.allclose(flow_grpo_loss(torch.zeros(4, 3), A, 1e-4, adv_clip_max=5),
                          -torch.tensor(4.5 / 4))


@pytest.mark.parametrize("ratio, A, loss", [
    (1.5, 1.0, -1.2), (0.5, 1.0, -0.5), (0.5, -1.0, 0.8), (1.5, -1.0, 1.5), (1.1, 2.0, -2.2)])
def test_clipping_regions(ratio, A, loss):
    got = flow_grpo_loss(torch.tensor([math.log(ratio)], dtype=torch.float64),
                         torch.tensor([A]).double(), 0.2)
    assert got.item() == pytest.approx(loss, rel=1e-12)


def test_dt_divides_each_step_by_abs_dt():
    log_r = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    A = torch.tensor([1.0, 3.0])
    dt = torch.tensor([-0.5, -0.25])                                   # per window step, signed
    # per-step terms -A / |dt_k|: mean over (B, K) of [[-2, -4], [-6, -12]]
    assert torch.allclose(flow_grpo_loss(log_r, A, 0.1, dt=dt), torch.tensor(-6.0))
    assert torch.allclose(flow_grpo_loss(log_r[:, 0], A, 0.1, dt=-0.5), torch.tensor(-4.0))


def test_gradient_blocked_only_in_the_clipped_direction():
    """d loss / d log_r is zero where the clip binds (A > 0, r > 1+eps; A < 0, r < 1-eps),
    else -A r / n."""
    eps = 0.1
    r = torch.tensor([1.3, 0.7, 0.7, 1.3, 1.05, 0.95], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    blocked = torch.tensor([True, True, False, False, False, False])
    log_r = torch.log(r).requires_grad_(True)
    flow_grpo_loss(log_r, A, eps).backward()
    assert torch.equal(log_r.grad[blocked], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(log_r.grad[~blocked], (-A * r / len(r))[~blocked], rtol=1e-12)


def test_window_form_is_mean_of_single_steps():
    gen = torch.Generator().manual_seed(0)
    log_r = 1e-4 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    A = torch.randn(4, generator=gen, dtype=torch.float64)
    dt = torch.tensor([-0.1, -0.2, -0.05], dtype=torch.float64)
    steps = [flow_grpo_loss(log_r[:, k], A, 5e-5, dt=dt[k]) for k in range(3)]
    assert torch.allclose(flow_grpo_loss(log_r, A, 5e-5, dt=dt), torch.stack(steps).mean(),
                          rtol=1e-13)


def test_logging_helpers_closed_form():
    r = torch.tensor([1.0, 1.3, 0.6, 1.05])
    assert clip_fraction(r, 0.1).item() == pytest.approx(0.5)
    assert clip_fraction(r, 0.1, side="high").item() == pytest.approx(0.25)
    assert clip_fraction(r, 0.1, side="low").item() == pytest.approx(0.25)
    assert clip_fraction(r, 0.1, clip_eps_high=0.4).item() == pytest.approx(0.25)
    assert (clip_fraction(r, 0.1, mask=torch.tensor([1.0, 1.0, 0.0, 0.0])).item()
            == pytest.approx(0.5))
    assert approx_kl(torch.tensor([0.2, -0.4])).item() == pytest.approx(0.5 * (0.04 + 0.16) / 2)
    stats = ratio_summary(r)
    assert (stats["ratio_min"].item() == pytest.approx(0.6)
            and stats["ratio_max"].item() == pytest.approx(1.3))


# --- independent re-derivation: numpy loops -------------------------------------------------------
def test_matches_numpy_rederivation():
    gen = torch.Generator().manual_seed(1)
    B, K, eps, cap = 6, 3, 1e-3, 1.0
    log_r = 2e-3 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    A = 2 * torch.randn(B, generator=gen, dtype=torch.float64)
    dt = -torch.rand(K, generator=gen, dtype=torch.float64) - 0.05
    lr, a, d = log_r.numpy(), np.clip(A.numpy(), -cap, cap), dt.numpy()
    terms = [max(-a[b] * np.exp(lr[b, k]), -a[b] * min(max(np.exp(lr[b, k]), 1 - eps), 1 + eps))
             / abs(d[k]) for b in range(B) for k in range(K)]
    got = flow_grpo_loss(log_r, A, eps, adv_clip_max=cap, dt=dt)
    assert got.item() == pytest.approx(np.mean(terms), rel=1e-12)


# --- golden: every variant and step of the official FlowGRPO / GRPO-Guard loss blocks -------------
def _step_inputs(variant, cfg, j):
    """(log-ratio fed to the clip, dt or None), exactly as the variant's script builds them."""
    chain = golden.chain_step(j)
    lr = log_ratio(golden.flow_step(variant, j, "log_prob_new"), chain["log_prob_old"])
    if not cfg["rationorm"]:
        return lr, None
    lr = ratio_norm(lr, chain["mean_new"], chain["mean_old"], golden.transition_std(variant, j),
                    bias="batch")
    # official: / mean_b(sqrt(-dt))^2
    return lr, golden.flow_step(variant, j, "sqrt_neg_dt").mean() ** 2


def _ambiguous(ratio, eps):
    return ((ratio - 1).abs() - eps).abs() < BOUNDARY


@pytest.mark.parametrize("case", golden.flow_cases(), ids=golden.flow_case_id)
def test_golden_flowgrpo(case):
    variant, cfg, j = case
    eps, cap = cfg["clip_range"], cfg["adv_clip_max"]
    field = lambda name: golden.flow_step(variant, j, name)  # noqa: E731
    A_raw = golden.chain_step(j)["advantages"]
    lr, dt = _step_inputs(variant, cfg, j)
    policy = flow_grpo_loss(lr, A_raw, eps, adv_clip_max=cap, dt=dt)
    assert torch.allclose(policy.reshape(1), field("policy_loss"), rtol=1e-5, atol=1e-7)

    A = clamp_advantages(A_raw, cap)
    assert torch.equal(A, field("advantages"))
    r = torch.exp(lr)
    assert torch.allclose(r - 1, field("ratio") - 1, rtol=0, atol=1e-6)
    per_sample = clipped_surrogate(r, A, eps)
    expected = torch.maximum(field("unclipped_loss"), field("clipped_loss"))
    assert torch.allclose(per_sample, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(-A * r, field("unclipped_loss"), rtol=1e-5, atol=1e-7)

    slack = _ambiguous(r, eps).float().mean()
    for side, name in (("both", "info_clipfrac"), ("high", "info_clipfrac_gt_one"),
                       ("low", "info_clipfrac_lt_one")):
        got = clip_fraction(r, eps, side=side)
        assert (got - field(name).reshape(())).abs() <= slack, name
    raw = log_ratio(field("log_prob_new"), golden.chain_step(j)["log_prob_old"])
    assert torch.allclose(approx_kl(raw).reshape(1), field("info_approx_kl"), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("variant", list(golden.load_json("flowgrpo_loss.json")["configs"]))
def test_golden_window_form_is_mean_over_steps(variant):
    """All train steps as one (B, K) call (dt of shape (K,)) = the mean of the official per-step
    losses."""
    cfg = golden.load_json("flowgrpo_loss.json")["configs"][variant]
    steps = golden.load_json("flowgrpo_loss.json")["train_steps_j"]
    inputs = [_step_inputs(variant, cfg, j) for j in steps]
    log_r = torch.stack([lr for lr, _ in inputs], dim=1)                                    # (B, K)
    dt = None if inputs[0][1] is None else torch.stack([d for _, d in inputs])              # (K,)
    A = torch.stack([golden.chain_step(j)["advantages"] for j in steps], dim=1)             # (B, K)
    got = flow_grpo_loss(log_r, A, cfg["clip_range"], adv_clip_max=cfg["adv_clip_max"], dt=dt)
    expected = torch.stack([golden.flow_step(variant, j, "policy_loss").reshape(())
                            for j in steps]).mean()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, word", [
    (dict(log_r=torch.zeros(3, 2, 2)), "log_r"),
    (dict(advantages=torch.zeros(4)), "advantages"),
    (dict(clip_eps=0.0), "clip_eps"),
    (dict(clip_eps=-1e-4), "clip_eps"),
    (dict(adv_clip_max=0.0), "adv_clip_max"),
    (dict(dt=torch.ones(3)), "dt"),
    (dict(dt=0.0), "dt"),
])
def test_errors(change, word):
    base = dict(log_r=torch.zeros(3, 2), advantages=torch.zeros(3), clip_eps=1e-4)
    with pytest.raises(ValueError, match=word):
        flow_grpo_loss(**{**base, **change})


def test_clip_fraction_errors():
    with pytest.raises(ValueError, match="side"):
        clip_fraction(torch.ones(3), 0.1, side="up")
