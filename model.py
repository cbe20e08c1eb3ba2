"""The Policy: BAGEL's Mixture-of-Transformers (MoT) and the interface the RL loop uses; 7B and toy presets.

BAGEL (ByteDance-Seed/Bagel) is a Qwen2 decoder whose every layer holds two full sets of weights: the
understanding (und) expert, used by text tokens and the vision_start/vision_end markers, and the generation
expert (`*_moe_gen`), used by the latent image tokens being denoised. Both share one joint attention per sample.
A latent token enters as vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos) and leaves as
llm2vae(norm_moe_gen(h)), the velocity v = eps - x_0. This file rebuilds it from transformers' Qwen2 blocks
(RMSNorm, gated MLP, rotate-half RoPE) with the official state-dict keys, and wraps it in the Policy
interface (think, context, velocity, train_forward, encode, decode, param_groups; DESIGN.md). Loading and
saving the official layout is checkpoint.py's; the toy preset is this same class with a tiny config.

Glossary
    R rows (prompts x group), P prompt tokens, T reasoning tokens, K noisy blocks per row, N latent tokens per
    image (h x w grid, row-major), D = p*p*C latent token dim (C fastest), L sequence length, H hidden size.
    chunk: a text piece fed as [im_start] + ids + [im_end]; block: [vision_start] + N latents + [vision_end].
    x_t: latent at time t (t = 1 noise, t = 0 data), x_t = (1 - t)*x_0 + t*eps; v = eps - x_0.
    rope_next: next RoPE position of a row. Text advances it by one per token; an image block being denoised
    uses it for all its tokens (markers included) and does not advance it (Bagel's position rule).

Deviations / borrowed defaults
    1. Attention is padded: right-padded (R, L) batches, a boolean (R, 1, Lq, Lk) mask, torch SDPA, per-row
       position ids; Bagel packs samples and calls flash-attn varlen. Same math; packing is a later speed-up.
    2. The reasoning chunk fed after thinking is [im_start] + sampled ids (+ im_end if truncated); Bagel
       re-tokenizes the decoded text, which can differ from the sampled ids.
    3. Thoughts.logp is the log-prob under the temperature-1 policy softmax(logits), whatever the sampling
       temperature: the policy's own log-prob, which is what the GRPO ratio compares.
    4. CFG is plain text CFG v_u + s*(v - v_u) (no cfg_interval, no renorm, no image CFG); off by default.
    5. Toy-only settings (the bagel_7b values reproduce Bagel exactly):
       a. codec="pixels" (bagel: "flux"): latent = the [-1, 1] image itself, C = 3, downsample 1.
       b. prediction="x0" (bagel: "velocity"): llm2vae gives x0_hat, returned as v = (x_t - x0_hat)/max(t, t_min)
          (a hidden size below the patch dim cannot pass the noise through a velocity head).
       c. Policy.embed_hook (bagel: None): an extra term added to the text tokens' input embeddings, with a
          per-row carry kept in the Context across KV-cached calls. The toy's grounding is one (toy.Grounding).
    6. from_config initialises like Qwen2 (normal 0.02, zero biases, unit norms), experts drawn independently,
       llm2vae zero (Bagel's from-scratch choice); the FLUX VAE is loaded lazily at the first encode/decode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, apply_rotary_pos_emb

# Bagel's inferencer.py, verbatim (the think-mode system prompt for image generation).
GEN_THINK_SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then generate the "
                           "image. \nThe planning process is enclosed within <think> </think> tags, i.e. "
                           "<think> planning process here </think> image here")
SPECIAL_TOKENS = {"im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>",
                  "vision_start_id": "<|vision_start|>", "vision_end_id": "<|vision_end|>"}


# ------------------------------------------------------------------------------------------------ config
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
    pad_id: int | None = None             # fills masked slots; None: Qwen2.5's <|endoftext|> if in vocab, else 0
    im_start_id: int = 151644
    im_end_id: int = 151645
    vision_start_id: int = 151652
    vision_end_id: int = 151653
    think_system_prompt: str | None = GEN_THINK_SYSTEM_PROMPT
    codec: str = "flux"                   # "flux" (ae.safetensors) or "pixels" (toy, deviation 5a)
    vae_config: dict | None = None        # FLUX AE params; None = flux_vae's 7B defaults
    latent_channels: int = 16
    latent_downsample: int = 8            # image pixels per latent pixel
    latent_patch_size: int = 2
    max_latent_size: int = 64
    image_hw: tuple | None = None         # default image size in pixels; None = the largest, 1024 x 1024 for 7B
    timestep_shift: float = 1.0           # training t shift (Bagel's class default)
    prediction: str = "velocity"          # or "x0" (toy, deviation 5b)
    t_min: float = 0.05

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
        checks = {"prediction": self.prediction in ("velocity", "x0"), "codec": self.codec in ("flux", "pixels"),
                  "num_attention_heads": heads_ok, "hidden_size": self.hidden_size % 4 == 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"BagelConfig.{name}={getattr(self, name)!r} is invalid")
        self.grid(self.image_hw, "image_hw")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:          # D
        return self.latent_patch_size ** 2 * self.latent_channels

    @property
    def stride(self) -> int:             # image pixels per latent token side
        return self.latent_downsample * self.latent_patch_size

    def grid(self, image_hw, name="image_hw"):
        """(h, w) latent tokens of an H x W image; ValueError naming `name` if not a multiple of the stride."""
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
        rope_theta 1e6 (BAGEL-7B's) and a training timestep_shift of 3 (the inferencer's sampling shift) are
        plain settings, not deviations; they let the image expert learn to follow the plan in a short SFT."""
        kw = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=4096, pad_id=0, im_start_id=1,
                  im_end_id=2, vision_start_id=3, vision_end_id=4, think_system_prompt=None, codec="pixels",
                  latent_channels=3, latent_downsample=1, latent_patch_size=8, max_latent_size=4,
                  image_hw=(32, 32), prediction="x0", timestep_shift=3.0)
        if isinstance(vocab, int):
            kw["vocab_size"] = vocab
        else:
            kw.update(vocab_size=vocab.vocab_size, pad_id=vocab.pad_id,
                      **{role: getattr(vocab, role) for role in SPECIAL_TOKENS})
        return cls(**{**kw, **overrides})


def check_tokenizer(tokenizer, cfg: BagelConfig):
    """The tokenizer must fit the embedding table and agree with the config on Bagel's special-token ids."""
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


# -------------------------------------------------------------------------------------- pure tensor helpers
def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(R, C, h*p, w*p) latent -> (R, h*w, p*p*C) tokens, row-major, C fastest (Bagel's packing)."""
    return rearrange(z, "r c (h p) (w q) -> r (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(R, h*w, p*p*C) tokens -> (R, C, h*p, w*p) latent; inverse of patchify."""
    return rearrange(x, "r (h w) (p q c) -> r c (h p) (w q)", h=h, w=w, p=p, q=p)


def latent_position_ids(h: int, w: int, max_latent_size: int, device=None) -> torch.Tensor:
    """(h*w,) index into latent_pos_embed: row * max_latent_size + col (Bagel's extrapolate mode)."""
    return (torch.arange(h, device=device)[:, None] * max_latent_size + torch.arange(w, device=device)).flatten()


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
    """(..., dim) = [cos(t f) | sin(t f)], f_k = exp(-ln(1e4) k / (dim/2)), t in [0, 1] as is (DiT embedder)."""
    half = dim // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[..., None] * f
    return torch.cat([a.cos(), a.sin()], dim=-1)


def train_timesteps(raw: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Bagel's training t: t = sigmoid(raw), then t = s*t / (1 + (s - 1)*t) with s = timestep_shift."""
    t = torch.sigmoid(raw)
    return shift * t / (1 + (shift - 1) * t)


def guided_velocity(v_c, v_u, cfg_scale):
    """Text CFG: v = v_u + s * (v_c - v_u); v_u None (or s = 1 with v_u given) is the conditional velocity."""
    return v_c if v_u is None else v_u + cfg_scale * (v_c - v_u)


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Let query rows with no visible key (padding) see every key, so SDPA stays finite; outputs unused."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def block_layout(rope_next: torch.Tensor, K: int, N: int):
    """K image blocks [vision_start, N latents, vision_end] per row: is_gen (R, K*(N+2)) and position ids
    (every token at rope_next: a noisy image does not advance the RoPE counter)."""
    col = torch.arange(N + 2, device=rope_next.device)
    is_gen = ((col > 0) & (col <= N)).repeat(K).expand(rope_next.shape[0], -1)
    return is_gen, rope_next[:, None].expand(-1, K * (N + 2))


def packed_layout(text_valid: torch.Tensor, K: int, N: int):
    """One training sequence per row: [text (right-padded), K noisy blocks]. Returns is_gen (R, L),
    position ids (R, L), mask (R, 1, L, L): text causal; a block sees all text and itself; nothing sees a block."""
    R, Lt = text_valid.shape
    dev = text_valid.device
    is_gen_b, pos_b = block_layout(text_valid.sum(1), K, N)
    is_gen = torch.cat([torch.zeros_like(text_valid), is_gen_b], 1)
    pos = torch.cat([torch.arange(Lt, device=dev).expand(R, -1), pos_b], 1)
    blk = torch.cat([torch.full((Lt,), -1, device=dev), torch.arange(K, device=dev).repeat_interleave(N + 2)])
    q_text, k_text = (blk < 0)[:, None], (blk < 0)[None, :]
    L = blk.numel()
    causal = torch.arange(L, device=dev)[:, None] >= torch.arange(L, device=dev)[None, :]
    mask = (k_text & (causal | ~q_text)) | ((blk[:, None] == blk[None, :]) & ~q_text)
    key_valid = torch.cat([text_valid, torch.ones(R, K * (N + 2), dtype=torch.bool, device=dev)], 1)
    return is_gen, pos, _visible(mask[None] & key_valid[:, None, :])[:, None]


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
    """Sends each token to its expert: f_und on tokens with is_gen False, f_gen on the rest, as one tensor."""

    def __init__(self, is_gen: torch.Tensor | None):
        flat = None if is_gen is None else is_gen.reshape(-1)
        n_gen = 0 if flat is None else int(flat.sum())
        self.mode = "und" if n_gen == 0 else "gen" if n_gen == flat.numel() else "mixed"
        if self.mode == "mixed":
            self.und, self.gen = (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)

    def __call__(self, x, f_und, f_gen):
        if self.mode != "mixed":
            return (f_und if self.mode == "und" else f_gen)(x)
        flat = x.reshape(-1, *x.shape[2:])
        y_und, y_gen = f_und(flat[self.und]), f_gen(flat[self.gen])
        y = y_und.new_empty((flat.shape[0],) + y_und.shape[1:])
        y = y.index_copy(0, self.und, y_und).index_copy(0, self.gen, y_gen)
        return y.reshape(*x.shape[:2], *y.shape[1:])


# ------------------------------------------------------------------------------------------------ the MoT
class MoTAttention(nn.Module):
    """Qwen2 attention with q/k RMSNorm, duplicated for the generation expert; one joint SDPA over all tokens."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        H, d, nq, nkv, eps = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                              cfg.rms_norm_eps)
        self.d, self.nq, self.nkv = d, nq, nkv
        # understanding expert: text tokens and the vision markers
        self.q_proj = nn.Linear(H, nq * d)
        self.k_proj = nn.Linear(H, nkv * d)
        self.v_proj = nn.Linear(H, nkv * d)
        self.o_proj = nn.Linear(nq * d, H, bias=False)
        self.q_norm = Qwen2RMSNorm(d, eps=eps)
        self.k_norm = Qwen2RMSNorm(d, eps=eps)
        # generation expert: the latent tokens being denoised
        self.q_proj_moe_gen = nn.Linear(H, nq * d)
        self.k_proj_moe_gen = nn.Linear(H, nkv * d)
        self.v_proj_moe_gen = nn.Linear(H, nkv * d)
        self.o_proj_moe_gen = nn.Linear(nq * d, H, bias=False)
        self.q_norm_moe_gen = Qwen2RMSNorm(d, eps=eps)
        self.k_norm_moe_gen = Qwen2RMSNorm(d, eps=eps)

    def forward(self, x, route, cos, sin, mask, past=None):
        R, L, _ = x.shape
        q = route(x, self.q_proj, self.q_proj_moe_gen).view(R, L, self.nq, self.d)
        k = route(x, self.k_proj, self.k_proj_moe_gen).view(R, L, self.nkv, self.d)
        v = route(x, self.v_proj, self.v_proj_moe_gen).view(R, L, self.nkv, self.d)
        q = route(q, self.q_norm, self.q_norm_moe_gen).transpose(1, 2)          # (R, nq, L, d)
        k = route(k, self.k_norm, self.k_norm_moe_gen).transpose(1, 2)          # (R, nkv, L, d)
        v = v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)                              # HF rotate_half form
        present = (k, v)                                                         # keys after norm + RoPE
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nq != self.nkv)
        return route(o.transpose(1, 2).reshape(R, L, -1), self.o_proj, self.o_proj_moe_gen), present


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
    """The network; state-dict keys are the official ones (language_model.model.layers.{i}..., vae2llm, ...)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        self.language_model = _LanguageModel(cfg)
        self.time_embedder = _TimestepEmbedder(cfg.hidden_size)
        self.vae2llm = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.llm2vae = nn.Linear(cfg.hidden_size, cfg.patch_dim)
        self.latent_pos_embed = _PosEmbed(cfg.hidden_size, cfg.max_latent_size)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_latents(self, x_t, t, h, w):
        """x_t (..., N, D), t (...) -> vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos), (..., N, H)."""
        pos = latent_position_ids(h, w, self.cfg.max_latent_size, x_t.device)
        lat = self.vae2llm(x_t.to(self.vae2llm.weight.dtype))
        return lat + self.time_embedder(t)[..., None, :] + self.latent_pos_embed.pos_embed[pos]

    def head(self, hidden, x_t, t):
        """Velocity from final gen-expert hiddens; x0 mode converts x0_hat to v = (x_t - x0_hat)/max(t, t_min)."""
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

    def forward(self, h, is_gen, position_ids, mask, past=None):
        """h (R, L, H) input embeddings -> (final hidden after the per-expert final norm, per-layer (k, v))."""
        route = Router(is_gen)
        cos, sin = self.rope(position_ids, h.dtype)
        present = []
        for i, layer in enumerate(self.language_model.model.layers):
            h, kv = layer(h, route, cos, sin, mask, None if past is None else past[i])
            present.append(kv)
        m = self.language_model.model
        return route(h, m.norm, m.norm_moe_gen), present


# ------------------------------------------------------------------------------------------ the Policy
@dataclass
class Thoughts:
    """Reasoning chains, rows group-contiguous. prompt_ids = everything fed before the reasoning chunk."""
    prompt_ids: torch.Tensor   # (R, P) long, right-padded: [system chunk] + [im_start, prompt, im_end]
    prompt_mask: torch.Tensor  # (R, P) bool
    ids: torch.Tensor          # (R, T) long, sampled tokens incl. the stop token im_end, right-padded
    mask: torch.Tensor         # (R, T) bool
    logp: torch.Tensor         # (R, T) float, temperature-1 log-prob of each token (deviation 3), 0 where masked
    texts: list                # (R,) decoded reasoning, without im_end

    def select(self, idx) -> Thoughts:
        idx = torch.as_tensor(idx, device=self.ids.device)
        idx = idx.nonzero()[:, 0] if idx.dtype == torch.bool else idx.long()
        rows = (x[idx] for x in (self.prompt_ids, self.prompt_mask, self.ids, self.mask, self.logp))
        return Thoughts(*rows, [self.texts[i] for i in idx.tolist()])


@dataclass
class Context:
    """Cached conditioning sequence: per-layer keys (after norm + RoPE) and values (R, H_kv, L, d)."""
    keys: list
    values: list
    key_mask: torch.Tensor     # (R, L) bool, valid (non-padding) keys
    rope_next: torch.Tensor    # (R,) long
    hook_carry: torch.Tensor | None = None  # (R,), the embed hook's state after the context (deviation 5c)

    def past(self) -> list:
        return list(zip(self.keys, self.values))

    def repeat_interleave(self, n: int) -> Context:
        def rep(x):
            return None if x is None else x.repeat_interleave(n, 0)
        return Context([rep(k) for k in self.keys], [rep(v) for v in self.values], rep(self.key_mask),
                       rep(self.rope_next), rep(self.hook_carry))


@dataclass
class TrainOutput:
    logp: torch.Tensor         # (R, T) log-softmax of the reasoning tokens (temperature 1), 0 where masked
    v: torch.Tensor            # (R, K, N, D) velocities of the K noisy blocks


class _PixelCodec:
    """Toy codec (deviation 5a): the latent is the image itself."""

    @staticmethod
    def encode(x):
        return x

    @staticmethod
    def decode(x):
        return x


class Policy(nn.Module):
    """The MoT (`self.model`), the tokenizer and the image codec behind the interface the RL loop uses.
    embed_hook(model, ids, valid, carry) -> (extra input embedding, new carry): deviation 5c, None for Bagel."""

    def __init__(self, cfg: BagelConfig, tokenizer, model: BagelMoT | None = None, embed_hook=None):
        super().__init__()
        self.cfg, self.tokenizer, self.embed_hook = cfg, tokenizer, embed_hook
        self.model = model if model is not None else BagelMoT(cfg)
        self.extra_state: dict = {}          # ViT / connector tensors of a real checkpoint, exported untouched
        self.source_folder: Path | None = None
        self._codec = None

    @classmethod
    def from_config(cls, cfg: BagelConfig, tokenizer, seed: int = 0, embed_hook=None) -> Policy:
        """Random init (deviation 6), fp32, deterministic in `seed`. Official checkpoints: checkpoint.py."""
        check_tokenizer(tokenizer, cfg)
        policy = cls(cfg, tokenizer, embed_hook=embed_hook)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if name.startswith("latent_pos_embed."):
                    continue                                   # keeps its sincos table
                if name.startswith("llm2vae.") or name.endswith(".bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return policy

    @property
    def device(self) -> torch.device:
        return self.model.vae2llm.weight.device

    def latent_shape(self, image_hw=None) -> tuple[int, int]:
        """(N, D) of an image of image_hw pixels (default cfg.image_hw)."""
        h, w = self.cfg.grid(image_hw or self.cfg.image_hw)
        return h * w, self.cfg.patch_dim

    def empty_context(self, R: int) -> Context:
        p = self.model.vae2llm.weight
        shape = (R, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
        keys = [p.new_zeros(shape) for _ in range(self.cfg.num_hidden_layers)]
        values = [p.new_zeros(shape) for _ in range(self.cfg.num_hidden_layers)]
        return Context(keys, values, torch.zeros(R, 0, dtype=torch.bool, device=p.device),
                       torch.zeros(R, dtype=torch.long, device=p.device))

    # -------------------------------------------------------------------------------- text
    def embed_text(self, ids, valid, carry=None):
        """Input embeddings of text ids (R, L), plus the embed hook's term; returns (embeddings, new carry)."""
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
        emb, carry = self.embed_text(ids, valid, past.hook_carry)
        h, present = self.model(emb, None, pos, _visible(mask)[:, None], past.past())
        keys = [torch.cat([pk, k], 2) for pk, (k, _) in zip(past.keys, present)]
        values = [torch.cat([pv, v], 2) for pv, (_, v) in zip(past.values, present)]
        return h, Context(keys, values, torch.cat([past.key_mask, valid], 1), past.rope_next + valid.sum(1), carry)

    @torch.no_grad()
    def think(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
              generator: torch.Generator | None = None) -> Thoughts:
        """Sample n reasoning chains per prompt with a KV cache: prefill [system?, prompt chunk] once per prompt,
        feed im_start, sample until im_end (kept, with its log-prob) or max_new_tokens. temperature 0 = greedy."""
        if n < 1 or max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"need n >= 1, max_new_tokens >= 0, temperature >= 0; "
                             f"got {n}, {max_new_tokens}, {temperature}")
        thinking = max_new_tokens > 0
        prefixes = [self._prompt_prefix(p, i, max_new_tokens, thinking) for i, p in enumerate(prompts)]
        P_ids, P_mask = pad_rows(prefixes, self.cfg.pad_id, self.device)
        R, c, dev = len(prompts) * n, self.cfg, self.device
        prompt_ids, prompt_mask = P_ids.repeat_interleave(n, 0), P_mask.repeat_interleave(n, 0)
        if not thinking:
            empty = torch.zeros(R, 0, dtype=torch.long, device=dev)
            return Thoughts(prompt_ids, prompt_mask, empty, empty.bool(), empty.float(), [""] * R)
        ctx = self.forward_text(P_ids, P_mask)[1].repeat_interleave(n)
        tok = torch.full((R,), c.im_start_id, dtype=torch.long, device=dev)
        alive = torch.ones(R, dtype=torch.bool, device=dev)
        ids, mask, logp = [], [], []
        for _ in range(max_new_tokens):
            h, ctx = self.forward_text(tok[:, None], alive[:, None], ctx)
            logits = self.model.language_model.lm_head(h[:, -1]).float()
            if not torch.isfinite(logits).all():
                raise FloatingPointError("think: non-finite logits (the policy's weights hold NaN or inf)")
            if temperature == 0:
                tok = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                gdev = generator.device if generator is not None else probs.device   # a CPU generator on GPU runs
                tok = torch.multinomial(probs.to(gdev), 1, generator=generator).squeeze(1).to(probs.device)
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
        return Thoughts(prompt_ids, prompt_mask, ids, mask, logp, texts)

    def thoughts_from_text(self, prompts: list[str], reasonings: list[str]) -> Thoughts:
        """Teacher-forced Thoughts (SFT): reasoning ids = encode(text) + [im_end], logp 0. One row per pair."""
        if len(prompts) != len(reasonings):
            raise ValueError(f"prompts ({len(prompts)}) and reasonings ({len(reasonings)}) differ in length")
        prefixes = [self._prompt_prefix(p, i, 0, True) for i, p in enumerate(prompts)]
        P_ids, P_mask = pad_rows(prefixes, self.cfg.pad_id, self.device)
        rows = [self._encode_text(r) + [self.cfg.im_end_id] for r in reasonings]
        ids, mask = pad_rows(rows, self.cfg.pad_id, self.device)
        return Thoughts(P_ids, P_mask, ids, mask, torch.zeros(ids.shape, device=self.device), list(reasonings))

    def context(self, thoughts: Thoughts) -> Context:
        """Prefill [prompt_ids, reasoning chunk] once per row (causal, und expert); every denoising step reuses it."""
        ids, valid, _ = self._text_rows(thoughts)
        return self.forward_text(ids, valid)[1]

    def uncond_context(self, R: int) -> Context:
        """Bagel's text-unconditional CFG context in think mode: the system chunk only (empty without one)."""
        s = self.cfg.think_system_prompt
        if not s:
            return self.empty_context(R)
        chunk = [self.cfg.im_start_id] + self._encode_text(s) + [self.cfg.im_end_id]
        ids, valid = pad_rows([chunk] * R, self.cfg.pad_id, self.device)
        return self.forward_text(ids, valid)[1]

    # -------------------------------------------------------------------------------- images
    def velocity(self, x_t, t, context: Context, cfg_scale: float = 1.0, uncond: Context | None = None,
                 image_hw=None) -> torch.Tensor:
        """v_theta(x_t, t) (R, N, D): gen expert over [vision_start, N latents, vision_end] at rope_next, full
        attention over the cached context + the block, no cache write. cfg_scale != 1: v_u + s*(v - v_u)."""
        h, w = self._check_latents(x_t, image_hw, 3)
        R, N = x_t.shape[:2]
        if context.key_mask.shape[0] != R:
            raise ValueError(f"context has {context.key_mask.shape[0]} rows, x_t {R}")
        t = _as_times(t, (R,), self.device)
        block = self._blocks(x_t[:, None], t[:, None], h, w)

        def v_of(ctx):
            is_gen, pos = block_layout(ctx.rope_next, 1, N)
            mask = torch.cat([ctx.key_mask, torch.ones(R, N + 2, dtype=torch.bool, device=self.device)], 1)
            hid, _ = self.model(block, is_gen, pos, mask[:, None, None, :], ctx.past())
            return self.model.head(hid[:, 1:-1], x_t, t)

        v = v_of(context)
        if cfg_scale != 1.0:
            if uncond is None:
                raise ValueError("cfg_scale != 1 needs the unconditional context `uncond`")
            v = guided_velocity(v, v_of(uncond), cfg_scale)
        return v

    def packed_forward(self, thoughts: Thoughts, x_t, t, image_hw=None):
        """One forward over [prompt, reasoning, K noisy blocks] per row (packed_layout).
        Returns (reasoning logits (R, T, V): row j predicts thoughts.ids[:, j]; v (R, K, N, D))."""
        h, w = self._check_latents(x_t, image_hw, 4)
        R, K, N = x_t.shape[:3]
        if thoughts.ids.shape[0] != R:
            raise ValueError(f"thoughts has {thoughts.ids.shape[0]} rows, x_t {R}")
        t = _as_times(t, (R, K), self.device)
        ids, valid, starts = self._text_rows(thoughts)
        Lt, T = ids.shape[1], thoughts.ids.shape[1]
        is_gen, pos, mask = packed_layout(valid, K, N)
        emb = torch.cat([self.embed_text(ids, valid)[0], self._blocks(x_t, t, h, w)], 1)
        hid, _ = self.model(emb, is_gen, pos, mask)
        cols = (starts[:, None] + torch.arange(T, device=self.device)).clamp(max=max(Lt - 1, 0))
        logits = self.model.language_model.lm_head(hid.gather(1, cols[..., None].expand(-1, -1, hid.shape[-1])))
        lat = rearrange(hid[:, Lt:], "r (k n) h -> r k n h", k=K)[:, :, 1:-1]
        return logits, self.model.head(lat, x_t, t)

    def train_forward(self, thoughts: Thoughts, x_t, t, image_hw=None) -> TrainOutput:
        """Token log-probs of the reasoning (temperature 1) and velocities at K noisy blocks, one forward, with
        gradients into both experts (flow gradients reach the text expert through attention)."""
        logits, v = self.packed_forward(thoughts, x_t, t, image_hw)
        logp = torch.log_softmax(logits.float(), -1).gather(2, thoughts.ids[..., None]).squeeze(2)
        return TrainOutput(logp * thoughts.mask, v)

    forward = train_forward  # so wrappers (DDP, FSDP2 root hooks) see the training pass through __call__

    @property
    def codec(self):
        if self._codec is None:
            if self.cfg.codec == "pixels":
                self._codec = _PixelCodec()
            else:
                if self.source_folder is None or not (self.source_folder / "ae.safetensors").is_file():
                    raise FileNotFoundError(f"no ae.safetensors in the checkpoint folder {self.source_folder}")
                from flux_vae import load_flux_vae  # lazy: only the Bagel path needs diffusers
                vae = load_flux_vae(self.source_folder / "ae.safetensors", self.cfg.vae_config,
                                    dtype=self.model.vae2llm.weight.dtype, device=self.device)
                object.__setattr__(self, "_codec", vae)  # not a submodule: outside state_dict and param_groups
        return self._codec

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (R, 3, H, W) in [-1, 1] -> x_0 tokens (R, N, D): codec (FLUX: 0.3611*(mu - 0.1159)), patchify."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (R, 3, H, W), got {tuple(images.shape)}")
        self.cfg.grid(images.shape[-2:], "images (H, W)")
        z = self.codec.encode(images.to(self.model.vae2llm.weight.dtype))
        return patchify(z, self.cfg.latent_patch_size)

    def decode(self, x_0: torch.Tensor, image_hw=None) -> torch.Tensor:
        """x_0 tokens (R, N, D) -> images (R, 3, H, W) in [-1, 1]."""
        h, w = self._check_latents(x_0, image_hw, 3)
        z = unpatchify(x_0.to(self.model.vae2llm.weight.dtype), h, w, self.cfg.latent_patch_size)
        return self.codec.decode(z).float().clamp(-1, 1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'reasoning': und expert + embed_tokens + lm_head + final norm; 'denoising': *_moe_gen, time_embedder,
        vae2llm, llm2vae. The frozen latent_pos_embed is in neither."""
        groups = {"reasoning": [], "denoising": []}
        for name, p in self.model.named_parameters():
            if name.startswith("latent_pos_embed."):
                continue
            gen = "_moe_gen" in name or name.startswith(("time_embedder.", "vae2llm.", "llm2vae."))
            groups["denoising" if gen else "reasoning"].append(p)
        return groups

    # -------------------------------------------------------------------------------- helpers
    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this Policy has no tokenizer: pass tokenizer= when loading the checkpoint")
        return list(self.tokenizer.encode(text))

    def _prompt_prefix(self, prompt: str, i: int, max_new_tokens: int, thinking: bool) -> list[int]:
        c = self.cfg
        ids = [c.im_start_id] + self._encode_text(prompt) + [c.im_end_id]
        if thinking and c.think_system_prompt:
            ids = [c.im_start_id] + self._encode_text(c.think_system_prompt) + [c.im_end_id] + ids
        if len(ids) + max_new_tokens + 2 > c.max_position_embeddings:
            raise ValueError(f"prompts[{i}] is too long: {len(ids)} prompt tokens + max_new_tokens="
                             f"{max_new_tokens} + 2 exceed max_position_embeddings={c.max_position_embeddings}")
        return ids

    def _text_rows(self, th: Thoughts):
        """Per row [prompt_ids, im_start, reasoning (+ im_end if truncated)], right-padded; im_start's column."""
        rows, starts = [], []
        for p, pm, r, rm in zip(th.prompt_ids.tolist(), th.prompt_mask.tolist(), th.ids.tolist(),
                                th.mask.tolist()):
            p, r = [x for x, m in zip(p, pm) if m], [x for x, m in zip(r, rm) if m]
            tail = [] if not r or r[-1] == self.cfg.im_end_id else [self.cfg.im_end_id]
            rows.append(p + ([self.cfg.im_start_id] + r + tail if r else []))
            starts.append(len(p))
        ids, valid = pad_rows(rows, self.cfg.pad_id, self.device)
        return ids, valid, torch.tensor(starts, device=self.device)

    def _blocks(self, x_t, t, h, w):
        """[vision_start, latents, vision_end] embeddings of x_t (R, K, N, D) at t (R, K) -> (R, K*(N+2), H)."""
        R, K = x_t.shape[:2]
        marks = [torch.full((R, K, 1), i, dtype=torch.long, device=self.device)
                 for i in (self.cfg.vision_start_id, self.cfg.vision_end_id)]
        lat = self.model.embed_latents(x_t, t, h, w)
        seq = torch.cat([self.model.embed_text(marks[0]), lat, self.model.embed_text(marks[1])], 2)
        return rearrange(seq, "r k n h -> r (k n) h")

    def _check_latents(self, x_t, image_hw, ndim):
        hw = image_hw or self.cfg.image_hw
        h, w = self.cfg.grid(hw)
        if x_t.ndim != ndim or tuple(x_t.shape[-2:]) != (h * w, self.cfg.patch_dim):
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}, expected {ndim - 2} batch dims then "
                             f"(N, D) = ({h * w}, {self.cfg.patch_dim}) for image_hw={hw}")
        return h, w


def _as_times(t, shape, device):
    """A float or tensor time broadcast to `shape` (its trailing dims must match), float32 on device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim > len(shape) or tuple(t.shape) != tuple(shape)[len(shape) - t.ndim:]:
        raise ValueError(f"t has shape {tuple(t.shape)}, expected a float or {tuple(shape)}")
    return t.expand(shape)
