"""Eq. (2) clipped token-level GRPO: closed forms, a python-loop re-derivation,
TRL golden vectors."""

import math

import pytest
import torch

import _golden as golden
from losses import (approx_kl, clip_fraction, k3_kl, ratio_summary, reduce_token_loss,
                    text_grpo_loss, text_grpo_per_token_loss, text_importance_ratio)

RTOL, ATOL = 1e-5, 1e-6


def _one_token(log_r, A, **kwargs):
    """Loss and d loss / d logp of a single token with log-ratio log_r and advantage A."""
    logp = torch.tensor([[log_r]], dtype=torch.float64, requires_grad=True)
    loss = text_grpo_loss(logp, torch.zeros(1, 1, dtype=torch.float64),
                          torch.tensor([A], dtype=torch.float64), torch.ones(1, 1), **kwargs)
    loss.backward()
    return loss.item(), logp.grad.item()


# --- closed forms ---------------------------------------------------------------------------------
def test_on_policy_loss_is_minus_mean_advantage_per_reduction():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    A = torch.tensor([0.5, -2.0, 1.0])
    logp = torch.randn(3, 3)
    n = mask.sum(1)                                                   # tokens per sequence: 3, 1, 2
    expected = {"grpo": -A.mean(), "bnpo": -(A * n).sum() / n.sum(),
                "dapo": -(A * n).sum() / n.sum(), "dr_grpo": -(A * n).sum() / (3 * 3)}
    for reduction, value in expected.items():
        got = text_grpo_loss(logp, logp.clone(), A, mask, 0.2, reduction=reduction)
        assert torch.allclose(got, value), reduction
    got = text_grpo_loss(logp, logp.clone(), A, mask, 0.2, reduction="dr_grpo",
                         max_completion_length=10)
    assert torch.allclose(got, -(A * n).sum() / 30)


@pytest.mark.parametrize("ratio, A, loss, grad_zero", [
    (1.5, 1.0, -1.2, True),     # A > 0 above 1 + eps: clipped, no push further up
    (0.5, 1.0, -0.5, False),    # A > 0 below 1 - eps: unclipped side (the min) keeps the gradient
    (0.5, -1.0, 0.8, True),     # A < 0 below 1 - eps: clipped
    (1.5, -1.0, 1.5, False),    # A < 0 above 1 + eps: unclipped
    (1.1, 2.0, -2.2, False),    # inside the range
])
def test_clipping_regions(ratio, A, loss, grad_zero):
    got, grad = _one_token(math.log(ratio), A, clip_eps=0.2)
    assert got == pytest.approx(loss, rel=1e-12)
    assert (grad == 0.0) == grad_zero
    if not grad_zero:
        assert grad == pytest.approx(-A * ratio, rel=1e-12)         # d(-A r)/d logp = -A r


def test_asymmetric_clip_uses_clip_eps_high_above_one():
    assert (_one_token(math.log(1.3), 1.0, clip_eps=0.2, clip_eps_high=0.28)[0]
            == pytest.approx(-1.28))
    assert (_one_token(math.log(0.7), -1.0, clip_eps=0.2, clip_eps_high=0.28)[0]
            == pytest.approx(0.8))


def test_k3_kl_closed_form_and_beta():
    logp = torch.tensor([[0.0, math.log(0.5)]], dtype=torch.float64)
    ref = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(k3_kl(logp, ref),
                          torch.tensor([[0.0, 2.0 - math.log(2.0) - 1.0]], dtype=torch.float64))
    per_token = text_grpo_per_token_loss(logp, logp, torch.tensor([0.0]).double(), torch.ones(1, 2),
                                         0.2, logp_ref=ref, beta=0.5)
    assert torch.allclose(per_token, 0.5 * k3_kl(logp, ref))


def test_sequence_level_ratio_is_exp_of_masked_mean_log_ratio():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    logp_old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.3, 9.0], [-0.2, 5.0, 5.0]])        # padding values must not matter
    r = text_importance_ratio(logp, logp_old, mask, level="sequence")
    assert r.shape == (2, 1)
    assert torch.allclose(r, torch.tensor([[math.exp(0.2)], [math.exp(-0.2)]]))


def test_padding_has_no_effect_and_no_gradient():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    logp_old, ref = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    A = torch.tensor([1.0, -0.5])
    for level in ("token", "sequence"):
        for reduction in ("grpo", "bnpo", "dr_grpo"):
            a = (logp_old + 0.1 * torch.randn(2, 4, generator=gen)).requires_grad_(True)
            b = torch.where(mask.bool(), a.detach(), torch.full_like(a, 7.0)).requires_grad_(True)
            la = text_grpo_loss(a, logp_old, A, mask, 0.2, reduction, logp_ref=ref, beta=0.1,
                                level=level)
            lb = text_grpo_loss(b, logp_old, A, mask, 0.2, reduction, logp_ref=ref, beta=0.1,
                                level=level)
            la.backward()
            assert torch.allclose(la, lb)
            assert torch.equal(a.grad[~mask.bool()], torch.zeros(int((1 - mask).sum())))


def test_masked_logging_helpers_broadcast_a_sequence_ratio_over_tokens():
    ratio = torch.tensor([[1.5], [1.0]])                                # (B, 1), level="sequence"
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    assert clip_fraction(ratio, 0.2, mask=mask).item() == pytest.approx(3 / 4)      # token-weighted
    assert (approx_kl(torch.log(ratio), mask=mask).item()
            == pytest.approx(0.5 * 3 * math.log(1.5) ** 2 / 4))
    stats = ratio_summary(torch.tensor([[1.2, 9.0], [0.9, 1.0]]),
                          mask=torch.tensor([[1, 0], [1, 1]]))
    assert (stats["ratio_max"].item() == pytest.approx(1.2)
            and stats["ratio_min"].item() == pytest.approx(0.9))


# --- independent re-derivation: python loops in float64 -------------------------------------------
def _loop_loss(logp, logp_old, ref, A, mask, eps_lo, eps_hi, beta, reduction, level):
    B, T = len(logp), len(logp[0])
    per = [[0.0] * T for _ in range(B)]
    for i in range(B):
        valid = [t for t in range(T) if mask[i][t]]
        seq_lr = sum(logp[i][t] - logp_old[i][t] for t in valid) / max(len(valid), 1)
        for t in range(T):
            lr = logp[i][t] - logp_old[i][t] if level == "token" else seq_lr
            r = math.exp(lr)
            r_clip = min(max(r, 1 - eps_lo), 1 + eps_hi)
            per[i][t] = -min(r * A[i], r_clip * A[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                per[i][t] += beta * (math.exp(d) - d - 1)
    if reduction == "grpo":
        return sum(sum(per[i][t] * mask[i][t] for t in range(T)) / max(sum(mask[i]), 1)
                   for i in range(B)) / B
    total = sum(per[i][t] * mask[i][t] for i in range(B) for t in range(T))
    return total / (sum(map(sum, mask)) if reduction in ("bnpo", "dapo") else B * T)


@pytest.mark.parametrize("reduction", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_matches_loop_rederivation(reduction, level, beta):
    gen = torch.Generator().manual_seed(3)
    B, T = 5, 7
    logp_old = torch.randn(B, T, generator=gen, dtype=torch.float64)
    logp = logp_old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp_old + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    A = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=gen) < 0.7).double()
    mask[:, 0] = 1
    got = text_grpo_loss(logp, logp_old, A, mask, 0.2, reduction, 0.28, ref, beta, level=level)
    expected = _loop_loss(logp.tolist(), logp_old.tolist(), ref.tolist(), A.tolist(), mask.tolist(),
                          0.2, 0.28, beta, reduction, level)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


# --- golden: TRL GRPOTrainer._compute_loss --------------------------------------------------------
@pytest.mark.parametrize("case", golden.trl_cases(), ids=lambda c: c["name"])
def test_golden_trl(case):
    name = case["name"]
    inp = {k: golden.trl(f"inputs/{k}")
           for k in ("per_token_logps", "old_per_token_logps", "ref_per_token_logps",
                     "advantages", "completion_mask")}
    args = (inp["old_per_token_logps"], inp["advantages"], inp["completion_mask"],
            case["epsilon_low"])
    kwargs = dict(clip_eps_high=case["epsilon_high"], logp_ref=inp["ref_per_token_logps"],
                  beta=case["beta"], level=case["importance_sampling_level"])
    logp = inp["per_token_logps"].clone().requires_grad_(True)
    loss = text_grpo_loss(logp, *args, reduction=case["loss_type"], **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=RTOL, abs=ATOL)
    assert torch.allclose(loss.reshape(1), golden.trl(f"{name}/loss"), rtol=RTOL, atol=ATOL)
    assert torch.allclose(logp.grad, golden.trl(f"{name}/grad_per_token_logps"),
                          rtol=RTOL, atol=ATOL)

    per_token = text_grpo_per_token_loss(inp["per_token_logps"], *args, **kwargs)
    expected = golden.trl(f"{name}/per_token_loss")             # (B, 1) at sequence level, beta = 0
    assert torch.allclose(per_token, expected.expand_as(per_token), rtol=RTOL, atol=ATOL)
    coef_1 = text_importance_ratio(inp["per_token_logps"], inp["old_per_token_logps"],
                                   inp["completion_mask"], case["importance_sampling_level"])
    assert torch.allclose(coef_1, golden.trl(f"{name}/coef_1"), rtol=RTOL, atol=ATOL)
    coef_2 = torch.clamp(coef_1, 1 - case["epsilon_low"], 1 + case["epsilon_high"])
    assert torch.allclose(coef_2, golden.trl(f"{name}/coef_2"), rtol=RTOL, atol=ATOL)
    if golden.trl_has(f"{name}/per_token_kl"):
        kl = k3_kl(inp["per_token_logps"], inp["ref_per_token_logps"])
        assert torch.allclose(kl, golden.trl(f"{name}/per_token_kl"), rtol=RTOL, atol=ATOL)


# --- errors ---------------------------------------------------------------------------------------
def _inputs():
    return dict(logp=torch.zeros(2, 3), logp_old=torch.zeros(2, 3), advantages=torch.zeros(2),
                mask=torch.ones(2, 3), clip_eps=0.2)


@pytest.mark.parametrize("change, word", [
    (dict(logp_old=torch.zeros(2, 4)), "logp_old"),
    (dict(mask=torch.ones(3, 3)), "mask"),
    (dict(advantages=torch.zeros(3)), "advantages"),
    (dict(logp=torch.zeros(6), logp_old=torch.zeros(6), mask=torch.ones(6)), "logp"),
    (dict(clip_eps=0.0), "clip_eps"),
    (dict(clip_eps_high=-0.1), "clip_eps_high"),
    (dict(reduction="sum"), "reduction"),
    (dict(level="chunk"), "level"),
    (dict(beta=0.1), "logp_ref"),
    (dict(beta=0.1, logp_ref=torch.zeros(2, 2)), "logp_ref"),
    (dict(beta=-0.1), "beta"),
    (dict(reduction="dr_grpo", max_completion_length=0), "max_completion_length"),
])
def test_errors(change, word):
    with pytest.raises(ValueError, match=word):
        text_grpo_loss(**{**_inputs(), **change})


def test_reduce_token_loss_errors():
    with pytest.raises(ValueError, match="mask"):
        reduce_token_loss(torch.zeros(2, 3), torch.ones(2, 2))
