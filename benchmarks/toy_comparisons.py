"""The paper's comparisons on the toy world, one seed each: every RL switch from the same cached
SFT policy, plus the equal-time SFT continuation control. Prints the markdown table that RESULTS.md
shows.

    python benchmarks/toy_comparisons.py                   # all variants (~5 min each on 2 cores)
    python benchmarks/toy_comparisons.py unigrpo sft_more  # a subset, by name
    python benchmarks/toy_comparisons.py --seed=1          # extra --key=value flags go to every run
    python benchmarks/toy_comparisons.py sft_more --sft_more_steps=800  # control length set by hand
    python benchmarks/toy_comparisons.py --reuse           # keep finished runs, run the rest

Each run is `python train.py --toy --name=cmp-<name> <flags>` in its own process; the table reads
<out_dir>/cmp-<name>/summary.json (out_dir: runs, or --out_dir=...), and all results are saved
together as <out_dir>/comparisons.json.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo's flat modules
import config  # noqa: E402
import toy_policy  # noqa: E402
from reward import CATEGORIES  # noqa: E402

VARIANTS = {  # name: (the table's label, flags)
    "unigrpo": ("**unigrpo** (the toy preset)", []),
    "flowgrpo_only": ("flowgrpo_only (image expert only)", ["--train_parts=image"]),
    "textgrpo_only": ("textgrpo_only (reasoning expert only)", ["--train_parts=text"]),
    "no_rationorm": ("no_rationorm", ["--ratio_norm=false"]),
    "reg_latent_kl": ("reg_latent_kl (FlowGRPO's latent KL, weight 0.04, instead of Eq. (8))",
                      ["--regulariser=latent_kl", "--reg_weight=0.04"]),
    "reg_none": ("reg_none (no regulariser)", ["--regulariser=none"]),
    "text_kl": ("text_kl (`--text_kl=0.05`)", ["--text_kl=0.05"]),
    "cfg_rollouts": ("cfg_rollouts (CFG 3 in rollouts and evaluation)", ["--cfg_scale=3.0", "--eval_cfg=3"]),
    "no_thinking": ("no_thinking (image expert only, no reasoning)",
                    ["--think=false", "--train_parts=image"]),
}
HEADER = ("| run | TA | accuracy | plan validity | plan following | background | single object | "
          "two object | counting | colors | position | color attr | RL s |")


def run(name, flags, extra, out_dir: Path, reuse: bool) -> dict:
    done = out_dir / f"cmp-{name}" / "summary.json"
    if not (reuse and done.exists()):   # keep finished runs with --reuse; otherwise run (again)
        cmd = [sys.executable, str(ROOT / "train.py"), "--toy", f"--name=cmp-{name}", "--overwrite",
               *flags, *extra]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(done.read_text())


def row(label, before, after, rl_seconds) -> str:
    arrow = " | ".join(f"{before[k]:.3f} → {after[k]:.3f}"
                       for k in ("ta", "accuracy", "plan_validity", "plan_following"))
    cats = " | ".join(f"{after['accuracy/' + c]:.2f}" for c in CATEGORIES)
    rl = "—" if rl_seconds is None else f"{rl_seconds:.0f}"
    return f"| {label} | {arrow} | {after['background_noise']:.3f} | {cats} | {rl} |"


def base_row(before) -> str:
    cells = " | ".join(f"{before[k]:.3f}" for k in ("ta", "accuracy", "plan_validity",
                                                     "plan_following", "background_noise"))
    cats = " | ".join(f"{before['accuracy/' + c]:.2f}" for c in CATEGORIES)
    return f"| (SFT base, for reference) | {cells} | {cats} | |"


def main(argv):
    more = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--sft_more_steps=")]
    extra = [a for a in argv
             if a.startswith("--") and not a.startswith(("--sft_more_steps=", "--reuse"))]
    names = [a for a in argv if not a.startswith("--")] or [*VARIANTS, "sft_more"]
    unknown = [n for n in names if n not in VARIANTS and n != "sft_more"]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; "
                         f"known: {', '.join([*VARIANTS, 'sft_more'])}")
    cfg, _ = config.parse_args(["--toy", *extra])
    out_dir, reuse = Path(cfg.out_dir).resolve(), "--reuse" in argv
    extra = [a for a in extra if not a.startswith("--out_dir=")] + [f"--out_dir={out_dir}"]
    results, lines = {}, []
    for name in names:
        if name != "sft_more":
            results[name] = run(name, VARIANTS[name][1], extra, out_dir, reuse)
            lines.append(row(VARIANTS[name][0], results[name]["before"], results[name]["after"],
                             results[name]["seconds"]["rl"]))
    if "sft_more" in names:
        # Equal-time control: SFT continued (same data stream, same optimiser) for UniGRPO's RL time.
        base = results.get("unigrpo") or run("unigrpo", [], extra, out_dir, reuse)
        if more:
            more = more[0]
        else:
            # UniGRPO's RL seconds / seconds per step of the cached SFT (both timed under one load)
            cache = toy_policy.sft_cache_path(toy_policy.build_policy(cfg.seed), cfg,
                                              out_dir / "sft-cache")
            more = round(base["seconds"]["rl"]
                         / (toy_policy.read_sft_cache(cache)[1]["seconds"] / cfg.sft_steps))
        ctl = run("sft_more", [f"--sft_steps={cfg.sft_steps + more}", "--rl_steps=0"], extra,
                  out_dir, reuse)
        results["sft_more"] = {**ctl, "before": base["before"], "after": ctl["before"],
                               "extra_sft_steps": more}
        lines.append(row(f"SFT continued for the same time (+{more} steps, no RL)", base["before"],
                         ctl["before"], None))
    if results:
        lines.append(base_row(next(iter(results.values()))["before"]))
    print("\n" + HEADER + "\n" + "|---" * 13 + "|\n" + "\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparisons.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
