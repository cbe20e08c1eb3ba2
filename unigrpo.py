"""UniGRPO: Prompt -> Thinking -> Image as one MDP, and the unified update (arXiv 2603.23500).

Every reasoning token and every denoising step is an action; a reward model scores only the final
image. For each prompt, G reasoning chains are sampled (text expert); each chain conditions one image
trajectory (generation expert) that runs ODE steps except inside a short SDE window (FlowGRPO-Fast).
Group-relative advantages (Eq. (1)) are shared by all text and image actions of a trajectory, and one
objective J = J_text + lam * J_flow (Eq. (7)) updates both experts of the same model through one
packed forward.

Multi-round (cfg.rounds > 1, the paper's future work): each later round puts the previous image into the
context (Policy.context_image), samples a reflection (Policy.think_from: more text actions) and draws again.
The rollout stays linear and CFG-free; the reward scores the final image; one advantage per trajectory
weights all its text and image actions; Eq. (7) is summed over the rounds (round_objective), each with its
own velocity MSE; the update reads every round from one packed forward (Policy.train_forward_turns).

This module talks to the model only through the Policy interface (policy.py): think,
context, velocity, train_forward, decode, encode, param_groups; it gets the frozen reference through
one function (reference_policy) and holds no state of its own. The equations live in losses.py and
sampler.py; nothing here re-derives them.

Glossary: B prompts per step, G group size, R = B*G rows, T reasoning tokens, K window steps,
N latent tokens, D latent token dim; A advantages (R,), r ratio, theta policy, theta_ref reference.

Deviations / borrowed defaults (each a Config field, its paper value noted there):
- Minibatches take an equal shuffled share of every group (minibatches must divide G): advantages
  are computed once per rollout, and every rank then holds the same share of every minibatch.
- `train_parts="text"|"image"` freezes the other expert AND drops its loss term (the paper's
  TextGRPO-only / FlowGRPO-only baselines); "both" is UniGRPO.
- `text_kl > 0` (paper: 0) adds TRL's k3 KL to the frozen reference on reasoning tokens: the remedy
  when the reasoning, rewarded only through the image, drifts away from valid plans.
- `cfg_scale != 1` (paper: 1, no CFG in training) is the ablation with guided, branched rollouts: the
  update recomputes the same guided velocity (one formula, `model.guided_velocity`), so the ratio
  stays on-policy.
- GRPO-Guard's 1/|dt| gradient reweighting (`losses.flow_grpo_loss(dt=...)`) is not applied: the
  paper's Eq. (5) and Eq. (6) do not include it.
- RatioNorm's bias term assumes Eq. (3)'s Gaussian log-density averaged over elements, so
  `ratio_norm=True` needs `sde_kind="sde"` and `logprob_reduce="mean"` (checked).
- A non-finite loss or gradient norm raises FloatingPointError before the optimizer step.
- Multi-round: every round uses the batch's one SDE window, and a reflection gets max_think_tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from einops import rearrange

import losses
import sampler
from config import Config
from model import guided_velocity
from policy import ContextImage, Thoughts, TrainOutput, Turn


# ----------------------------------------------------------------------------------------------- rollout
@dataclass
class Round:
    """Round r >= 2 of a multi-round trajectory (think -> image -> reflect -> image): the previous image as it
    entered the context, the reflection sampled after it (text actions), and this round's image (actions)."""
    seen: ContextImage           # the previous round's image in the context (its latents; ViT pixels)
    thoughts: Thoughts           # the reflection: ids, mask, old log-probs; empty prompt
    traj: sampler.Trajectory     # this round's SDE window and x_0
    images: torch.Tensor         # (R, 3, H, W) in [0, 1]

    @staticmethod
    def cat(parts: list[Round]) -> Round:
        return Round(ContextImage.cat([p.seen for p in parts]), Thoughts.cat([p.thoughts for p in parts]),
                     sampler.Trajectory.cat([p.traj for p in parts]), torch.cat([p.images for p in parts]))


@dataclass
class Rollout:
    """One batch of trajectories: everything the update reads, produced once, under no_grad. thoughts and
    traj are round 1's; later holds rounds 2.. (empty for one round)."""
    prompts: list                # (R,) prompt objects (with .text), group-contiguous
    thoughts: object             # policy.Thoughts: prompt ids, reasoning ids/mask, old token log-probs
    traj: sampler.Trajectory     # x_t, x_next, mean, std, log_prob at the K window steps; x_0
    images: torch.Tensor         # (R, 3, H, W) in [0, 1], the final image (the one the reward scores)
    rewards: torch.Tensor        # (R,)
    advantages: torch.Tensor     # (R,), Eq. (1), shared by every text and image action of a row
    first_row: int = 0           # global index of row 0 (its rank's offset): keys the minibatch draw
    later: list = field(default_factory=list)   # Round per round after the first
    round_rewards: torch.Tensor | None = None   # (rounds, R): every round's image scored (analysis only)

    def rounds(self) -> list:
        """(thoughts, traj) of every round: round 1's reasoning and window, then each reflection and window."""
        return [(self.thoughts, self.traj), *((r.thoughts, r.traj) for r in self.later)]


def _texts(prompts) -> list[str]:
    return [p.text if hasattr(p, "text") else str(p) for p in prompts]


def uncond_thoughts(policy, n_rows: int):
    """The text-unconditional input for CFG: an empty prompt chunk and no reasoning (Bagel's
    cfg_text_precontext omits the chunk; an empty one keeps rollout and train_forward on one layout)."""
    return policy.think([""] * n_rows, n=1, max_new_tokens=0)


@torch.no_grad()
def generate(policy, prompts, cfg: Config, generator, *, n=1, window=(), temperature=None,
             num_steps=None):
    """Prompt -> Thinking -> Image for n chains per prompt: (thoughts, trajectory, images in [0, 1], later).
    With cfg.rounds > 1 each later round puts the previous image into the context, samples a reflection and
    draws again, on the same SDE window: later is one Round per round after the first (else empty)."""
    steps = num_steps or cfg.num_steps
    temperature = cfg.temperature if temperature is None else temperature
    thoughts, ctx = policy.think(_texts(prompts), n=n,                  # its cache is the denoising context
                                 max_new_tokens=cfg.max_think_tokens if cfg.think else 0,
                                 temperature=temperature, generator=generator, with_context=True)
    R = thoughts.ids.shape[0]
    uctx = policy.context(uncond_thoughts(policy, R)) if cfg.cfg_scale != 1.0 else None
    grid = sampler.timesteps(steps, cfg.shift)

    def draw(ctx):
        def velocity_fn(x_t, t):
            return policy.velocity(x_t, t, ctx, cfg_scale=cfg.cfg_scale, uncond=uctx, image_hw=cfg.image_hw)
        x_1 = sampler.draw((R, *policy.latent_shape(cfg.image_hw)), generator, policy.device)
        traj = sampler.sample(velocity_fn, x_1, grid, window, cfg.noise_level, generator=generator,
                              reduce=cfg.logprob_reduce, kind=cfg.sde_kind)
        return traj, (policy.decode(traj.x_0, cfg.image_hw) * 0.5 + 0.5).clamp(0, 1)

    traj, images = draw(ctx)
    later, last = [], images
    for _ in range(cfg.rounds - 1):
        seen = policy.seen_image(last, use_vit=cfg.context_vit)
        reflection, ctx = policy.think_from(policy.context_image(ctx, seen), cfg.max_think_tokens,
                                            temperature, generator, with_context=True)
        later.append(Round(seen, reflection, *draw(ctx)))
        last = later[-1].images
    return thoughts, traj, images, later


def final_images(images, later):
    """The image a trajectory ends with: the last round's."""
    return later[-1].images if later else images


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of every rank in rank order (each rank holds as many, whole groups); one process: x."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def rollout(policy, prompts, reward_fn, cfg: Config, generator, first_row: int = 0) -> Rollout:
    """Sample G (reasoning, image) trajectories per prompt, score the images, and compute Eq. (1).
    `generator` draws what the whole batch shares (the SDE window, the key of the row streams): every
    rank holds the same one. Row i's own randomness (reasoning tokens, noise) is sampler.RowStreams
    keyed by its global index first_row + i, so the numbers do not depend on the rank count or on
    rollout_batch. Generation runs rollout_batch prompts at a time (0: all), on one SDE window;
    advantages are over the rows of every rank (a group never spans ranks)."""
    G = cfg.group_size
    window = sampler.sde_window(cfg.num_steps, cfg.window_start, cfg.window_size, generator=generator)
    streams = sampler.RowStreams(torch.randint(2 ** 62, (1,), generator=generator).item(),
                                 range(first_row, first_row + len(prompts) * G))
    size = cfg.rollout_batch or len(prompts)
    parts = [generate(policy, prompts[i:i + size], cfg, streams[i * G:(i + size) * G], n=G, window=window)
             for i in range(0, len(prompts), size)]
    thoughts, traj, images, later = zip(*parts)
    thoughts, traj, images = Thoughts.cat(thoughts), sampler.Trajectory.cat(traj), torch.cat(images)
    later = [Round.cat(list(r)) for r in zip(*later)]
    rows = [p for p in prompts for _ in range(G)]

    def score(imgs):
        r = reward_fn(imgs, rows).float().to(imgs.device)
        if not torch.isfinite(r).all():
            raise FloatingPointError(f"the reward model returned non-finite rewards "
                                     f"({int((~torch.isfinite(r)).sum())} of {len(rows)})")
        return r
    rewards = score(final_images(images, later))                 # the terminal reward: the final image only
    round_rewards = torch.stack([score(images), *(score(r.images) for r in later[:-1]), rewards]) if later else None
    A = losses.group_advantages(all_rows(rewards), G, std=cfg.adv_std, scope=cfg.adv_scope)
    A = losses.clamp_advantages(A, cfg.adv_clip_max)          # once, so text and image actions share it
    mine = _rank() * len(rows)                                 # this rank's rows of the gathered batch
    return Rollout(rows, thoughts, traj, final_images(images, later), rewards, A[mine:mine + len(rows)],
                   first_row, later, round_rewards)


def rollout_stats(ro: Rollout, G: int) -> dict:
    """Reward and reasoning statistics over the rows of every rank."""
    rewards, lengths = all_rows(ro.rewards), all_rows(ro.thoughts.mask.sum(1).float())
    spread = rearrange(rewards, "(b g) -> b g", g=G).std(dim=1)
    stats = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
             "zero_spread_groups": (spread < 1e-8).float().mean().item(),
             "reasoning_len": lengths.mean().item()}
    if ro.round_rewards is not None:                     # per round, for analysis: the reward reads the last
        for r, scores in enumerate(ro.round_rewards, start=1):
            stats[f"reward_round{r}"] = all_rows(scores).mean().item()
        for r, later in enumerate(ro.later, start=2):
            stats[f"reflection_len_round{r}"] = all_rows(later.thoughts.mask.sum(1).float()).mean().item()
    return stats


# ------------------------------------------------------------------------------------------------ update
def needs_reference(cfg: Config) -> bool:
    """Whether the update reads the frozen reference: Eq. (8) (or the latent KL) on the image
    actions, or the text KL on the reasoning."""
    flow_on, text_on = cfg.train_parts in ("both", "image"), cfg.train_parts in ("both", "text")
    return (flow_on and cfg.regulariser != "none") or (text_on and cfg.text_kl > 0)


def reference_policy(build):
    """The frozen reference theta_ref of Eq. (8) and of the optional text KL. `build()` makes the start policy
    anew (a fresh model loaded with the start weights; at scale a sharded load, or the adapters switched off),
    so no copy of a live, possibly sharded, model is ever needed."""
    ref = build().eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# the experts each train_parts setting trains
TRAINED_EXPERTS = {"both": ("reasoning", "denoising"), "text": ("reasoning",), "image": ("denoising",)}


def make_optimizer(policy, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the paper's two learning rates; an expert switched off is frozen and left out."""
    groups = policy.param_groups()
    lrs = {"reasoning": cfg.lr_reasoning, "denoising": cfg.lr_denoising}
    learn = TRAINED_EXPERTS[cfg.train_parts]
    param_groups = []
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name in learn)
        if name in learn:
            param_groups.append({"params": params, "lr": lrs[name], "name": name})
    return torch.optim.AdamW(param_groups, lr=cfg.lr_denoising, betas=(0.9, 0.999),
                             weight_decay=cfg.weight_decay)


def _flat(x):
    """(b, K, ...) window tensors -> (b*K, ...) rows: row (i, k) is step k of sample i."""
    return rearrange(x, "b k ... -> (b k) ...")


def window_step(traj: sampler.Trajectory, idx, v, cfg: Config) -> sampler.SDEStep:
    """Re-evaluate Eq. (3) at the stored window transitions x_t -> x_next under velocities v
    (b, K, N, D)."""
    b, K = v.shape[:2]
    t, t_next = traj.t.repeat(b), traj.t_next.repeat(b)        # row (i, k) -> t[k]
    step = sampler.sde_step(_flat(traj.x_t[idx]), _flat(v), t, t_next, cfg.noise_level,
                            x_next=_flat(traj.x_next[idx]), reduce=cfg.logprob_reduce,
                            kind=cfg.sde_kind)
    parts = (rearrange(x, "(b k) ... -> b k ...", b=b, k=K)
             for x in (step.x_next, step.mean, step.std, step.log_prob))
    return sampler.SDEStep(*parts)


def turns_of(ro: Rollout, idx) -> list:
    """The rows idx of a multi-round rollout as policy.Turns: each round's text, its window states, and the
    image it put into the context (the next round's `seen`), exactly as the rollout used them."""
    seen = [r.seen.select(idx) for r in ro.later] + [None]
    return [Turn(th.select(idx), traj.x_t[idx], traj.t, s) for (th, traj), s in zip(ro.rounds(), seen)]


def _outputs(policy, ro: Rollout, idx, uncond, cfg) -> list:
    """Token log-probs and window velocities of rows idx, one TrainOutput per round, from one packed forward
    (a second one for CFG's unconditional branch). policy(...) is train_forward through __call__, where FSDP's
    root hooks gather the root's weights."""
    if ro.later:
        return policy(turns_of(ro, idx), image_hw=cfg.image_hw)
    x_t = ro.traj.x_t[idx]
    out = policy(ro.thoughts.select(idx), x_t, ro.traj.t, image_hw=cfg.image_hw)
    if uncond is not None:
        v_u = policy(uncond.select(idx), x_t, ro.traj.t, image_hw=cfg.image_hw).v
        out = dataclasses.replace(out, v=guided_velocity(out.v, v_u, cfg.cfg_scale))
    return [out]


@torch.no_grad()
def reference_outputs(ref, ro: Rollout, cfg: Config, uncond=None):
    """theta_ref's token log-probs and window velocities at every row of a rollout, one TrainOutput per round,
    computed once (in micro-batch or minibatch-sized chunks): the reference is frozen, so every epoch and
    minibatch reads the same numbers. None when the update does not read the reference."""
    if ref is None or not needs_reference(cfg):
        return None
    R = ro.rewards.shape[0]
    size = cfg.micro_batch or R // cfg.minibatches
    chunks = [_outputs(ref, ro, idx, uncond, cfg) for idx in torch.arange(R, device=ro.rewards.device).split(size)]
    return [TrainOutput(torch.cat([c[r].logp for c in chunks]), torch.cat([c[r].v for c in chunks]))
            for r in range(len(chunks[0]))]


def round_objective(out, out_ref, th, traj, idx, A, cfg: Config):
    """Eq. (7) for one round of rows idx: J_text (Eq. (2)) on its text actions + lam * J_flow (Eq. (4),
    Eq. (5), Eq. (6)) on its window steps + w * reg (Eq. (8)). out_ref: the reference's TrainOutput or None."""
    flow_on, text_on = cfg.train_parts in ("both", "image"), cfg.train_parts in ("both", "text")
    stats, zero = {}, out.v.sum() * 0.0
    J_text = zero
    if text_on and th.mask.any():
        J_text = losses.text_grpo_loss(out.logp, th.logp, A, th.mask, cfg.clip_text,
                                       reduction=cfg.text_reduction,
                                       logp_ref=out_ref.logp if cfg.text_kl > 0 else None, beta=cfg.text_kl)
        log_r_text = losses.log_ratio(out.logp, th.logp)[th.mask]
        stats["clip_frac_text"] = losses.clip_fraction(log_r_text.exp(), cfg.clip_text).item()

    J_flow, reg = zero, None
    if flow_on:
        new = window_step(traj, idx, out.v, cfg)
        log_r = losses.log_ratio(new.log_prob, traj.log_prob[idx])                   # (b, K), Eq. (4)
        if cfg.ratio_norm:
            log_r = losses.ratio_norm(log_r, new.mean, traj.mean[idx], traj.std[idx])      # Eq. (5)
        J_flow = losses.flow_grpo_loss(log_r, A, cfg.clip_flow)                        # Eq. (6)
        r = log_r.detach().exp()
        stats.update(clip_frac_flow=losses.clip_fraction(r, cfg.clip_flow).item(),
                     approx_kl_flow=losses.approx_kl(log_r.detach()).item(),
                     **{k: float(v) for k, v in losses.ratio_summary(r).items()})
        if out_ref is not None and cfg.regulariser == "velocity_mse":
            reg = losses.velocity_mse(out.v, out_ref.v)                                # Eq. (8)
        elif out_ref is not None and cfg.regulariser == "latent_kl":
            ref_step = window_step(traj, idx, out_ref.v, cfg)
            dt = (traj.t_next - traj.t).repeat(len(idx))                         # row (i, k) -> dt[k]
            reg = losses.latent_kl(_flat(new.mean), _flat(ref_step.mean), _flat(traj.std[idx]), dt)
        if reg is not None:
            stats["regulariser"] = reg.item()
    J = losses.unified_loss(J_text, J_flow, reg, lam=cfg.lam, reg_weight=cfg.reg_weight)      # Eq. (7)
    stats.update(loss=J.item(), loss_text=J_text.item(), loss_flow=J_flow.item())
    return J, stats


def unified_objective(policy, ref_out, ro: Rollout, idx, cfg: Config, uncond=None):
    """Eq. (7) on one minibatch of rows idx, summed over the rounds of a trajectory (round_objective), every
    round's actions weighted by the trajectory's one advantage. ref_out: reference_outputs of every row, or
    None. Stats: round 1's, plus each later round's with a suffix _round{r}."""
    if ref_out is None and cfg.text_kl > 0:
        raise ValueError("text_kl > 0 needs the frozen reference's outputs (reference_outputs)")
    A = ro.advantages[idx]
    outs = _outputs(policy, ro, idx, uncond, cfg)
    J, stats = None, {}
    for r, (out, (th, traj)) in enumerate(zip(outs, ro.rounds())):
        out_ref = None if ref_out is None else TrainOutput(ref_out[r].logp[idx], ref_out[r].v[idx])
        J_r, s = round_objective(out, out_ref, th.select(idx), traj, idx, A, cfg)
        J = J_r if J is None else J + J_r
        stats.update(s if r == 0 else {f"{k}_round{r + 1}": v for k, v in s.items()})
    stats["loss"] = J.item()
    return J, stats


def minibatch_rows(G: int, minibatches: int, first_row: int, R: int, generator) -> list[torch.Tensor]:
    """One epoch's minibatches of local rows 0..R-1: each group's G rows are shuffled by a stream keyed by
    its global group index, and minibatch m takes the m-th G/minibatches of every group. So every
    minibatch sees every group, and every rank holds the same share of it: the global minibatches, and
    the gradient FSDP averages over ranks, are those of one process (the key comes from `generator`)."""
    key = torch.randint(2 ** 62, (1,), generator=generator).item()
    first_group = first_row // G
    streams = sampler.RowStreams(key, range(first_group, first_group + R // G))
    order = streams.draw((G,), uniform=True).argsort(1) + torch.arange(0, R, G)[:, None]     # (groups, G)
    return [part.flatten() for part in order.chunk(minibatches, dim=1)]


def update(policy, ref, optimizer, ro: Rollout, cfg: Config, generator) -> dict:
    """The unified update: ppo_epochs passes over shuffled minibatches (minibatch_rows), one optimizer
    step each; a minibatch runs forward/backward micro_batch rows at a time (0: at once), each
    micro-batch's objective weighted by its share of rows, so the gradient is the minibatch's."""
    policy.train()
    R = ro.rewards.shape[0]
    uncond = uncond_thoughts(policy, R) if cfg.cfg_scale != 1.0 else None
    ref_out = reference_outputs(ref, ro, cfg, uncond)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    history = []
    for _ in range(cfg.ppo_epochs):
        for idx in minibatch_rows(cfg.group_size, cfg.minibatches, ro.first_row, R, generator):
            idx = idx.to(ro.rewards.device)
            optimizer.zero_grad(set_to_none=True)
            micro = idx.split(cfg.micro_batch) if cfg.micro_batch else (idx,)
            stats = {}
            for part in micro:
                J, part_stats = unified_objective(policy, ref_out, ro, part, cfg, uncond)
                share = len(part) / len(idx)                   # 1.0 (exact) for one micro-batch
                (J * share).backward()
                for k, v in part_stats.items():
                    stats[k] = stats.get(k, 0.0) + v * share
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            stats["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            for name in ("loss", "grad_norm"):
                if not math.isfinite(stats[name]):   # a NaN step would poison every later one
                    raise FloatingPointError(f"non-finite {name.replace('_', ' ')} ({stats[name]}) in the "
                                             f"update; the optimizer step was skipped")
            optimizer.step()
            history.append(stats)
    policy.eval()
    return {k: sum(h[k] for h in history if k in h) / sum(k in h for h in history)
            for k in {k for h in history for k in h}}
