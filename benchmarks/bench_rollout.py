"""Rollout cost of the toy Policy, cached against naive, on one group.

The cached path keeps a KV cache while thinking and one context prefill reused by every denoising
step; the naive path re-runs the whole sequence at every token and every step.

One group: G reasoning chains for one prompt (temperature 1, the same generator seed in both paths,
so both sample the same tokens) and one image per chain with `num_steps` Euler ODE steps on Bagel's
shifted grid. The naive path is the training pass (`packed_forward`) re-run on the sequence so far.
Forward only, fp32, CPU; prints the best of `repeats` wall times of both paths, their ratio and the
largest difference between their outputs (they compute the same thing). Sizes are the --toy preset's
unless overridden (any Config field).

    .venv/bin/python benchmarks/bench_rollout.py [--group_size 8] [--num_steps 10]
                                                 [--max_think_tokens 20] [--repeats 5] [--threads 1]
"""
import sys
import time
from pathlib import Path

import torch

# run from anywhere: the repo's flat modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import sampler  # noqa: E402
import toy_policy  # noqa: E402
from policy import Thoughts, sample_tokens  # noqa: E402

PROMPT = "one plus two red circles"


@torch.no_grad()
def cached_rollout(policy, n, tokens, grid, x_1, seed):
    th = policy.think([PROMPT], n=n, max_new_tokens=tokens,
                      generator=torch.Generator().manual_seed(seed))
    ctx = policy.context(th)
    traj = sampler.sample(lambda x_t, t: policy.velocity(x_t, t, ctx), x_1, grid, window=(),
                          noise_level=0.0)
    return th, traj.x_0


def _rows(prompt, ids, n, T):
    """Thoughts of n rows with reasoning ids (n, T) (all valid) after the prompt rows of
    `prompt`."""
    return Thoughts(prompt.prompt_ids, prompt.prompt_mask, ids, torch.ones(n, T, dtype=torch.bool),
                    torch.zeros(n, T), [""] * n)


@torch.no_grad()
def naive_rollout(policy, n, tokens, grid, x_1, seed):
    """No cache: token j comes from packed_forward over [prompt, im_start, tokens so far]; every
    ODE step re-runs the packed [text, image block] sequence (train_forward's layout, K = 1)."""
    c, g = policy.cfg, torch.Generator().manual_seed(seed)
    prompt = policy.thoughts_from_text([PROMPT] * n, [""] * n)
    N, D = policy.latent_shape()
    no_blocks, no_t = torch.zeros(n, 0, N, D), torch.zeros(n, 0)
    ids = torch.zeros(n, 0, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    mask, logp = [], []
    for j in range(tokens):
        probe = torch.cat([ids, torch.full((n, 1), c.pad_id)], 1)       # the slot being predicted
        logits = policy.packed_forward(
            _rows(prompt, probe, n, j + 1), no_blocks, no_t)[0][:, j].float()
        tok = sample_tokens(logits, 1.0, g)
        lp = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
        ids = torch.cat([ids, torch.where(alive, tok, c.pad_id)[:, None]], 1)
        mask.append(alive)
        logp.append(torch.where(alive, lp, 0.0))
        alive = alive & (tok != c.im_end_id)
        if not alive.any():
            break
    th = Thoughts(prompt.prompt_ids, prompt.prompt_mask, ids, torch.stack(mask, 1),
                  torch.stack(logp, 1), [""] * n)
    x = x_1
    for i in range(grid.numel() - 1):
        v = policy.packed_forward(th, x[:, None], grid[i:i + 1].expand(n, 1))[1][:, 0]
        x = sampler.ode_step(x, v, grid[i], grid[i + 1])
    return th, x


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv):
    p = config.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    cfg, a = config.parse_args(["--toy", *argv], p)
    torch.set_num_threads(a.threads)
    policy = toy_policy.build_policy(cfg.seed).eval()
    with torch.no_grad():  # llm2vae is zero at init; give the image expert a non-trivial output
        policy.model.llm2vae.weight.normal_(0, 0.02,
                                            generator=torch.Generator().manual_seed(cfg.seed))
    n, tokens, grid = (cfg.group_size, cfg.max_think_tokens,
                       sampler.timesteps(cfg.num_steps, cfg.shift))
    N, D = policy.latent_shape()
    x_1 = torch.randn(n, N, D, generator=torch.Generator().manual_seed(cfg.seed + 1))
    t_cached, (th_c, x_c) = best_of(lambda: cached_rollout(policy, n, tokens, grid, x_1, cfg.seed),
                                    a.repeats)
    t_naive, (th_n, x_n) = best_of(lambda: naive_rollout(policy, n, tokens, grid, x_1, cfg.seed),
                                   a.repeats)
    params = sum(p.numel() for p in policy.parameters())
    print(f"toy Policy: {params / 1e6:.2f}M params, hidden {policy.cfg.hidden_size}, "
          f"{policy.cfg.num_hidden_layers} layers, {N} image tokens of D={D}; group {n}, "
          f"{cfg.num_steps} ODE steps, up to {tokens} reasoning tokens "
          f"(mean {th_c.mask.sum(1).float().mean():.1f}), prompt "
          f"{th_c.prompt_mask.sum(1)[0]} tokens, {a.threads} thread(s), best of {a.repeats}")
    print(f"cached (KV cache + context cache): {t_cached * 1e3:8.1f} ms")
    print(f"naive  (re-run whole sequence)   : {t_naive * 1e3:8.1f} ms")
    print(f"speed-up naive / cached          : {t_naive / t_cached:8.2f} x")
    same = torch.equal(th_c.ids, th_n.ids)
    print(f"same tokens: {same}; max |logp diff| {(th_c.logp - th_n.logp).abs().max():.2e}; "
          f"max |x_0 diff| {(x_c - x_n).abs().max():.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
