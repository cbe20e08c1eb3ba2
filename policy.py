"""The Policy: BAGEL's MoT (model.py) behind the interface the RL loop uses.

    think(prompts, n, max_new_tokens, temperature)  reasoning chains, KV-cached -> Thoughts
                                                     (with_context=True: and that cache as the Context)
    context(thoughts)                                the conditioning cache, once per row -> Context
    context([text, ContextImage, text, ...])         the same from interleaved segments (multi-round)
    context_image(ctx, image), think_from(ctx, ...)  an image into the cache (VAE, then ViT); a reflection
    velocity(x_t, t, context)                        v_theta(x_t, t): the generation expert, cached context
    train_forward(thoughts, x_t, t)                  one packed forward: reasoning log-probs, K velocities
    train_forward_turns([Turn, ...])                 the same over an interleaved multi-round trajectory
    encode(images), decode(x_0), param_groups()      the image codec; reasoning vs denoising parameters

Rollouts use the cached path (think, context, velocity); the update recomputes with the packed path.
Before any update the two agree (ratio = 1 up to float error; a test), for one round and for several.
An image enters the context as Bagel's update_context_image does (reference/bagel_context/NOTES.md):
the VAE update (markers: und expert; clean latents at t = 0: gen expert) and then the ViT update (vit.py;
und expert), each a full-attention cache write at the RoPE counter, which then advances by one.
Loading: checkpoint.py.

Glossary
    R rows (prompts x group), P prompt tokens, T reasoning tokens, K noisy blocks per row, N latent
    tokens, D latent token dim, L sequence length, H hidden size.
    chunk: a text piece fed as [im_start] + ids + [im_end]; block: [vision_start] + N latents +
    [vision_end]. x_t: the latent at time t (t = 1 noise, t = 0 data), x_t = (1 - t)*x_0 + t*eps;
    v = eps - x_0.

Deviations / borrowed defaults
    1. The reasoning chunk fed after thinking is [im_start] + sampled ids (+ im_end if truncated);
       Bagel re-tokenizes the decoded text, which can differ from the sampled ids.
    2. Thoughts.logp is the log-prob under the temperature-1 policy softmax(logits), whatever the
       sampling temperature: the policy's own log-prob, which is what the GRPO ratio compares.
    3. CFG is plain text CFG v_u + s*(v - v_u) (no cfg_interval, no renorm, no image CFG); off by
       default.
    4. embed_hook (Bagel: None): a toy's extra term on the text tokens' input embeddings, with a
       per-row carry kept in the Context across KV-cached calls (toy_policy.Grounding).
    5. The FLUX VAE is loaded lazily at the first encode/decode, from the checkpoint folder.
    6. seen_image encodes the posterior mean (Bagel's encode samples it) and reads a generated image at
       its own size (Bagel first applies the VAE transform's resize, a no-op for its own outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

import lora
import sampler
import vit
from model import (BagelConfig, BagelMoT, block_is_gen, check_tokenizer, guided_velocity,
                   interleaved_layout, packed_blocks, packed_layout, pad_rows, patchify, unpatchify, visible)


@dataclass
class Thoughts:
    """Reasoning chains, rows group-contiguous. prompt_ids: everything fed before the reasoning."""
    prompt_ids: torch.Tensor   # (R, P) long, right-padded: [system chunk] + [im_start, prompt, im_end]
    prompt_mask: torch.Tensor  # (R, P) bool
    ids: torch.Tensor          # (R, T) long, sampled tokens incl. the stop token im_end, right-padded
    mask: torch.Tensor         # (R, T) bool
    logp: torch.Tensor         # (R, T) float, temperature-1 log-prob (deviation 2), 0 where masked
    texts: list                # (R,) decoded reasoning, without im_end

    def select(self, idx) -> Thoughts:
        idx = torch.as_tensor(idx, device=self.ids.device)
        idx = idx.nonzero()[:, 0] if idx.dtype == torch.bool else idx.long()
        rows = (x[idx] for x in (self.prompt_ids, self.prompt_mask, self.ids, self.mask, self.logp))
        return Thoughts(*rows, [self.texts[i] for i in idx.tolist()])

    @staticmethod
    def cat(parts: list[Thoughts]) -> Thoughts:
        """Rows of several Thoughts, each width right-padded to the widest (masked slots are never read)."""
        def pad(name, value):
            xs = [getattr(p, name) for p in parts]
            width = max(x.shape[1] for x in xs)
            return torch.cat([nn.functional.pad(x, (0, width - x.shape[1]), value=value) for x in xs])
        return Thoughts(pad("prompt_ids", 0), pad("prompt_mask", False), pad("ids", 0), pad("mask", False),
                        pad("logp", 0.0), [t for p in parts for t in p.texts])


@dataclass
class Context:
    """A cached conditioning sequence: per-layer keys (after norm + RoPE), values (R, H_kv, L, d)."""
    keys: list
    values: list
    key_mask: torch.Tensor     # (R, L) bool, valid (non-padding) keys
    rope_next: torch.Tensor    # (R,) long
    hook_carry: torch.Tensor | None = None  # (R,), the embed hook's carry (deviation 4)

    def past(self) -> list:
        return list(zip(self.keys, self.values))

    def repeat_interleave(self, n: int) -> Context:
        def rep(x):
            return None if x is None else x.repeat_interleave(n, 0)
        return Context([rep(k) for k in self.keys], [rep(v) for v in self.values],
                       rep(self.key_mask), rep(self.rope_next), rep(self.hook_carry))


@dataclass
class ContextImage:
    """An image entering the context, as Bagel's update_context_image puts it there: the VAE update (its
    clean latent tokens at t = 0 through the generation expert, the markers through the understanding
    expert), then the ViT update (every token through the understanding expert). Either may be left out."""
    latents: torch.Tensor | None = None     # (R, N, D) x_0 tokens (encode of the image)
    vit_pixels: torch.Tensor | None = None  # (R, 3, H', W') in [-1, 1] (vit.preprocess, the ViT transform)
    image_hw: tuple | None = None           # pixel size of the latents' image; None: cfg.image_hw

    def select(self, idx) -> ContextImage:
        return ContextImage(*(None if x is None else x[idx] for x in (self.latents, self.vit_pixels)),
                            self.image_hw)

    @staticmethod
    def cat(parts: list[ContextImage]) -> ContextImage:
        """Rows of several ContextImages of one image size."""
        def rows(name):
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
        return ContextImage(rows("latents"), rows("vit_pixels"), parts[0].image_hw)


@dataclass
class Turn:
    """One round of an interleaved trajectory, as the packed training forward reads it: the round's text
    (round 1: prompt and reasoning; later rounds: the reflection, thoughts with an empty prompt), its K noisy
    window blocks, then `seen`, the round's image as it entered the context (None in the last round)."""
    thoughts: Thoughts
    x_t: torch.Tensor                  # (R, K, N, D)
    t: torch.Tensor | float            # (R, K), (K,) or a float
    seen: ContextImage | None = None


@dataclass
class TrainOutput:
    logp: torch.Tensor         # (R, T) log-softmax of the reasoning tokens (temperature 1), 0 if masked
    v: torch.Tensor            # (R, K, N, D) velocities of the K noisy blocks


class _PixelCodec:
    """Toy codec (model.py deviation 2a): the latent is the image itself."""

    @staticmethod
    def encode(x):
        return x

    @staticmethod
    def decode(x):
        return x


class Policy(nn.Module):
    """The MoT (`self.model`), the tokenizer and the image codec behind the RL loop's interface.
    embed_hook(model, ids, valid, carry) -> (extra input embedding, carry): deviation 4."""

    def __init__(self, cfg: BagelConfig, tokenizer, model: BagelMoT | None = None, embed_hook=None):
        super().__init__()
        self.cfg, self.tokenizer, self.embed_hook = cfg, tokenizer, embed_hook
        self.model = model if model is not None else BagelMoT(cfg)
        self.extra_state: dict = {}    # ViT / connector tensors of a real checkpoint, kept untouched
        self.source_folder: Path | None = None
        self._codec = None
        self.attention = "dense"       # packed_forward's attention: "dense" mask or "blocks" (model.py 1)

    @classmethod
    def from_config(cls, cfg: BagelConfig, tokenizer, seed: int = 0, embed_hook=None) -> Policy:
        """Random init (BagelMoT.init_weights), fp32, deterministic in `seed`."""
        check_tokenizer(tokenizer, cfg)
        return cls(cfg, tokenizer, BagelMoT(cfg).init_weights(seed), embed_hook)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def latent_shape(self, image_hw=None) -> tuple[int, int]:
        """(N, D) of an image of image_hw pixels (default cfg.image_hw)."""
        h, w = self.cfg.grid(image_hw or self.cfg.image_hw)
        return h * w, self.cfg.patch_dim

    def empty_context(self, R: int) -> Context:
        shape, dev = (R, self.cfg.num_key_value_heads, 0, self.cfg.head_dim), self.device
        n = self.cfg.num_hidden_layers
        keys = [torch.zeros(shape, dtype=self.model.dtype, device=dev) for _ in range(n)]
        values = [torch.zeros(shape, dtype=self.model.dtype, device=dev) for _ in range(n)]
        return Context(keys, values, torch.zeros(R, 0, dtype=torch.bool, device=dev),
                       torch.zeros(R, dtype=torch.long, device=dev))

    # -------------------------------------------------------------------------------------- text
    def text_embeddings(self, ids, valid, carry=None):
        """Input embeddings of text ids (R, L) plus the embed hook's term: (embeddings, carry)."""
        e = self.model.embed_text(ids)
        if self.embed_hook is None:
            return e, None
        extra, carry = self.embed_hook(self.model, ids, valid, carry)
        return e + extra, carry

    def forward_text(self, ids: torch.Tensor, valid: torch.Tensor, past: Context | None = None):
        """Causal und-expert pass over new text ids (R, L) (right-padded, `valid`) after `past`.
        Returns (final hidden (R, L, H), the context extended by these tokens)."""
        R, L = ids.shape
        past = past if past is not None else self.empty_context(R)
        pos = past.rope_next[:, None] + torch.arange(L, device=ids.device)
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        mask = torch.cat([past.key_mask[:, None, :].expand(R, L, -1), causal & valid[:, None, :]], -1)
        emb, carry = self.text_embeddings(ids, valid, past.hook_carry)
        h, present = self.model(emb, None, pos, visible(mask)[:, None], past.past())
        keys = [torch.cat([pk, k], 2) for pk, (k, _) in zip(past.keys, present)]
        values = [torch.cat([pv, v], 2) for pv, (_, v) in zip(past.values, present)]
        key_mask = torch.cat([past.key_mask, valid], 1)
        return h, Context(keys, values, key_mask, past.rope_next + valid.sum(1), carry)

    @torch.no_grad()
    def think(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
              generator: torch.Generator | None = None, with_context: bool = False):
        """Sample n reasoning chains per prompt with a KV cache: prefill [system?, prompt chunk] once
        per prompt, feed im_start, sample until im_end (kept, with its log-prob) or max_new_tokens.
        temperature 0 is greedy. generator: a torch.Generator, or a sampler.RowStreams (a stream per row).
        with_context: (thoughts, the cache extended to context(thoughts)'s tokens), so that denoising
        reuses the reasoning's cache instead of prefilling it again."""
        if n < 1 or max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"need n >= 1, max_new_tokens >= 0, temperature >= 0; "
                             f"got {n}, {max_new_tokens}, {temperature}")
        thinking = max_new_tokens > 0
        prefixes = [self._prompt_prefix(p, i, max_new_tokens, thinking) for i, p in enumerate(prompts)]
        P_ids, P_mask = pad_rows(prefixes, self.cfg.pad_id, self.device)
        R, dev = len(prompts) * n, self.device
        prompt_ids, prompt_mask = P_ids.repeat_interleave(n, 0), P_mask.repeat_interleave(n, 0)
        if not thinking:
            empty = torch.zeros(R, 0, dtype=torch.long, device=dev)
            th = Thoughts(prompt_ids, prompt_mask, empty, empty.bool(), empty.float(), [""] * R)
            return (th, self.forward_text(P_ids, P_mask)[1].repeat_interleave(n)) if with_context else th
        ctx = self.forward_text(P_ids, P_mask)[1].repeat_interleave(n)
        return self._sample_chunk(ctx, prompt_ids, prompt_mask, max_new_tokens, temperature, generator,
                                  with_context)

    @torch.no_grad()
    def think_from(self, ctx: Context, max_new_tokens: int, temperature: float = 1.0,
                   generator: torch.Generator | None = None, with_context: bool = False):
        """think, continuing any context (a reflection after an image): one chunk per row of ctx, sampled
        after im_start until im_end or max_new_tokens. The Thoughts have an empty prompt."""
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0; got {max_new_tokens}, {temperature}")
        R = ctx.key_mask.shape[0]
        none = torch.zeros(R, 0, dtype=torch.long, device=self.device)
        if max_new_tokens == 0:
            th = Thoughts(none, none.bool(), none, none.bool(), none.float(), [""] * R)
            return (th, ctx) if with_context else th
        return self._sample_chunk(ctx, none, none.bool(), max_new_tokens, temperature, generator, with_context)

    def _sample_chunk(self, ctx, prompt_ids, prompt_mask, max_new_tokens, temperature, generator, with_context):
        R, c, dev = ctx.key_mask.shape[0], self.cfg, self.device
        tok = torch.full((R,), c.im_start_id, dtype=torch.long, device=dev)
        alive = torch.ones(R, dtype=torch.bool, device=dev)
        ids, mask, logp = [], [], []
        for _ in range(max_new_tokens):
            h, ctx = self.forward_text(tok[:, None], alive[:, None], ctx)
            logits = self.model.logits(h[:, -1]).float()
            if not torch.isfinite(logits).all():
                raise FloatingPointError("think: non-finite logits (the weights hold NaN or inf)")
            tok = sample_tokens(logits, temperature, generator)
            lp = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
            ids.append(torch.where(alive, tok, c.pad_id))
            mask.append(alive)
            logp.append(torch.where(alive, lp, 0.0))
            alive = alive & (tok != c.im_end_id)
            if not alive.any():
                break
        ids, mask, logp = torch.stack(ids, 1), torch.stack(mask, 1), torch.stack(logp, 1)
        texts = [self.tokenizer.decode([x for x, m in zip(r, rm) if m and x != c.im_end_id])
                 for r, rm in zip(ids.tolist(), mask.tolist())]
        th = Thoughts(prompt_ids, prompt_mask, ids, mask, logp, texts)
        if not with_context:
            return th
        # the last sampled token (fed only where a chain was cut off), then the chunk's im_end for all
        ctx = self.forward_text(tok[:, None], alive[:, None], ctx)[1]
        end = torch.full((R, 1), c.im_end_id, dtype=torch.long, device=dev)
        return th, self.forward_text(end, torch.ones_like(end, dtype=torch.bool), ctx)[1]

    def thoughts_from_text(self, prompts: list[str], reasonings: list[str]) -> Thoughts:
        """Teacher-forced Thoughts (SFT): reasoning ids = encode(text) + [im_end], logp 0."""
        if len(prompts) != len(reasonings):
            raise ValueError(f"prompts ({len(prompts)}) and reasonings ({len(reasonings)}) differ in "
                             f"length")
        prefixes = [self._prompt_prefix(p, i, 0, True) for i, p in enumerate(prompts)]
        P_ids, P_mask = pad_rows(prefixes, self.cfg.pad_id, self.device)
        rows = [self._encode_text(r) + [self.cfg.im_end_id] for r in reasonings]
        ids, mask = pad_rows(rows, self.cfg.pad_id, self.device)
        logp = torch.zeros(ids.shape, device=self.device)
        return Thoughts(P_ids, P_mask, ids, mask, logp, list(reasonings))

    def context(self, source, past: Context | None = None) -> Context:
        """The conditioning cache; every denoising step reuses it. source: Thoughts (prefill [prompt_ids,
        reasoning chunk] once per row, causal, und expert) or interleaved segments in order, each a text chunk
        (a str for every row, or a list of one str per row: [im_start] + text + [im_end], causal) or a
        ContextImage (context_image). past: the context they continue (None: empty)."""
        if isinstance(source, Thoughts):
            ids, valid, _ = text_rows(self.cfg, source, self.device)
            return self.forward_text(ids, valid, past)[1]
        ctx = past
        for i, seg in enumerate(source):
            if isinstance(seg, ContextImage):
                if ctx is None:
                    ctx = self.empty_context(next(x for x in (seg.latents, seg.vit_pixels) if x is not None).shape[0])
                ctx = self.context_image(ctx, seg)
                continue
            if not isinstance(seg, (str, list, tuple)):
                raise TypeError(f"segments[{i}]: a str, a list of str or a ContextImage, not {type(seg).__name__}")
            texts = [seg] * (1 if ctx is None else ctx.key_mask.shape[0]) if isinstance(seg, str) else list(seg)
            c = self.cfg
            ids, valid = pad_rows([[c.im_start_id] + self._encode_text(x) + [c.im_end_id] for x in texts],
                                  c.pad_id, self.device)
            ctx = self.forward_text(ids, valid, ctx)[1]
        if ctx is None:
            raise ValueError("context: no segments")
        return ctx

    def image_parts(self, image: ContextImage) -> list:
        """The cache updates of an image in the context, in Bagel's order (VAE, then ViT): for each,
        (input embeddings (R, n, H), is_gen (n,)); the markers are plain text embeddings."""
        parts = []
        if image.latents is None and image.vit_pixels is None:
            raise ValueError("ContextImage holds neither latents (VAE update) nor vit_pixels (ViT update)")
        if image.latents is not None:
            h, w = _check_latents(self.cfg, image.latents, image.image_hw, 3)
            R, N = image.latents.shape[:2]
            t0 = torch.zeros(R, 1, device=self.device)              # a clean context image: t = 0
            parts.append((_blocks(self.model, image.latents[:, None].to(self.device), t0, h, w),
                          block_is_gen(N, self.device)))
        if image.vit_pixels is not None:
            px = image.vit_pixels
            if px.ndim != 4 or px.shape[1] != 3:
                raise ValueError(f"ContextImage.vit_pixels must be (R, 3, H, W), got {tuple(px.shape)}")
            tok = self.model.embed_vit(px.to(self.device))
            parts.append((_with_markers(self.model, tok),
                          torch.zeros(tok.shape[1] + 2, dtype=torch.bool, device=self.device)))
        return parts

    def seen_image(self, images: torch.Tensor, use_vit: bool = True) -> ContextImage:
        """A generated image (R, 3, H, W) in [0, 1] as the next round reads it, as Bagel's interleave_inference
        does: quantised to uint8 (decode_image), then its latent tokens (encode: the VAE update) and, when the
        model has a ViT and use_vit, the ViT transform's pixels (the ViT update)."""
        u8 = (images.clamp(0, 1) * 255).to(torch.uint8)            # truncation, as Bagel's decode_image
        latents = self.encode(u8.to(self.model.dtype) / 255 * 2 - 1)
        px = None
        if use_vit and self.cfg.vit_config is not None:
            P = self.model.vit_model.patch_size
            side = self.cfg.vit_max_num_patch_per_side * P
            rows = u8.permute(0, 2, 3, 1).cpu().numpy()
            px = torch.stack([vit.preprocess(r, side, min(vit.VIT_TRANSFORM[1], side), P) for r in rows])
            px = px.to(self.device, self.model.dtype)
        return ContextImage(latents, px, tuple(images.shape[-2:]))

    def _image_pass(self, emb, is_gen, ctx: Context):
        """Image tokens emb (R, n, H) at ctx's RoPE counter, full attention over the cache and themselves:
        (final hidden, per-layer (k, v))."""
        R, n = emb.shape[:2]
        if ctx.key_mask.shape[0] != R:
            raise ValueError(f"context has {ctx.key_mask.shape[0]} rows, the image {R}")
        ones = torch.ones(R, n, dtype=torch.bool, device=self.device)
        mask = torch.cat([ctx.key_mask, ones], 1)[:, None, None, :]
        return self.model(emb, is_gen.expand(R, n), ctx.rope_next[:, None].expand(R, n), mask, ctx.past())

    def context_image(self, ctx: Context, image: ContextImage) -> Context:
        """Bagel's update_context_image: each of image_parts is one cache write at the RoPE counter (every
        token, markers included), full attention; the counter then advances by 1, the cache by n + 2."""
        for emb, is_gen in self.image_parts(image):
            _, present = self._image_pass(emb, is_gen, ctx)
            R, n = emb.shape[:2]
            ctx = Context([torch.cat([pk, k], 2) for pk, (k, _) in zip(ctx.keys, present)],
                          [torch.cat([pv, v], 2) for pv, (_, v) in zip(ctx.values, present)],
                          torch.cat([ctx.key_mask, torch.ones(R, n, dtype=torch.bool, device=self.device)], 1),
                          ctx.rope_next + 1, ctx.hook_carry)
        return ctx

    def uncond_context(self, R: int) -> Context:
        """Bagel's text-unconditional CFG context in think mode: the system chunk only (or empty)."""
        s = self.cfg.think_system_prompt
        if not s:
            return self.empty_context(R)
        chunk = [self.cfg.im_start_id] + self._encode_text(s) + [self.cfg.im_end_id]
        ids, valid = pad_rows([chunk] * R, self.cfg.pad_id, self.device)
        return self.forward_text(ids, valid)[1]

    # ------------------------------------------------------------------------------------ images
    def velocity(self, x_t, t, context: Context, cfg_scale: float = 1.0,
                 uncond: Context | None = None, image_hw=None) -> torch.Tensor:
        """v_theta(x_t, t) (R, N, D): the gen expert over [vision_start, N latents, vision_end] at
        rope_next, full attention over the cached context and the block, no cache write.
        cfg_scale != 1: v_u + s*(v - v_u) with the unconditional context `uncond`."""
        h, w = _check_latents(self.cfg, x_t, image_hw, 3)
        R, N = x_t.shape[:2]
        if context.key_mask.shape[0] != R:
            raise ValueError(f"context has {context.key_mask.shape[0]} rows, x_t {R}")
        t = _as_times(t, (R,), self.device)
        block = _blocks(self.model, x_t[:, None], t[:, None], h, w)

        is_gen = block_is_gen(N, self.device)

        def v_of(ctx):
            hid, _ = self._image_pass(block, is_gen, ctx)
            return self.model.head(hid[:, 1:-1], x_t, t)

        v = v_of(context)
        if cfg_scale != 1.0:
            if uncond is None:
                raise ValueError("cfg_scale != 1 needs the unconditional context `uncond`")
            v = guided_velocity(v, v_of(uncond), cfg_scale)
        return v

    def packed_forward(self, thoughts: Thoughts, x_t, t, image_hw=None):
        """One forward over [prompt, reasoning, K noisy blocks] per row (model.packed_layout; its mask
        as a model.PackedBlocks when self.attention is "blocks"). Returns (reasoning logits (R, T, V),
        row j predicting thoughts.ids[:, j]; v (R, K, N, D))."""
        h, w = _check_latents(self.cfg, x_t, image_hw, 4)
        R, K, N = x_t.shape[:3]
        if thoughts.ids.shape[0] != R:
            raise ValueError(f"thoughts has {thoughts.ids.shape[0]} rows, x_t {R}")
        t = _as_times(t, (R, K), self.device)
        ids, valid, starts = text_rows(self.cfg, thoughts, self.device)
        Lt, T = ids.shape[1], thoughts.ids.shape[1]
        layout = {"dense": packed_layout, "blocks": packed_blocks}[self.attention]
        is_gen, pos, mask = layout(valid, K, N)
        emb = torch.cat([self.text_embeddings(ids, valid)[0], _blocks(self.model, x_t, t, h, w)], 1)
        pad = F.pad(~valid, (0, is_gen.shape[1] - Lt))                # no expert computes padding
        hid, _ = self.model(emb, is_gen, pos, mask, skip=pad)
        logits = self._text_logits(hid, 0, Lt, starts, T)
        lat = hid[:, Lt:].unflatten(1, (K, N + 2))[:, :, 1:-1]       # (R, K, N, H); K = 0: text only
        return logits, self.model.head(lat, x_t, t)

    def train_forward(self, thoughts: Thoughts, x_t, t, image_hw=None) -> TrainOutput:
        """Token log-probs of the reasoning (temperature 1) and velocities at K noisy blocks in one
        forward, with gradients into both experts (flow gradients reach the text expert through
        attention)."""
        logits, v = self.packed_forward(thoughts, x_t, t, image_hw)
        return TrainOutput(_token_logp(logits, thoughts), v)

    def _text_logits(self, hid, first: int, n: int, starts, T: int):
        """Logits (R, T, V) of a text part's T reasoning tokens from the packed hiddens hid: the part spans
        columns first..first+n-1 and row j of token j is read at its im_start (starts) + j."""
        cols = (first + starts[:, None] + torch.arange(T, device=hid.device)).clamp(max=first + max(n - 1, 0))
        return self.model.logits(hid.gather(1, cols[..., None].expand(-1, -1, hid.shape[-1])))

    def train_forward_turns(self, turns: list[Turn], image_hw=None) -> list[TrainOutput]:
        """train_forward over an interleaved trajectory, one packed forward (model.interleaved_layout):
        [text 1, K noisy blocks of image 1, image 1 as clean context, text 2, K noisy blocks of image 2, ...].
        Each noisy block is private; later tokens see the texts and the clean context images, never a noisy
        block. Returns one TrainOutput per turn (its text's log-probs, its K velocities)."""
        R, dev = turns[0].thoughts.ids.shape[0], self.device
        parts, embs, reads, carry, L = [], [], [], None, 0
        for r, turn in enumerate(turns):
            h, w = _check_latents(self.cfg, turn.x_t, image_hw, 4)
            if turn.thoughts.ids.shape[0] != R or turn.x_t.shape[0] != R:
                raise ValueError(f"turns[{r}] has {turn.thoughts.ids.shape[0]} text rows and {turn.x_t.shape[0]}"
                                 f" image rows, turns[0] {R}")
            if turn.seen is None and r < len(turns) - 1:
                raise ValueError(f"turns[{r}].seen is None: every turn but the last puts its image in the context")
            ids, valid, starts = text_rows(self.cfg, turn.thoughts, dev)
            e, carry = self.text_embeddings(ids, valid, carry)
            parts.append(("text", torch.zeros(ids.shape[1], dtype=torch.bool, device=dev), valid))
            embs.append(e)
            K, N = turn.x_t.shape[1:3]
            t = _as_times(turn.t, (R, K), dev)
            reads.append((L, ids.shape[1], starts, K, N, t))
            L += ids.shape[1] + K * (N + 2)
            parts += [("noisy", block_is_gen(N, dev), None)] * K
            embs.append(_blocks(self.model, turn.x_t, t, h, w))
            for emb, is_gen in self.image_parts(turn.seen) if turn.seen is not None else ():
                parts.append(("image", is_gen, None))
                embs.append(emb)
                L += emb.shape[1]
        is_gen, pos, mask, valid = interleaved_layout(parts, R, dev)
        hid, _ = self.model(torch.cat(embs, 1), is_gen, pos, mask, skip=~valid)
        outs = []
        for turn, (first, n, starts, K, N, t) in zip(turns, reads):
            logits = self._text_logits(hid, first, n, starts, turn.thoughts.ids.shape[1])
            lat = hid[:, first + n:first + n + K * (N + 2)].unflatten(1, (K, N + 2))[:, :, 1:-1]
            outs.append(TrainOutput(_token_logp(logits, turn.thoughts), self.model.head(lat, turn.x_t, t)))
        return outs

    def forward(self, thoughts, x_t=None, t=None, image_hw=None):
        """train_forward, or train_forward_turns for a list of Turns: wrappers (DDP, FSDP2's root hooks)
        see the training pass in __call__."""
        if isinstance(thoughts, (list, tuple)):
            return self.train_forward_turns(thoughts, image_hw)
        return self.train_forward(thoughts, x_t, t, image_hw)

    @property
    def codec(self):
        if self._codec is None:
            if self.cfg.codec == "pixels":
                self._codec = _PixelCodec()
            else:
                folder = self.source_folder
                if folder is None or not (folder / "ae.safetensors").is_file():
                    raise FileNotFoundError(f"no ae.safetensors in the checkpoint folder {folder}")
                from flux_vae import load_flux_vae  # lazy: only the Bagel path needs diffusers
                vae = load_flux_vae(folder / "ae.safetensors", self.cfg.vae_config,
                                    dtype=self.model.dtype, device=self.device)
                object.__setattr__(self, "_codec", vae)  # not a submodule: not in state_dict
        return self._codec

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (R, 3, H, W) in [-1, 1] -> x_0 tokens (R, N, D): the codec (FLUX:
        0.3611*(mu - 0.1159)), then patchify."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (R, 3, H, W), got {tuple(images.shape)}")
        self.cfg.grid(images.shape[-2:], "images (H, W)")
        z = self.codec.encode(images.to(self.model.dtype))
        return patchify(z, self.cfg.latent_patch_size)

    def decode(self, x_0: torch.Tensor, image_hw=None) -> torch.Tensor:
        """x_0 tokens (R, N, D) -> images (R, 3, H, W) in [-1, 1]."""
        h, w = _check_latents(self.cfg, x_0, image_hw, 3)
        z = unpatchify(x_0.to(self.model.dtype), h, w, self.cfg.latent_patch_size)
        return self.codec.decode(z).float().clamp(-1, 1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'reasoning' and 'denoising' parameters (BagelMoT.expert_of); the frozen position table is
        in neither. An expert with LoRA adapters (lora.py) holds only its adapters."""
        groups = {"reasoning": [], "denoising": []}
        adapted = lora.adapted_experts(self)
        for name, p in self.model.named_parameters():
            expert = self.model.expert_of(name)
            if expert is not None and (expert not in adapted or name.endswith(lora.ADAPTER_KEYS)):
                groups[expert].append(p)
        return groups

    # ----------------------------------------------------------------------------------- helpers
    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this Policy has no tokenizer: pass tokenizer= when loading it")
        return list(self.tokenizer.encode(text))

    def _prompt_prefix(self, prompt: str, i: int, max_new_tokens: int, thinking: bool) -> list[int]:
        c = self.cfg
        ids = [c.im_start_id] + self._encode_text(prompt) + [c.im_end_id]
        if thinking and c.think_system_prompt:
            ids = [c.im_start_id] + self._encode_text(c.think_system_prompt) + [c.im_end_id] + ids
        if len(ids) + max_new_tokens + 2 > c.max_position_embeddings:
            raise ValueError(f"prompts[{i}] is too long: {len(ids)} prompt tokens + max_new_tokens="
                             f"{max_new_tokens} + 2 exceed max_position_embeddings="
                             f"{c.max_position_embeddings}")
        return ids


def sample_tokens(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """One token per row of logits (R, V) at `temperature` (0: greedy), by the inverse CDF of one uniform
    per row: from a torch.Generator, or a sampler.RowStreams (row i's draw from stream i)."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
    u = sampler.draw(logits.shape[:1], generator, logits.device, uniform=True) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


def text_rows(cfg: BagelConfig, th: Thoughts, device):
    """Per row [prompt_ids, im_start, reasoning (+ im_end if truncated)], right-padded, and the
    column of im_start."""
    rows, starts, end = [], [], cfg.im_end_id
    for p, pm, r, rm in zip(th.prompt_ids.tolist(), th.prompt_mask.tolist(), th.ids.tolist(),
                            th.mask.tolist()):
        p, r = [x for x, m in zip(p, pm) if m], [x for x, m in zip(r, rm) if m]
        tail = [] if not r or r[-1] == end else [end]
        rows.append(p + ([cfg.im_start_id] + r + tail if r else []))
        starts.append(len(p))
    ids, valid = pad_rows(rows, cfg.pad_id, device)
    return ids, valid, torch.tensor(starts, device=device)


def _token_logp(logits, th: Thoughts) -> torch.Tensor:
    """(R, T) temperature-1 log-probs of th's reasoning tokens under logits (R, T, V), 0 where masked."""
    return torch.log_softmax(logits.float(), -1).gather(2, th.ids[..., None]).squeeze(2) * th.mask


def _with_markers(model: BagelMoT, tokens):
    """[vision_start, tokens, vision_end]: image token embeddings (..., n, H) between the markers' plain
    text embeddings -> (..., n+2, H)."""
    marks = [model.embed_text(torch.full((*tokens.shape[:-2], 1), i, dtype=torch.long, device=tokens.device))
             for i in (model.cfg.vision_start_id, model.cfg.vision_end_id)]
    return torch.cat([marks[0], tokens.to(marks[0].dtype), marks[1]], -2)


def _blocks(model: BagelMoT, x_t, t, h, w):
    """[vision_start, latents, vision_end] embeddings of x_t (R, K, N, D) at t (R, K):
    (R, K*(N+2), H)."""
    return rearrange(_with_markers(model, model.embed_latents(x_t, t, h, w)), "r k n h -> r (k n) h")


def _check_latents(cfg: BagelConfig, x_t, image_hw, ndim):
    hw = image_hw or cfg.image_hw
    h, w = cfg.grid(hw)
    if x_t.ndim != ndim or tuple(x_t.shape[-2:]) != (h * w, cfg.patch_dim):
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}, expected {ndim - 2} batch dims then "
                         f"(N, D) = ({h * w}, {cfg.patch_dim}) for image_hw={hw}")
    return h, w


def _as_times(t, shape, device):
    """A float or tensor time broadcast to `shape` (its trailing dims must match), float32."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim > len(shape) or tuple(t.shape) != tuple(shape)[len(shape) - t.ndim:]:
        raise ValueError(f"t has shape {tuple(t.shape)}, expected a float or {tuple(shape)}")
    return t.expand(shape)
