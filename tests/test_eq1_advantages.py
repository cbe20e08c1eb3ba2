"""Eq. (1) group-relative advantages: closed forms, a loop re-derivation, FlowGRPO and TRL
golden vectors."""

import math
import statistics

import pytest
import torch

import _golden as golden
from losses import group_advantages

EPS = 1e-4


# --- closed forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("std", ["population", "sample", "none"])
@pytest.mark.parametrize("scope", ["group", "batch"])
def test_equal_rewards_give_exactly_zero(std, scope):
    # a flat-group value whose float64 mean is inexact, so zero cannot come from cancellation alone
    inexact = [x for x in (k / 7 + 0.01 for k in range(1, 200))
               if (torch.full((3,), x, dtype=torch.float64).mean() - x).item() != 0]
    assert inexact, "no inexact float64 mean found among the candidates"
    rewards = torch.tensor([inexact[0]] * 3 + [0.7, 0.2, 0.4], dtype=torch.float64)
    A = group_advantages(rewards, 3, std=std, scope=scope)
    assert torch.equal(A[:3], torch.zeros(3, dtype=torch.float64))
    assert (A[3:] != 0).all()


def test_two_sample_group_population_and_sample_std():
    rewards = torch.tensor([1.0, 3.0], dtype=torch.float64)
    # population std = 1, sample std = sqrt(2)
    assert torch.allclose(group_advantages(rewards, 2),
                          torch.tensor([-1.0, 1.0]).double() / (1 + EPS))
    expected = torch.tensor([-1.0, 1.0]).double() / (math.sqrt(2) + EPS)
    assert torch.allclose(group_advantages(rewards, 2, std="sample"), expected)
    assert torch.equal(group_advantages(rewards, 2, std="none"), torch.tensor([-1.0, 1.0]).double())


def test_batch_scope_keeps_group_mean_and_uses_global_std():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0], dtype=torch.float64)
    # group means 1 and 12; population std of all four = sqrt(mean(r^2) - mean(r)^2)
    sigma = math.sqrt((0 + 4 + 100 + 196) / 4 - 6.5**2)
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]).double() / (sigma + EPS)
    assert torch.allclose(group_advantages(rewards, 2, scope="batch"), expected)


def test_group_of_one_is_zero_and_dtype_is_kept():
    rewards = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float32)
    A = group_advantages(rewards, 1, std="sample")      # ddof 1 on one element: flat group, not NaN
    assert A.dtype == torch.float32 and torch.equal(A, torch.zeros(3))


# --- independent re-derivation: python statistics, one group at a time ----------------------------
@pytest.mark.parametrize("std", ["population", "sample", "none"])
@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("group_size", [2, 3, 6])
def test_matches_loop_rederivation(std, scope, group_size):
    gen = torch.Generator().manual_seed(7 + group_size)
    rewards = torch.randn(12, generator=gen, dtype=torch.float64)
    values = rewards.tolist()
    spread = {"population": statistics.pstdev, "sample": statistics.stdev}
    expected = []
    for start in range(0, len(values), group_size):
        group = values[start:start + group_size]
        mean = sum(group) / len(group)
        if std == "none":
            scale = 1.0
        else:
            scale = (spread[std](group) if scope == "group" else spread[std](values)) + EPS
        expected += [(x - mean) / scale for x in group]
    got = group_advantages(rewards, group_size, std=std, scope=scope)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# --- golden: FlowGRPO PerPromptStatTracker (prompts interleaved, numpy ddof 0) --------------------
def _flowgrpo_by_prompt(rewards, prompts, eps, **kwargs):
    """Regroup interleaved prompts into contiguous groups, apply Eq. (1), scatter back."""
    order = list(dict.fromkeys(prompts))
    perm = [i for p in order for i, q in enumerate(prompts) if q == p]
    sizes = {prompts.count(p) for p in order}
    assert len(sizes) == 1, (f"fixture prompts have unequal group sizes {sizes}; "
                             "Eq. (1) needs equal groups")
    perm = torch.tensor(perm)
    A = torch.empty_like(rewards)
    A[perm] = group_advantages(rewards[perm], sizes.pop(), eps=eps, **kwargs)
    return A


FLOW_MODES = {
    "per_prompt_global_std_False": lambda r, p, eps: _flowgrpo_by_prompt(r, p, eps),
    "per_prompt_global_std_True": lambda r, p, eps: _flowgrpo_by_prompt(r, p, eps, scope="batch"),
    # one group of all N
    "no_per_prompt": lambda r, p, eps: group_advantages(r, r.numel(), eps=eps),
}


@pytest.mark.parametrize(
    "mode", list(golden.load_json("flowgrpo_loss.json")["stat_tracking"]["advantages"]))
def test_golden_flowgrpo_stat_tracking(mode):
    st = golden.load_json("flowgrpo_loss.json")["stat_tracking"]
    rewards = torch.tensor(st["rewards_1d"], dtype=torch.float64)
    got = FLOW_MODES[mode](rewards, st["prompts"], st["eps"])
    # (N, repeats), equal columns
    expected = torch.tensor(st["advantages"][mode], dtype=torch.float64)
    for column in expected.T:
        assert torch.allclose(got, column, rtol=1e-10, atol=1e-12), mode


# --- golden: TRL _generate_and_score_completions (unbiased std) -----------------------------------
TRL_MODES = {"group": dict(std="sample"), "batch": dict(std="sample", scope="batch"),
             "none": dict(std="none")}


@pytest.mark.parametrize("mode", list(golden.load_json("trl_grpo.json")["advantages"]["out"]))
def test_golden_trl_advantages(mode):
    adv = golden.load_json("trl_grpo.json")["advantages"]
    rewards = torch.tensor(adv["rewards"], dtype=torch.float32)
    got = group_advantages(rewards, adv["num_generations"], eps=adv["eps"], **TRL_MODES[mode])
    expected = torch.tensor(adv["out"][mode]["advantages"], dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), mode


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, word", [
    (dict(rewards=torch.zeros(6), group_size=4), "group_size"),
    (dict(rewards=torch.zeros(6), group_size=0), "group_size"),
    (dict(rewards=torch.zeros(2, 3), group_size=3), "rewards"),
    (dict(rewards=torch.zeros(6), group_size=3, std="biased"), "std"),
    (dict(rewards=torch.zeros(6), group_size=3, scope="prompt"), "scope"),
])
def test_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        group_advantages(**kwargs)
