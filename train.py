"""train.py: the UniGRPO training loop.

    python train.py --toy                      # SFT warm-up + UniGRPO on the toy world, laptop CPU
    python train.py --toy --train_parts=image  # any Config field: --key=value (python train.py --help)
    python train.py --toy --resume             # continue a killed run exactly (--overwrite: start over)
    python train.py --bagel --model=/path/to/BAGEL-7B-MoT --prompts=train.txt --reward=clip:/path/to/clip
    python train.py --bagel --model=runs/bagel/model --eval_only --eval_prompts=evaluation_metadata.jsonl \
        --reward=geneval:/path/to/geneval --eval_cfg=1,4   # evaluate a folder, with and without CFG

main() reads as a handful of named calls at every scale: the algorithm is in unigrpo.py, the equations in
losses.py and sampler.py, the model in model.py, the config in config.py, checkpoints in checkpoint.py, the
toy world in toy.py and its base policy in toy_policy.py, prompt files in prompts.py, reward models in
reward.py (GenEval's rules in geneval.py), evaluation in evaluate.py.
Artifacts in <out_dir>/<name>/: metrics.jsonl, grid_before.png / grid_after.png (more CFG scales:
grid_<stage>_cfg<s>.png), reward_curve.png, summary.json, ckpt.pt (atomic; `--resume` continues exactly where
it stopped), model/ (--bagel: the trained policy in the official layout).
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
import prompts
import reward
import toy
import toy_policy
import unigrpo


# metrics that measure the machine, not the algorithm: they differ between two runs of the same config
TIMING = ("step_time", "rollout_time", "images_per_s", "peak_mem_gb")


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


def build_reward(cfg, spec: str | None = None):
    """The toy world's exact verifier, or the reward models of a --reward spec (default cfg.reward),
    loaded from local folders."""
    if cfg.model == "toy":
        return toy.ToyReward()
    return reward.build_reward(spec or cfg.reward, device=cfg.device, batch_size=cfg.reward_batch)


def _checked_spec(text: str, flag: str) -> list:
    if text == "toy":
        raise ValueError(f"{flag}=toy is the toy world's verifier: a checkpoint needs "
                         f"{flag}=kind:folder[@weight],... (kinds: {', '.join(reward.KINDS)})")
    try:
        specs = reward.parse_reward_spec(text)
        reward.check_reward_spec(specs)
    except ValueError as e:
        raise ValueError(str(e) if flag == "--reward" else f"{flag}: {e}") from None
    return specs


def read_inputs(cfg, eval_only: bool):
    """(train prompts, eval prompts) of a checkpoint run, after checking the files and the --reward /
    --eval_reward specs, before any model is loaded; (None, None) for the toy, which draws its own."""
    if cfg.model == "toy":
        if eval_only:
            raise SystemExit("error: --eval_only evaluates a checkpoint folder: --bagel --model=FOLDER")
        return None, None
    try:
        train_specs = [] if eval_only and cfg.eval_reward else _checked_spec(cfg.reward, "--reward")
        eval_specs = _checked_spec(cfg.eval_reward, "--eval_reward") if cfg.eval_reward else train_specs
        if eval_only and not cfg.eval_prompts:
            raise ValueError("--eval_only needs --eval_prompts=FILE")
        if not eval_only and not cfg.prompts:
            raise ValueError("--bagel needs --prompts=FILE (.txt one prompt a line, .jsonl, or GenEval's "
                             "evaluation_metadata.jsonl)")
        train_set = prompts.load_prompts(cfg.prompts) if cfg.prompts and not eval_only else None
        eval_set = prompts.load_prompts(cfg.eval_prompts) if cfg.eval_prompts else None
        for path, rows, specs in ((cfg.prompts, train_set, train_specs),
                                  (cfg.eval_prompts, eval_set, eval_specs)):
            message = rows and reward.needs_metadata(specs) and prompts.needs_metadata_error(rows, path)
            if message:
                raise ValueError(message)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return train_set, eval_set


def train_batch(cfg, train_set, step: int) -> list:
    """The prompts of RL step `step`: the toy world's stream, or the seeded epochs of --prompts."""
    if train_set is None:
        return toy.train_prompts(cfg.seed, step, cfg.prompts_per_step)
    return prompts.batch(train_set, cfg.seed, step, cfg.prompts_per_step)


def peak_memory_gb(device) -> float:
    """Peak accelerator memory of this process (CUDA), else its peak resident host memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20       # Linux: KiB


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
            if cfg.image_hw == (0, 0):
                largest = checkpoint.config_from_folder(cfg.model).image_hw
                cfg = dataclasses.replace(cfg, image_hw=tuple(largest))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: --model={cfg.model}: {e}") from None
    train_set, eval_set = read_inputs(cfg, args.eval_only)
    try:
        reward_fn = None if args.eval_only and cfg.eval_reward else build_reward(cfg)
        eval_fn = build_reward(cfg, cfg.eval_reward) if cfg.eval_reward else reward_fn
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --reward={cfg.reward} / --eval_reward={cfg.eval_reward}: {e}") from None
    with checkpoint.run_folder(Path(cfg.out_dir) / cfg.name, args.resume, args.overwrite) as run_dir:
        try:
            if args.eval_only:
                return evaluate_only(cfg, run_dir, eval_fn, eval_set)
            return run(cfg, run_dir, args.resume, reward_fn, train_set=train_set, eval_set=eval_set,
                       eval_fn=eval_fn)
        except checkpoint.CorruptFile as e:
            raise SystemExit(f"error: {e}") from None
        except FloatingPointError as e:
            ckpt = run_dir / "ckpt.pt"
            kept = f"{ckpt} keeps the last good checkpoint" if ckpt.exists() else "no checkpoint written"
            raise SystemExit(f"error: {e}; the run stopped, {kept}") from None


def write_summary(run_dir: Path, summary: dict):
    text = json.dumps(summary, indent=1)
    checkpoint.atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))


def evaluate_only(cfg, run_dir: Path, eval_fn, eval_set, log=print) -> dict:
    """--eval_only: the policy of --model on --eval_prompts at each CFG scale; summary.json and grids."""
    summary = {"config": dataclasses.asdict(cfg), "seconds": {}}
    policy = build_policy(cfg)
    check_fits(policy, cfg)
    evaluate.evaluate_stage(policy, cfg, run_dir, "eval", summary, log, eval_set, eval_fn)
    write_summary(run_dir, summary)
    log(f"artifacts in {run_dir}/")
    return summary


def run(cfg, run_dir: Path, resume: bool, reward_fn, log=print, train_set=None, eval_set=None,
        eval_fn=None) -> dict:
    """SFT (toy), evaluation, UniGRPO steps with checkpoints, evaluation, artifacts. eval_fn scores the
    evaluation (default: reward_fn)."""
    eval_fn = eval_fn or reward_fn
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
    evaluate.evaluate_stage(policy, cfg, run_dir, "before", summary, log, eval_set, eval_fn)

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
        try:
            ro = unigrpo.rollout(policy, train_batch(cfg, train_set, step), reward_fn, cfg, gen)
            tr = time.time()
            stats = unigrpo.update(policy, ref, opt, ro, cfg, gen)
        except FloatingPointError as e:
            raise FloatingPointError(f"RL step {step}: {e}") from None
        te = time.time()
        record = {"step": step, **unigrpo.rollout_stats(ro, cfg.group_size), **stats,
                  "step_time": te - ts, "rollout_time": tr - ts, "images_per_s": len(ro.rewards) / (tr - ts),
                  "peak_mem_gb": peak_memory_gb(cfg.device)}
        log_jsonl(metrics, record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.rl_steps:
            checkpoint.save_training(ckpt, step + 1, policy, opt, gen, cfg, ref_id)
    summary["seconds"]["rl"] = time.time() - t0

    evaluate.evaluate_stage(policy, cfg, run_dir, "after", summary, log, eval_set, eval_fn)
    if metrics.exists() and metrics.stat().st_size:
        evaluate.plot_curve(run_dir / "reward_curve.png", metrics)
    if cfg.save_model and cfg.model != "toy":
        checkpoint.save_pretrained(policy, run_dir / "model", int(cfg.export_shard_gb * 2 ** 30) or None)
    write_summary(run_dir, summary)
    log(f"artifacts in {run_dir}/")
    return summary


if __name__ == "__main__":
    main()
