"""Training forward + backward of the packed sequence: the dense mask against the blocks path, at
growing image sizes.

One step is Policy.train_forward on R rows of [text, K = 3 noisy blocks], then the backward of
logp.sum() + mean(v^2). The rows' text is ragged (the first row `--text` tokens, each next one
`--ragged` fewer, right-padded), as a group of reasoning chains is. Three paths, the same shapes:

    dense   Policy.attention = "dense": the (R, 1, L, L) mask (model.packed_layout)
    blocks  Policy.attention = "blocks": model.PackedBlocks (text causal; each block a batch row on
            [its text, itself], with a key-padding mask since the rows are ragged)
    bound   the blocks path on rows of equal text length (all `--text` tokens): no mask at all, so
            the text once (causal) and K blocks on its keys with SDPA's mask-free kernels, the least
            work for these shapes (L, K, N equal to the other two)

Time: the best of `repeats` steps, the three paths interleaved so that a noisy machine drifts alike
for all; ratios to the bound. --clock=cpu times this process's CPU seconds instead of wall seconds:
with --threads=1 it does not count the time other processes take the core (a shared machine). Peak memory: on CUDA, torch.cuda.max_memory_allocated during the step
minus the memory allocated before it; on CPU, the growth of the peak RSS (VmHWM; ru_maxrss off Linux)
over one step, in a fresh process per path and size (activations, masks, gradients; not the model).
A narrow BAGEL config (codec "pixels" with the flux latent shape: 16 channels, downsample 8, patch 2,
so N = (px/16)^2 latent tokens; about 52M parameters by default) keeps 1024 px (N = 4096) within a
CPU's memory; there it takes minutes a step, so --sizes=256,512 on a CPU.

    .venv/bin/python benchmarks/bench_attention.py [--sizes 256,512,1024] [--repeats 3]
        [--device cpu] [--layers 8] [--hidden 512] [--text 256] [--ragged 64] [--rows 2] [--threads 0]
        [--clock wall] [--no_memory]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# run from anywhere: the repo's flat modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import BagelConfig  # noqa: E402
from policy import Policy, Thoughts  # noqa: E402

PATHS = ("dense", "blocks", "bound")
K = 3


def build(a) -> Policy:
    cfg = BagelConfig(vocab_size=1024, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                      num_key_value_heads=max(a.hidden // 256, 1), max_position_embeddings=4096,
                      pad_id=0, im_start_id=1, im_end_id=2, vision_start_id=3, vision_end_id=4,
                      think_system_prompt=None, codec="pixels", max_latent_size=64)
    dtype = getattr(torch, a.dtype)
    return Policy.from_config(cfg, None).to(a.device, dtype)


def inputs(policy, a, path, px):
    """(thoughts, x_t, t) of `path` at px x px: 16 prompt tokens, im_start, reasoning ending in
    im_end; row r has `text - r * ragged` text tokens (all `text` for the bound)."""
    g, R, T, V = torch.Generator().manual_seed(0), a.rows, a.text - 17, policy.cfg.vocab_size
    lens = torch.tensor([a.text - (0 if path == "bound" else r * a.ragged) for r in range(R)])
    mask = torch.arange(T) < lens[:, None] - 17
    ids = torch.randint(5, V, (R, T), generator=g)
    ids[torch.arange(R), mask.sum(1) - 1] = policy.cfg.im_end_id
    prompt = torch.randint(5, V, (R, 16), generator=g)
    th = [x.to(a.device) for x in (prompt, torch.ones_like(prompt, dtype=torch.bool), ids, mask,
                                   torch.zeros(R, T))]
    N, D = policy.latent_shape((px, px))
    x_t = torch.randn(R, K, N, D, generator=g).to(a.device, policy.model.dtype)
    return Thoughts(*th, [""] * R), x_t, torch.full((R, K), 0.5, device=a.device)


def step(policy, path, th, x_t, t, px):
    policy.attention = "dense" if path == "dense" else "blocks"
    out = policy.train_forward(th, x_t, t, image_hw=(px, px))
    (out.logp.sum() + out.v.float().square().mean()).backward()
    policy.zero_grad(set_to_none=True)
    if x_t.is_cuda:
        torch.cuda.synchronize()


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM on Linux (ru_maxrss survives exec there, so it would
    start at our parent's RSS), else ru_maxrss (bytes on macOS)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def peak_memory(policy, a, path, px, argv) -> float:
    """Bytes the step adds at its peak (module docstring); on CPU measured in a fresh process."""
    if a.device == "cpu" and not a.measure:
        cmd = [sys.executable, __file__, *argv, f"--measure={path},{px}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    args = inputs(policy, a, path, px)
    if a.device == "cpu":
        before = peak_rss()
        step(policy, path, *args, px)
        return peak_rss() - before
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(policy, path, *args, px)
    return torch.cuda.max_memory_allocated() - before


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,512,1024", help="image sides in pixels, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512, help="a multiple of 64 (head dim 64)")
    p.add_argument("--text", type=int, default=256, help="text tokens of the longest row")
    p.add_argument("--ragged", type=int, default=64, help="each next row has this many fewer")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="cpu: process CPU time")
    p.add_argument("--no_memory", action="store_true",
                   help="skip peak memory (on CPU each probe is a fresh process, ~10 s)")
    p.add_argument("--measure", default="", help=argparse.SUPPRESS)   # path,px: one CPU memory probe
    a = p.parse_args(argv)
    if a.clock == "cpu" and a.device != "cpu":
        raise SystemExit("--clock=cpu times a CPU run")
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.text - (a.rows - 1) * a.ragged < 18:
        raise SystemExit("--text, --ragged, --rows: every row needs at least 18 text tokens")
    if a.threads:
        torch.set_num_threads(a.threads)
    policy = build(a)
    if a.measure:
        path, px = a.measure.split(",")
        print(json.dumps({"peak": peak_memory(policy, a, path, int(px), argv)}))
        return
    params = sum(q.numel() for q in policy.parameters())
    print(f"narrow BAGEL: {params / 1e6:.1f}M params, hidden {a.hidden}, {a.layers} layers, "
          f"{policy.cfg.num_attention_heads}/{policy.cfg.num_key_value_heads} q/kv heads; {a.rows} "
          f"rows, text {a.text} tokens (ragged by {a.ragged}), K = {K} blocks; {a.device} {a.dtype}, "
          f"{torch.get_num_threads()} threads, {a.clock} clock, best of {a.repeats}")
    cols = [f"{q} s" for q in PATHS] + ["t dense/bnd", "t blocks/bnd"]
    cols += [f"{q} GiB" for q in PATHS] + ["m dense/bnd", "m blocks/bnd"]
    print(f"{'px':>5} {'N':>5} {'L':>6} " + " ".join(f"{c:>12}" for c in cols))
    for px in (int(s) for s in a.sizes.split(",")):
        N = policy.latent_shape((px, px))[0]
        args = {path: inputs(policy, a, path, px) for path in PATHS}
        best = dict.fromkeys(PATHS, float("inf"))
        for path in PATHS:                                               # warm-up
            step(policy, path, *args[path], px)
        for _ in range(a.repeats):
            for path in PATHS:
                t0 = clock()
                step(policy, path, *args[path], px)
                best[path] = min(best[path], clock() - t0)
        del args
        peak = {path: float("nan") if a.no_memory else peak_memory(policy, a, path, px, argv) / 2 ** 30
                for path in PATHS}
        row = []
        for d in (best, peak):                  # a tiny step may not raise the peak RSS: no ratio
            row += [d[q] for q in PATHS] + [d[q] / d["bound"] if d["bound"] else float("nan")
                                            for q in ("dense", "blocks")]
        print(f"{px:>5} {N:>5} {a.text + K * (N + 2):>6} " + " ".join(f"{x:>12.3f}" for x in row))

if __name__ == "__main__":
    main(sys.argv[1:])
