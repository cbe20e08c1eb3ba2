"""The toy's base policy: Bagel's MoT with its tiny preset, a word tokenizer, the grounding hook, and
the SFT warm-up on noisy (prompt, plan, image) triples that makes it an imperfect base, as the paper's
SFT'd BAGEL is.

    policy = toy_policy.build_policy(seed=0)       # a policy.Policy, random init, fp32
    toy_policy.sft(policy, cfg, cache_dir, print)  # Bagel's own losses, cached by all they depend on

Toy-only behaviour lives here and nowhere in Bagel's path: `WordTokenizer` (one id per word of the toy
world) and `Grounding`, the Policy's embed hook (policy.py deviation 4). The SFT triples are imperfect on
purpose, like real paired data (`sft_noise`): SFT learns their mistakes, more SFT keeps them, and only a
reward tells a mistake from a choice (RESULTS.md).

Deviations / borrowed defaults
    1. SFT trains both experts with Bagel's losses, CE on the plan plus the flow-matching MSE at a
       logit-normal t shifted by timestep_shift; the MSE is weighted sft_mse_weight (toy: 10, Bagel: 1).
    2. The SFT weights are an EMA of the trained ones (sft_ema), sharper after a short run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import checkpoint
import toy
from model import BagelConfig, train_timesteps
from policy import ContextImage, Policy, Thoughts, Turn


class WordTokenizer:
    """Whitespace word tokenizer for the toy: ids 0-4 are pad, im_start, im_end, vision_start, vision_end."""
    SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
    FILE = "word_tokenizer.json"

    def __init__(self, words):
        self.vocab = list(self.SPECIALS) + list(words)
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("words contains duplicates or special tokens")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.im_start_id, self.im_end_id, self.vision_start_id, self.vision_end_id = range(5)
        self.vocab_size = len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self.index]
        if unknown:
            raise ValueError(f"unknown word(s) {unknown} in text {text!r}")
        return [self.index[w] for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def save_pretrained(self, folder):
        path = Path(folder) / self.FILE
        checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.vocab[5:])))

    @classmethod
    def from_pretrained(cls, folder) -> WordTokenizer:
        words = checkpoint.read_json(Path(folder) / cls.FILE)
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{Path(folder) / cls.FILE}: expected a JSON list of words")
        return cls(words)


class Grounding:
    """The toy's embed hook (policy.py deviation 4): each plan token of a chunk `c5 red circle` gets
    scale * latent_pos_embed(cell 5) added to its input embedding, so an image token finds its object's
    colour and shape by position (GLIGEN-style); without it the image ignores positions. A ground token
    (`c5`) is in its cell; with span ends, so is every token after it up to the next span end (`;`,
    im_start, im_end). The cell comes first, so this stays causal and KV-cacheable: the cell still open
    after the last valid token is the carry of the next call. The scale (toy 0.1) keeps the sincos rows
    (norm ~8) from drowning a token's own embedding (norm ~0.2 at init).

    token_ids: the ground tokens; token_cells: the cell k = row*w + col of each (default: i for the
    i-th)."""
    FILE = "toy_grounding.json"

    def __init__(self, token_ids, token_cells=None, span_end_ids=(), scale=0.1, grid_hw=(toy.GRID, toy.GRID)):
        self.token_ids = tuple(int(i) for i in token_ids)
        self.token_cells = tuple(range(len(self.token_ids)) if token_cells is None else map(int, token_cells))
        self.span_end_ids, self.scale = tuple(int(i) for i in span_end_ids), float(scale)
        self.grid_hw = tuple(int(s) for s in grid_hw)
        h, w = self.grid_hw
        if len(self.token_cells) != len(self.token_ids):
            raise ValueError(f"token_cells has {len(self.token_cells)} entries, token_ids "
                             f"{len(self.token_ids)}")
        if any(not 0 <= k < h * w for k in self.token_cells):
            raise ValueError(f"token_cells {self.token_cells}: cells must lie in the {h}x{w} grid")
        if set(self.span_end_ids) & set(self.token_ids):
            raise ValueError("span_end_ids and token_ids must not share tokens")
        self._tables = {}                                      # per device: cell of each token, is-span-end

    @classmethod
    def from_words(cls, tokenizer, words, span_end_words=None, scale=0.1) -> Grounding:
        """words: one word per grid cell, row-major, or (word, cell) pairs (several words may share a cell).
        span_end_words (None: no spans): words that end a span; im_start and im_end always end one."""
        pairs = [(w, k) if isinstance(w, str) else tuple(w) for k, w in enumerate(words)]
        ends = () if span_end_words is None else (*tokenizer.encode(" ".join(span_end_words)),
                                                  tokenizer.im_start_id, tokenizer.im_end_id)
        return cls(tokenizer.encode(" ".join(w for w, _ in pairs)), [k for _, k in pairs], ends, scale)

    def spec(self) -> dict:
        return {"token_ids": self.token_ids, "token_cells": self.token_cells,
                "span_end_ids": self.span_end_ids, "scale": self.scale, "grid_hw": self.grid_hw}

    def save_pretrained(self, folder):
        path = Path(folder) / self.FILE
        checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.spec())))

    @classmethod
    def from_pretrained(cls, folder) -> Grounding:
        spec = checkpoint.read_json(Path(folder) / cls.FILE)
        try:
            return cls(**spec)
        except TypeError as e:
            raise ValueError(f"{Path(folder) / cls.FILE}: {e}") from None

    def _lookup(self, device):
        if device not in self._tables:
            vocab = max((*self.token_ids, *self.span_end_ids), default=0) + 1
            cell = torch.full((vocab,), -1, dtype=torch.long)
            cell[list(self.token_ids)] = torch.tensor(self.token_cells, dtype=torch.long)
            end = torch.zeros(vocab, dtype=torch.bool)
            end[list(self.span_end_ids)] = True
            self._tables[device] = (cell.to(device), end.to(device))
        return self._tables[device]

    def cells(self, ids: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
        """The grid cell (R, L) each token is grounded in, -1 for none. `carry` (R,): the cell open at the end
        of the tokens before `ids` (KV-cached decoding feeds one token at a time)."""
        cell_of, is_end = self._lookup(ids.device)
        known = ids < cell_of.shape[0]
        safe = torch.where(known, ids, 0)
        own = torch.where(known, cell_of[safe], -1)
        if not self.span_end_ids:
            return own
        idx = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        last_ground = torch.where(own >= 0, idx, -1).cummax(-1).values
        last_end = torch.where(known & is_end[safe], idx, -1).cummax(-1).values
        cells = torch.where(last_ground > last_end, own.gather(-1, last_ground.clamp(min=0)), -1)
        if carry is not None:  # tokens before any ground token or span end continue the open span
            cells = torch.where((last_ground < 0) & (last_end < 0), carry[..., None], cells)
        return cells

    def __call__(self, model, ids, valid, carry=None):
        """The hook: (extra input embedding (R, L, H), the cell open after the last valid token (R,),
        or None without spans)."""
        if model.cfg.grid(model.cfg.image_hw) != self.grid_hw:
            raise ValueError(f"Grounding is for a {self.grid_hw} grid, the model's is "
                             f"{model.cfg.grid(model.cfg.image_hw)}")
        cells = self.cells(ids, carry)
        k = cells.clamp(min=0)
        pos = (k // self.grid_hw[1]) * model.cfg.max_latent_size + k % self.grid_hw[1]
        extra = (self.scale * (cells >= 0))[..., None] * model.latent_pos_embed.pos_embed[pos]
        if not self.span_end_ids:
            return extra, None
        last = (valid.sum(1) - 1).clamp(min=0)[:, None]
        open_cell = cells.gather(1, last)[:, 0]
        return extra, torch.where(valid.any(1), open_cell, carry if carry is not None else -1)


# ------------------------------------------------------------------------------------------ the policy
def build_policy(seed: int = 0, device="cpu", **overrides) -> Policy:
    """The toy's Policy: BagelConfig.toy sized for the toy world's vocabulary, grounded plans, random init."""
    tok = WordTokenizer(toy.vocabulary())
    hook = Grounding.from_words(tok, toy.cell_tokens(), span_end_words=[toy.SEP])
    return Policy.from_config(BagelConfig.toy(tok, **overrides), tok, seed=seed, embed_hook=hook).to(device)


def from_pretrained(folder, dtype=torch.float32, device="cpu") -> Policy:
    """A toy policy saved by checkpoint.save_pretrained (official layout + its tokenizer and hook files)."""
    folder = Path(folder)
    hook = Grounding.from_pretrained(folder) if (folder / Grounding.FILE).is_file() else None
    return checkpoint.from_pretrained(folder, dtype=dtype, device=device,
                                      tokenizer=WordTokenizer.from_pretrained(folder), embed_hook=hook)


# ------------------------------------------------------------------------------------------ SFT warm-up
def _sft_layouts(cfg, step: int):
    """The prompts of SFT step `step` and, per row, its valid layout, its plan's layout and its image's."""
    prompts = toy.train_prompts(cfg.seed, step, cfg.sft_batch, split="train")
    rng = random.Random(f"{cfg.seed}/sft-layout/{step}")

    def noisy(layout, p):
        return toy.corrupt_layout(layout, rng) if p and rng.random() < p else layout

    valid, plans, drawn = [], [], []
    for prompt in prompts:
        valid.append(toy.random_layout(prompt, rng))
        plans.append(noisy(valid[-1], cfg.sft_noise))                    # the plan (wrong for its prompt)
        drawn.append(noisy(plans[-1], cfg.sft_image_noise))              # the image (off its plan)
    return prompts, valid, plans, drawn


def sft_batch(cfg, step: int):
    """Synthetic (prompt, plan, image) triples: a random valid layout, its canonical plan, its render. A
    triple's plan is wrong with probability sft_noise (one corrupt_layout error; the image still draws that
    plan) and, independently, its image is off its plan with probability sft_image_noise (one error)."""
    prompts, _, plans, drawn = _sft_layouts(cfg, step)
    return prompts, [toy.plan_text(p) for p in plans], toy.render_batch(drawn).to(cfg.device)


def sft_reflections(cfg, step: int):
    """Round 2 of the rows of SFT step `step` that train as two rounds (sft_reflect): (rows (sft_batch,) bool,
    their first images, reflections, second images). The first image is the row's, off its plan one time in
    two more; the reflection is the correct plan (the same plan where the first was right) and the second
    image its render."""
    rng = random.Random(f"{cfg.seed}/sft-reflect/{step}")
    _, valid, _, drawn = _sft_layouts(cfg, step)
    rows = torch.tensor([rng.random() < cfg.sft_reflect for _ in valid])
    first = [toy.corrupt_layout(d, rng) if rng.random() < 0.5 else d for d, r in zip(drawn, rows) if r]
    fixed = [v for v, r in zip(valid, rows) if r]
    if not fixed:
        return rows, None, [], None
    return (rows, toy.render_batch(first).to(cfg.device), [toy.plan_text(v) for v in fixed],
            toy.render_batch(fixed).to(cfg.device))


def sft_drop(cfg, step: int) -> torch.Tensor:
    """(sft_batch,) bool: the triples of SFT step `step` trained without their text (sft_cfg_drop)."""
    rng = random.Random(f"{cfg.seed}/sft-drop/{step}")
    return torch.tensor([rng.random() < cfg.sft_cfg_drop for _ in range(cfg.sft_batch)])


def sft_loss(policy, prompts, plans, images, generator, mse_weight: float = 1.0, drop=None, reflect=None):
    """Bagel's own losses on (prompt, plan, image) triples: CE on the plan + mse_weight * flow-matching MSE.

    images: (R, 3, H, W) in [0, 1]. One train_forward gives both, with K = 1 noisy block per sample.
    drop (R,) bool: rows whose image is trained on the unconditional input that CFG reads (an empty
    prompt chunk, no reasoning: unigrpo.uncond_thoughts), as Bagel drops the text of a share of its data.
    reflect: sft_reflections' output; its rows train as two rounds in one interleaved forward
    ([prompt, plan, noisy image, the image as context, reflection, noisy second image]).
    """
    if reflect is not None and reflect[1] is not None:
        return _sft_loss_two_rounds(policy, prompts, plans, images, generator, mse_weight, drop, reflect)
    out, thoughts, target = _one_round(policy, prompts, plans, images, generator, drop)
    ce = -(out.logp * thoughts.mask).sum() / thoughts.mask.sum().clamp(min=1)
    mse = ((out.v[:, 0] - target) ** 2).mean()
    return ce + mse_weight * mse, {"sft_ce": ce.item(), "sft_mse": mse.item()}


def _noised(x_0, generator, shift):
    """Bagel's training noise: a logit-normal t per row, then x_t = (1 - t) x_0 + t eps: (t, x_t, eps - x_0)."""
    u = torch.randn(x_0.shape[0], generator=generator, device=generator.device).to(x_0.device)
    t = train_timesteps(u, shift)
    eps = torch.randn(x_0.shape, generator=generator, device=generator.device).to(x_0.device)
    return t, (1 - t)[:, None, None] * x_0 + t[:, None, None] * eps, eps - x_0


def _one_round(policy, prompts, plans, images, generator, drop):
    """(train_forward output, thoughts, velocity target) of one-round SFT rows."""
    dropped = [False] * len(prompts) if drop is None else drop.tolist()
    thoughts = policy.thoughts_from_text(["" if d else p.text for p, d in zip(prompts, dropped)],
                                         ["" if d else plan for plan, d in zip(plans, dropped)])
    if any(dropped):
        keep = ~torch.tensor(dropped, device=thoughts.mask.device)[:, None]
        thoughts.mask = thoughts.mask & keep
        thoughts.ids = torch.where(keep, thoughts.ids, policy.cfg.pad_id)
    x_0 = policy.encode(images * 2 - 1)                                   # (R, N, D)
    t, x_t, target = _noised(x_0, generator, policy.cfg.timestep_shift)
    return policy.train_forward(thoughts, x_t[:, None], t[:, None]), thoughts, target


def _sft_loss_two_rounds(policy, prompts, plans, images, generator, mse_weight, drop, reflect):
    """sft_loss with reflect rows: the other rows as one round, the reflect rows as two (their first image
    the reflection data's), CE over every text token and MSE over every noisy block."""
    rows, first, reflections, second = reflect
    drop = None if drop is None else drop & ~rows                # a reflect row keeps its text
    keep, idx = (~rows).nonzero()[:, 0].tolist(), rows.nonzero()[:, 0].tolist()
    ce_sum, tokens, mse_sum, blocks = 0.0, 0, 0.0, 0
    if keep:
        out, th, target = _one_round(policy, [prompts[i] for i in keep], [plans[i] for i in keep], images[keep],
                                     generator, None if drop is None else drop[keep])
        ce_sum, tokens = -(out.logp * th.mask).sum(), th.mask.sum()
        mse_sum, blocks = ((out.v[:, 0] - target) ** 2).mean((1, 2)).sum(), len(keep)
    th1 = policy.thoughts_from_text([prompts[i].text for i in idx], [plans[i] for i in idx])
    th2 = policy.thoughts_from_text([""] * len(idx), reflections)
    th2 = Thoughts(th2.prompt_ids[:, :0], th2.prompt_mask[:, :0], th2.ids, th2.mask, th2.logp, th2.texts)
    x1, x2 = policy.encode(first * 2 - 1), policy.encode(second * 2 - 1)
    (t1, xt1, v1), (t2, xt2, v2) = (_noised(x, generator, policy.cfg.timestep_shift) for x in (x1, x2))
    outs = policy.train_forward_turns([Turn(th1, xt1[:, None], t1[:, None], ContextImage(latents=x1)),
                                       Turn(th2, xt2[:, None], t2[:, None])])
    for out, th, target in zip(outs, (th1, th2), (v1, v2)):
        ce_sum, tokens = ce_sum - (out.logp * th.mask).sum(), tokens + th.mask.sum()
        mse_sum, blocks = mse_sum + ((out.v[:, 0] - target) ** 2).mean((1, 2)).sum(), blocks + len(idx)
    ce, mse = ce_sum / tokens.clamp(min=1), mse_sum / blocks
    return ce + mse_weight * mse, {"sft_ce": ce.item(), "sft_mse": mse.item()}


def sft_cache_path(policy, cfg, cache_dir: Path) -> Path:
    """The cache file of this SFT, keyed by everything its weights depend on: the model's config,
    vocabulary and hook, the seed, the sft_* settings and the data (through its first batch's plans)."""
    hook = policy.embed_hook.spec() if policy.embed_hook is not None else None
    what = [checkpoint.config_to_json(policy.cfg), getattr(policy.tokenizer, "vocab", None), hook, cfg.seed,
            *(getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name.startswith("sft_") and (f.name != "sft_reflect" or cfg.sft_reflect)),
            sft_batch(cfg, 0)[1]]
    key = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"sft-{key}.safetensors"


def read_sft_cache(path: Path) -> tuple[dict, dict]:
    """(state dict, metadata with 'seconds' and 'steps') of a cached SFT policy; safetensors, no pickle,
    every tensor finite."""
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = {k: float(v) for k, v in (f.metadata() or {}).items()}
        checkpoint.check_finite("", **state)
    except (SafetensorError, OSError, ValueError, FloatingPointError) as e:
        raise checkpoint.CorruptFile(f"SFT cache {path} is corrupt or unreadable ({type(e).__name__}: "
                                     f"{e}); delete it to train again") from None
    return state, meta


def sft(policy, cfg, cache_dir: Path, log, probe=None, probe_every: int = 100) -> float:
    """SFT warm-up of both experts (Bagel's losses), cached so that RL can be rerun alone. Returns the seconds
    spent training (0 when the cache had it). probe(step, seconds), every probe_every steps, sees the
    policy as SFT would end there (its EMA weights) and the training seconds so far (its own excluded)."""
    if cfg.sft_steps == 0:
        return 0.0
    path = sft_cache_path(policy, cfg, cache_dir)
    if path.exists():
        state, meta = read_sft_cache(path)
        try:
            policy.load_state_dict(state)
        except RuntimeError as e:
            raise checkpoint.CorruptFile(f"SFT cache {path} holds another model ({str(e)[:200]}); "
                                         f"delete it to train again") from None
        log(f"SFT: loaded cached checkpoint {path} (trained in {meta.get('seconds', float('nan')):.0f} s)")
        return 0.0
    t0 = time.time()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.sft_warmup, 1)))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    params = [p for p in policy.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    policy.train()
    for step in (bar := tqdm(range(cfg.sft_steps), desc="SFT", dynamic_ncols=True, disable=None)):
        prompts, plans, images = sft_batch(cfg, step)
        drop = sft_drop(cfg, step) if cfg.sft_cfg_drop else None
        reflect = sft_reflections(cfg, step) if cfg.sft_reflect else None
        loss, stats = sft_loss(policy, prompts, plans, images, g, cfg.sft_mse_weight, drop, reflect)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        checkpoint.check_finite(f"SFT step {step}", loss=loss, grad_norm=grad_norm)
        opt.step()
        sched.step()
        if cfg.sft_ema:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - cfg.sft_ema)
        if step % 50 == 0:
            bar.set_postfix(ce=f"{stats['sft_ce']:.3f}", mse=f"{stats['sft_mse']:.4f}")
        if probe is not None and (step + 1) % probe_every == 0:
            paused, live = time.time(), [p.detach().clone() for p in params]
            if cfg.sft_ema:                      # the probe sees what SFT would return if it ended here
                torch._foreach_copy_([p.data for p in params], ema)
            policy.eval()
            probe(step + 1, paused - t0)
            torch._foreach_copy_([p.data for p in params], live)
            policy.train()
            t0 += time.time() - paused
    if cfg.sft_ema:  # the EMA weights are the SFT policy (sharper samples after a short run)
        torch._foreach_copy_([p.data for p in params], ema)
    policy.eval()
    seconds = time.time() - t0
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    checkpoint.check_finite(f"SFT after {cfg.sft_steps} steps", **state)
    checkpoint.atomic_write(path, lambda tmp: save_file(
        state, tmp, metadata={"seconds": str(seconds), "steps": str(cfg.sft_steps)}))
    return seconds
