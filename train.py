"""train.py: the UniGRPO training loop, its presets, checkpoints and artifacts.

    python train.py --toy                      # SFT warm-up + UniGRPO on the toy world, laptop CPU
    python train.py --toy --train_parts=image  # any Config field can be overridden: --key=value
    python train.py --bagel --model=/path/to/BAGEL-7B-MoT   (loads the checkpoint; reward models, FSDP2 and
                                                            torchrun are the road ahead: see README)

The loop (main) reads as a handful of named calls; the algorithm is in unigrpo.py, the equations in
losses.py and sampler.py, the model in model.py, the toy world and its verifier in reward.py.
Artifacts in runs/<name>/: metrics.jsonl, grid_before.png / grid_after.png, reward_curve.png,
summary.json, ckpt.pt (atomic; `--resume` continues exactly where it stopped).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import model as model_lib
import reward
import unigrpo
from unigrpo import Config

# ------------------------------------------------------------------------------------------------ presets
PRESETS = {
    # Laptop CPU, fp32, minutes. Sizes and rates follow reference/toy_feasibility.md; see README for results.
    # reg_weight 0.01 (paper 1.5e-5): at toy scale the paper's weight leaves the velocity MSE ~1000x weaker than
    # the policy gradient, and the background pixels, which the reward cannot see, drift into speckle.
    # sft_noise 0.3: the SFT triples are imperfect like real paired data (30% of plans wrong for their prompt,
    # 30% of images off their plan); with clean triples 1200 steps already give TA 0.98, leaving RL nothing to do.
    # lr_reasoning 6e-5: at 3e-5 the reasoning barely moved (text clip fraction ~0.002; README, Results).
    "toy": dict(name="toy", model="toy", image_hw=(32, 32), prompts_per_step=8, group_size=8,
                max_think_tokens=20, num_steps=10, window_start=(0, 5), window_size=3,
                lr_reasoning=6e-5, lr_denoising=1e-4, clip_text=0.2, clip_flow=1e-4, reg_weight=0.01,
                sft_steps=1200, sft_batch=64, sft_lr=1e-3, sft_ema=0.99, sft_mse_weight=10.0, sft_noise=0.3,
                rl_steps=140, ckpt_every=10, eval_per_category=256, eval_steps=20),
    # The paper's setting (BAGEL-7B-MoT, 1024 px); the defaults of Config are the paper's numbers.
    "bagel": dict(name="bagel", model="", dtype="bfloat16", device="cuda", image_hw=(1024, 1024),
                  rl_steps=1000, eval_per_category=0),
}


def parse_args(argv) -> tuple[Config, bool]:
    """`--toy`/`--bagel` picks a preset; `--key=value` (or `--key value`) overrides any Config field."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    preset, overrides, resume = None, {}, False
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("--toy", "--bagel"):
            preset = a[2:]
        elif a == "--resume":
            resume = True
        elif a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            if key not in fields:
                raise SystemExit(f"error: unknown option --{key}: presets are --toy and --bagel; "
                                 f"config keys are {', '.join(sorted(fields))}")
            if not eq:
                if not args:
                    raise SystemExit(f"error: --{key} needs a value")
                val = args.pop(0)
            overrides[key] = _parse_value(key, val, getattr(Config, key, None))
        else:
            raise SystemExit(f"error: unexpected argument {a!r}; use --toy, --bagel, --resume or --key=value")
    if preset is None:
        raise SystemExit("error: choose a preset: --toy or --bagel")
    cfg = dataclasses.replace(Config(), **PRESETS[preset])
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.model != "toy" and not (cfg.model and Path(cfg.model).is_dir()):
        raise SystemExit(f"error: --model={cfg.model!r} is not a folder: --bagel needs "
                         f"--model=/path/to/BAGEL-7B-MoT (the official checkpoint layout)")
    try:
        return cfg.validate(), resume
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def _parse_value(key, val: str, default):
    try:
        if isinstance(default, bool):
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        if isinstance(default, tuple):
            return tuple(int(v) for v in val.split(","))
        if isinstance(default, int):
            return int(val)
        if isinstance(default, float) or default is None:
            return None if val.lower() == "none" else float(val)
        return val
    except ValueError:
        raise SystemExit(f"error: --{key}={val!r} is not a valid {type(default).__name__}") from None


# ------------------------------------------------------------------------------------------ building blocks
def build_policy(cfg: Config):
    torch.manual_seed(cfg.seed)
    if cfg.model == "toy":
        tok = model_lib.WordTokenizer(reward.vocabulary())
        bcfg = model_lib.BagelConfig.toy(tok, ground_words=reward.cell_tokens(), span_end_words=[reward.SEP])
        return model_lib.Policy.from_config(bcfg, tok, seed=cfg.seed).to(cfg.device)
    return model_lib.Policy.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)


def build_reward(cfg: Config):
    if cfg.model == "toy":
        return reward.ToyReward()
    raise NotImplementedError("real reward models for --bagel are not wired yet (see README, 'Road ahead')")


def train_prompts(cfg: Config, step: int, n: int, split="train"):
    """Deterministic per step (so a resumed run sees the same prompts): mixed categories."""
    rng = random.Random(f"{cfg.seed}/{split}/{step}")
    return [reward.make_prompt(reward.CATEGORIES[rng.randrange(len(reward.CATEGORIES))], rng, split)
            for _ in range(n)]


def sft_batch(cfg: Config, step: int):
    """Synthetic (prompt, plan, image) triples: a random valid layout, its canonical plan, its render. With
    sft_noise = p (toy), a triple's plan is wrong with probability p (one corrupt_layout error; the image still
    draws that plan) and, independently, its image with probability p (one error against its plan)."""
    prompts = train_prompts(cfg, step, cfg.sft_batch, split="train")
    rng = random.Random(f"{cfg.seed}/sft-layout/{step}")
    noisy = lambda layout: reward.corrupt_layout(layout, rng) if cfg.sft_noise and rng.random() < cfg.sft_noise \
        else layout
    plans, drawn = [], []
    for p in prompts:
        layout = noisy(reward.random_layout(p, rng))     # the plan (wrong for its prompt with p = sft_noise)
        plans.append(reward.plan_text(layout))
        drawn.append(noisy(layout))                      # the image (off its plan with p = sft_noise)
    return prompts, plans, reward.render_batch(drawn).to(cfg.device)


def sft(policy, cfg: Config, cache_dir: Path, log) -> float:
    """SFT warm-up (both experts, Bagel's losses), cached by its settings so RL can be rerun alone."""
    if cfg.sft_steps == 0:
        return 0.0
    # Keyed by everything the SFT weights depend on: the model's config (vocabulary included), the SFT settings
    # and the data (its first batch's plans, so that a change to the toy world's data is a new key).
    what = [policy.cfg.to_json(), getattr(policy.tokenizer, "vocab", None), cfg.seed,
            *(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.startswith("sft_")),
            sft_batch(cfg, 0)[1]]
    key = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode())
    path = cache_dir / f"sft-{key.hexdigest()[:12]}.pt"
    if path.exists():
        state = load_checkpoint(path)
        policy.load_state_dict(state["policy"])
        log(f"SFT: loaded cached checkpoint {path} (trained in {state.get('seconds', float('nan')):.0f} s)")
        return 0.0
    t0 = time.time()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    params = [p for p in policy.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    policy.train()
    for step in (bar := tqdm(range(cfg.sft_steps), desc="SFT", dynamic_ncols=True, disable=None)):
        prompts, plans, images = sft_batch(cfg, step)
        loss, stats = unigrpo.sft_loss(policy, prompts, plans, images, g, cfg.sft_mse_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        if cfg.sft_ema:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - cfg.sft_ema)
        if step % 50 == 0:
            bar.set_postfix(ce=f"{stats['sft_ce']:.3f}", mse=f"{stats['sft_mse']:.4f}")
    if cfg.sft_ema:  # the EMA weights are the SFT policy (sharper samples after a short run)
        torch._foreach_copy_([p.data for p in params], ema)
    policy.eval()
    seconds = time.time() - t0
    atomic_save({"policy": policy.state_dict(), "seconds": seconds, "steps": cfg.sft_steps}, path)
    return seconds


@torch.no_grad()
def evaluate(policy, cfg: Config, n_per_category: int):
    """Held-out prompts, one reasoning chain each, ODE images: TA score, GenEval-style accuracy, plan validity,
    plan following, background noise."""
    prompts = reward.prompts("eval", n_per_category, seed=cfg.seed + 12345)
    g = torch.Generator().manual_seed(cfg.seed + 777)
    texts, images = [], []
    for i in range(0, len(prompts), 256):
        th, _, img = unigrpo.generate(policy, prompts[i:i + 256], cfg, g, temperature=cfg.eval_temperature,
                                      num_steps=cfg.eval_steps)
        texts += th.texts
        images.append(img)
    images = torch.cat(images)
    result = reward.summarize(reward.score_images(images, prompts), prompts)
    plans = reward.summarize(reward.score_plans(texts, prompts), prompts)
    result.update({k.replace("accuracy", "plan_validity"): v for k, v in plans.items() if k.startswith("accuracy")})
    drawn, planned = reward.plan_following(texts, images)
    result["plan_following"] = drawn / max(planned, 1)
    result["background_noise"] = reward.background_noise(images)
    return result, prompts, texts, images


# ----------------------------------------------------------------------------------- checkpoints, logging
def atomic_save(obj, path: Path):
    """Write to a temp file in the same folder, fsync, then rename: a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise RuntimeError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                           f"delete it to start over") from None


def save_state(path, step, policy, ref, opt, gen, cfg):
    atomic_save({"step": step, "policy": policy.state_dict(), "ref": ref.state_dict() if ref else None,
                 "opt": opt.state_dict(), "gen": gen.get_state(), "config": dataclasses.asdict(cfg)}, path)


def check_same_run(saved: dict, cfg: Config, path: Path):
    """Resume only the run the checkpoint belongs to (rl_steps may grow: that extends the run)."""
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k != "rl_steps" and saved.get(k) != now[k]
            and not (isinstance(now[k], tuple) and tuple(saved.get(k) or ()) == now[k])}
    if diff:
        raise SystemExit(f"error: {path} was written with another config ({diff}: saved vs now); "
                         f"rerun with the same settings, or without --resume to start over")


def log_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int):
    """On resume, drop metrics logged after the checkpoint (and a line torn by the kill), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) < step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def save_grid(path: Path, prompts, texts, images, per_category: int, title: str, per_row=3):
    """A PNG of a fixed slice of the evaluation set (two prompts per category): image, prompt, reasoning, verdict."""
    from PIL import Image, ImageDraw
    pick = [i for c in range(len(prompts) // per_category) for i in (c * per_category, c * per_category + 1)]
    scores = reward.score_images(images[pick], [prompts[i] for i in pick])
    cell_w, img_px, rows = 300, 96, -(-len(pick) // per_row)
    canvas = Image.new("RGB", (cell_w * per_row, 20 + rows * (img_px + 52)), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 4), title, fill="black")
    for j, i in enumerate(pick):
        x, y = (j % per_row) * cell_w, 20 + (j // per_row) * (img_px + 52)
        arr = (images[i].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
        canvas.paste(Image.fromarray(arr).resize((img_px, img_px), Image.NEAREST), (x + 4, y))
        ok = bool(scores.all_correct[j])
        d.text((x + img_px + 8, y), ("OK " if ok else "X ") + f"{scores.points[j]:.2f}",
               fill="green" if ok else "red")
        d.text((x + img_px + 8, y + 14), _wrap(prompts[i].text, 28), fill="black")
        d.text((x + 4, y + img_px + 2), _wrap(texts[i], 46), fill="gray")
    canvas.save(path)


def _wrap(s, w):
    return "\n".join(s[i:i + w] for i in range(0, min(len(s), 3 * w), w))


def plot_curve(path: Path, metrics_path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward_mean"] for r in rows], lw=0.8, label="train reward (mean exam points)")
    k = 10
    smooth = [sum(r["reward_mean"] for r in rows[max(0, i - k + 1):i + 1]) / len(rows[max(0, i - k + 1):i + 1])
              for i in range(len(rows))]
    ax.plot(steps, smooth, lw=2, label=f"moving mean ({k})")
    ax.set_xlabel("RL step"), ax.set_ylabel("reward"), ax.legend(), fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main
def evaluate_stage(policy, cfg: Config, run_dir: Path, stage: str, summary: dict, log):
    """Held-out evaluation of one stage ("before" / "after" RL): scores into summary, a PNG grid, one log line."""
    if cfg.eval_per_category == 0:
        return
    t0 = time.time()
    result, prompts, texts, images = evaluate(policy, cfg, cfg.eval_per_category)
    summary["seconds"][f"eval_{stage}"] = time.time() - t0
    summary[stage] = result
    save_grid(run_dir / f"grid_{stage}.png", prompts, texts, images, cfg.eval_per_category, f"{stage} RL")
    log(f"{stage:>6} RL: TA {result['ta']:.3f}  accuracy {result['accuracy']:.3f}  "
        f"plan validity {result['plan_validity']:.3f}  plan following {result['plan_following']:.3f}  "
        f"({len(prompts)} held-out prompts)")


def main(argv=None):
    cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt, metrics = run_dir / "ckpt.pt", run_dir / "metrics.jsonl"
    log = print
    summary = {"config": dataclasses.asdict(cfg), "seconds": {}}

    reward_fn = build_reward(cfg)
    policy = build_policy(cfg)
    summary["seconds"]["sft"] = sft(policy, cfg, Path(cfg.out_dir) / "sft-cache", log)
    evaluate_stage(policy, cfg, run_dir, "before", summary, log)

    ref = unigrpo.reference_copy(policy)
    opt = unigrpo.make_optimizer(policy, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start = 0
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        check_same_run(state["config"], cfg, ckpt)
        policy.load_state_dict(state["policy"]), ref.load_state_dict(state["ref"])
        opt.load_state_dict(state["opt"]), gen.set_state(state["gen"])
        start = state["step"]
        truncate_jsonl(metrics, start)
        log(f"resumed from {ckpt} at RL step {start}")
    else:  # a fresh run: nothing of an earlier run in this folder may be resumed into it
        for stale in (metrics, ckpt):
            stale.unlink(missing_ok=True)

    t0 = time.time()
    for step in (bar := tqdm(range(start, cfg.rl_steps), desc="UniGRPO", dynamic_ncols=True, disable=None)):
        ts = time.time()
        prompts = train_prompts(cfg, step, cfg.prompts_per_step)
        ro = unigrpo.rollout(policy, prompts, reward_fn, cfg, gen)
        stats = unigrpo.update(policy, ref, opt, ro, cfg, gen)
        record = {"step": step, **unigrpo.rollout_stats(ro, cfg.group_size), **stats, "step_time": time.time() - ts}
        log_jsonl(metrics, record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.rl_steps:
            save_state(ckpt, step + 1, policy, ref, opt, gen, cfg)
    summary["seconds"]["rl"] = time.time() - t0

    evaluate_stage(policy, cfg, run_dir, "after", summary, log)
    if metrics.exists() and metrics.stat().st_size:
        plot_curve(run_dir / "reward_curve.png", metrics)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"artifacts in {run_dir}/")
    return summary


if __name__ == "__main__":
    main()
