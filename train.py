"""train.py: the UniGRPO training loop.

    python train.py --toy                      # SFT warm-up + UniGRPO on the toy world, laptop CPU
    python train.py --toy --train_parts=image  # any Config field: --key=value (python train.py --help)
    python train.py --toy --resume             # continue a killed run exactly (--overwrite: start over)
    python train.py --bagel --model=/path/to/BAGEL-7B-MoT   # checks the checkpoint; reward models next

main() reads as a handful of named calls at every scale: the algorithm is in unigrpo.py, the equations in
losses.py and sampler.py, the model in model.py, the config in config.py, checkpoints in checkpoint.py, the
toy world in toy.py and its base policy in toy_policy.py, evaluation in evaluate.py.
Artifacts in <out_dir>/<name>/: metrics.jsonl, grid_before.png / grid_after.png, reward_curve.png,
summary.json, ckpt.pt (atomic; `--resume` continues exactly where it stopped).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import config
import evaluate
import toy
import toy_policy
import unigrpo


def build_policy(cfg, start=None):
    """The policy of cfg.model: the toy's (random init) or an official checkpoint; with `start`, holding
    its weights."""
    if cfg.model == "toy":
        policy = toy_policy.build_policy(cfg.seed, cfg.device)
    else:
        policy = checkpoint.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    if start is not None:
        policy.load_state_dict(start.state_dict())
    return policy


def build_reward(cfg):
    if cfg.model == "toy":
        return toy.ToyReward()
    raise SystemExit(f"error: --model={cfg.model} is a readable checkpoint, but real reward models for "
                     f"--bagel are not wired yet (README, 'BAGEL-7B-MoT')")


def check_fits(policy, cfg):
    """The run's sizes fit the model (and the toy world), before any work."""
    try:
        policy.latent_shape(cfg.image_hw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.model == "toy" and tuple(cfg.image_hw) != (toy.IMAGE_SIZE, toy.IMAGE_SIZE):
        raise SystemExit(f"error: image_hw={cfg.image_hw}: the toy world's images are "
                         f"{toy.IMAGE_SIZE}x{toy.IMAGE_SIZE}")
    if cfg.max_think_tokens + 2 >= policy.cfg.max_position_embeddings:
        raise SystemExit(f"error: max_think_tokens={cfg.max_think_tokens} does not fit the model's "
                         f"{policy.cfg.max_position_embeddings} positions")


def log_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None):
    cfg, args = config.parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.model != "toy":
        try:                                             # a bad folder fails before anything else
            checkpoint.check_pretrained_folder(cfg.model)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: --model={cfg.model}: {e}") from None
    reward_fn = build_reward(cfg)
    with checkpoint.run_folder(Path(cfg.out_dir) / cfg.name, args.resume, args.overwrite) as run_dir:
        try:
            return run(cfg, run_dir, args.resume, reward_fn)
        except checkpoint.CorruptFile as e:
            raise SystemExit(f"error: {e}") from None
        except FloatingPointError as e:
            ckpt = run_dir / "ckpt.pt"
            kept = f"{ckpt} keeps the last good checkpoint" if ckpt.exists() else "no checkpoint written"
            raise SystemExit(f"error: {e}; the run stopped, {kept}") from None


def run(cfg, run_dir: Path, resume: bool, reward_fn, log=print) -> dict:
    ckpt, metrics = run_dir / "ckpt.pt", run_dir / "metrics.jsonl"
    state = checkpoint.load_training(ckpt) if resume and ckpt.exists() else None
    if state is not None:
        checkpoint.check_same_run(state["config"], cfg, ckpt)
    else:
        metrics.unlink(missing_ok=True)                  # an unfinished run with no checkpoint starts over
    summary = {"config": dataclasses.asdict(cfg), "seconds": {}}
    torch.manual_seed(cfg.seed)

    policy = build_policy(cfg)
    check_fits(policy, cfg)
    if state is not None and set(state["policy"]) != set(policy.state_dict()):
        raise SystemExit(f"error: {ckpt} holds the weights of another model; --overwrite starts over")
    summary["seconds"]["sft"] = toy_policy.sft(policy, cfg, Path(cfg.out_dir) / "sft-cache", log)
    evaluate.evaluate_stage(policy, cfg, run_dir, "before", summary, log)

    ref, ref_id = None, None                             # theta_ref: the policy RL starts from
    if unigrpo.needs_reference(cfg):
        ref = unigrpo.reference_policy(lambda: build_policy(cfg, start=policy))
        ref_id = checkpoint.fingerprint(ref.state_dict())
    opt = unigrpo.make_optimizer(policy, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start = 0
    if state is not None:
        saved = state.get("ref")                          # a fingerprint (older checkpoints: weights)
        saved = checkpoint.fingerprint(saved) if isinstance(saved, dict) else saved
        if saved is not None and saved != ref_id:
            raise SystemExit(f"error: {ckpt}: the frozen reference differs from the one this run "
                             f"started from (its SFT was retrained on another CPU or thread count?)")
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
        checkpoint.truncate_jsonl(metrics, start)
        log(f"resumed from {ckpt} at RL step {start}")

    t0 = time.time()
    for step in (bar := tqdm(range(start, cfg.rl_steps), desc="UniGRPO", dynamic_ncols=True, disable=None)):
        ts = time.time()
        prompts = toy.train_prompts(cfg.seed, step, cfg.prompts_per_step)
        try:
            ro = unigrpo.rollout(policy, prompts, reward_fn, cfg, gen)
            stats = unigrpo.update(policy, ref, opt, ro, cfg, gen)
        except FloatingPointError as e:
            raise FloatingPointError(f"RL step {step}: {e}") from None
        record = {"step": step, **unigrpo.rollout_stats(ro, cfg.group_size), **stats,
                  "step_time": time.time() - ts}
        log_jsonl(metrics, record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.rl_steps:
            checkpoint.save_training(ckpt, step + 1, policy, opt, gen, cfg, ref_id)
    summary["seconds"]["rl"] = time.time() - t0

    evaluate.evaluate_stage(policy, cfg, run_dir, "after", summary, log)
    if metrics.exists() and metrics.stat().st_size:
        evaluate.plot_curve(run_dir / "reward_curve.png", metrics)
    text = json.dumps(summary, indent=1)
    checkpoint.atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
    log(f"artifacts in {run_dir}/")
    return summary


if __name__ == "__main__":
    main()
