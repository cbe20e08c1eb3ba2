"""BAGEL's Mixture-of-Transformers (MoT): its config (the 7B and toy presets), the network with the
official state-dict keys, and the tensor helpers of its sequence layout. policy.py wraps it in the
interface of the RL loop; checkpoint.py loads and saves it.

BAGEL (ByteDance-Seed/Bagel) is a Qwen2 decoder whose every layer holds two full sets of weights: the
understanding (und) expert, used by text tokens and the vision_start/vision_end markers, and the
generation expert (`*_moe_gen`), used by the latent image tokens being denoised. Both share one joint
attention per sample. A latent token enters as vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos)
and leaves as llm2vae(norm_moe_gen(h)), the velocity v = eps - x_0. This file rebuilds it from
transformers' Qwen2 blocks (RMSNorm, gated MLP, rotate-half RoPE) with the official keys, so loading
and saving are plain copies. The toy preset is this same class with a tiny config. A checkpoint with
vit_config.json also gets Bagel's ViT and connector (vit.py, frozen), which read images into the context;
interleaved_layout is the packed training sequence of a multi-round trajectory.

Glossary
    R rows (prompts x group), K noisy blocks per row, N latent tokens per image (h x w grid,
    row-major), D = p*p*C latent token dim (C fastest), L sequence length, H hidden size.
    block: [vision_start] + N latents + [vision_end].
    rope_next: the next RoPE position of a row. Text advances it by one per token; an image block
    being denoised uses it for all its tokens (markers included) and does not advance it (Bagel's rule).

Deviations / borrowed defaults
    1. Attention is padded: right-padded (R, L) batches, a boolean (R, 1, Lq, Lk) mask, torch SDPA,
       per-row position ids; Bagel packs samples and calls flash-attn varlen. Same math. With
       attention="blocks" (Policy.attention) the packed training forward takes a PackedBlocks instead
       of its (L, L) mask: the text causal, unmasked; each block a batch row on [its text, itself].
    2. Toy-only settings (the bagel_7b values reproduce Bagel exactly):
       a. codec="pixels" (bagel: "flux"): latent = the [-1, 1] image itself, C = 3, downsample 1.
       b. prediction="x0" (bagel: "velocity"): llm2vae gives x0_hat, returned as
          v = (x_t - x0_hat) / max(t, t_min) (a hidden size below the patch dim cannot pass the noise
          through a velocity head).
    3. init_weights is Qwen2's (normal 0.02, zero biases, unit norms), experts drawn independently,
       llm2vae zero (Bagel's from-scratch choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange, repeat
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, apply_rotary_pos_emb

import vit

# Bagel's inferencer.py, verbatim (the think-mode system prompt for image generation).
GEN_THINK_SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then "
                           "generate the image. \nThe planning process is enclosed within <think> "
                           "</think> tags, i.e. <think> planning process here </think> image here")
SPECIAL_TOKENS = {"im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>",
                  "vision_start_id": "<|vision_start|>", "vision_end_id": "<|vision_end|>"}


# ------------------------------------------------------------------------------------------- config
@dataclass
class BagelConfig:
    """Every size of the model. Defaults = BAGEL-7B-MoT; `toy` is the same class, tiny."""
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    pad_id: int | None = None       # fills masked slots; None: Qwen2.5's <|endoftext|> if in vocab, else 0
    im_start_id: int = 151644
    im_end_id: int = 151645
    vision_start_id: int = 151652
    vision_end_id: int = 151653
    think_system_prompt: str | None = GEN_THINK_SYSTEM_PROMPT
    codec: str = "flux"             # "flux" (ae.safetensors) or "pixels" (toy, deviation 2a)
    vae_config: dict | None = None  # FLUX AE params; None = flux_vae's 7B defaults
    latent_channels: int = 16
    latent_downsample: int = 8      # image pixels per latent pixel
    latent_patch_size: int = 2
    max_latent_size: int = 64
    image_hw: tuple | None = None   # default image size in pixels; None: the largest, 1024 x 1024 (7B)
    timestep_shift: float = 1.0     # training t shift (Bagel's class default)
    prediction: str = "velocity"    # or "x0" (toy, deviation 2b)
    t_min: float = 0.05
    vit_config: dict | None = None  # vit_config.json (SigLIP): the ViT reads images into the context
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        side = self.max_latent_size * self.stride
        self.image_hw = tuple(self.image_hw) if self.image_hw is not None else (side, side)
        if self.pad_id is None:
            self.pad_id = 151643 if self.vocab_size > 151643 else 0
        for name in ("pad_id", *SPECIAL_TOKENS):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"BagelConfig.{name}={getattr(self, name)} is outside the vocabulary "
                                 f"({self.vocab_size})")
        heads_ok = (self.hidden_size % self.num_attention_heads == 0 and self.head_dim % 2 == 0
                    and self.num_attention_heads % self.num_key_value_heads == 0)
        checks = {"prediction": self.prediction in ("velocity", "x0"),
                  "codec": self.codec in ("flux", "pixels"),
                  "num_attention_heads": heads_ok, "hidden_size": self.hidden_size % 4 == 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"BagelConfig.{name}={getattr(self, name)!r} is invalid")
        self.grid(self.image_hw, "image_hw")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:     # D
        return self.latent_patch_size ** 2 * self.latent_channels

    @property
    def stride(self) -> int:        # image pixels per latent token side
        return self.latent_downsample * self.latent_patch_size

    def grid(self, image_hw, name="image_hw"):
        """(h, w) latent tokens of an H x W image; ValueError naming `name` if not a multiple of the
        stride."""
        H, W = (int(s) for s in image_hw)
        s, M = self.stride, self.max_latent_size
        if H <= 0 or W <= 0 or H % s or W % s or H // s > M or W // s > M:
            raise ValueError(f"{name}={(H, W)}: height and width must be positive multiples of {s} px "
                             f"(VAE downsample x latent_patch_size) and at most {s * M} px")
        return H // s, W // s

    @classmethod
    def bagel_7b(cls, **overrides) -> BagelConfig:
        return cls(**overrides)

    @classmethod
    def toy(cls, vocab, **overrides) -> BagelConfig:
        """Tiny MoT for the toy world. vocab: an int, or a tokenizer (its vocab_size and special ids).
        rope_theta 1e6 (BAGEL-7B's) and a training timestep_shift of 3 (the inferencer's sampling shift)
        are plain settings, not deviations; they let the image expert follow the plan after a short SFT."""
        kw = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=4096, pad_id=0,
                  im_start_id=1, im_end_id=2, vision_start_id=3, vision_end_id=4,
                  think_system_prompt=None, codec="pixels", latent_channels=3, latent_downsample=1,
                  latent_patch_size=8, max_latent_size=4, image_hw=(32, 32), prediction="x0",
                  timestep_shift=3.0)
        if isinstance(vocab, int):
            kw["vocab_size"] = vocab
        else:
            kw.update(vocab_size=vocab.vocab_size, pad_id=vocab.pad_id,
                      **{role: getattr(vocab, role) for role in SPECIAL_TOKENS})
        return cls(**{**kw, **overrides})


def check_tokenizer(tokenizer, cfg: BagelConfig):
    """The tokenizer must fit the embedding table and agree with the config on Bagel's special ids."""
    if tokenizer is None:
        return
    for role, name in SPECIAL_TOKENS.items():
        got = getattr(tokenizer, role, None)
        if got is None and hasattr(tokenizer, "convert_tokens_to_ids"):
            got = tokenizer.convert_tokens_to_ids(name)
        if got is not None and got != getattr(cfg, role):
            raise ValueError(f"tokenizer: {name} has id {got}, the checkpoint config says "
                             f"{role}={getattr(cfg, role)}")
    if hasattr(tokenizer, "pad_id") and tokenizer.pad_id != cfg.pad_id:
        raise ValueError(f"tokenizer: pad id {tokenizer.pad_id}, the config says pad_id={cfg.pad_id}")
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 0)
    if n > cfg.vocab_size:
        raise ValueError(f"tokenizer has {n} tokens, more than the model's vocab_size={cfg.vocab_size}")


# ------------------------------------------------------------------------------ pure tensor helpers
def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(R, C, h*p, w*p) latent -> (R, h*w, p*p*C) tokens, row-major, C fastest (Bagel's packing)."""
    return rearrange(z, "r c (h p) (w q) -> r (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(R, h*w, p*p*C) tokens -> (R, C, h*p, w*p) latent; inverse of patchify."""
    return rearrange(x, "r (h w) (p q c) -> r c (h p) (w q)", h=h, w=w, p=p, q=p)


def latent_position_ids(h: int, w: int, max_latent_size: int, device=None) -> torch.Tensor:
    """(h*w,) index into latent_pos_embed: row * max_latent_size + col (Bagel's extrapolate mode)."""
    rows = torch.arange(h, device=device)[:, None] * max_latent_size
    return (rows + torch.arange(w, device=device)).flatten()


def sincos_2d_table(dim: int, side: int) -> torch.Tensor:
    """(side^2, dim) frozen table; row r*side + c = [sin(c f) | cos(c f) | sin(r f) | cos(r f)],
    f_k = 10000^(-k/(dim/4)): the FIRST half encodes the column (MAE / Bagel)."""
    quarter = dim // 4
    f = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def half(pos):
        a = pos.reshape(-1, 1) * f
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([half(c), half(r)], dim=1).float()


def timestep_sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """(..., dim) = [cos(t f) | sin(t f)], f_k = exp(-ln(1e4) k / (dim/2)), t in [0, 1] as it is (the
    DiT embedder)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    f = torch.exp(-math.log(10000) * k / half)
    a = t.float()[..., None] * f
    return torch.cat([a.cos(), a.sin()], dim=-1)


def train_timesteps(raw: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Bagel's training t: t = sigmoid(raw), then t = s*t / (1 + (s - 1)*t), s = timestep_shift."""
    t = torch.sigmoid(raw)
    return shift * t / (1 + (shift - 1) * t)


def guided_velocity(v_c, v_u, cfg_scale):
    """Text CFG: v = v_u + s * (v_c - v_u); v_u None (or s = 1) is the conditional velocity."""
    return v_c if v_u is None else v_u + cfg_scale * (v_c - v_u)


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Let query rows with no visible key (padding) see every key, so SDPA stays finite (unused)."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def block_is_gen(N: int, device=None) -> torch.Tensor:
    """(N+2,) bool of one image block [vision_start, N latents, vision_end]: the latents use the
    generation expert, the two markers the understanding expert."""
    col = torch.arange(N + 2, device=device)
    return (col > 0) & (col <= N)


def block_layout(rope_next: torch.Tensor, K: int, N: int):
    """K image blocks [vision_start, N latents, vision_end] per row: is_gen (R, K*(N+2)) and position
    ids (every token at rope_next: a noisy image does not advance the RoPE counter)."""
    is_gen = block_is_gen(N, rope_next.device).repeat(K).expand(rope_next.shape[0], -1)
    return is_gen, rope_next[:, None].expand(-1, K * (N + 2))


def packed_ids(text_valid: torch.Tensor, K: int, N: int):
    """is_gen (R, L) and position ids (R, L) of the training sequence [text (right-padded), K blocks]."""
    R, Lt = text_valid.shape
    is_gen_b, pos_b = block_layout(text_valid.sum(1), K, N)
    is_gen = torch.cat([torch.zeros_like(text_valid), is_gen_b], 1)
    pos = torch.cat([torch.arange(Lt, device=text_valid.device).expand(R, -1), pos_b], 1)
    return is_gen, pos


def packed_layout(text_valid: torch.Tensor, K: int, N: int):
    """One training sequence per row: [text (right-padded), K noisy blocks]. Returns is_gen (R, L),
    position ids (R, L) and mask (R, 1, L, L): text is causal; a block sees all text and itself;
    nothing sees a block."""
    R, Lt = text_valid.shape
    dev = text_valid.device
    is_gen, pos = packed_ids(text_valid, K, N)
    blk = torch.cat([torch.full((Lt,), -1, device=dev),
                     torch.arange(K, device=dev).repeat_interleave(N + 2)])      # -1: text, else block
    q_text, k_text = (blk < 0)[:, None], (blk < 0)[None, :]
    L = blk.numel()
    causal = torch.arange(L, device=dev)[:, None] >= torch.arange(L, device=dev)[None, :]
    mask = (k_text & (causal | ~q_text)) | ((blk[:, None] == blk[None, :]) & ~q_text)
    key_valid = torch.cat([text_valid, torch.ones(R, K * (N + 2), dtype=torch.bool, device=dev)], 1)
    return is_gen, pos, visible(mask[None] & key_valid[:, None, :])[:, None]


def interleaved_layout(parts: list, R: int, device):
    """The packed training sequence of an interleaved trajectory, as Bagel's packer builds it. parts: in
    sequence order, (kind, is_gen (n,) bool, valid (R, n) bool or None) with kind
      "text"   causal; advances the RoPE counter by its valid tokens, each at its own position;
      "image"  a clean image in the context (VAE or ViT update): full attention, every token at the counter,
               seen by every later part; advances the counter by 1;
      "noisy"  one noisy block being denoised: full attention, at the counter, seen by no other part.
    Returns is_gen (R, L), position ids (R, L), mask (R, 1, L, L) and valid (R, L). A part sees the valid
    tokens of every earlier text or image part; [text, K noisy] is packed_layout's sequence."""
    seg, is_gen, pos, valid = [], [], [], []
    rope = torch.zeros(R, dtype=torch.long, device=device)
    for i, (kind, gen, ok) in enumerate(parts):
        n = gen.shape[0]
        ok = torch.ones(R, n, dtype=torch.bool, device=device) if ok is None else ok
        if kind == "text":
            pos.append(rope[:, None] + torch.arange(n, device=device))
            rope = rope + ok.sum(1)
        elif kind in ("image", "noisy"):
            pos.append(rope[:, None].expand(R, n))
            rope = rope + (kind == "image")
        else:
            raise ValueError(f"parts[{i}]: unknown kind {kind!r} (text, image or noisy)")
        seg.append(torch.full((n,), i, device=device))
        is_gen.append(gen.to(device).expand(R, n))
        valid.append(ok)
    seg = torch.cat(seg)
    kinds = [k for k, _, _ in parts]
    full = torch.tensor([k != "text" for k in kinds], device=device)[seg]
    private = torch.tensor([k == "noisy" for k in kinds], device=device)[seg]
    col = torch.arange(seg.numel(), device=device)
    earlier = (seg[None, :] < seg[:, None]) & ~private[None, :]
    same = (seg[None, :] == seg[:, None]) & (full[:, None] | (col[None, :] <= col[:, None]))
    valid = torch.cat(valid, 1)
    mask = visible((earlier | same)[None] & valid[:, None, :])[:, None]
    return torch.cat(is_gen, 1), torch.cat(pos, 1), mask, valid


@dataclass
class PackedBlocks:
    """packed_layout's mask as structure (deviation 1): text_len text columns, then K blocks of
    block_len tokens. text_valid (R, text_len) bool, None when no row is padded (then no mask at all)."""
    text_len: int
    K: int
    block_len: int
    text_valid: torch.Tensor | None


def packed_blocks(text_valid: torch.Tensor, K: int, N: int):
    """packed_layout with a PackedBlocks in place of the mask: is_gen, position ids, PackedBlocks."""
    is_gen, pos = packed_ids(text_valid, K, N)
    padded = not bool(text_valid.all())          # one host sync here, not one per layer
    return is_gen, pos, PackedBlocks(text_valid.shape[1], K, N + 2, text_valid if padded else None)


def attend(q, k, v, mask, enable_gqa: bool = False) -> torch.Tensor:
    """Joint attention of q (R, nq, Lq, d) on k, v (R, nkv, Lk, d) -> (R, nq, Lq, d): SDPA with a
    boolean mask (R, 1, Lq, Lk), or the packed training layout given as a PackedBlocks (same math)."""
    if not isinstance(mask, PackedBlocks):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    Lt, K, B = mask.text_len, mask.K, mask.block_len
    (q_t, q_b), (k_t, k_b), (v_t, v_b) = (x.split([Lt, K * B], 2) for x in (q, k, v))
    # right padding: causality alone hides a row's padded keys from its valid queries (padded
    # queries, never read, see earlier keys only and stay finite)
    o_t = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, enable_gqa=enable_gqa)
    # block k of row r is batch row r*K + k, on [row r's text keys, its own keys]
    q_b, k_b, v_b = (rearrange(x, "r h (k n) d -> (r k) h n d", n=B) for x in (q_b, k_b, v_b))
    k_b, v_b = (torch.cat([repeat(x_t, "r h l d -> (r k) h l d", k=K), x_b], 2)
                for x_t, x_b in ((k_t, k_b), (v_t, v_b)))
    key_mask = None if mask.text_valid is None else repeat(      # no mask: SDPA's fast kernels
        F.pad(mask.text_valid, (0, B), value=True), "r l -> (r k) 1 1 l", k=K)
    o_b = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=key_mask, enable_gqa=enable_gqa)
    return torch.cat([o_t, rearrange(o_b, "(r k) h n d -> r h (k n) d", r=q.shape[0])], 2)


def pad_rows(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ids (R, L) long and mask (R, L) bool, L the longest row."""
    L = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids.to(device), mask.to(device)


class Router:
    """Sends each token to its expert: f_und on tokens with is_gen False, f_gen on the rest. Tokens in
    `skip` (R, L) (right padding, whose outputs nothing reads) go to neither expert and come out as zeros,
    as Bagel's packed sequences hold no padding at all."""

    def __init__(self, is_gen: torch.Tensor | None, skip: torch.Tensor | None = None):
        gen = None if is_gen is None else is_gen.reshape(-1)
        skips = skip is not None and bool(skip.any())
        n_gen = 0 if gen is None else int(gen.sum())
        if not skips and (n_gen == 0 or n_gen == gen.numel()):
            self.mode = "und" if n_gen == 0 else "gen"
            return
        self.mode = "mixed"
        gen = torch.zeros(skip.numel(), dtype=torch.bool, device=skip.device) if gen is None else gen
        keep = ~skip.reshape(-1) if skips else torch.ones_like(gen)
        self.und, self.gen = (~gen & keep).nonzero()[:, 0], (gen & keep).nonzero()[:, 0]
        self.skipped = (~keep).nonzero()[:, 0]

    def __call__(self, x, f_und, f_gen):
        if self.mode != "mixed":
            return (f_und if self.mode == "und" else f_gen)(x)
        flat = x.reshape(-1, *x.shape[2:])
        y_und, y_gen = f_und(flat.index_select(0, self.und)), f_gen(flat.index_select(0, self.gen))
        shape = (flat.shape[0],) + y_und.shape[1:]
        y = y_und.new_empty(shape)                   # filled in place: no zero-fill or copies of the whole
        y.index_copy_(0, self.und, y_und).index_copy_(0, self.gen, y_gen).index_fill_(0, self.skipped, 0)
        return y.reshape(*x.shape[:2], *y.shape[1:])


# ---------------------------------------------------------------------------------------- the MoT
FROZEN_PREFIXES = ("latent_pos_embed.", "vit_pos_embed.", "vit_model.", "connector.")

class MoTAttention(nn.Module):
    """Qwen2 attention with q/k RMSNorm, duplicated for the generation expert; one joint SDPA."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        H, d, eps = cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d, self.nq, self.nkv = d, nq, nkv
        # understanding expert (text tokens and the vision markers), then the generation expert (the
        # latent tokens being denoised): the same shapes, in the official key order
        self.q_proj, self.k_proj = nn.Linear(H, nq * d), nn.Linear(H, nkv * d)
        self.v_proj, self.o_proj = nn.Linear(H, nkv * d), nn.Linear(nq * d, H, bias=False)
        self.q_norm, self.k_norm = Qwen2RMSNorm(d, eps=eps), Qwen2RMSNorm(d, eps=eps)
        self.q_proj_moe_gen, self.k_proj_moe_gen = nn.Linear(H, nq * d), nn.Linear(H, nkv * d)
        self.v_proj_moe_gen = nn.Linear(H, nkv * d)
        self.o_proj_moe_gen = nn.Linear(nq * d, H, bias=False)
        self.q_norm_moe_gen, self.k_norm_moe_gen = Qwen2RMSNorm(d, eps=eps), Qwen2RMSNorm(d, eps=eps)

    def forward(self, x, route, cos, sin, mask, past=None):
        R, L, _ = x.shape
        q = route(x, self.q_proj, self.q_proj_moe_gen).view(R, L, self.nq, self.d)
        k = route(x, self.k_proj, self.k_proj_moe_gen).view(R, L, self.nkv, self.d)
        v = route(x, self.v_proj, self.v_proj_moe_gen).view(R, L, self.nkv, self.d)
        q = route(q, self.q_norm, self.q_norm_moe_gen).transpose(1, 2)      # (R, nq, L, d)
        k = route(k, self.k_norm, self.k_norm_moe_gen).transpose(1, 2)      # (R, nkv, L, d)
        v = v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)                          # HF rotate_half form
        present = (k, v)                                                     # keys after norm + RoPE
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        o = attend(q, k, v, mask, self.nq != self.nkv)                      # mask: or PackedBlocks
        o = o.transpose(1, 2).reshape(R, L, -1)
        return route(o, self.o_proj, self.o_proj_moe_gen), present


class MoTDecoderLayer(nn.Module):
    """Pre-norm Qwen2 layer; every norm, projection and MLP is per expert, attention is shared."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = MoTAttention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.mlp_moe_gen = Qwen2MLP(cfg)
        self.input_layernorm = Qwen2RMSNorm(H, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(H, eps=eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(H, eps=eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(H, eps=eps)

    def forward(self, x, route, cos, sin, mask, past=None):
        h = route(x, self.input_layernorm, self.input_layernorm_moe_gen)
        a, present = self.self_attn(h, route, cos, sin, mask, past)
        x = x + a
        h = route(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + route(h, self.mlp, self.mlp_moe_gen), present


class _Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class _LanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = _Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class _TimestepEmbedder(nn.Module):
    def __init__(self, H):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, H), nn.SiLU(), nn.Linear(H, H))

    def forward(self, t):
        return self.mlp(timestep_sinusoid(t).to(self.mlp[0].weight.dtype))


class _PosEmbed(nn.Module):
    def __init__(self, H, side):
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_2d_table(H, side), requires_grad=False)


class BagelMoT(nn.Module):
    """The network; its state-dict keys are the official ones (language_model.model.layers.{i}...)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        self.language_model = _LanguageModel(cfg)
        self.time_embedder = _TimestepEmbedder(cfg.hidden_size)
        self.vae2llm = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.llm2vae = nn.Linear(cfg.hidden_size, cfg.patch_dim)
        self.latent_pos_embed = _PosEmbed(cfg.hidden_size, cfg.max_latent_size)
        if cfg.vit_config is not None:       # the understanding path for images in the context (vit.py)
            siglip = vit.siglip_config(cfg.vit_config)
            if siglip.image_size // siglip.patch_size != cfg.vit_max_num_patch_per_side:
                raise ValueError(f"vit_config image_size / patch_size = {siglip.image_size // siglip.patch_size}"
                                 f" must equal vit_max_num_patch_per_side={cfg.vit_max_num_patch_per_side}")
            self.vit_model = vit.VisionTower(siglip)
            self.connector = vit.Connector(siglip.hidden_size, cfg.hidden_size, cfg.connector_act)
            self.vit_pos_embed = _PosEmbed(cfg.hidden_size, cfg.vit_max_num_patch_per_side)
        self.freeze_untrained()
        self.checkpoint_layers = False     # activation checkpointing per decoder layer (Config switch)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def embed_latents(self, x_t, t, h, w):
        """x_t (..., N, D), t (...) -> vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos)."""
        pos = latent_position_ids(h, w, self.cfg.max_latent_size, x_t.device)
        lat = self.vae2llm(x_t.to(self.vae2llm.weight.dtype))
        return lat + self.time_embedder(t)[..., None, :] + self.latent_pos_embed.pos_embed[pos]

    def embed_vit(self, pixels: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """pixels (R, 3, H, W) in [-1, 1] -> (R, n, H) LLM inputs of the ViT patches:
        connector(SigLIP features) + vit_pos_embed(row * vit_max_num_patch_per_side + col)."""
        if not hasattr(self, "vit_model"):
            raise ValueError("this model has no ViT (its checkpoint folder has no vit_config.json, or "
                             "bagel_config.json says visual_und=false): it cannot read an image through the ViT")
        side = self.cfg.vit_max_num_patch_per_side
        feats, (h, w) = vit.vit_forward(self.vit_model, pixels, side, trace)
        out = self.connector(feats)
        pos = vit.vit_position_ids(h, w, side, pixels.device)
        if trace is not None:
            trace.update(vit_out=feats, connector_out=out, vit_pos_embed=self.vit_pos_embed.pos_embed[pos])
        return out + self.vit_pos_embed.pos_embed[pos]

    def head(self, hidden, x_t, t):
        """The velocity from final gen-expert hiddens; x0 mode (deviation 2b) converts x0_hat to
        v = (x_t - x0_hat) / max(t, t_min)."""
        out = self.llm2vae(hidden).float()
        if self.cfg.prediction == "x0":
            out = (x_t.float() - out) / t.float().clamp(min=self.cfg.t_min)[..., None, None]
        return out.to(x_t.dtype)

    def rope(self, position_ids, dtype):
        """HF Qwen2 default RoPE: inv_freq = theta^(-2i/d), cos/sin of [freqs | freqs], (R, L, d)."""
        d = self.cfg.head_dim
        i = torch.arange(0, d, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / self.cfg.rope_theta ** (i / d)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, h, is_gen, position_ids, mask, past=None, skip=None):
        """h (R, L, H) input embeddings -> (final hidden after the per-expert final norm,
        per-layer (k, v)). skip (R, L): padding no expert computes (zeros out, masked as keys)."""
        route = Router(is_gen, skip)
        cos, sin = self.rope(position_ids, h.dtype)
        present = []
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        for i, layer in enumerate(self.language_model.model.layers):
            step = None if past is None else past[i]
            if recompute:      # keep only each layer's input; recompute its insides in the backward
                h, kv = torch.utils.checkpoint.checkpoint(layer, h, route, cos, sin, mask, step,
                                                          use_reentrant=False)
            else:
                h, kv = layer(h, route, cos, sin, mask, step)
            present.append(kv)
        m = self.language_model.model
        return route(h, m.norm, m.norm_moe_gen), present

    @staticmethod
    def expert_of(name: str) -> str | None:
        """'denoising' for the generation expert's parameters (*_moe_gen, time_embedder, vae2llm,
        llm2vae), 'reasoning' for the rest (und expert, embed_tokens, lm_head, final norm), None for
        the frozen parts: the position tables, the ViT and its connector (the paper trains two experts)."""
        if name.startswith(FROZEN_PREFIXES):
            return None
        gen = "_moe_gen" in name or name.startswith(("time_embedder.", "vae2llm.", "llm2vae."))
        return "denoising" if gen else "reasoning"

    def freeze_untrained(self):
        """requires_grad False on the frozen parts (expert_of None); loading with assign=True resets it."""
        for name, p in self.named_parameters():
            if self.expert_of(name) is None:
                p.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> BagelMoT:
        """Deviation 3, deterministic in `seed`; the position table keeps its sincos values."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if self.expert_of(name) is None:
                continue
            if name.startswith("llm2vae.") or name.endswith(".bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        return self
