"""Fit the hackable proxy reward of the Fig. 5 analogue: toy.ProxyReward, a small CNN + GRU scorer, on
images labelled by the toy's exact verifier (TA).

    python experiments/fit_proxy.py                  # -> experiments/proxy.safetensors (~6 min on 2 cores)
    python experiments/fit_proxy.py --samples=2048 --epochs=2 --out=/tmp/proxy.safetensors

The images are what RL starts from: the SFT base of --seed (experiments/results.py's, trained into the SFT
cache when missing; any Config flag as --key=value) drawing for training prompts, half with the ODE and half through an SDE window as rollouts
do, plus as many clean renders of random and corrupted layouts. Fitted by binary cross-entropy to TA,
with a held-out fifth for the printed fit (mean absolute error and correlation to the verifier). It has
seen only the base's kind of images, so what RL drifts to (speckle, haze, odd shapes) it scores by
guesswork: the reward a policy can hack.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # run from anywhere: the repo's flat modules
import config  # noqa: E402
import sampler  # noqa: E402
import toy  # noqa: E402
import toy_policy  # noqa: E402
import unigrpo  # noqa: E402
import results  # noqa: E402


def policy_images(cfg, n: int, seed: int):
    """(prompts, images) of the SFT base: n training prompts, one chain each, half through an SDE window."""
    policy = toy_policy.build_policy(cfg.seed)
    toy_policy.sft(policy, cfg, Path(cfg.out_dir) / "sft-cache", print)
    return _draw(policy, cfg, n, seed)


@torch.no_grad()
def _draw(policy, cfg, n: int, seed: int):
    prompts = toy.train_prompts(seed, 10 ** 6, n)
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, n, 256):
        window = sampler.sde_window(cfg.num_steps, cfg.window_start, cfg.window_size, generator=g) \
            if (i // 256) % 2 else ()
        images.append(unigrpo.generate(policy, prompts[i:i + 256], cfg, g, window=window)[2])
    return prompts, torch.cat(images)


def render_images(n: int, seed: int):
    """(prompts, images): clean renders, half of a valid layout and half with one to three errors."""
    rng = random.Random(f"proxy/{seed}")
    prompts = toy.train_prompts(seed, 10 ** 6 + 1, n)
    layouts = []
    for i, p in enumerate(prompts):
        layout = toy.random_layout(p, rng)
        for _ in range(rng.randint(1, 3) if i % 2 else 0):
            layout = toy.corrupt_layout(layout, rng)
        layouts.append(layout)
    return prompts, toy.render_batch(layouts)


def fit(proxy, prompts, images, targets, epochs: int, batch: int = 32, lr: float = 3e-3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(proxy.parameters(), lr=lr, weight_decay=1e-4)
    proxy.train()
    for epoch in range(epochs):
        order = torch.randperm(len(prompts), generator=g).tolist()
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            logits = proxy.logits(images[idx], [prompts[j] for j in idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    return proxy.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the SFT base (toy preset, this seed) that draws")
    p.add_argument("--samples", type=int, default=8192, help="policy images; as many renders again")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", default=str(HERE / "proxy.safetensors"))
    p.add_argument("--out_dir", default=str(HERE.parent / "runs" / "results"), help="where the SFT cache is")
    a, extra = p.parse_known_args(argv)
    t0 = time.time()
    # the base of experiments/results.py's runs, unless Config flags (--key=value) say otherwise
    cfg, _ = config.parse_args(["--toy", *results.SCALE, f"--seed={a.seed}", f"--out_dir={a.out_dir}", *extra])
    pp, pi = policy_images(cfg, a.samples, a.seed)
    rp, ri = render_images(a.samples, a.seed)
    prompts, images = pp + rp, torch.cat([pi, ri])
    targets = toy.ToyReward()(images, prompts)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(a.seed)).tolist()
    cut = len(order) // 5
    test, train = order[:cut], order[cut:]
    proxy = fit(toy.ProxyReward(), [prompts[i] for i in train], images[train], targets[train], a.epochs,
                seed=a.seed)
    pred = proxy(images[test], [prompts[i] for i in test])
    truth = targets[test]
    corr = torch.corrcoef(torch.stack([pred, truth]))[0, 1].item()
    print(f"held-out fit on {len(test)} images: mean |proxy - TA| {(pred - truth).abs().mean():.4f}, "
          f"correlation {corr:.3f} (verifier TA mean {truth.mean():.3f}, proxy {pred.mean():.3f})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    proxy.save(a.out)
    print(f"wrote {a.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
