"""The paper's claims on the toy world, with seeds: every table and plot of RESULTS.md's claims section.

    python experiments/results.py                     # every table: run what is missing, then write RESULTS.md
    python experiments/results.py table1 fig5         # some tables (table1, fig4, fig5, ablations)
    python experiments/results.py --seeds=0,1,2 --jobs=2   # the seeds (each its own SFT base); runs side by side
    python experiments/results.py --report            # only rewrite the tables and plots from experiments/raw/
    python experiments/results.py --quick             # a few steps of everything (what the test runs)

A run is `python train.py --toy --seed=S --name=<variant>-s<S> <flags>` in its own process; with --jobs=2
two run side by side, one thread each. Every finished run leaves its raw record in experiments/raw/
(<variant>-s<seed>.json: the flags, the summary before and after RL, the seconds and the per-step curve),
committed, and a run whose record exists is not run again (--rerun: run it anyway). The tables are written
into RESULTS.md between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, the plots to
experiments/plots/; numbers are mean ± std over the seeds (sample std; one seed: the value alone).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo's flat modules
import config  # noqa: E402
from reward import CATEGORIES  # noqa: E402

PROXY = HERE / "proxy.safetensors"       # experiments/fit_proxy.py writes it
CURVE = ["--eval_every=10"]              # the held-out curve of the runs that plot it
REFLECT = ["--sft_reflect=0.5"]          # the multi-round table's SFT base: half its rows train two rounds

# variant: (label, flags). {proxy} is replaced by the proxy reward's file.
VARIANTS = {
    "sft_base": ("SFT base (no RL)", None),
    "sft_more": ("SFT continued for UniGRPO's RL time", None),       # flags from the seed's unigrpo run
    "unigrpo": ("**UniGRPO** (RatioNorm, K = 3, G = 8, velocity MSE 1e-2)", [*CURVE, "--eval_cfg=1,3"]),
    "text_only": ("TextGRPO only (image expert frozen)", [*CURVE, "--train_parts=text"]),
    "flow_only": ("FlowGRPO only (reasoning frozen, thinking on)", [*CURVE, "--train_parts=image"]),
    "flow_no_think": ("FlowGRPO without thinking", [*CURVE, "--train_parts=image", "--think=false"]),
    "cfg_rollouts": ("rollouts with CFG 3", ["--cfg_scale=3", "--eval_cfg=1,3"]),
    "proxy_none": ("no regulariser", ["--reward=proxy:{proxy}", "--regulariser=none"]),
    "proxy_kl": ("latent KL (FlowGRPO's, weight 0.04)", ["--reward=proxy:{proxy}", "--regulariser=latent_kl",
                                                         "--reg_weight=0.04"]),
    "proxy_mse": ("velocity MSE, Eq. (8) (weight 1e-2)", ["--reward=proxy:{proxy}"]),
    "no_rationorm": ("RatioNorm off", ["--ratio_norm=false"]),
    "window_1": ("window K = 1", ["--window_size=1"]),
    "window_5": ("window K = 5", ["--window_size=5", "--window_start=0,4"]),
    "group_4": ("group G = 4 (8 prompts a step)", ["--group_size=4", "--prompts_per_step=8"]),
    "group_16": ("group G = 16 (2 prompts a step)", ["--group_size=16", "--prompts_per_step=2"]),
    "mse_0": ("velocity MSE weight 0 (no regulariser)", ["--regulariser=none"]),
    "mse_1e-3": ("velocity MSE weight 1e-3", ["--reg_weight=1e-3"]),
    "mse_1e-1": ("velocity MSE weight 1e-1", ["--reg_weight=1e-1"]),
    "reflect_base": ("SFT base with reflection rows (no RL; two-round evaluation)", None),
    "rounds1_time": ("UniGRPO, one round, as long as the two-round run", None),  # steps from rounds2's time
    "rounds2": ("**UniGRPO, two rounds** (think, image, reflect, image)", [*CURVE, *REFLECT, "--rounds=2"]),
}
TABLES = {  # name: (title, variants)
    "table1": ("Table 1 analogue", ["sft_base", "sft_more", "text_only", "flow_only", "flow_no_think",
                                    "unigrpo"]),
    "fig4": ("Fig. 4 analogue: CFG in training rollouts", ["unigrpo", "cfg_rollouts"]),
    "fig5": ("Fig. 5 analogue: regularisers on a hackable proxy reward", ["proxy_none", "proxy_kl",
                                                                          "proxy_mse"]),
    "ablations": ("Ablations", ["unigrpo", "no_rationorm", "window_1", "window_5", "group_4", "group_16",
                                "mse_0", "mse_1e-3", "mse_1e-1"]),
    "rounds": ("Multi-round UniGRPO: two rounds against one at equal wall-clock", ["reflect_base", "rounds1_time",
                                                                               "rounds2"]),
}
WAITS = {"sft_more": "unigrpo", "rounds1_time": "rounds2"}     # variant: the run whose time it matches
BASES = {"sft_base": "unigrpo", "reflect_base": "rounds2"}     # variant: the run whose 'before' it shows
# The experiment scale: every run of every table, so that a row costs ~2 min on 2 cores. A shorter SFT
# than the --toy preset's (plans wrong 30 % of the time, images faithful to their plan: the image expert
# learns to follow plans sooner), an unconditional branch for CFG (Fig. 4), RL of 40 steps at twice the
# preset's rates on 4 prompts x 8 chains, 128 held-out prompts per category.
SCALE = ["--sft_steps=600", "--sft_lr=2e-3", "--sft_warmup=50", "--sft_ema=0.95", "--sft_image_noise=0",
         "--sft_cfg_drop=0.1", "--rl_steps=40", "--prompts_per_step=4", "--lr_reasoning=1.2e-4",
         "--lr_denoising=2e-4", "--eval_per_category=128", "--eval_curve_size=32"]
QUICK = ["--sft_steps=20", "--sft_batch=16", "--eval_steps=4", "--rl_steps=2", "--eval_per_category=2",
         "--prompts_per_step=4", "--group_size=4", "--eval_every=1", "--eval_curve_size=1", "--ckpt_every=1"]
CURVE_KEYS = ("step", "reward_mean", "verifier_mean", "heldout_ta", "heldout_accuracy",
              "heldout_background_noise", "step_time")
MEASURES = ("ta", "accuracy", "plan_validity", "plan_following", "background_noise")


# ------------------------------------------------------------------------------------------------ runs
def run_flags(variant: str, seed: int, args, raw: Path) -> list[str] | None:
    """The train.py flags of a variant (None: it needs no run of its own, or waits for another)."""
    if variant in BASES:
        return None
    if variant in WAITS:
        base = _load(raw, WAITS[variant], seed)
        if base is None:
            return None
        if variant == "sft_more":
            return [f"--sft_steps={base['sft_steps'] + sft_more_steps(base)}", "--rl_steps=0"]
        # a one-round step's time: this variant's earlier run (the same base, flags and side-by-side
        # condition) where there is one, else the seed's unigrpo run
        one = _load(raw, variant, seed) or _load(raw, "unigrpo", seed)
        if one is None:
            raise SystemExit(f"error: rounds1_time-s{seed} needs unigrpo-s{seed} (its step time): run table1")
        return [*CURVE, *REFLECT, f"--rl_steps={equal_time_steps(base, one)}"]
    return [f.format(proxy=args.proxy) for f in VARIANTS[variant][1]]


def _rl_seconds(record: dict) -> float:
    """Seconds of a run's RL steps (evaluations not counted), brought to one run alone on the two cores."""
    return sum(p["step_time"] for p in record["curve"]) / (SIDE_BY_SIDE if record["side_by_side"] else 1)


def equal_time_steps(base: dict, one: dict) -> int:
    """One-round RL steps that take as long as the `base` run's RL steps (one: a one-round run's record)."""
    return max(1, round(_rl_seconds(base) / (_rl_seconds(one) / len(one["curve"]))))


SIDE_BY_SIDE = 2.04   # measured: an SFT step takes 0.96 s on one thread beside another run, 0.47 s on two alone


def sft_more_steps(base: dict) -> int:
    """SFT steps that take as long as the unigrpo run's RL steps (their step_time summed, evaluations not
    counted), both times brought to one run alone on the two cores (SIDE_BY_SIDE)."""
    rl = _rl_seconds(base)
    sft = base["sft_step_seconds"] / (SIDE_BY_SIDE if base["sft_side_by_side"] else 1)
    return round(rl / sft)


def run_one(variant: str, seed: int, flags: list[str], args, raw: Path) -> Path:
    """train.py in its own process; its summary and curve become raw/<variant>-s<seed>.json."""
    name = f"{variant}-s{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--toy", f"--seed={seed}", f"--name={name}",
           f"--out_dir={args.out_dir}", "--overwrite", *args.extra, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.side_by_side else dict(os.environ)
    t0 = time.time()
    log = Path(args.out_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({done.returncode}); see {log}")
    run_dir = Path(args.out_dir) / name
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = run_dir / "metrics.jsonl"
    curve = [{k: r[k] for k in CURVE_KEYS if k in r}
             for r in map(json.loads, metrics.read_text().splitlines() if metrics.exists() else [])]
    cfg = summary["config"]
    trained = summary["seconds"].get("sft", 0) > 0          # this run trained the seed's SFT base
    sft_side = args.side_by_side if trained else _sft_condition(raw, seed, cfg)
    record = {"variant": variant, "seed": seed, "command": " ".join(["python", *_portable(cmd[1:])]),
              "flags": _portable([*args.extra, *flags]), "sft_steps": cfg["sft_steps"], "side_by_side": args.side_by_side,
              "sft_side_by_side": sft_side, "trained_sft": trained,
              "sft_step_seconds": _sft_step_seconds(cfg, summary), "wall_seconds": time.time() - t0,
              "summary": {k: summary[k] for k in ("before", "after", "by_cfg", "seconds") if k in summary},
              "curve": curve}
    out = raw / f"{name}.json"
    out.write_text(json.dumps(record, indent=1))
    return out


def _portable(argv: list[str]) -> list[str]:
    """Command-line words with this checkout's absolute paths made relative to it (records are committed)."""
    return [a.replace(f"{ROOT}/", "") for a in argv]


def _sft_step_seconds(cfg: dict, summary: dict) -> float:
    """Seconds of one SFT step of this run's base, from the SFT cache's record of its training."""
    import toy_policy
    conf = config.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    path = toy_policy.sft_cache_path(toy_policy.build_policy(conf.seed), conf, Path(conf.out_dir) / "sft-cache")
    return toy_policy.read_sft_cache(path)[1]["seconds"] / conf.sft_steps


def _sft_condition(raw: Path, seed: int, cfg: dict) -> bool:
    """Whether the run that trained this seed's SFT base (same sft_steps) ran side by side."""
    for path in raw.glob(f"*-s{seed}.json"):
        r = json.loads(path.read_text())
        if r.get("trained_sft") and r["sft_steps"] == cfg["sft_steps"]:
            return r["side_by_side"]
    return False


def _load(raw: Path, variant: str, seed: int) -> dict | None:
    path = raw / f"{variant}-s{seed}.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_all(variants: list[str], args, raw: Path):
    """Every missing (variant, seed) run, args.jobs at a time: first one run per seed (it trains that
    seed's SFT base into the cache), then the rest, then the runs that wait for others (sft_more)."""
    raw.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for v in variants for s in args.seeds
            if v not in BASES and (args.rerun or _load(raw, v, s) is None)]
    first = list({s: (v, s) for v, s in reversed(todo) if v not in WAITS}.values())
    later = [t for t in todo if t not in first and t[0] not in WAITS]
    waits = [t for t in todo if t[0] in WAITS]
    for batch in (first, later, waits):
        args.side_by_side = args.jobs > 1 and len(batch) > 1     # one thread each when runs share the cores
        with ThreadPoolExecutor(args.jobs) as pool:
            jobs = [(v, s, run_flags(v, s, args, raw)) for v, s in batch]
            for out in pool.map(lambda j: run_one(*j, args, raw), [j for j in jobs if j[2] is not None]):
                print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)


# --------------------------------------------------------------------------------------------- report
def stage_of(record: dict, variant: str) -> dict:
    """The held-out numbers a variant's row shows: the SFT base ('before') or the state after RL."""
    s = record["summary"]
    return s["before"] if variant in ("sft_base", "sft_more", "reflect_base") else s["after"]


def records(raw: Path, variant: str, seeds) -> list[dict]:
    source = BASES.get(variant, variant)
    found = [_load(raw, source, s) for s in seeds]
    return [r for r in found if r is not None]


def mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(name: str, raw: Path, seeds) -> str:
    """The markdown of one table: a row per variant, mean ± std over the seeds found."""
    head = ["run", "seeds", "base TA", "TA", "accuracy", "plan validity", "plan following", "background",
            *[c.replace("_", " ") for c in CATEGORIES]]
    extra = {"fig4": ["TA with CFG 3 at evaluation"], "fig5": ["proxy reward (last 10 steps)",
                                                              "verifier on rollouts (last 10)"],
             "rounds": ["RL steps", "TA round 1", "TA round 2", "accuracy round 1", "accuracy round 2"]
             }.get(name, [])
    lines = ["| " + " | ".join(head[:8] + extra + head[8:]) + " |", "|---" * (len(head) + len(extra)) + "|"]
    for v in TABLES[name][1]:
        recs = records(raw, v, seeds)
        base = _load(raw, "unigrpo", recs[0]["seed"]) if v == "sft_more" and recs else None
        label = VARIANTS[v][0] + (f" (+{recs[0]['sft_steps'] - base['sft_steps']} steps)" if base else "")
        stages = [stage_of(r, v) for r in recs]
        cells = [mean_std([r["summary"]["before"]["ta"] for r in recs]),     # each run's own SFT base
                 *(mean_std([s[k] for s in stages]) for k in MEASURES)]
        if name == "fig4":
            cells.append(mean_std([r["summary"]["by_cfg"]["after"]["3"]["ta"] for r in recs
                                   if "3" in r["summary"].get("by_cfg", {}).get("after", {})]))
        if name == "fig5":
            for key in ("reward_mean", "verifier_mean"):
                cells.append(mean_std([statistics.mean(p[key] for p in r["curve"][-10:]) for r in recs
                                       if r["curve"] and key in r["curve"][-1]]))
        if name == "rounds":
            steps = sorted({len(r["curve"]) for r in recs}) if v != "reflect_base" else [0]
            cells.append("/".join(map(str, steps)) or "—")
            for k in ("ta", "accuracy"):
                for r in (1, 2):                 # a one-round run's round 1 is its only round
                    key = k if (v, r) == ("rounds1_time", 1) else f"round{r}/{k}"
                    cells.append(mean_std([s[key] for s in stages if key in s]))
        cats = [mean_std([s[f"accuracy/{c}"] for s in stages], 2) for c in CATEGORIES]
        lines.append("| " + " | ".join([label, str(len(recs)), *cells, *cats]) + " |")
    return "\n".join(lines)


def plot(name: str, raw: Path, seeds, plots: Path) -> Path | None:
    """Curves against RL steps, the mean over seeds with the spread (min to max) shaded: the train reward
    and the held-out TA (fig5: the proxy reward and the verifier's score of the same rollouts)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = (("reward_mean", "proxy reward"), ("verifier_mean", "verifier (exact TA) of the same images")) \
        if name == "fig5" else (("reward_mean", "train reward"), ("heldout_ta", "held-out TA"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    for v in TABLES[name][1]:
        recs = [r for r in records(raw, v, seeds) if r["curve"] and v not in (*BASES, "sft_more")]
        for ax, (key, title) in zip(axes, keys):
            runs = [[(x, p[key]) for x, p in zip(_x_axis(name, r["curve"]), r["curve"]) if key in p] for r in recs]
            runs = [r for r in runs if r]
            if not runs:
                continue
            n = min(map(len, runs))
            xs = [statistics.mean(col) for col in zip(*([x for x, _ in r[:n]] for r in runs))]
            ys = [[y for _, y in r[:n]] for r in runs]
            mean = [statistics.mean(col) for col in zip(*ys)]
            line, = ax.plot(xs, mean, lw=1.5, label=VARIANTS[v][0].replace("**", ""))
            ax.fill_between(xs, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)], alpha=0.2,
                            color=line.get_color())
            ax.set_title(title)
            ax.set_xlabel("seconds of RL steps (mean over seeds)" if name == "rounds" else "RL step")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    path = plots / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _x_axis(name: str, curve: list) -> list:
    """A curve's x values: the RL step, or for the rounds table (equal wall-clock) the summed step time."""
    if name != "rounds":
        return [p["step"] + 1 for p in curve]
    total, xs = 0.0, []
    for p in curve:
        total += p["step_time"]
        xs.append(total)
    return xs


def write_report(names: list[str], raw: Path, seeds, results_md: Path, plots: Path):
    """Each table (and its plot) into results_md between its markers; a missing marker pair is an error
    naming it."""
    text = results_md.read_text()
    for name in names:
        begin, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"error: {results_md} has no {begin} ... {end} block for table {name}")
        body = f"**{TABLES[name][0]}** ({_seed_note(raw, name, seeds)})\n\n{table(name, raw, seeds)}\n"
        picture = plot(name, raw, seeds, plots)
        if picture is not None:
            rel = os.path.relpath(picture, results_md.parent)
            body += f'\n<img src="{rel}" width="760" alt="{TABLES[name][0]}: curves against RL steps">\n'
        a, b = text.index(begin) + len(begin), text.index(end)
        text = text[:a] + "\n" + body + text[b:]
    results_md.write_text(text)


def _seed_note(raw: Path, name: str, seeds) -> str:
    found = sorted({r["seed"] for v in TABLES[name][1] for r in records(raw, v, seeds)})
    return f"seeds {', '.join(map(str, found)) or 'none yet'}; held-out prompts; regenerate: " \
           f"`python experiments/results.py {name}`"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="*", help=f"tables to run and write: {', '.join(TABLES)} (default all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (each its own SFT base)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each when > 1)")
    p.add_argument("--report", action="store_true", help="only write the tables and plots")
    p.add_argument("--rerun", action="store_true", help="run again even where a raw record exists")
    p.add_argument("--only", default="", help="comma-separated variants: run only these (the tables show all)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (the test)")
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "results"), help="run folders and SFT caches")
    p.add_argument("--raw", default=str(HERE / "raw"), help="folder of the raw per-run records")
    p.add_argument("--results_md", default=str(ROOT / "RESULTS.md"))
    p.add_argument("--plots", default=str(HERE / "plots"))
    p.add_argument("--proxy", default=str(PROXY), help="the proxy reward of fig5 (experiments/fit_proxy.py)")
    args, extra = p.parse_known_args(argv)
    unknown = [t for t in args.tables if t not in TABLES]
    if unknown:
        raise SystemExit(f"error: unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds={args.seeds!r}: expected integers, e.g. --seeds=0,1,2") from None
    args.extra = [*SCALE, *(QUICK if args.quick else []), *extra]
    names = args.tables or list(TABLES)
    variants = list(dict.fromkeys(v for n in names for v in TABLES[n][1]))
    if args.only:
        only = args.only.split(",")
        if set(only) - set(VARIANTS):
            raise SystemExit(f"error: --only: unknown variant(s) {sorted(set(only) - set(VARIANTS))}")
        variants = [v for v in variants if v in only]
    if "fig5" in names and not args.report and not Path(args.proxy).is_file():
        raise SystemExit(f"error: --proxy={args.proxy} does not exist: python experiments/fit_proxy.py "
                         f"writes it")
    for v in variants:                                   # every command line parses before any run
        flags = VARIANTS[v][1]
        if flags is not None:
            try:
                config.parse_args(["--toy", *args.extra, *[f.format(proxy=args.proxy) for f in flags]])
            except SystemExit as e:
                raise SystemExit(f"error: variant {v}: {e}") from None
    raw = Path(args.raw)
    if not args.report:
        run_all(variants, args, raw)
    write_report(names, raw, args.seeds, Path(args.results_md), Path(args.plots))
    print(f"wrote {', '.join(names)} into {args.results_md}")


if __name__ == "__main__":
    main()
