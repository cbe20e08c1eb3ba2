"""The MDP and the unified update (unigrpo.py) on the toy preset of the real model class."""
import dataclasses

import pytest
import torch

import config
import losses
import toy
import toy_policy
import unigrpo
from model import train_timesteps

torch.set_num_threads(1)


def small_cfg(**kw):
    cfg = config.Config(**config.PRESETS["toy"])
    base = dict(prompts_per_step=2, group_size=4, max_think_tokens=12, num_steps=6,
                window_start=(0, 2), window_size=2, minibatches=2, ppo_epochs=1, sft_steps=0,
                eval_per_category=2, out_dir="unused")
    return dataclasses.replace(cfg, **{**base, **kw}).validate()


@pytest.fixture(scope="module")
def policy(randomize):
    """Random, non-trivial weights (Bagel's init zeroes llm2vae, which would make every velocity
    path agree)."""
    return randomize(toy_policy.build_policy(small_cfg().seed), seed=3).eval()


def test_on_policy_ratio_is_one_before_any_update(policy):
    """Rollout (cached path) and update (packed train_forward) agree: text and image
    ratios are 1."""
    cfg = small_cfg()
    g = torch.Generator().manual_seed(0)
    prompts = toy.train_prompts(cfg.seed, 0, cfg.prompts_per_step)
    ro = unigrpo.rollout(policy, prompts, toy.ToyReward(), cfg, g)
    idx = torch.arange(ro.rewards.shape[0])
    th = ro.thoughts.select(idx)
    with torch.no_grad():
        out = policy.train_forward(th, ro.traj.x_t, ro.traj.t)
        new = unigrpo.window_step(ro.traj, idx, out.v, cfg)
    assert th.mask.any(), "the toy policy produced no reasoning tokens"
    text_lr = losses.log_ratio(out.logp, th.logp)[th.mask]
    flow_lr = losses.log_ratio(new.log_prob, ro.traj.log_prob)
    assert text_lr.abs().max() < 1e-4, text_lr.abs().max()
    assert flow_lr.abs().max() < 1e-4, flow_lr.abs().max()
    torch.testing.assert_close(new.mean, ro.traj.mean, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_unified_objective_is_on_policy_before_any_update(policy, cfg_scale):
    """Through the update's own code path (RatioNorm, and the guided velocity when CFG is on):
    r = 1, no clipping."""
    cfg = small_cfg(cfg_scale=cfg_scale, clip_flow=1e-6)
    g = torch.Generator().manual_seed(4)
    ro = unigrpo.rollout(policy, toy.train_prompts(cfg.seed, 4, cfg.prompts_per_step),
                         toy.ToyReward(), cfg, g)
    uncond = unigrpo.uncond_thoughts(policy, ro.rewards.shape[0]) if cfg_scale != 1 else None
    with torch.no_grad():
        _, stats = unigrpo.unified_objective(policy, None, ro, torch.arange(ro.rewards.shape[0]),
                                             cfg, uncond)
    assert abs(stats["ratio_min"] - 1) < 1e-6 and abs(stats["ratio_max"] - 1) < 1e-6, stats
    assert stats["clip_frac_flow"] == 0 and stats["clip_frac_text"] == 0


def test_text_and_image_actions_share_the_trajectory_advantage(policy, monkeypatch):
    cfg = small_cfg()
    g = torch.Generator().manual_seed(1)
    prompts = toy.train_prompts(cfg.seed, 1, cfg.prompts_per_step)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0, 1.0, 0.0, 0.5])
    ro = unigrpo.rollout(policy, prompts, lambda imgs, ps: rewards[:len(ps)], cfg, g)
    torch.testing.assert_close(ro.advantages, losses.group_advantages(rewards, cfg.group_size))
    seen = {}

    def spy(name, real, position):
        def wrapped(*args, **kwargs):
            seen[name] = args[position]
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(losses, "text_grpo_loss", spy("text", losses.text_grpo_loss, 2))
    monkeypatch.setattr(losses, "flow_grpo_loss", spy("flow", losses.flow_grpo_loss, 1))
    idx = torch.tensor([5, 0, 3])
    ref = unigrpo.reference_policy(lambda: reference_of(policy))
    unigrpo.unified_objective(policy, unigrpo.reference_outputs(ref, ro, cfg), ro, idx, cfg)
    torch.testing.assert_close(seen["text"], ro.advantages[idx])
    torch.testing.assert_close(seen["flow"], ro.advantages[idx])


def reference_of(policy):
    """A fresh toy policy holding `policy`'s weights (how train.py builds the frozen reference)."""
    ref = toy_policy.build_policy()
    ref.load_state_dict(policy.state_dict())
    return ref


def _changed(before, policy, names):
    return {n for n, p in policy.named_parameters()
            if n in names and not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("parts", ["both", "text", "image"])
def test_one_update_changes_exactly_the_experts_it_should(parts):
    cfg = small_cfg(train_parts=parts, lr_reasoning=1e-3, lr_denoising=1e-3, clip_flow=0.2)
    policy = toy_policy.build_policy(cfg.seed)
    groups = {k: {n for n, p in policy.named_parameters() if any(p is q for q in v)}
              for k, v in policy.param_groups().items()}
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    g = torch.Generator().manual_seed(2)
    prompts = toy.train_prompts(cfg.seed, 2, cfg.prompts_per_step)
    ramp = torch.linspace(0, 1, cfg.prompts_per_step * cfg.group_size)
    ro = unigrpo.rollout(policy, prompts, lambda imgs, ps: ramp[:len(ps)], cfg, g)
    ref = unigrpo.reference_policy(lambda: reference_of(policy))
    opt = unigrpo.make_optimizer(policy, cfg)
    stats = unigrpo.update(policy, ref, opt, ro, cfg, g)
    changed_r = _changed(before, policy, groups["reasoning"])
    changed_d = _changed(before, policy, groups["denoising"])
    if parts in ("both", "text"):
        assert changed_r, "reasoning expert did not change"
    else:
        assert not changed_r, f"reasoning expert changed while frozen: {sorted(changed_r)[:3]}"
    if parts in ("both", "image"):
        assert changed_d, "denoising expert did not change"
    else:
        assert not changed_d, f"denoising expert changed while frozen: {sorted(changed_d)[:3]}"
    frozen = {n for n, p in policy.named_parameters()} - groups["reasoning"] - groups["denoising"]
    assert not _changed(before, policy, frozen)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="group_size"):
        small_cfg(group_size=1)
    with pytest.raises(ValueError, match="window"):
        small_cfg(window_start=(0, 5), window_size=3, num_steps=6)
    with pytest.raises(ValueError, match="train_parts"):
        small_cfg(train_parts="vision")
    with pytest.raises(ValueError, match="regulariser"):
        small_cfg(regulariser="kl")
    with pytest.raises(ValueError, match="sde_kind"):
        small_cfg(sde_kind="sdee")
    with pytest.raises(ValueError, match="ratio_norm"):
        small_cfg(logprob_reduce="sum")
    with pytest.raises(ValueError, match="minibatches"):
        small_cfg(minibatches=0)


def test_sft_loss_is_plan_ce_plus_weighted_flow_mse(policy):
    """SFT = CE of the plan tokens (teacher-forced on the cached text path) + w * MSE(v, eps - x_0)
    at the logit-normal t drawn from the generator, re-derived here from forward_text
    and velocity()."""
    prompts = [toy.make_prompt(c, i) for i, c in enumerate(toy.CATEGORIES[:3])]
    layouts = [toy.random_layout(p, i) for i, p in enumerate(prompts)]
    plans, images = [toy.plan_text(l) for l in layouts], toy.render_batch(layouts)
    with torch.no_grad():
        loss1, st1 = toy_policy.sft_loss(policy, prompts, plans, images,
                                         torch.Generator().manual_seed(0))
        loss3, st3 = toy_policy.sft_loss(policy, prompts, plans, images,
                                         torch.Generator().manual_seed(0), mse_weight=3.0)
    assert st1 == st3 and loss3.item() == pytest.approx(loss1.item() + 2 * st1["sft_mse"], rel=1e-5)
    pol, c = policy, policy.cfg
    nll, n = 0.0, 0
    for p, plan in zip(prompts, plans):
        tail = [c.im_start_id] + pol.tokenizer.encode(plan) + [c.im_end_id]
        ids = torch.tensor([[c.im_start_id] + pol.tokenizer.encode(p.text) + [c.im_end_id] + tail])
        with torch.no_grad():
            h, _ = pol.forward_text(ids, torch.ones_like(ids, dtype=torch.bool))
            logp = torch.log_softmax(pol.model.language_model.lm_head(h[0]).float(), -1)
        L = len(tail) - 1   # predictions of plan + im_end, from im_start onwards
        nll -= logp[-L - 1:-1].gather(1, ids[0, -L:, None]).sum().item()
        n += L
    assert st1["sft_ce"] == pytest.approx(nll / n, rel=1e-4)
    g = torch.Generator().manual_seed(0)
    x_0 = pol.encode(images * 2 - 1)
    t = train_timesteps(torch.randn(3, generator=g), c.timestep_shift)
    eps = torch.randn(x_0.shape, generator=g)
    with torch.no_grad():
        ctx = pol.context(pol.thoughts_from_text([p.text for p in prompts], plans))
        v = pol.velocity((1 - t)[:, None, None] * x_0 + t[:, None, None] * eps, t, ctx)
    assert st1["sft_mse"] == pytest.approx(((v - (eps - x_0)) ** 2).mean().item(), rel=1e-4)


def _ramp_rollout(policy, cfg, seed=5):
    g = torch.Generator().manual_seed(seed)
    prompts = toy.train_prompts(cfg.seed, 1, cfg.prompts_per_step)
    ramp = torch.linspace(0, 1, cfg.prompts_per_step * cfg.group_size)
    return unigrpo.rollout(policy, prompts, lambda imgs, ps: ramp[:len(ps)], cfg, g)


def test_reference_outputs_once_per_rollout_equal_the_per_minibatch_ones(policy, monkeypatch):
    """Eq. (8)'s reference velocities (and its log-probs) come from one pass over the rollout, however
    many epochs and minibatches read them, and equal what a per-minibatch pass would give."""
    cfg = small_cfg(ppo_epochs=2, minibatches=2, text_kl=0.1)
    ro = _ramp_rollout(policy, cfg)
    ref = unigrpo.reference_policy(lambda: reference_of(policy))
    out, = unigrpo.reference_outputs(ref, ro, cfg)                  # one TrainOutput per round
    for idx in (torch.tensor([6, 1, 3]), torch.arange(8)):
        with torch.no_grad():
            direct = ref.train_forward(ro.thoughts.select(idx), ro.traj.x_t[idx], ro.traj.t)
        # fp32 rounding differs with the batch's padded width; a wrong row would differ by O(1)
        torch.testing.assert_close(out.v[idx], direct.v, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.logp[idx], direct.logp, atol=2e-5, rtol=1e-4)
    calls = {"ref": 0}
    real = ref.train_forward

    def counted(*a, **k):
        calls["ref"] += 1
        return real(*a, **k)
    monkeypatch.setattr(ref, "forward", counted)                 # what ref(...) runs
    net = reference_of(policy)                         # a copy: the module's policy stays as it is
    unigrpo.update(net, ref, unigrpo.make_optimizer(net, cfg), ro, cfg, torch.Generator().manual_seed(1))
    assert calls["ref"] == cfg.minibatches           # R // minibatches rows a chunk, once: not epochs x
    assert unigrpo.reference_outputs(ref, ro, small_cfg(regulariser="none")) is None


def test_micro_batches_give_the_minibatch_gradient(policy):
    """Gradient accumulation over micro-batches, each weighted by its share of rows, is the gradient of
    the whole minibatch (every reduction of Eq. (7) here is a mean over rows)."""
    cfg = small_cfg(minibatches=1, lr_reasoning=1e-3, lr_denoising=1e-3, clip_flow=0.2)
    ro = _ramp_rollout(policy, cfg)
    ref = unigrpo.reference_policy(lambda: reference_of(policy))

    def grads_after(micro):
        net = reference_of(policy).train()
        run = dataclasses.replace(cfg, micro_batch=micro)
        opt = unigrpo.make_optimizer(net, run)
        captured = {}
        opt.step = lambda: captured.update({n: p.grad.clone() for n, p in net.named_parameters()
                                            if p.grad is not None})
        stats = unigrpo.update(net, ref, opt, ro, run, torch.Generator().manual_seed(4))
        return captured, stats

    whole, s_whole = grads_after(0)
    split, s_split = grads_after(3)                  # 8 rows: micro-batches of 3, 3, 2
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-4, msg=name)
    assert s_split["loss"] == pytest.approx(s_whole["loss"], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="micro_batch"):
        small_cfg(micro_batch=2, text_reduction="dapo")


def test_rollout_in_prompt_chunks_keeps_groups_and_shapes(policy):
    """rollout_batch generates a few prompts at a time: the rows stay group-contiguous, the chunks
    are padded to one width, and the update reads the result on-policy."""
    cfg = small_cfg(prompts_per_step=3, group_size=2, minibatches=1, rollout_batch=2)
    ro = _ramp_rollout(policy, cfg)
    R = cfg.prompts_per_step * cfg.group_size
    assert ro.thoughts.ids.shape[0] == R == ro.traj.x_t.shape[0] == ro.images.shape[0]
    assert [p.text for p in ro.prompts] == [p.text for p in ro.prompts[::2] for _ in range(2)]
    with torch.no_grad():
        out = policy.train_forward(ro.thoughts, ro.traj.x_t, ro.traj.t)
    lr = losses.log_ratio(out.logp, ro.thoughts.logp)[ro.thoughts.mask]
    assert ro.thoughts.mask.any() and lr.abs().max() < 1e-4
    new = unigrpo.window_step(ro.traj, torch.arange(R), out.v, cfg)
    assert losses.log_ratio(new.log_prob, ro.traj.log_prob).abs().max() < 1e-4


def test_minibatches_take_an_equal_share_of_every_group_and_ignore_the_rank_split():
    """Each epoch's minibatches partition the rows, every minibatch holds G/minibatches rows of every
    group, and the rows a rank sees are the global minibatch's rows of its groups (world-size invariance)."""
    G, M, B = 6, 3, 4
    whole = unigrpo.minibatch_rows(G, M, 0, B * G, torch.Generator().manual_seed(5))
    assert sorted(torch.cat(whole).tolist()) == list(range(B * G))
    for part in whole:
        assert torch.bincount(part // G, minlength=B).tolist() == [G // M] * B
    halves = [unigrpo.minibatch_rows(G, M, first, B * G // 2, torch.Generator().manual_seed(5))
              for first in (0, B * G // 2)]
    for m, part in enumerate(whole):
        split = torch.cat([halves[0][m], halves[1][m] + B * G // 2])
        assert sorted(split.tolist()) == sorted(part.tolist())
    other = unigrpo.minibatch_rows(G, M, 0, B * G, torch.Generator().manual_seed(6))
    assert any(not torch.equal(a, b) for a, b in zip(whole, other))       # the key shuffles


def test_rollout_rows_do_not_depend_on_the_generation_batch():
    """Row i's randomness is keyed by its global index: rolling out in chunks of one prompt, or as the
    second half of a batch (first_row), gives the same reasoning, trajectories and images."""
    cfg = small_cfg(prompts_per_step=2, group_size=2)
    policy = toy_policy.build_policy(0, "cpu")
    batch = toy.train_prompts(0, 0, 2)
    a = unigrpo.rollout(policy, batch, toy.ToyReward(), cfg, torch.Generator().manual_seed(3))
    b = unigrpo.rollout(policy, batch, toy.ToyReward(), dataclasses.replace(cfg, rollout_batch=1),
                        torch.Generator().manual_seed(3))
    second = unigrpo.rollout(policy, batch[1:], toy.ToyReward(), cfg, torch.Generator().manual_seed(3),
                             first_row=2)
    for x, y in ((a.traj.x_0, b.traj.x_0), (a.images, b.images), (a.thoughts.logp, b.thoughts.logp),
                 (a.traj.x_0[2:], second.traj.x_0), (a.thoughts.ids[2:], second.thoughts.ids)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
