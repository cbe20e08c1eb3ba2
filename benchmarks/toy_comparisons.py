"""The paper's comparisons on the toy world, one seed each: every RL switch from the same cached SFT policy,
plus the equal-time SFT continuation control. Prints a markdown table of held-out scores.

    python benchmarks/toy_comparisons.py                 # all variants (~5 min each on 2 cores)
    python benchmarks/toy_comparisons.py unigrpo sft_more  # a subset, by name
    python benchmarks/toy_comparisons.py --seed=1        # extra flags go to every run
    python benchmarks/toy_comparisons.py sft_more --sft_more_steps=800   # control length set by hand
    python benchmarks/toy_comparisons.py --reuse         # only print the table of finished runs (and run the rest)

Each run is `python train.py --toy <flags>`; the table reads <out_dir>/cmp-<name>/summary.json (out_dir: runs,
or --out_dir=...), and is saved with every result as <out_dir>/comparisons.json.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

VARIANTS = {
    "unigrpo": [],                                       # text + image, velocity MSE, RatioNorm, no CFG
    "flowgrpo_only": ["--train_parts=image"],            # image expert only (FlowGRPO-Fast)
    "textgrpo_only": ["--train_parts=text"],             # reasoning expert only
    "no_thinking": ["--think=false", "--train_parts=image"],
    "reg_latent_kl": ["--regulariser=latent_kl", "--reg_weight=0.04"],
    "reg_none": ["--regulariser=none"],
    "no_rationorm": ["--ratio_norm=false"],
    "text_kl": ["--text_kl=0.05"],                       # remedy for reasoning drift
    "cfg_rollouts": ["--cfg_scale=3.0"],
}


def run(name, flags, extra, out_dir: Path, reuse: bool):
    done = out_dir / f"cmp-{name}" / "summary.json"
    if reuse and done.exists():   # keep finished runs; delete the folder to redo one
        return json.loads(done.read_text())
    return train.main(["--toy", f"--name=cmp-{name}", *flags, *extra])


def main(argv):
    more = [int(a.split("=")[1]) for a in argv if a.startswith("--sft_more_steps=")]
    extra = [a for a in argv if a.startswith("--") and not a.startswith(("--sft_more_steps=", "--reuse"))]
    names = [a for a in argv if not a.startswith("--")] or [*VARIANTS, "sft_more"]
    cfg, _ = train.parse_args(["--toy", *extra])
    out_dir, reuse = Path(cfg.out_dir), "--reuse" in argv
    results = {}
    for name in names:
        if name == "sft_more":
            continue
        results[name] = run(name, VARIANTS[name], extra, out_dir, reuse)
    if "sft_more" in names:
        # Equal-time control: continue SFT (same data stream, same optimiser) for as long as UniGRPO trained.
        base = results.get("unigrpo") or run("unigrpo", [], extra, out_dir, reuse)
        if more:
            more = more[0]
        else:  # UniGRPO's RL seconds / seconds per SFT step of the cached SFT run (time both on the same load)
            cache = sorted((out_dir / "sft-cache").glob("sft-*.pt"), key=lambda p: p.stat().st_mtime)
            more = round(base["seconds"]["rl"] / (train.load_checkpoint(cache[-1])["seconds"] / cfg.sft_steps))
        ctl = run("sft_more", [f"--sft_steps={cfg.sft_steps + more}", "--rl_steps=0"], extra, out_dir, reuse)
        ctl["after"] = ctl["before"]
        ctl["before"] = base["before"]
        results["sft_more"] = ctl
        print(f"sft_more: {more} extra SFT steps against {base['seconds']['rl']:.0f} s of UniGRPO")
    cats = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    print("\n| variant | TA before -> after | accuracy before -> after | plan validity before -> after | "
          + " | ".join(f"acc {c}" for c in cats) + " | RL s |")
    print("|---" * (5 + len(cats)) + "|")
    for name, s in results.items():
        b, a = s["before"], s["after"]
        print(f"| {name} | {b['ta']:.3f} -> {a['ta']:.3f} | {b['accuracy']:.3f} -> {a['accuracy']:.3f} | "
              f"{b['plan_validity']:.3f} -> {a['plan_validity']:.3f} | "
              + " | ".join(f"{a['accuracy/' + c]:.2f}" for c in cats) + f" | {s['seconds'].get('rl', 0):.0f} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparisons.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
