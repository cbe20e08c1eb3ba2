"""Throughput of the toy world's renderer and exact verifier.

Images (plans) per second for render, verify and plan scoring on this process's threads. The reward
of every RL step runs this path on R = B*G images.

    .venv/bin/python benchmarks/bench_verifier.py [--n 4096] [--seed 0] [--threads 1]
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

# run from anywhere: the repo's flat modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import toy  # noqa: E402


def benchmark(n: int = 4096, seed: int = 0) -> dict[str, float]:
    """Print and return the rates, and the share of renders the verifier scores all-correct
    (1.0 expected)."""
    ps = toy.prompts("train", n // len(toy.CATEGORIES) + 1, seed)[:n]
    rng = random.Random(seed)
    layouts = [toy.random_layout(p, rng) for p in ps]
    texts = [toy.plan_text(lay) for lay in layouts]
    t0 = time.perf_counter()
    images = toy.render_batch(layouts)
    t1 = time.perf_counter()
    scores = toy.score_images(images, ps)
    t2 = time.perf_counter()
    toy.score_plans(texts, ps)
    t3 = time.perf_counter()
    rates = {"render": n / (t1 - t0), "verify": n / (t2 - t1), "render+verify": n / (t2 - t0),
             "plans": n / (t3 - t2)}
    print(", ".join(f"{k} {v:.0f}/s" for k, v in rates.items())
          + f", all_correct {scores.all_correct.float().mean().item():.3f}")
    return {**rates, "all_correct": scores.all_correct.float().mean().item()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    benchmark(a.n, a.seed)
