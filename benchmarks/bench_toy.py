"""The toy's time to quality: held-out TA against wall-clock seconds through SFT and RL, and the run's
peak memory.

    .venv/bin/python benchmarks/bench_toy.py                      # the --toy preset (~7 min on 2 cores)
    .venv/bin/python benchmarks/bench_toy.py --plot=docs/toy_time_to_quality.png --sft_steps=400

SFT runs with a probe every --probe_every steps (the held-out TA of its EMA weights on --probe_size
prompts per category, the probe's own time not counted) and is cached; then `train.py --toy` loads that
cache and runs RL with --eval_every=10 on the same prompts (seconds: the RL steps' own step_time summed).
Any Config field as --key=value. Prints a markdown table of (stage, step, seconds, held-out TA, accuracy)
and the peak resident memory of this process (the run included: one process does both).
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo's flat modules
import config  # noqa: E402
import evaluate  # noqa: E402
import toy_policy  # noqa: E402
import train  # noqa: E402


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe_every", type=int, default=100, help="SFT steps between probes")
    p.add_argument("--probe_size", type=int, default=64, help="held-out prompts per category of a probe")
    p.add_argument("--plot", default="", help="also draw the curve into this PNG")
    a, extra = p.parse_known_args(argv)
    flags = ["--toy", "--name=bench-toy", f"--out_dir={ROOT / 'runs'}", *extra]
    cfg, _ = config.parse_args(flags)
    points = []
    t_start = time.time()

    def probe(step, seconds):
        result = evaluate.evaluate(policy, cfg, a.probe_size)[0]
        points.append(("SFT", step, seconds, result["ta"], result["accuracy"]))
        print(f"SFT step {step}: {seconds:.0f} s, held-out TA {result['ta']:.3f}, plan validity "
              f"{result['plan_validity']:.3f}, plan following {result['plan_following']:.3f}", flush=True)

    torch.manual_seed(cfg.seed)
    policy = toy_policy.build_policy(cfg.seed, cfg.device)
    cache = toy_policy.sft_cache_path(policy, cfg, Path(cfg.out_dir) / "sft-cache")
    cache.unlink(missing_ok=True)                       # time the SFT itself, not a cache read
    sft_seconds = toy_policy.sft(policy, cfg, Path(cfg.out_dir) / "sft-cache", print, probe, a.probe_every)
    summary = train.main([*flags, "--overwrite", f"--eval_every=10", f"--eval_curve_size={a.probe_size}"])
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / cfg.name / "metrics.jsonl").read_text().splitlines()]
    elapsed = sft_seconds
    for r in rows:
        elapsed += r["step_time"]
        if "heldout_ta" in r:
            points.append(("RL", r["step"] + 1, elapsed, r["heldout_ta"], r["heldout_accuracy"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
    print(f"\nSFT {sft_seconds:.0f} s ({cfg.sft_steps} steps), RL {summary['seconds']['rl']:.0f} s "
          f"({cfg.rl_steps} steps, held-out probes included), evaluations {summary['seconds']['eval_before']:.0f} "
          f"+ {summary['seconds']['eval_after']:.0f} s; final held-out TA {summary['after']['ta']:.3f} "
          f"({cfg.eval_per_category} per category); whole benchmark {time.time() - t_start:.0f} s; "
          f"peak resident memory {peak:.0f} MiB")
    print("\n| stage | step | seconds | held-out TA | accuracy |\n|---|---|---|---|---|")
    for stage, step, seconds, ta, acc in points:
        print(f"| {stage} | {step} | {seconds:.0f} | {ta:.3f} | {acc:.3f} |")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for stage in ("SFT", "RL"):
            xs = [pt[2] for pt in points if pt[0] == stage]
            ax.plot(xs, [pt[3] for pt in points if pt[0] == stage], marker="o", ms=3, label=stage)
        ax.set_xlabel("training seconds (SFT, then RL)")
        ax.set_ylabel(f"held-out TA ({a.probe_size} prompts per category)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
