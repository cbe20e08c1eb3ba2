"""train.py: the UniGRPO training loop.

    python train.py --toy                      # SFT warm-up + UniGRPO on the toy world, laptop CPU
    python train.py --toy --train_parts=image  # any Config field: --key=value (python train.py --help)
    python train.py --toy --resume             # continue a killed run exactly (--overwrite: start over)
    python train.py --bagel --model=/path/to/BAGEL-7B-MoT --prompts=train.txt --reward=clip:/path/to/clip
    python train.py --bagel --model=runs/bagel/model --eval_only --eval_prompts=evaluation_metadata.jsonl \
        --reward=geneval:/path/to/geneval --eval_cfg=1,4   # evaluate a folder, with and without CFG
    torchrun --nproc_per_node=8 train.py --bagel --model=... --prompts=... --reward=...   # FSDP2, same numbers
    python train.py --bagel --model=... --name=NAME --export_only --export_to=DIR        # a checkpoint, exported

main() reads as a handful of named calls at every scale: the algorithm is in unigrpo.py, the equations in
losses.py and sampler.py, the model in model.py, the config in config.py, checkpoints in checkpoint.py, the
toy world in toy.py and its base policy in toy_policy.py, prompt files in prompts.py, reward models in
reward.py (GenEval's rules in geneval.py), evaluation in evaluate.py, ranks and sharding in distributed.py,
adapters in lora.py.
Artifacts in <out_dir>/<name>/: metrics.jsonl, grid_before.png / grid_after.png (more CFG scales:
grid_<stage>_cfg<s>.png), reward_curve.png, summary.json, ckpt.pt (atomic; `--resume` continues exactly where
it stopped; under torchrun ckpt/step-N/, DCP), model/ (--bagel: the trained policy in the official layout;
--export_to elsewhere).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import config
import distributed
import evaluate
import lora
import prompts
import reward
import toy
import toy_policy
import unigrpo


# metrics that measure the machine, not the algorithm: they differ between two runs of the same config
TIMING = ("step_time", "rollout_time", "images_per_s", "peak_mem_gb")


def build_policy(cfg, start=None, world=distributed.World(), adapters=True):
    """The policy of cfg.model: the toy's (random init) or an official checkpoint; with `start`, holding
    its weights. Under torchrun: fp32 master weights sharded by FSDP2, each rank reading its rows, LoRA
    adapters (if any) added before sharding."""
    if world.on:
        def prepare(p):
            if adapters and cfg.lora_rank:
                lora.add_lora(p, cfg.lora_rank, cfg.lora_alpha, cfg.lora_experts, seed=cfg.seed)
            distributed.shard(p, cfg)
        policy = checkpoint.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device, prepare=prepare)
    elif cfg.model == "toy":
        policy = toy_policy.build_policy(cfg.seed, cfg.device)
    else:
        policy = checkpoint.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    if start is not None:
        policy.load_state_dict(start.state_dict())
    policy.attention = cfg.attention
    policy.model.checkpoint_layers = cfg.activation_checkpointing
    return policy


def start_rl(cfg, policy, world):
    """The frozen reference theta_ref (the policy RL starts from) and its fingerprint (None where not
    computed), then LoRA adapters on the policy when asked for. With adapters on every trained expert the
    reference is the same model with its adapters off; else a second model (under torchrun sharded alike,
    read from cfg.model)."""
    adapted = set(lora.EXPERTS[cfg.lora_experts]) if cfg.lora_rank else set()
    ref, ref_id = None, None
    if unigrpo.needs_reference(cfg) and not set(unigrpo.TRAINED_EXPERTS[cfg.train_parts]) <= adapted:
        if world.on:
            ref = unigrpo.reference_policy(lambda: build_policy(cfg, world=world, adapters=False))
        else:
            ref = unigrpo.reference_policy(lambda: build_policy(cfg, start=policy))
            ref_id = checkpoint.fingerprint(ref.state_dict())
    if cfg.lora_rank and not lora.is_lora(policy):
        lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_experts, seed=cfg.seed)
    if unigrpo.needs_reference(cfg) and ref is None:
        ref = lora.AdaptersOff(policy)
    return ref, ref_id


def build_reward(cfg, spec: str | None = None):
    """The toy world's exact verifier, or the reward models of a --reward spec (default cfg.reward),
    loaded from local folders."""
    if cfg.model == "toy":
        return toy.ProxyReward.load(cfg.proxy_file) if cfg.proxy_file else toy.ToyReward()
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


def metrics_sink(cfg, run_dir: Path | None):
    """--log_to: a function logging each step's record to wandb or TensorBoard (rank 0), None when not
    asked for; run_dir None only checks that the package is installed (before any model work)."""
    if not cfg.log_to:
        return None
    package = {"wandb": "wandb", "tensorboard": "tensorboard"}[cfg.log_to]
    try:
        __import__(package)
    except ImportError:
        raise SystemExit(f"error: --log_to={cfg.log_to} needs the {package} package (pip install {package}); "
                         f"metrics.jsonl is written either way") from None
    if run_dir is None:
        return None
    if cfg.log_to == "wandb":
        import wandb
        wandb.init(project="unigrpo", name=cfg.name, config=dataclasses.asdict(cfg), dir=str(run_dir))
        return lambda record: wandb.log(record, step=record["step"])
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(record):
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(k, v, record["step"])
        writer.flush()
    return log


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
    if args.export_only and not cfg.export_to:
        raise SystemExit("error: --export_only needs --export_to=FOLDER")
    distributed.check_world(cfg, distributed.World(size=int(os.environ.get("WORLD_SIZE", 1))))
    metrics_sink(cfg, None)
    train_set, eval_set = (None, None) if args.export_only else read_inputs(cfg, args.eval_only)
    try:
        reward_fn = None if (args.eval_only and cfg.eval_reward) or args.export_only else build_reward(cfg)
        eval_fn = build_reward(cfg, cfg.eval_reward) if cfg.eval_reward else reward_fn
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --reward={cfg.reward} / --eval_reward={cfg.eval_reward}: {e}") from None
    cfg, world = distributed.setup(cfg)
    try:
        with checkpoint.run_folder(Path(cfg.out_dir) / cfg.name, args.resume or args.export_only,
                                   args.overwrite, hold=world.main) as run_dir:
            distributed.barrier()                        # rank 0 has checked (and cleared) the folder
            try:
                if args.eval_only:
                    return evaluate_only(cfg, run_dir, eval_fn, eval_set, world=world)
                if args.export_only:
                    return export_checkpoint(cfg, run_dir, world)
                return run(cfg, run_dir, args.resume, reward_fn, train_set=train_set, eval_set=eval_set,
                           eval_fn=eval_fn, world=world)
            except checkpoint.CorruptFile as e:
                raise SystemExit(f"error: {e}") from None
            except FloatingPointError as e:
                last = (checkpoint.step_folders(run_dir) or [run_dir / "ckpt.pt"])[-1]
                kept = f"{last} keeps the last good checkpoint" if last.exists() else "no checkpoint written"
                raise SystemExit(f"error: {e}; the run stopped, {kept}") from None
    finally:
        distributed.teardown()


def write_summary(run_dir: Path, summary: dict):
    text = json.dumps(summary, indent=1)
    checkpoint.atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))


def evaluate_only(cfg, run_dir: Path, eval_fn, eval_set, log=print, world=distributed.World()) -> dict:
    """--eval_only: the policy of --model on --eval_prompts at each CFG scale; summary.json and grids."""
    summary = {"config": dataclasses.asdict(cfg), "seconds": {}}
    policy = build_policy(cfg, world=world)
    check_fits(policy, cfg)
    evaluate_all(policy, cfg, run_dir, "eval", summary, log, eval_set, eval_fn, world)
    if world.main:
        write_summary(run_dir, summary)
        log(f"artifacts in {run_dir}/")
    return summary


def evaluate_all(policy, cfg, run_dir, stage, summary, log, eval_set, eval_fn, world):
    """One evaluation stage on the unsharded weights; under torchrun every rank computes the same
    numbers and rank 0 writes."""
    with distributed.unsharded(policy):
        evaluate.evaluate_stage(policy, cfg, run_dir, stage, summary, log if world.main else _quiet,
                                eval_set, eval_fn, write=world.main)


def _quiet(*args, **kwargs):
    pass


def find_checkpoint(cfg, run_dir: Path, world):
    """The newest checkpoint of the run, its config checked against cfg before any model work: torchrun's
    step folders (any rank count, DCP) first, then one process's ckpt.pt (loaded here); None if there
    is none."""
    steps = checkpoint.step_folders(run_dir)
    if steps:
        meta = checkpoint.read_json(steps[-1] / "state.json")
        checkpoint.check_same_run(meta.get("config", {}) if isinstance(meta, dict) else {}, cfg, steps[-1])
        return steps[-1]
    ckpt = run_dir / "ckpt.pt"
    if not ckpt.exists():
        return None
    if world.on:
        raise SystemExit(f"error: {ckpt} was written by one process (python train.py); resume it the same "
                         f"way, or start over with --overwrite")
    state = checkpoint.load_training(ckpt)
    checkpoint.check_same_run(state["config"], cfg, ckpt)
    return state


def resume_state(saved, cfg, policy, opt, gen, ref_id, world, log) -> int:
    """Load a checkpoint of find_checkpoint into policy, optimizer and generator: the RL step to go on
    from (0: none)."""
    if saved is None:
        return 0
    if isinstance(saved, Path):
        start = checkpoint.load_step(saved, policy, opt, gen, cfg, world)
        log(f"resumed from {saved} at RL step {start}")
        return start
    if set(saved["policy"]) != set(policy.state_dict()):
        raise SystemExit("error: ckpt.pt holds the weights of another model; --overwrite starts over")
    ref = saved.get("ref")                                # a fingerprint (older checkpoints: weights)
    ref = checkpoint.fingerprint(ref) if isinstance(ref, dict) else ref
    if ref is not None and ref_id is not None and ref != ref_id:
        raise SystemExit("error: ckpt.pt: the frozen reference differs from the one this run started "
                         "from (its SFT was retrained on another CPU or thread count?)")
    policy.load_state_dict(saved["policy"])
    opt.load_state_dict(saved["opt"])
    gen.set_state(saved["gen"])
    log(f"resumed from ckpt.pt at RL step {saved['step']}")
    return saved["step"]


def save_state(cfg, run_dir: Path, step: int, policy, opt, gen, ref_id, world):
    if world.on:
        checkpoint.save_step(run_dir, step, policy, opt, gen, cfg, world, cfg.ckpt_keep)
    else:
        checkpoint.save_training(run_dir / "ckpt.pt", step, policy, opt, gen, cfg, ref_id)


def export(policy, cfg, run_dir: Path, world):
    """The trained policy in the official layout at --export_to (default <run>/model), in cfg.dtype,
    streamed tensor by tensor; LoRA adapters merged."""
    folder = Path(cfg.export_to) if cfg.export_to else run_dir / "model"
    checkpoint.save_pretrained(policy, folder, int(cfg.export_shard_gb * 2 ** 30) or None,
                               dtype=getattr(torch, cfg.dtype), write=world.main)
    distributed.barrier()
    return folder


def export_checkpoint(cfg, run_dir: Path, world, log=print):
    """--export_only: the run's newest checkpoint to --export_to, no training."""
    saved = find_checkpoint(cfg, run_dir, world)
    if saved is None:
        raise SystemExit(f"error: {run_dir} holds no checkpoint to export")
    policy = build_policy(cfg, world=world)
    if cfg.lora_rank and not lora.is_lora(policy):
        lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_experts, seed=cfg.seed)
    opt = unigrpo.make_optimizer(policy, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    step = resume_state(saved, cfg, policy, opt, gen, None, world, log if world.main else _quiet)
    folder = export(policy, cfg, run_dir, world)
    if world.main:
        log(f"exported the policy of RL step {step} to {folder}/")
    return folder


def run(cfg, run_dir: Path, resume: bool, reward_fn, log=print, train_set=None, eval_set=None,
        eval_fn=None, world=distributed.World()) -> dict:
    """SFT (toy), evaluation, UniGRPO steps with checkpoints, evaluation, artifacts. eval_fn scores the
    evaluation (default: reward_fn). Under torchrun each rank rolls out its share of every step's
    groups; rank 0 logs and writes."""
    eval_fn, log = eval_fn or reward_fn, log if world.main else _quiet
    metrics = run_dir / "metrics.jsonl"
    saved = find_checkpoint(cfg, run_dir, world) if resume else None
    summary = {"config": dataclasses.asdict(cfg), "seconds": {}}
    torch.manual_seed(cfg.seed)

    policy = build_policy(cfg, world=world)
    check_fits(policy, cfg)
    summary["seconds"]["sft"] = toy_policy.sft(policy, cfg, Path(cfg.out_dir) / "sft-cache", log)
    evaluate_all(policy, cfg, run_dir, "before", summary, log, eval_set, eval_fn, world)

    ref, ref_id = start_rl(cfg, policy, world)           # theta_ref: the policy RL starts from
    opt = unigrpo.make_optimizer(policy, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 2)    # what every rank shares: windows, stream keys
    start = resume_state(saved, cfg, policy, opt, gen, ref_id, world, log)
    if start and world.main:
        checkpoint.truncate_jsonl(metrics, start)
    elif world.main:
        metrics.unlink(missing_ok=True)                  # an unfinished run with no checkpoint starts over

    sink = metrics_sink(cfg, run_dir) if world.main else None
    t0 = time.time()
    bar = tqdm(range(start, cfg.rl_steps), desc="UniGRPO", dynamic_ncols=True, disable=None if world.main else True)
    for step in bar:
        ts = time.time()
        mine, first = distributed.my_prompts(train_batch(cfg, train_set, step), world)
        try:
            with distributed.unsharded(policy):
                ro = unigrpo.rollout(policy, mine, reward_fn, cfg, gen, first_row=first * cfg.group_size)
            tr = time.time()
            stats = unigrpo.update(policy, ref, opt, ro, cfg, gen)
        except FloatingPointError as e:
            raise FloatingPointError(f"RL step {step}: {e}") from None
        te = time.time()
        if isinstance(reward_fn, toy.ProxyReward):     # the truth the proxy stands in for (Fig. 5)
            stats["verifier_mean"] = toy.ToyReward()(ro.images, ro.prompts).mean().item()
        record = {"step": step, **unigrpo.rollout_stats(ro, cfg.group_size), **stats,
                  "step_time": te - ts, "rollout_time": tr - ts, "peak_mem_gb": peak_memory_gb(cfg.device)}
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.rl_steps):
            with distributed.unsharded(policy):           # every rank computes the same numbers
                record.update(evaluate.curve_point(policy, cfg, eval_set, eval_fn))
        record = distributed.mean_over_ranks(record)
        record["images_per_s"] = len(ro.rewards) * world.size / record["rollout_time"]
        if world.main:
            log_jsonl(metrics, record)
            if sink is not None:
                sink(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.rl_steps:
            save_state(cfg, run_dir, step + 1, policy, opt, gen, ref_id, world)
    summary["seconds"]["rl"] = time.time() - t0

    evaluate_all(policy, cfg, run_dir, "after", summary, log, eval_set, eval_fn, world)
    if world.main and metrics.exists() and metrics.stat().st_size:
        evaluate.plot_curve(run_dir / "reward_curve.png", metrics)
    if (cfg.save_model and cfg.model != "toy") or cfg.export_to:
        export(policy, cfg, run_dir, world)
    if world.main:
        write_summary(run_dir, summary)
        log(f"artifacts in {run_dir}/")
    return summary


if __name__ == "__main__":
    main()
