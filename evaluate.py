"""Held-out evaluation and the run's pictures: one reasoning chain and one ODE image per prompt,
scored by the toy world's verifier (TA-style score, GenEval-style accuracy, plan validity, plan
following, background noise), a PNG grid of a fixed slice of the prompts, and the reward curve.
The Bagel path's evaluation (GenEval's rules, several CFG scales) is the next step and joins here.

    result, prompts, texts, images = evaluate.evaluate(policy, cfg, n_per_category=256)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

import toy
import unigrpo


@torch.no_grad()
def evaluate(policy, cfg, n_per_category: int):
    """Held-out prompts, one reasoning chain each (eval_temperature), ODE images (eval_steps).
    Returns (scores dict, prompts, reasoning texts, images in [0, 1])."""
    prompts = toy.prompts("eval", n_per_category, seed=cfg.seed + 12345)
    g = torch.Generator().manual_seed(cfg.seed + 777)
    texts, images = [], []
    for i in range(0, len(prompts), 256):
        th, _, img = unigrpo.generate(policy, prompts[i:i + 256], cfg, g,
                                      temperature=cfg.eval_temperature, num_steps=cfg.eval_steps)
        texts += th.texts
        images.append(img)
    images = torch.cat(images)
    result = toy.summarize(toy.score_images(images, prompts), prompts)
    plans = toy.summarize(toy.score_plans(texts, prompts), prompts)
    result.update({k.replace("accuracy", "plan_validity"): v for k, v in plans.items()
                   if k.startswith("accuracy")})
    drawn, planned = plan_following(texts, images)
    result["plan_following"] = drawn / max(planned, 1)
    result["background_noise"] = background_noise(images)
    return result, prompts, texts, images


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


def evaluate_stage(policy, cfg, run_dir: Path, stage: str, summary: dict, log):
    """Held-out evaluation of one stage ("before" / "after" RL): scores into summary, a PNG grid,
    one log line."""
    if cfg.eval_per_category == 0:
        return
    t0 = time.time()
    result, prompts, texts, images = evaluate(policy, cfg, cfg.eval_per_category)
    summary["seconds"][f"eval_{stage}"] = time.time() - t0
    summary[stage] = result
    save_grid(run_dir / f"grid_{stage}.png", prompts, texts, images, cfg.eval_per_category,
              f"{stage} RL")
    log(f"{stage:>6} RL: TA {result['ta']:.3f}  accuracy {result['accuracy']:.3f}  "
        f"plan validity {result['plan_validity']:.3f}  "
        f"plan following {result['plan_following']:.3f}  "
        f"({len(prompts)} held-out prompts)")


def save_grid(path: Path, prompts, texts, images, per_category: int, title: str, per_row=3):
    """A PNG of a fixed slice of the evaluation set (two prompts per category): image, prompt,
    reasoning, verdict."""
    from PIL import Image, ImageDraw
    pick = [c * per_category + j for c in range(len(prompts) // per_category)
            for j in range(min(2, per_category))]
    scores = toy.score_images(images[pick], [prompts[i] for i in pick])
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
