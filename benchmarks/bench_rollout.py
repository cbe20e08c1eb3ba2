"""Rollout cost of the toy Policy: cached path (KV cache while thinking, one context prefill reused by every
denoising step) against a naive path that re-runs the whole sequence at every token and every step.

One group: n reasoning chains for one prompt (temperature 1, same generator seed in both paths, so both sample
the same tokens) and one image per chain with `steps` Euler ODE steps on Bagel's shifted grid (shift 3).
Forward only, fp32, CPU; prints the best of `repeats` wall times of both paths, their ratio and the largest
difference between their outputs (they compute the same thing).

    .venv/bin/python benchmarks/bench_rollout.py [--group 8] [--steps 10] [--tokens 20] [--repeats 5] [--threads 1]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's flat modules
import model as M  # noqa: E402

WORDS = ("a an one two three four plus red green blue yellow circle square triangle left_of right_of above below "
         "and colour_of grass sky blood sun ; r0 r1 r2 r3 c0 c1 c2 c3").split()
PROMPT = "two plus one red circle and a square colour_of sky"


def grid(num_steps, shift=3.0):
    """Bagel's float32 grid shift(linspace(1, 0, num_steps + 1)), shift(s) = s*t / (1 + (s - 1)*t)."""
    t = torch.linspace(1, 0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def cached_rollout(policy, n, tokens, steps, x_1, seed):
    th = policy.think([PROMPT], n=n, max_new_tokens=tokens, generator=torch.Generator().manual_seed(seed))
    ctx = policy.context(th)
    x, ts = x_1, grid(steps)
    for i in range(steps):
        x = x - policy.velocity(x, ts[i], ctx) * (ts[i] - ts[i + 1])
    return th, x


@torch.no_grad()
def naive_rollout(policy, n, tokens, steps, x_1, seed):
    """No cache: every new token re-runs [prompt, im_start, tokens so far]; every ODE step re-runs the packed
    [text, image block] sequence (train_forward's layout, K = 1)."""
    c, g = policy.cfg, torch.Generator().manual_seed(seed)
    prefix = policy._prompt_prefix(PROMPT, 0, tokens, thinking=True)
    rows = [prefix + [c.im_start_id] for _ in range(n)]
    alive = [True] * n
    gen, logps = [[] for _ in range(n)], [[] for _ in range(n)]
    for _ in range(tokens):
        ids, valid = policy._pad(rows)
        h, _ = policy.forward_text(ids, valid)
        last = h[torch.arange(n), valid.sum(1) - 1]
        logits = policy.model.language_model.lm_head(last).float()
        tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
        lp = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
        for r in range(n):
            if alive[r]:
                gen[r].append(int(tok[r])), logps[r].append(float(lp[r])), rows[r].append(int(tok[r]))
                alive[r] = int(tok[r]) != c.im_end_id
        if not any(alive):
            break
    P_ids, P_mask = policy._pad([prefix] * n)
    ids, mask = policy._pad(gen)
    logp = torch.zeros(ids.shape)
    for r in range(n):
        logp[r, :len(logps[r])] = torch.tensor(logps[r])
    th = M.Thoughts(P_ids, P_mask, ids, mask, logp, [""] * n)
    x, ts = x_1, grid(steps)
    for i in range(steps):
        _, v = policy.packed_forward(th, x[:, None], ts[i:i + 1])
        x = x - v[:, 0] * (ts[i] - ts[i + 1])
    return th, x


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = M.WordTokenizer(WORDS)
    cfg = M.BagelConfig.toy(tok, ground_words="r0 r1 r2 r3".split())
    policy = M.Policy.from_config(cfg, tok, seed=a.seed).eval()
    with torch.no_grad():  # llm2vae is zero at init; give the image expert a non-trivial output
        policy.model.llm2vae.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(a.seed))
    N, D = policy.latent_shape()
    x_1 = torch.randn(a.group, N, D, generator=torch.Generator().manual_seed(a.seed + 1))
    run = lambda f: f(policy, a.group, a.tokens, a.steps, x_1, a.seed)
    t_cached, (th_c, x_c) = best_of(lambda: run(cached_rollout), a.repeats)
    t_naive, (th_n, x_n) = best_of(lambda: run(naive_rollout), a.repeats)
    params = sum(p.numel() for p in policy.parameters())
    print(f"toy Policy: {params / 1e6:.2f}M params, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{N} image tokens of D={D}; group {a.group}, {a.steps} ODE steps, up to {a.tokens} reasoning tokens "
          f"(mean {th_c.mask.sum(1).float().mean():.1f}), prompt {th_c.prompt_mask.sum(1)[0]} tokens, "
          f"{a.threads} thread(s), best of {a.repeats}")
    print(f"cached (KV cache + context cache): {t_cached * 1e3:8.1f} ms")
    print(f"naive  (re-run whole sequence)   : {t_naive * 1e3:8.1f} ms")
    print(f"speed-up naive / cached          : {t_naive / t_cached:8.2f} x")
    same = torch.equal(th_c.ids, th_n.ids)
    print(f"same tokens: {same}; max |logp diff| {(th_c.logp - th_n.logp).abs().max():.2e}; "
          f"max |x_0 diff| {(x_c - x_n).abs().max():.2e}")


if __name__ == "__main__":
    main()
