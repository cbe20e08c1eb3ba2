"""UniGRPO: Prompt -> Thinking -> Image as one MDP, and the unified update (arXiv 2603.23500).

Every reasoning token and every denoising step is an action; a reward model scores only the final image.
For each prompt, G reasoning chains are sampled (text expert); each chain conditions one image trajectory
(generation expert) that runs ODE steps except inside a short SDE window (FlowGRPO-Fast). Group-relative
advantages (Eq. 1) are shared by all text and image actions of a trajectory, and one objective
J = J_text + lam * J_flow (Eq. 7) updates both experts of the same model through one packed forward.

This module talks to the model only through the Policy interface (model.py / DESIGN.md):
think, context, velocity, train_forward, decode, encode, param_groups. The equations live in losses.py and
sampler.py; nothing here re-derives them.

Glossary: B prompts per step, G group size, R = B*G rows, T reasoning tokens, K window steps,
N latent tokens, D latent token dim; A advantages (R,), r ratio, theta policy, theta_ref frozen reference.

Deviations / borrowed defaults (each a Config field, paper value noted there):
- Minibatches are shuffled rows (whole groups are kept per rank, not per minibatch): advantages are
  computed once per rollout, so a minibatch never needs its group.
- `train_parts="text"|"image"` freezes the other expert AND drops its loss term (TextGRPO-only /
  FlowGRPO-only baselines of the paper); "both" is UniGRPO.
- `text_kl > 0` (paper: 0) adds TRL's k3 KL to the frozen reference on reasoning tokens: our documented
  remedy when the reasoning, rewarded only through the image, drifts away from valid plans.
- `cfg_scale != 1` (paper: 1, no CFG in training) is the ablation with guided, branched rollouts: the
  update then recomputes the same guided velocity (one formula, `model.guided_velocity`), so the ratio stays on-policy.
- GRPO-Guard's 1/|dt| gradient reweighting (`losses.flow_grpo_loss(dt=...)`) is not applied: the paper's Eqs. 5-6
  do not include it.
- RatioNorm's bias term assumes Eq. 3's Gaussian log-density averaged over elements, so `ratio_norm=True` needs
  `sde_kind="sde"` and `logprob_reduce="mean"` (checked).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from einops import rearrange

import losses
import model as model_lib
import sampler


@dataclass
class Config:
    """Every number of a run: the algorithm's (paper defaults noted) and the run's. Presets in train.py."""
    # run
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    device: str = "cpu"
    dtype: str = "float32"              # weights dtype for a loaded checkpoint (--bagel); the toy runs in fp32
    model: str = "toy"                   # "toy" or a folder with an official BAGEL checkpoint
    # rollout (paper: group 24, batch 32, temperature 1, 25 steps, shift 3, noise 0.8, window [0,5] x 3)
    prompts_per_step: int = 32           # B
    group_size: int = 24                 # G
    think: bool = True
    max_think_tokens: int = 512
    temperature: float = 1.0
    num_steps: int = 25
    shift: float = 3.0
    noise_level: float = 0.8
    window_start: tuple = (0, 5)
    window_size: int = 3
    sde_kind: str = "sde"                # "sde" (Eq. 3) or "cps" (FlowGRPO-Fast configs)
    logprob_reduce: str = "mean"         # FlowGRPO's choice; "sum" is the exact density
    image_hw: tuple = (1024, 1024)
    cfg_scale: float = 1.0               # paper: no CFG in training
    # update (paper: 2 PPO epochs, lr 1e-6 / 3e-5, lam 1, clip 1e-6, MSE weight 1.5e-5, text KL 0)
    ppo_epochs: int = 2
    minibatches: int = 2
    lr_reasoning: float = 1e-6
    lr_denoising: float = 3e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_parts: str = "both"            # "both" | "text" | "image"
    lam: float = 1.0
    clip_text: float = 0.2
    clip_flow: float = 1e-6
    adv_clip_max: float | None = None    # FlowGRPO clamps A to [-5, 5]; the paper does not say
    adv_std: str = "population"
    adv_scope: str = "group"
    text_reduction: str = "grpo"
    ratio_norm: bool = True
    regulariser: str = "velocity_mse"    # "velocity_mse" (Eq. 8) | "latent_kl" | "none"
    reg_weight: float = 1.5e-5
    text_kl: float = 0.0
    # stages
    sft_steps: int = 0
    sft_batch: int = 64
    sft_lr: float = 1e-3
    sft_ema: float = 0.0                 # EMA decay of the SFT weights (0 = off)
    sft_mse_weight: float = 1.0          # weight of the flow-matching MSE against the plan CE (Bagel: 1)
    sft_noise: float = 0.0               # toy: share of SFT plans, and (independently) images, with one error
    rl_steps: int = 100
    eval_per_category: int = 256
    eval_steps: int = 20
    eval_temperature: float = 1.0
    ckpt_every: int = 10

    def validate(self) -> "Config":
        """Fail at the command line, not minutes into a run."""
        choices = {"train_parts": ("both", "text", "image"), "regulariser": ("velocity_mse", "latent_kl", "none"),
                   "sde_kind": sampler.KINDS, "logprob_reduce": sampler.REDUCTIONS,
                   "adv_std": ("population", "sample", "none"), "adv_scope": ("group", "batch"),
                   "text_reduction": ("grpo", "bnpo", "dapo", "dr_grpo"),
                   "dtype": ("float32", "bfloat16", "float16", "float64")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {', '.join(map(str, allowed))}")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: group-relative advantages need at least 2 samples")
        for key in ("prompts_per_step", "ppo_epochs", "minibatches", "num_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        lo, hi = self.window_start
        if not (0 <= lo <= hi and hi + self.window_size <= self.num_steps - 1 and self.window_size >= 1):
            raise ValueError(f"window_start={self.window_start}, window_size={self.window_size}: the SDE window "
                             f"must lie inside steps 0..{self.num_steps - 2} (the last step is never trained)")
        if self.ratio_norm and (self.sde_kind, self.logprob_reduce) != ("sde", "mean"):
            raise ValueError(f"ratio_norm needs sde_kind='sde' and logprob_reduce='mean' (its bias term is the "
                             f"Gaussian one of Eq. 3 averaged over elements); got {self.sde_kind!r}, "
                             f"{self.logprob_reduce!r}")
        if not 0 <= self.sft_noise < 1:
            raise ValueError(f"sft_noise={self.sft_noise} must be in [0, 1)")
        if self.sft_mse_weight <= 0:
            raise ValueError(f"sft_mse_weight={self.sft_mse_weight} must be > 0")
        if self.train_parts == "text" and not self.think:
            raise ValueError("train_parts='text' with think=False leaves nothing to train")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError(f"minibatches={self.minibatches} must divide prompts_per_step*group_size")
        return self


# ----------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """One batch of trajectories: everything the update reads, produced once, under no_grad."""
    prompts: list                # (R,) prompt objects (with .text), group-contiguous
    thoughts: object             # model.Thoughts: prompt ids, reasoning ids/mask, old token log-probs
    traj: sampler.Trajectory     # x_t, x_next, mean, std, log_prob at the K window steps; x_0
    images: torch.Tensor         # (R, 3, H, W) in [0, 1]
    rewards: torch.Tensor        # (R,)
    advantages: torch.Tensor     # (R,), Eq. (1), shared by the text and image actions of a row


def _texts(prompts) -> list[str]:
    return [p.text if hasattr(p, "text") else str(p) for p in prompts]


def uncond_thoughts(policy, n_rows: int):
    """The text-unconditional input for CFG: an empty prompt chunk and no reasoning. (Bagel's cfg_text_precontext
    omits the chunk; an empty one keeps rollout and train_forward on the same layout.)"""
    return policy.think([""] * n_rows, n=1, max_new_tokens=0)


@torch.no_grad()
def generate(policy, prompts, cfg: Config, generator, *, n=1, window=(), temperature=None, num_steps=None):
    """Prompt -> Thinking -> Image for n chains per prompt. Returns (thoughts, trajectory, images in [0, 1])."""
    steps = num_steps or cfg.num_steps
    thoughts = policy.think(_texts(prompts), n=n, max_new_tokens=cfg.max_think_tokens if cfg.think else 0,
                            temperature=cfg.temperature if temperature is None else temperature,
                            generator=generator)
    ctx = policy.context(thoughts)
    R = thoughts.ids.shape[0]
    uctx = policy.context(uncond_thoughts(policy, R)) if cfg.cfg_scale != 1.0 else None
    N, D = policy.latent_shape(cfg.image_hw)
    x_1 = torch.randn((R, N, D), generator=generator, device=generator.device).to(policy.device)
    grid = sampler.timesteps(steps, cfg.shift)

    def velocity_fn(x_t, t):
        return policy.velocity(x_t, t, ctx, cfg_scale=cfg.cfg_scale, uncond=uctx, image_hw=cfg.image_hw)

    traj = sampler.sample(velocity_fn, x_1, grid, window, cfg.noise_level, generator=generator,
                          reduce=cfg.logprob_reduce, kind=cfg.sde_kind)
    images = (policy.decode(traj.x_0, cfg.image_hw) * 0.5 + 0.5).clamp(0, 1)
    return thoughts, traj, images


@torch.no_grad()
def rollout(policy, prompts, reward_fn, cfg: Config, generator) -> Rollout:
    """Sample G (reasoning, image) trajectories per prompt, score the images, and compute Eq. (1)."""
    G = cfg.group_size
    window = sampler.sde_window(cfg.num_steps, cfg.window_start, cfg.window_size, generator=generator)
    thoughts, traj, images = generate(policy, prompts, cfg, generator, n=G, window=window)
    rows = [p for p in prompts for _ in range(G)]
    rewards = reward_fn(images, rows).float().to(images.device)
    A = losses.group_advantages(rewards, G, std=cfg.adv_std, scope=cfg.adv_scope)
    A = losses.clamp_advantages(A, cfg.adv_clip_max)          # once, so text and image actions share it
    return Rollout(rows, thoughts, traj, images, rewards, A)


def rollout_stats(ro: Rollout, G: int) -> dict:
    spread = rearrange(ro.rewards, "(b g) -> b g", g=G).std(dim=1)
    return {"reward_mean": ro.rewards.mean().item(), "reward_std": ro.rewards.std().item(),
            "zero_spread_groups": (spread < 1e-8).float().mean().item(),
            "reasoning_len": ro.thoughts.mask.sum(1).float().mean().item()}


# ------------------------------------------------------------------------------------------------ update
def reference_copy(policy):
    """The frozen reference theta_ref (Eq. 8 and the optional text KL): a detached copy of the start policy."""
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def make_optimizer(policy, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the paper's two learning rates; an expert switched off is frozen and left out."""
    groups = policy.param_groups()
    lrs = {"reasoning": cfg.lr_reasoning, "denoising": cfg.lr_denoising}
    learn = {"both": ("reasoning", "denoising"), "text": ("reasoning",), "image": ("denoising",)}[cfg.train_parts]
    param_groups = []
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name in learn)
        if name in learn:
            param_groups.append({"params": params, "lr": lrs[name], "name": name})
    return torch.optim.AdamW(param_groups, lr=cfg.lr_denoising, betas=(0.9, 0.999),
                             weight_decay=cfg.weight_decay)


def window_step(traj: sampler.Trajectory, idx, v, cfg: Config) -> sampler.SDEStep:
    """Re-evaluate Eq. (3) at the stored window transitions x_t -> x_next under velocities v (b, K, N, D)."""
    b, K = v.shape[:2]
    flat = lambda x: rearrange(x, "b k ... -> (b k) ...")
    t, t_next = traj.t.repeat(b), traj.t_next.repeat(b)        # row (i, k) -> t[k]
    step = sampler.sde_step(flat(traj.x_t[idx]), flat(v), t, t_next, cfg.noise_level,
                            x_next=flat(traj.x_next[idx]), reduce=cfg.logprob_reduce, kind=cfg.sde_kind)
    unflat = lambda x: rearrange(x, "(b k) ... -> b k ...", b=b, k=K)
    return sampler.SDEStep(unflat(step.x_next), unflat(step.mean), unflat(step.std), unflat(step.log_prob))


def _velocities(policy, thoughts, x_t, t, uncond, cfg):
    out = policy.train_forward(thoughts, x_t, t, image_hw=cfg.image_hw)
    if uncond is not None:
        v_u = policy.train_forward(uncond, x_t, t, image_hw=cfg.image_hw).v
        out = dataclasses.replace(out, v=model_lib.guided_velocity(out.v, v_u, cfg.cfg_scale))
    return out


def unified_objective(policy, ref, ro: Rollout, idx, cfg: Config, uncond=None):
    """Eq. (7) on one minibatch of rows idx: J_text (Eq. 2) + lam * J_flow (Eqs. 4-6) + w * reg (Eq. 8)."""
    th = ro.thoughts.select(idx)
    A = ro.advantages[idx]
    traj = ro.traj
    out = _velocities(policy, th, traj.x_t[idx], traj.t, uncond.select(idx) if uncond else None, cfg)
    if ref is None and cfg.text_kl > 0:
        raise ValueError("text_kl > 0 needs the frozen reference policy (ref)")
    flow_on, text_on = cfg.train_parts in ("both", "image"), cfg.train_parts in ("both", "text")
    need_ref = ref is not None and ((flow_on and cfg.regulariser != "none") or (text_on and cfg.text_kl > 0))
    if need_ref:
        with torch.no_grad():
            out_ref = _velocities(ref, th, traj.x_t[idx], traj.t, uncond.select(idx) if uncond else None, cfg)
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
        if need_ref and cfg.regulariser == "velocity_mse":
            reg = losses.velocity_mse(out.v, out_ref.v)                                # Eq. (8)
        elif need_ref and cfg.regulariser == "latent_kl":
            ref_step = window_step(traj, idx, out_ref.v, cfg)
            flat = lambda x: rearrange(x, "b k ... -> (b k) ...")
            dt = (traj.t_next - traj.t).repeat(len(idx))                                  # row (i, k) -> dt[k]
            reg = losses.latent_kl(flat(new.mean), flat(ref_step.mean), flat(traj.std[idx]), dt)
        if reg is not None:
            stats["regulariser"] = reg.item()
    J = losses.unified_loss(J_text, J_flow, reg, lam=cfg.lam, reg_weight=cfg.reg_weight)      # Eq. (7)
    stats.update(loss=J.item(), loss_text=J_text.item(), loss_flow=J_flow.item())
    return J, stats


def update(policy, ref, optimizer, ro: Rollout, cfg: Config, generator) -> dict:
    """The unified update: ppo_epochs passes over shuffled minibatches, one optimizer step each."""
    policy.train()
    R = ro.rewards.shape[0]
    uncond = uncond_thoughts(policy, R) if cfg.cfg_scale != 1.0 else None
    history = []
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(R, generator=generator, device=generator.device).to(ro.rewards.device)
        for idx in perm.chunk(cfg.minibatches):
            J, stats = unified_objective(policy, ref, ro, idx, cfg, uncond)
            optimizer.zero_grad(set_to_none=True)
            J.backward()
            params = [p for g in optimizer.param_groups for p in g["params"]]
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            optimizer.step()
            history.append(stats)
    policy.eval()
    return {k: sum(h[k] for h in history if k in h) / sum(k in h for h in history)
            for k in {k for h in history for k in h}}


# ------------------------------------------------------------------------------------------ SFT warm-up
def sft_loss(policy, prompts, plans, images, generator, mse_weight: float = 1.0):
    """Bagel's own losses on (prompt, plan, image) triples: CE on the plan + mse_weight * flow-matching MSE.

    images: (R, 3, H, W) in [0, 1]. One train_forward gives both, with K = 1 noisy block per sample.
    """
    thoughts = policy.thoughts_from_text(_texts(prompts), plans)
    x_0 = policy.encode(images * 2 - 1)                                   # (R, N, D)
    R = x_0.shape[0]
    u = torch.randn(R, generator=generator, device=generator.device).to(x_0.device)   # logit-normal t
    t = model_lib.train_timesteps(u, policy.cfg.timestep_shift)
    eps = torch.randn(x_0.shape, generator=generator, device=generator.device).to(x_0.device)
    x_t = (1 - t)[:, None, None] * x_0 + t[:, None, None] * eps
    out = policy.train_forward(thoughts, x_t[:, None], t[:, None])
    ce = -(out.logp * thoughts.mask).sum() / thoughts.mask.sum().clamp(min=1)
    mse = ((out.v[:, 0] - (eps - x_0)) ** 2).mean()
    return ce + mse_weight * mse, {"sft_ce": ce.item(), "sft_mse": mse.item()}
