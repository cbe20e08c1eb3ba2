"""The group rollout against its batched bound, and the packed training forward against K separate ones,
on a narrow BAGEL config (bench_attention's: ~52M parameters, N = (px/16)^2 image tokens).

rollout  unigrpo.generate for one prompt and G chains: think (KV cache; its cache is the denoising
         context, policy.think(with_context=True)), then `num_steps` ODE steps, then decode
bound    the same modules with nothing else: one prefill of the prompt, as many batched one-token
         decode forwards as the rollout took, and `num_steps` batched velocity forwards on that cache
         (no sampling, no log-probs, no SDE arithmetic)
packed   one Policy.train_forward over [text, K window blocks] (forward + backward), with the dense mask
         and with the blocks attention path (Policy.attention)
separate K train_forwards of [text, one block] each (dense), the text recomputed every time

Prints the best of --repeats of each, the two interleaved, and the ratios: rollout / bound overall and
by part (think + context against the decode forwards; denoising against the velocity forwards), and
separate / packed. CPU time of this process with --clock=cpu (a shared machine; use --threads=1).

    .venv/bin/python benchmarks/bench_rollout_bound.py [--group_size 4] [--max_think_tokens 64]
        [--num_steps 10] [--px 256] [--layers 8] [--hidden 512] [--K 3] [--repeats 3] [--threads 1]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere: the flat modules
import sampler  # noqa: E402
from bench_attention import build  # noqa: E402

PROMPT = [17, 23, 99, 5, 64, 31, 8, 77, 12, 40, 41, 42, 300, 301, 302, 303]   # 16 prompt ids


class Args:
    dtype, device = "float32", "cpu"


class _Ids:
    """A tokenizer for the narrow config: text is space-separated ids."""
    pad_id, im_start_id, im_end_id, vision_start_id, vision_end_id, vocab_size = 0, 1, 2, 3, 4, 1024

    def encode(self, text):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


@torch.no_grad()
def rollout(policy, a, x_1, grid, prefill: bool = False):
    """(seconds of think + context, seconds of denoising + decode, decode steps taken). prefill: the context
    built by a second pass over prompt and reasoning (policy.context), as rollouts did before."""
    t0 = clock()
    out = policy.think([" ".join(map(str, PROMPT))], n=a.group_size, max_new_tokens=a.max_think_tokens,
                       generator=torch.Generator().manual_seed(0), with_context=not prefill)
    if prefill:                                   # the thinking part only
        policy.context(out)
        return clock() - t0, 0.0, out.ids.shape[1]
    th, ctx = out
    t1 = clock()
    traj = sampler.sample(lambda x_t, t: policy.velocity(x_t, t, ctx, image_hw=(a.px, a.px)), x_1, grid,
                          window=(), noise_level=0.0)
    policy.decode(traj.x_0, (a.px, a.px))
    return t1 - t0, clock() - t1, th.ids.shape[1]


@torch.no_grad()
def bound(policy, a, x_1, grid, steps: int):
    """(seconds of the prefill + `steps` one-token decode forwards, seconds of the velocity forwards)."""
    R, dev = a.group_size, policy.device
    ids = torch.tensor([[1, *PROMPT, 2]])
    t0 = clock()
    ctx = policy.forward_text(ids, torch.ones_like(ids, dtype=torch.bool))[1].repeat_interleave(R)
    tok, ones = torch.full((R, 1), 5, device=dev), torch.ones(R, 1, dtype=torch.bool, device=dev)
    for _ in range(steps):
        ctx = policy.forward_text(tok, ones, ctx)[1]
    t1 = clock()
    for i in range(grid.numel() - 1):
        policy.velocity(x_1, grid[i], ctx, image_hw=(a.px, a.px))
    return t1 - t0, clock() - t1


def train_step(policy, th, x_t, t, a, packed: bool, attention: str = "dense"):
    policy.attention = attention
    if packed:
        out = [policy.train_forward(th, x_t, t, image_hw=(a.px, a.px))]
    else:
        out = [policy.train_forward(th, x_t[:, k:k + 1], t[:, k:k + 1], image_hw=(a.px, a.px))
               for k in range(x_t.shape[1])]
    sum(o.logp.sum() + o.v.square().mean() for o in out).backward()
    policy.zero_grad(set_to_none=True)


def main(argv):
    global clock
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group_size", type=int, default=4)
    p.add_argument("--max_think_tokens", type=int, default=64)
    p.add_argument("--num_steps", type=int, default=10)
    p.add_argument("--px", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--K", type=int, default=3, help="window blocks of the training forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="cpu", choices=("wall", "cpu"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    spec = Args()
    spec.hidden, spec.layers = a.hidden, a.layers
    policy = build(spec).eval()
    policy.tokenizer = _Ids()
    with torch.no_grad():   # softer logits: chains stop at different lengths, as a group's do
        policy.model.language_model.lm_head.weight.mul_(0.1)
        policy.model.llm2vae.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    N, D = policy.latent_shape((a.px, a.px))
    x_1 = torch.randn(a.group_size, N, D, generator=torch.Generator().manual_seed(1))
    grid = sampler.timesteps(a.num_steps, 3.0)

    best = dict.fromkeys(("think", "prefill", "denoise", "decode", "velocity", "dense", "blocks", "separate"), 1e9)
    th = policy.think([" ".join(map(str, PROMPT))], n=a.group_size, max_new_tokens=a.max_think_tokens,
                      generator=torch.Generator().manual_seed(0))
    x_t, t = torch.randn(a.group_size, a.K, N, D), torch.full((a.group_size, a.K), 0.5)
    policy.train()
    train_step(policy, th, x_t, t, a, True)                        # warm-up
    policy.eval()
    for _ in range(a.repeats):
        think_s, denoise_s, steps = rollout(policy, a, x_1, grid)
        decode_s, velocity_s = bound(policy, a, x_1, grid, steps)
        best["prefill"] = min(best["prefill"], rollout(policy, a, x_1, grid, prefill=True)[0])
        for k, v in (("think", think_s), ("denoise", denoise_s), ("decode", decode_s),
                     ("velocity", velocity_s)):
            best[k] = min(best[k], v)
        for key in ("dense", "blocks", "separate"):
            t0 = clock()
            train_step(policy, th, x_t, t, a, key != "separate", "blocks" if key == "blocks" else "dense")
            best[key] = min(best[key], clock() - t0)
    params = sum(q.numel() for q in policy.parameters())
    print(f"narrow BAGEL: {params / 1e6:.1f}M params, hidden {a.hidden}, {a.layers} layers; G = {a.group_size}, "
          f"{steps} decode steps (<= {a.max_think_tokens}; mean chain {th.mask.sum(1).float().mean():.1f} "
          f"tokens), {a.num_steps} ODE steps, {a.px} px (N = {N}), K = {a.K}; {a.threads} thread(s), "
          f"{a.clock} clock, best of {a.repeats}")
    total, low = best["think"] + best["denoise"], best["decode"] + best["velocity"]
    print(f"rollout {total:.3f} s, bound {low:.3f} s: rollout / bound {total / low:.3f}")
    print(f"  think + context {best['think']:.3f} s / decode forwards {best['decode']:.3f} s = "
          f"{best['think'] / best['decode']:.3f}")
    print(f"  think + a second prefill (context(thoughts)) {best['prefill']:.3f} s / decode forwards = "
          f"{best['prefill'] / best['decode']:.3f}")
    print(f"  denoise + decode {best['denoise']:.3f} s / velocity forwards {best['velocity']:.3f} s = "
          f"{best['denoise'] / best['velocity']:.3f}")
    print(f"training forward+backward: {a.K} separate {best['separate']:.3f} s, packed dense {best['dense']:.3f} s, "
          f"packed blocks {best['blocks']:.3f} s: separate / packed dense {best['separate'] / best['dense']:.3f}, "
          f"separate / packed blocks {best['separate'] / best['blocks']:.3f}")


clock = time.process_time

if __name__ == "__main__":
    main(sys.argv[1:])
