"""Eq. (7) unified objective J_text + lam * J_flow + reg_weight * R: closed forms, gradients,
golden compositions."""

import pytest
import torch

import _golden as golden
from losses import (flow_grpo_loss, latent_kl, log_ratio, ratio_norm, text_grpo_loss, unified_loss,
                    velocity_mse)


def _scalar(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


# --- closed forms ---------------------------------------------------------------------------------
def test_closed_form_and_defaults():
    # lam = 1, no reg
    assert unified_loss(_scalar(0.5), _scalar(-2.0)).item() == pytest.approx(-1.5)
    assert (unified_loss(_scalar(0.5), _scalar(-2.0), _scalar(4.0)).item()
            == pytest.approx(-1.5 + 6e-5))
    # text only
    assert unified_loss(_scalar(0.5), _scalar(-2.0), lam=0.0).item() == pytest.approx(0.5)
    assert unified_loss(_scalar(0.5), _scalar(-2.0), _scalar(4.0), lam=0.5,
                        reg_weight=0.1).item() == pytest.approx(0.5 - 1.0 + 0.4)


def test_gradients_are_one_lam_and_reg_weight():
    text, flow, reg = _scalar(0.3, True), _scalar(-0.7, True), _scalar(2.0, True)
    unified_loss(text, flow, reg, lam=0.25, reg_weight=1e-3).backward()
    assert ((text.grad.item(), flow.grad.item(), reg.grad.item())
            == pytest.approx((1.0, 0.25, 1e-3), rel=1e-15))


# --- independent re-derivation: both losses end to end on small random inputs ---------------------
def test_matches_sum_of_parts_with_shared_advantages():
    """One advantage per sample feeds both terms; the unified gradient is the sum of the two
    gradients."""
    gen = torch.Generator().manual_seed(0)
    B, T, K = 4, 5, 2
    A = torch.randn(B, generator=gen, dtype=torch.float64)
    logp_old = torch.randn(B, T, generator=gen, dtype=torch.float64)
    logp = (logp_old
            + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    log_r = (1e-4 * torch.randn(B, K, generator=gen, dtype=torch.float64)).requires_grad_(True)
    v = torch.randn(B, K, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    v_ref = v.detach() + 0.01 * torch.randn(B, K, 3, 2, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, T)
    parts = (text_grpo_loss(logp, logp_old, A, mask, 0.2), flow_grpo_loss(log_r, A, 1e-4),
             velocity_mse(v, v_ref))
    total = unified_loss(*parts)
    assert total.item() == pytest.approx(
        parts[0].item() + parts[1].item() + 1.5e-5 * parts[2].item(), rel=1e-14)
    total.backward()
    assert torch.allclose(v.grad, 1.5e-5 * 2 * (v - v_ref).detach() / v.numel(), rtol=1e-12)
    g_text = torch.autograd.grad(text_grpo_loss(logp, logp_old, A, mask, 0.2), logp)[0]
    assert torch.allclose(logp.grad, g_text, rtol=1e-14)


# --- golden: FlowGRPO's loss = policy + beta * kl is Eq. (7) with no text term; TRL + FlowGRPO ----
@pytest.mark.parametrize("case", golden.flow_cases(), ids=golden.flow_case_id)
def test_golden_flowgrpo_loss_as_unified(case):
    variant, cfg, j = case
    chain = golden.chain_step(j)
    std = golden.transition_std(variant, j)
    policy = golden.flow_policy_term(variant, cfg, j)
    reg = None
    if cfg["beta"] > 0:
        reg = latent_kl(chain["mean_new"], chain["mean_ref"], std,
                        -golden.flow_step(variant, j, "sqrt_neg_dt") ** 2)
    total = unified_loss(torch.zeros(()), policy, reg, lam=1.0, reg_weight=cfg["beta"])
    assert torch.allclose(total.reshape(1), golden.flow_step(variant, j, "loss"),
                          rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", golden.trl_cases(), ids=lambda c: c["name"])
def test_golden_trl_plus_flow(case):
    """Each TRL case's loss plus every FlowGRPO step's policy loss, lam = 1: the sum of the golden
    numbers."""
    inp = {k: golden.trl(f"inputs/{k}")
           for k in ("per_token_logps", "old_per_token_logps", "ref_per_token_logps",
                     "advantages", "completion_mask")}
    text = text_grpo_loss(inp["per_token_logps"], inp["old_per_token_logps"], inp["advantages"],
                          inp["completion_mask"], case["epsilon_low"], case["loss_type"],
                          case["epsilon_high"], inp["ref_per_token_logps"], case["beta"],
                          level=case["importance_sampling_level"])
    for variant, cfg, j in golden.flow_cases():
        if cfg["rationorm"]:
            continue                                               # Guard's policy term: test above
        chain = golden.chain_step(j)
        flow = flow_grpo_loss(log_ratio(golden.flow_step(variant, j, "log_prob_new"),
                                        chain["log_prob_old"]),
                              chain["advantages"], cfg["clip_range"], cfg["adv_clip_max"])
        expected = case["loss"] + golden.flow_step(variant, j, "policy_loss").item()
        assert unified_loss(text, flow).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, word", [
    (dict(text_loss=torch.zeros(2), flow_loss=torch.zeros(())), "text_loss"),
    (dict(text_loss=torch.zeros(()), flow_loss=1.0), "flow_loss"),
    (dict(text_loss=torch.zeros(()), flow_loss=torch.zeros(()), reg=torch.zeros(3)), "reg"),
    (dict(text_loss=torch.zeros(()), flow_loss=torch.zeros(()), lam=-1.0), "lam"),
    (dict(text_loss=torch.zeros(()), flow_loss=torch.zeros(()), reg_weight=-1e-5), "reg_weight"),
])
def test_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        unified_loss(**kwargs)
