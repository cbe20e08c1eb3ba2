"""Held-out evaluation and the run's pictures. One reasoning chain and one ODE image per (prompt,
sample), at each CFG scale asked for; scores per category (GenEval's tags, or the toy world's): the
TA-style score and GenEval-style accuracy where the scorer gives verdicts (the toy verifier, the
geneval reward), else the reward's mean; a PNG grid of a fixed slice of the prompts; the reward curve.
The toy adds what only its exact world can measure: plan validity, plan following, background noise.

    result, prompts, texts, images = evaluate.evaluate(policy, cfg, n_per_category=256)   # the toy
    result, rows, texts, images = evaluate.evaluate_prompts(policy, prompts, scorer, cfg, cfg_scale=4.0)
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import torch

import reward
import toy
import unigrpo


@torch.no_grad()
def generate_eval(policy, prompts, cfg, cfg_scale: float, samples: int = 1, by_round: list | None = None):
    """(rows, texts, images in [0, 1]) of the final round for `samples` rows per prompt: eval_temperature,
    eval_steps ODE steps, text CFG at cfg_scale, eval_batch rows per call, a fixed seed. by_round, when
    given, receives (texts, images) of every round (round 1's reasoning, then each reflection)."""
    rows = [p for p in prompts for _ in range(samples)]
    run = dataclasses.replace(cfg, cfg_scale=float(cfg_scale))
    g = torch.Generator().manual_seed(cfg.seed + 777)
    rounds = [([], []) for _ in range(cfg.rounds)]
    for i in range(0, len(rows), cfg.eval_batch):
        th, _, img, later = unigrpo.generate(policy, rows[i:i + cfg.eval_batch], run, g,
                                             temperature=cfg.eval_temperature, num_steps=cfg.eval_steps)
        for (texts, images), (t, x) in zip(rounds, [(th.texts, img), *((r.thoughts.texts, r.images) for r in later)]):
            texts += t
            images.append(x)
    rounds = [(texts, torch.cat(images)) for texts, images in rounds]
    if by_round is not None:
        by_round.extend(rounds)
    return rows, *rounds[-1]


def score(scorer, images: torch.Tensor, rows) -> dict[str, torch.Tensor]:
    """Per-image numbers: {"ta", "accuracy"} from a scorer with verdicts (`scores(images, rows) ->
    (points, all correct)`: the toy verifier, geneval), else {"reward"}; a weighted sum reports its
    {"reward"} and the verdicts of its first part that has them (that part scored once: a judge's
    reward is its points)."""
    if hasattr(scorer, "scores"):
        points, correct = scorer.scores(images, rows)
        return {"ta": points.float(), "accuracy": correct.float()}
    out, total = {}, torch.zeros(len(images))
    for weight, model in getattr(scorer, "parts", None) or [(1.0, scorer)]:
        if hasattr(model, "scores") and "ta" not in out:
            out.update(score(model, images, rows))
            value = out["ta"]
        else:
            value = model(images, rows).float()
        total = total + weight * value
    return {"reward": total, **out}


def evaluate_prompts(policy, prompts, scorer, cfg, cfg_scale: float = 1.0, samples: int = 1):
    """(scores dict, rows, reasoning texts, images) of a prompt set at one CFG scale: the final round's, and with
    rounds > 1 also every round's overall scores (round{r}/<measure>)."""
    rounds = []
    rows, texts, images = generate_eval(policy, prompts, cfg, cfg_scale, samples, by_round=rounds)

    def measures(texts, images):
        return reward.summarize(score(scorer, images, rows), rows)
    return _with_rounds(measures(texts, images), rounds, measures), rows, texts, images


def _with_rounds(result: dict, rounds: list, measures) -> dict:
    """result (the final round's) plus, with several rounds, every round's overall numbers as
    round{r}/<measure>; measures(texts, images) -> dict, called for the rounds before the last."""
    if len(rounds) < 2:
        return result
    overall = {f"round{len(rounds)}/{k}": v for k, v in result.items() if "/" not in k}
    for r, (texts, images) in enumerate(rounds[:-1], start=1):
        result.update({f"round{r}/{k}": v for k, v in measures(texts, images).items() if "/" not in k})
    return {**result, **overall}


@torch.no_grad()
def evaluate(policy, cfg, n_per_category: int, cfg_scale: float = 1.0):
    """The toy world's held-out prompts, with the toy-only measures.
    Returns (scores dict, prompts, reasoning texts, images in [0, 1])."""
    prompts = toy.prompts("eval", n_per_category, seed=cfg.seed + 12345)
    rounds = []
    prompts, texts, images = generate_eval(policy, prompts, cfg, cfg_scale, by_round=rounds)

    def measures(texts, images):
        result = reward.summarize(score(toy.ToyReward(), images, prompts), prompts)
        result.update(reward.summarize({"plan_validity": toy.score_plans(texts, prompts).all_correct}, prompts))
        drawn, planned = plan_following(texts, images)
        result["plan_following"] = drawn / max(planned, 1)
        result["background_noise"] = background_noise(images)
        return result

    return _with_rounds(measures(texts, images), rounds, measures), prompts, texts, images


def curve_point(policy, cfg, prompts=None, scorer=None) -> dict:
    """One point of the held-out curve during RL (eval_every): the toy's eval_curve_size prompts per
    category, or the first eval_curve_size of `prompts` scored by `scorer`, at the first eval_cfg scale;
    the keys heldout_<measure>."""
    if cfg.model == "toy":
        result = evaluate(policy, cfg, cfg.eval_curve_size, cfg.eval_cfg[0])[0]
    elif prompts:
        result = evaluate_prompts(policy, prompts[:cfg.eval_curve_size], scorer, cfg, cfg.eval_cfg[0])[0]
    else:
        return {}
    keys = ("ta", "accuracy", "reward", "plan_validity", "plan_following", "background_noise")
    keys += tuple(f"round{r}/{k}" for r in range(1, cfg.rounds + 1) for k in ("ta", "accuracy"))
    return {f"heldout_{k}": result[k] for k in keys if k in result}


def plan_following(texts: Sequence[str], images: torch.Tensor) -> tuple[int, int]:
    """(drawn, planned): of the objects that parsable plans ask for, how many the image draws in
    the planned cell (centroid inside it) with the planned colour and shape. Says whether the image
    expert follows the reasoning or only the prompt."""
    detections = toy.detect_batch(images)
    if len(detections) != len(texts):
        raise ValueError(f"texts: {len(texts)} plans but {len(detections)} images")
    drawn = planned = 0
    for text, found in zip(texts, detections):
        layout = toy.parse_plan(text) or []
        at = {(int(d.y // toy.CELL) * toy.GRID + int(d.x // toy.CELL), d.colour, d.shape)
              for d in found}
        planned += len(layout)
        drawn += sum((o.cell, o.colour, o.shape) in at for o in layout)
    return drawn, planned


def background_noise(images: torch.Tensor) -> float:
    """Mean brightest channel over the pixels the verifier reads as black (every channel < 0.5):
    0 for clean renders. The reward cannot see this noise, so it measures what a regulariser has to
    hold back."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (R, 3, H, W), got {tuple(images.shape)}")
    peak = images.amax(1)
    dark = (images < 0.5).all(1)
    return (peak * dark).sum().item() / max(int(dark.sum()), 1)


def evaluate_stage(policy, cfg, run_dir: Path, stage: str, summary: dict, log, prompts=None, scorer=None,
                   write=True):
    """Evaluation of one stage ("before" / "after" RL, "eval") at each scale of eval_cfg: the toy's
    held-out set (eval_per_category), or `prompts` scored by `scorer`. summary[stage] holds the first
    scale, summary["by_cfg"][stage][scale] every scale; grid_<stage>.png shows the first,
    grid_<stage>_cfg<scale>.png the others (write=False: none); a log line per scale."""
    toy_world = cfg.model == "toy"
    if (toy_world and cfg.eval_per_category == 0) or (not toy_world and not prompts):
        return
    if not toy_world and cfg.eval_limit:
        prompts = prompts[:cfg.eval_limit]
    t0, results = time.time(), {}
    scorer = toy.ToyReward() if toy_world else scorer
    for i, s in enumerate(cfg.eval_cfg):
        if toy_world:
            result, rows, texts, images = evaluate(policy, cfg, cfg.eval_per_category, cfg_scale=s)
        else:
            result, rows, texts, images = evaluate_prompts(policy, prompts, scorer, cfg, s, cfg.eval_samples)
        results[f"{s:g}"] = result
        name = f"grid_{stage}.png" if i == 0 else f"grid_{stage}_cfg{s:g}.png"
        if write:                                        # torchrun: rank 0 writes
            save_grid(run_dir / name, rows, texts, images, f"{stage} RL, CFG {s:g}", scorer)
        shown = "  ".join(f"{k.replace('_', ' ')} {result[k]:.3f}" for k in
                          ("ta", "accuracy", "reward", "plan_validity", "plan_following",
                           *(f"round{r}/ta" for r in range(1, cfg.rounds + 1))) if k in result)
        log(f"{stage:>6}: {shown}  (CFG {s:g}, {len(rows)} images)")
    summary["seconds"][f"eval_{stage}"] = time.time() - t0
    summary[stage] = next(iter(results.values()))
    summary.setdefault("by_cfg", {})[stage] = results


def save_grid(path: Path, rows, texts, images, title: str, scorer, per_row=3):
    """A PNG of a fixed slice of the evaluation set (the first two rows of each category, or the first
    twelve rows): image, verdict or reward, prompt, reasoning."""
    from PIL import Image, ImageDraw
    cats = [getattr(p, "category", "") for p in rows]
    pick = ([i for c in dict.fromkeys(cats) for i in [j for j, x in enumerate(cats) if x == c][:2]]
            if all(cats) else list(range(min(12, len(rows)))))
    per_image = score(scorer, images[pick], [rows[i] for i in pick])
    cell_w, img_px, n_rows = 300, 96, -(-len(pick) // per_row)
    canvas = Image.new("RGB", (cell_w * per_row, 20 + n_rows * (img_px + 52)), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 4), title, fill="black")
    small = images.shape[-1] <= img_px
    for j, i in enumerate(pick):
        x, y = (j % per_row) * cell_w, 20 + (j // per_row) * (img_px + 52)
        arr = (images[i].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
        pic = Image.fromarray(arr).resize((img_px, img_px), Image.NEAREST if small else Image.BICUBIC)
        canvas.paste(pic, (x + 4, y))
        if "accuracy" in per_image:
            ok = bool(per_image["accuracy"][j])
            verdict, colour = ("OK " if ok else "X ") + f"{per_image['ta'][j]:.2f}", "green" if ok else "red"
        else:
            verdict, colour = f"reward {per_image['reward'][j]:.3f}", "black"
        d.text((x + img_px + 8, y), verdict, fill=colour)
        d.text((x + img_px + 8, y + 14), _wrap(rows[i].text, 28), fill="black")
        d.text((x + 4, y + img_px + 2), _wrap(texts[i], 46), fill="gray")
    canvas.save(path)


def _wrap(s, w):
    return "\n".join(s[i:i + w] for i in range(0, min(len(s), 3 * w), w))


def plot_curve(path: Path, metrics_path: Path, k: int = 10):
    """The train reward per RL step and its moving mean over k steps, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    steps = [r["step"] for r in rows]
    reward = [r["reward_mean"] for r in rows]
    smooth = [sum(reward[max(0, i - k + 1):i + 1]) / len(reward[max(0, i - k + 1):i + 1])
              for i in range(len(rows))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, reward, lw=0.8, label="train reward (mean exam points)")
    ax.plot(steps, smooth, lw=2, label=f"moving mean ({k})")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
