"""The Policy: BAGEL's Mixture-of-Transformers (MoT), its tokenizer and image codec; the 7B and toy presets.

BAGEL (ByteDance-Seed/Bagel) is a Qwen2 decoder whose every layer holds two full sets of weights: the
understanding (und) expert, used by text tokens and the vision_start/vision_end markers, and the generation
expert (`*_moe_gen`), used by the latent image tokens being denoised. Both share one joint attention per sample.
A latent token enters as vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos) and leaves as
llm2vae(norm_moe_gen(h)), the velocity v = eps - x_0. This file rebuilds it from transformers' Qwen2 blocks
(RMSNorm, gated MLP, rotate-half RoPE) with the official state-dict keys, so loading and saving are plain
copies, and wraps it in the Policy interface the RL loop uses (think, context, velocity, train_forward,
encode, decode, param_groups; see DESIGN.md). The toy preset is the same class with a tiny config.

Glossary
    R rows (prompts x group), P prompt tokens, T reasoning tokens, K noisy blocks per row, N latent tokens per
    image (h x w grid, row-major), D = p*p*C latent token dim (C fastest), L sequence length, H hidden size.
    chunk: a text piece fed as [im_start] + ids + [im_end]; block: [vision_start] + N latents + [vision_end].
    x_t: latent at time t (t = 1 noise, t = 0 data), x_t = (1 - t)*x_0 + t*eps; v = eps - x_0.
    rope_next: next RoPE position of a row. Text advances it by one per token; an image block being denoised
    uses it for all its tokens (markers included) and does not advance it (SPEC, "Position ids").

Deviations / borrowed defaults
    1. Attention is padded: right-padded (R, L) batches, a boolean (R, 1, Lq, Lk) mask, torch SDPA, per-row
       position ids; Bagel packs samples and calls flash-attn varlen. Same math; packing is a later speed-up.
    2. The reasoning chunk fed after thinking is [im_start] + sampled ids (+ im_end if truncated); Bagel
       re-tokenizes the decoded text, which can differ from the sampled ids.
    3. Thoughts.logp is the log-prob under the temperature-1 policy softmax(logits), whatever the sampling
       temperature: the policy's own log-prob, which is what the GRPO ratio compares.
    4. CFG is plain text CFG v_u + s*(v - v_u) (no cfg_interval, no renorm, no image CFG); off by default.
    5. Toy-only config fields (bagel_7b values reproduce Bagel exactly):
       a. codec="pixels" (bagel: "flux"): latent = the [-1, 1] image itself, C = 3, downsample 1.
       b. prediction="x0" (bagel: "velocity"): llm2vae gives x0_hat, returned as v = (x_t - x0_hat)/max(t, t_min)
          (JiT-style; a hidden size below the patch dim cannot pass the noise through a velocity head).
       c. ground_token_ids (bagel: ()): each such token, placed in cell k = row*w + col of the default grid
          (ground_token_cells[i], or k = i when that is empty), gets ground_scale * latent_pos_embed[row*
          max_latent_size + col] added to its input embedding (toy_feasibility Part 2: without it the image
          ignores positions). With ground_span_end_ids, the tokens after a ground token, up to the next span
          end, get it too (GLIGEN-style: every token of a plan chunk `c5 red circle` carries its cell, so an
          image token finds its object's colour and shape by position; the cell comes first so that this
          stays causal). ground_scale (toy 0.1) keeps the sincos row (norm ~8) from drowning the token's own
          embedding (norm ~0.2 at init): at 1.0 the plans' validity fell from 0.90 to 0.78.
    6. from_config initialises like Qwen2 (normal 0.02, zero biases, unit norms), experts drawn independently,
       llm2vae zero (Bagel's from-scratch choice); the FLUX VAE is loaded lazily at the first encode/decode.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, apply_rotary_pos_emb

# Bagel's inferencer.py, verbatim (the think-mode system prompt for image generation).
GEN_THINK_SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then generate the "
                           "image. \nThe planning process is enclosed within <think> </think> tags, i.e. "
                           "<think> planning process here </think> image here")
EXTRA_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")  # kept untouched, ViT not built
LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rope_theta", "rms_norm_eps", "hidden_act", "max_position_embeddings")
TOKEN_ROLES = {"bos_token_id": "im_start_id", "eos_token_id": "im_end_id",  # Bagel's new_token_ids names
               "start_of_image": "vision_start_id", "end_of_image": "vision_end_id"}


# ------------------------------------------------------------------------------------------------ config
@dataclass
class BagelConfig:
    """Every size of the model. Defaults = BAGEL-7B-MoT (SPEC.md); `toy` is the same class, tiny."""
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
    ground_token_ids: tuple = ()          # toy, deviation 5c
    ground_token_cells: tuple = ()        # cell of each ground token; () = token i in cell i
    ground_span_end_ids: tuple = ()       # toy, 5c: () = only ground tokens are grounded; else their spans
    ground_scale: float = 1.0             # toy, 5c: weight of the grounding term

    def __post_init__(self):
        side = self.max_latent_size * self.stride
        self.image_hw = tuple(self.image_hw) if self.image_hw is not None else (side, side)
        self.ground_token_ids = tuple(int(i) for i in self.ground_token_ids)
        self.ground_token_cells = tuple(int(k) for k in self.ground_token_cells) or tuple(
            range(len(self.ground_token_ids)))
        self.ground_span_end_ids = tuple(int(i) for i in self.ground_span_end_ids)
        if self.pad_id is None:
            self.pad_id = 151643 if self.vocab_size > 151643 else 0
        for name in ("pad_id", "im_start_id", "im_end_id", "vision_start_id", "vision_end_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"BagelConfig.{name}={getattr(self, name)} is outside the vocabulary "
                                 f"({self.vocab_size})")
        checks = {"prediction": self.prediction in ("velocity", "x0"), "codec": self.codec in ("flux", "pixels"),
                  "num_attention_heads": self.hidden_size % self.num_attention_heads == 0
                  and self.num_attention_heads % self.num_key_value_heads == 0 and self.head_dim % 2 == 0,
                  "hidden_size": self.hidden_size % 4 == 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"BagelConfig.{name}={getattr(self, name)!r} is invalid")
        h, w = self.grid(self.image_hw, "image_hw")
        if len(self.ground_token_cells) != len(self.ground_token_ids):
            raise ValueError(f"ground_token_cells has {len(self.ground_token_cells)} entries, ground_token_ids "
                             f"{len(self.ground_token_ids)}")
        if any(not 0 <= k < h * w for k in self.ground_token_cells):
            raise ValueError(f"ground_token_cells: cells must lie in the default grid of {h * w} cells")
        if set(self.ground_span_end_ids) & set(self.ground_token_ids):
            raise ValueError("ground_span_end_ids and ground_token_ids must not share tokens")

    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    patch_dim = property(lambda self: self.latent_patch_size ** 2 * self.latent_channels)   # D
    stride = property(lambda self: self.latent_downsample * self.latent_patch_size)         # pixels per token

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
    def toy(cls, vocab_size, *, ground_words=(), span_end_words=None, **overrides) -> BagelConfig:
        """Tiny MoT for the toy world. vocab_size: an int or a WordTokenizer (vocab and special ids from it);
        ground_words: words of the tokenizer that become ground_token_ids: either one word per grid cell,
        row-major, or (word, cell) pairs (several words may share a cell). span_end_words (None: no spans):
        words that end a ground token's span; im_start and im_end always end one (deviation 5c).
        rope_theta 1e6 (BAGEL-7B's) and a training timestep_shift of 3 (the inferencer's sampling shift) are plain
        settings, not deviations: with 1e4 and 1 the image expert needed ~2x the SFT steps to follow the plan."""
        kw = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=4096, pad_id=0, im_start_id=1,
                  im_end_id=2, vision_start_id=3, vision_end_id=4, think_system_prompt=None, codec="pixels",
                  latent_channels=3, latent_downsample=1, latent_patch_size=8, max_latent_size=4,
                  image_hw=(32, 32), prediction="x0", ground_scale=0.1, timestep_shift=3.0)
        if isinstance(vocab_size, int):
            if ground_words or span_end_words is not None:
                raise ValueError("ground_words / span_end_words need a tokenizer as first argument "
                                 "(or pass ground_token_ids)")
            kw["vocab_size"] = vocab_size
        else:
            tok = vocab_size
            pairs = [(w, k) if isinstance(w, str) else tuple(w) for k, w in enumerate(ground_words)]
            kw.update(vocab_size=tok.vocab_size, ground_token_ids=tuple(tok.encode(" ".join(w for w, _ in pairs))),
                      ground_token_cells=tuple(int(k) for _, k in pairs),
                      ground_span_end_ids=() if span_end_words is None else
                      (*tok.encode(" ".join(span_end_words)), tok.im_start_id, tok.im_end_id),
                      **{r: getattr(tok, r) for r in ("pad_id", "im_start_id", "im_end_id", "vision_start_id",
                                                      "vision_end_id")})
        return cls(**{**kw, **overrides})

    @classmethod
    def from_folder(cls, folder, **overrides) -> BagelConfig:
        """llm_config.json (Qwen2; loader overrides qk_norm / untied lm_head are the architecture itself) and the
        optional bagel_config.json (latent sizes, vae_config, new_token_ids); missing values: 7B defaults."""
        folder = Path(folder)
        llm = _read_json(folder / "llm_config.json")
        kw = {k: llm[k] for k in LLM_FIELDS if k in llm}
        if "rope_theta" not in kw and isinstance(llm.get("rope_parameters"), dict):
            kw["rope_theta"] = llm["rope_parameters"]["rope_theta"]
        if (folder / "bagel_config.json").is_file():
            bag = _read_json(folder / "bagel_config.json")
            kw.update({TOKEN_ROLES[k]: v for k, v in bag.get("new_token_ids", {}).items() if k in TOKEN_ROLES})
            if bag.get("vae_config"):
                vae = bag["vae_config"]
                kw.update(vae_config=vae, latent_channels=vae["z_channels"], latent_downsample=vae["downsample"])
            kw.update({f.name: bag[f.name] for f in dataclasses.fields(cls)
                       if f.name in bag and f.name not in LLM_FIELDS})
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BagelConfig override(s): {sorted(unknown)}")
        return cls(**{**kw, **overrides})

    def to_json(self) -> tuple[dict, dict]:
        """(llm_config, bagel_config) dicts in the official layout (+ our fields in bagel_config)."""
        d = dataclasses.asdict(self)
        llm = {k: d.pop(k) for k in LLM_FIELDS}
        llm.update(model_type="qwen2", qk_norm=True, tie_word_embeddings=False, layer_module="Qwen2MoTDecoderLayer")
        d["new_token_ids"] = {k: getattr(self, v) for k, v in TOKEN_ROLES.items()}
        return llm, {**d, "visual_gen": True, "interpolate_pos": False}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint file: {path}")
    return json.loads(path.read_text())


class WordTokenizer:
    """Whitespace word tokenizer for the toy: ids 0-4 are pad, im_start, im_end, vision_start, vision_end."""
    SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")

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
        _atomic(Path(folder) / "word_tokenizer.json", lambda p: Path(p).write_text(json.dumps(self.vocab[5:])))


# -------------------------------------------------------------------------------------- pure tensor helpers
def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h*p, w*p) latent -> (B, h*w, p*p*C) tokens, row-major, C fastest (Bagel's packing)."""
    return rearrange(z, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) latent; inverse of patchify."""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)


def latent_position_ids(h: int, w: int, max_latent_size: int, device=None) -> torch.Tensor:
    """(h*w,) index into latent_pos_embed: row * max_latent_size + col (Bagel's extrapolate mode)."""
    return (torch.arange(h, device=device)[:, None] * max_latent_size + torch.arange(w, device=device)).flatten()


def sincos_2d_table(dim: int, side: int) -> torch.Tensor:
    """(side^2, dim) frozen table; row r*side + c = [sin(c f) | cos(c f) | sin(r f) | cos(r f)],
    f_k = 10000^(-k/(dim/4)): the FIRST half encodes the column (MAE / Bagel)."""
    quarter = dim // 4
    f = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    half = lambda pos: torch.cat([(a := pos.reshape(-1, 1) * f).sin(), a.cos()], dim=1)
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
    n_text = text_valid.sum(1)
    is_gen_b, pos_b = block_layout(n_text, K, N)
    is_gen = torch.cat([torch.zeros_like(text_valid), is_gen_b], 1)
    pos = torch.cat([torch.arange(Lt, device=dev).expand(R, -1), pos_b], 1)
    blk = torch.cat([torch.full((Lt,), -1, device=dev), torch.arange(K, device=dev).repeat_interleave(N + 2)])
    q_text, k_text = (blk < 0)[:, None], (blk < 0)[None, :]
    L = blk.numel()
    causal = torch.arange(L, device=dev)[:, None] >= torch.arange(L, device=dev)[None, :]
    mask = (k_text & (causal | ~q_text)) | ((blk[:, None] == blk[None, :]) & ~q_text)
    key_valid = torch.cat([text_valid, torch.ones(R, K * (N + 2), dtype=torch.bool, device=dev)], 1)
    return is_gen, pos, _visible(mask[None] & key_valid[:, None, :])[:, None]


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
        H, d, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.d, self.nq, self.nkv = d, nq, nkv
        for s in ("", "_moe_gen"):
            setattr(self, "q_proj" + s, nn.Linear(H, nq * d))
            setattr(self, "k_proj" + s, nn.Linear(H, nkv * d))
            setattr(self, "v_proj" + s, nn.Linear(H, nkv * d))
            setattr(self, "o_proj" + s, nn.Linear(nq * d, H, bias=False))
            setattr(self, "q_norm" + s, Qwen2RMSNorm(d, eps=cfg.rms_norm_eps))
            setattr(self, "k_norm" + s, Qwen2RMSNorm(d, eps=cfg.rms_norm_eps))

    def forward(self, x, route, cos, sin, mask, past=None):
        B, L, _ = x.shape
        ex = lambda name: (getattr(self, name), getattr(self, name + "_moe_gen"))
        heads = lambda name, n: route(x, *ex(name)).view(B, L, n, self.d)
        q = route(heads("q_proj", self.nq), *ex("q_norm")).transpose(1, 2)      # (B, nq, L, d)
        k = route(heads("k_proj", self.nkv), *ex("k_norm")).transpose(1, 2)     # (B, nkv, L, d)
        v = heads("v_proj", self.nkv).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)                              # HF rotate_half form
        present = (k, v)                                                         # keys after norm + RoPE
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nq != self.nkv)
        return route(o.transpose(1, 2).reshape(B, L, -1), *ex("o_proj")), present


class MoTDecoderLayer(nn.Module):
    """Pre-norm Qwen2 layer; every norm, projection and MLP is per expert, attention is shared."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(cfg), Qwen2MLP(cfg)
        for s in ("", "_moe_gen"):
            setattr(self, "input_layernorm" + s, Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps))
            setattr(self, "post_attention_layernorm" + s, Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps))

    def forward(self, x, route, cos, sin, mask, past=None):
        a, present = self.self_attn(route(x, self.input_layernorm, self.input_layernorm_moe_gen),
                                    route, cos, sin, mask, past)
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
        self._ground_cache = {}                              # deviation 5c lookup tables, per device
        self._grid_w = cfg.grid(cfg.image_hw)[1]

    def _ground_tables(self, device):
        """(vocab,) cell of each token (-1: not a ground token) and (vocab,) is-span-end, built once per device."""
        if device not in self._ground_cache:
            c = self.cfg
            cell = torch.full((c.vocab_size,), -1, dtype=torch.long)
            cell[list(c.ground_token_ids)] = torch.tensor(c.ground_token_cells, dtype=torch.long)
            end = torch.zeros(c.vocab_size, dtype=torch.bool)
            end[list(c.ground_span_end_ids)] = True
            self._ground_cache[device] = (cell.to(device), end.to(device))
        return self._ground_cache[device]

    def ground_cells(self, ids: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
        """Deviation 5c: the grid cell (R, L) each text token is grounded in, -1 for none. A ground token is in
        its cell; with ground_span_end_ids, so is every token after it up to the next span end. `carry` (R,):
        the cell open at the end of the tokens before `ids` (KV-cached decoding feeds one token at a time)."""
        cell_of, is_end = self._ground_tables(ids.device)
        own = cell_of[ids]
        if not self.cfg.ground_span_end_ids:
            return own
        idx = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        last_ground = torch.where(own >= 0, idx, -1).cummax(-1).values
        last_end = torch.where(is_end[ids], idx, -1).cummax(-1).values
        cells = torch.where(last_ground > last_end, own.gather(-1, last_ground.clamp(min=0)), -1)
        if carry is not None:  # tokens before any ground token or span end continue the open span
            cells = torch.where((last_ground < 0) & (last_end < 0), carry[..., None], cells)
        return cells

    def embed_text(self, ids: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (+ the grounding term of deviation 5c: latent_pos_embed of the token's cell;
        `cells` = ground_cells(ids, carry) when a KV-cached caller has an open span, else computed here)."""
        e = self.language_model.model.embed_tokens(ids)
        if self.cfg.ground_token_ids:
            cell = self.ground_cells(ids) if cells is None else cells
            k = cell.clamp(min=0)
            pos = (k // self._grid_w) * self.cfg.max_latent_size + k % self._grid_w
            e = e + (self.cfg.ground_scale * (cell >= 0))[..., None] * self.latent_pos_embed.pos_embed[pos]
        return e

    def embed_latents(self, x_t, t, h, w):
        """x_t (..., N, D), t (...) -> vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos), (..., N, H)."""
        pos = latent_position_ids(h, w, self.cfg.max_latent_size, x_t.device)
        dtype = self.vae2llm.weight.dtype
        return self.vae2llm(x_t.to(dtype)) + self.time_embedder(t)[..., None, :] + self.latent_pos_embed.pos_embed[pos]

    def head(self, hidden, x_t, t):
        """Velocity from final gen-expert hiddens; x0 mode converts x0_hat to v = (x_t - x0_hat)/max(t, t_min)."""
        out = self.llm2vae(hidden).float()
        if self.cfg.prediction == "x0":
            out = (x_t.float() - out) / t.float().clamp(min=self.cfg.t_min)[..., None, None]
        return out.to(x_t.dtype)

    def rope(self, position_ids, dtype):
        """HF Qwen2 default RoPE: inv_freq = theta^(-2i/d), cos/sin of [freqs | freqs], (B, L, d)."""
        d = self.cfg.head_dim
        i = torch.arange(0, d, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / self.cfg.rope_theta ** (i / d)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, h, is_gen, position_ids, mask, past=None):
        """h (B, L, H) input embeddings -> (final hidden after the per-expert final norm, per-layer (k, v))."""
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
        return Thoughts(*(x[idx] for x in (self.prompt_ids, self.prompt_mask, self.ids, self.mask, self.logp)),
                        [self.texts[i] for i in idx.tolist()])


@dataclass
class Context:
    """Cached conditioning sequence: per-layer keys (after norm + RoPE) and values (R, H_kv, L, d)."""
    keys: list
    values: list
    key_mask: torch.Tensor     # (R, L) bool, valid (non-padding) keys
    rope_next: torch.Tensor    # (R,) long
    ground: torch.Tensor | None = None  # (R,) long, toy 5c: the grounding span still open after the context

    past = property(lambda self: list(zip(self.keys, self.values)))

    def repeat_interleave(self, n: int) -> Context:
        rep = lambda x: x.repeat_interleave(n, 0)
        return Context([rep(k) for k in self.keys], [rep(v) for v in self.values], rep(self.key_mask),
                       rep(self.rope_next), None if self.ground is None else rep(self.ground))


@dataclass
class TrainOutput:
    logp: torch.Tensor         # (R, T) log-softmax of the reasoning tokens (temperature 1), 0 where masked
    v: torch.Tensor            # (R, K, N, D) velocities of the K noisy blocks


class _PixelCodec:
    """Toy codec (deviation 5a): the latent is the image itself."""
    encode = decode = staticmethod(lambda x: x)


class Policy(nn.Module):
    """The MoT (`self.model`), the tokenizer and the image codec behind the interface the RL loop uses."""

    def __init__(self, cfg: BagelConfig, tokenizer, model: BagelMoT | None = None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.model = model if model is not None else BagelMoT(cfg)
        self.extra_state: dict = {}          # ViT / connector tensors of a real checkpoint, exported untouched
        self.source_folder: Path | None = None
        self._codec = None

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: BagelConfig, tokenizer, seed: int = 0) -> Policy:
        """Random init (deviation 6), fp32, deterministic in `seed`."""
        _check_tokenizer(tokenizer, cfg)
        policy = cls(cfg, tokenizer)
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

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.bfloat16, device="cpu", tokenizer=None, **overrides) -> Policy:
        """Official layout: llm_config.json, ema.safetensors (or shards + index), optional bagel_config.json,
        tokenizer files, ae.safetensors (read at the first encode/decode). Weights are read memory-mapped
        straight into parameters built on the meta device (one copy in memory)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {folder}")
        cfg = BagelConfig.from_folder(folder, **overrides)
        files = _weight_files(folder)
        with torch.device("meta"):
            model = BagelMoT(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {}
        for f in files:
            with safe_open(str(f), framework="pt") as s:
                found.update({k: (f, tuple(s.get_slice(k).get_shape())) for k in s.keys()})
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(k for k in set(found) - set(expected) if not k.startswith(EXTRA_PREFIXES))
        if missing or unexpected:
            raise KeyError(f"{folder}: state dict mismatch: missing keys {missing}; unexpected keys {unexpected}")
        bad = [f"{k}: file {found[k][1]} vs model {shape}" for k, shape in expected.items() if found[k][1] != shape]
        if bad:
            raise ValueError(f"{folder}: wrong tensor shapes: {bad}")
        state, extra = {}, {}
        for f in files:
            with safe_open(str(f), framework="pt", device=str(device)) as s:
                for k in s.keys():
                    if k in expected:
                        state[k] = s.get_tensor(k).to(dtype)
                    else:
                        extra[k] = s.get_tensor(k).cpu()
        model.load_state_dict(state, strict=True, assign=True)
        model.latent_pos_embed.pos_embed.requires_grad_(False)
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(folder)
        _check_tokenizer(tokenizer, cfg)
        policy = cls(cfg, tokenizer, model)
        policy.extra_state, policy.source_folder = extra, folder
        return policy

    def save_pretrained(self, folder):
        """Write the official layout back (each file atomically: temp file, then rename); other files of the
        source folder (ae.safetensors, vit_config.json, ...) are copied."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        state.update(self.extra_state)
        _atomic(folder / "ema.safetensors", lambda p: save_file(state, p))
        llm, bag = self.cfg.to_json()
        bag["visual_und"] = any(k.startswith("vit_model.") for k in self.extra_state)
        src = self.source_folder
        for name, d in (("llm_config.json", llm), ("bagel_config.json", bag)):
            if src is not None and (src / name).is_file():  # keep the fields we do not model (e.g. Qwen2's)
                d = {**json.loads((src / name).read_text()), **d}
            _atomic(folder / name, lambda p, d=d: Path(p).write_text(json.dumps(d, indent=2)))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                self.tokenizer.save_pretrained(tmp)
                for f in Path(tmp).iterdir():
                    os.replace(f, folder / f.name)
        if src is not None and src.resolve() != folder.resolve():
            ours = set(_weight_files(src)) | set(src.glob("*.safetensors.index.json"))
            for f in src.iterdir():
                if f.is_file() and f not in ours and not (folder / f.name).exists():
                    _atomic(folder / f.name, lambda p, f=f: shutil.copyfile(f, p))

    # -------------------------------------------------------------------------------- small helpers
    device = property(lambda self: self.model.vae2llm.weight.device)

    def latent_shape(self, image_hw=None) -> tuple[int, int]:
        """(N, D) of an image of image_hw pixels (default cfg.image_hw)."""
        h, w = self.cfg.grid(image_hw or self.cfg.image_hw)
        return h * w, self.cfg.patch_dim

    def empty_context(self, R: int) -> Context:
        p = self.model.vae2llm.weight
        kv = lambda: [p.new_zeros(R, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
                      for _ in range(self.cfg.num_hidden_layers)]
        return Context(kv(), kv(), torch.zeros(R, 0, dtype=torch.bool, device=p.device),
                       torch.zeros(R, dtype=torch.long, device=p.device))

    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this Policy has no tokenizer: pass tokenizer= to from_pretrained")
        return list(self.tokenizer.encode(text))

    def _prompt_prefix(self, prompt: str, i: int, max_new_tokens: int, thinking: bool) -> list[int]:
        c = self.cfg
        chunk = lambda s: [c.im_start_id] + self._encode_text(s) + [c.im_end_id]
        ids = (chunk(c.think_system_prompt) if thinking and c.think_system_prompt else []) + chunk(prompt)
        if len(ids) + max_new_tokens + 2 > c.max_position_embeddings:
            raise ValueError(f"prompts[{i}] is too long: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} "
                             f"+ 2 exceed max_position_embeddings={c.max_position_embeddings}")
        return ids

    def _pad(self, rows):
        L = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), L), self.cfg.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), True
        return ids.to(self.device), mask.to(self.device)

    def _text_rows(self, th: Thoughts):
        """Per row [prompt_ids, im_start, reasoning (+ im_end if truncated)], right-padded; and im_start's column."""
        rows, starts = [], []
        for p, pm, r, rm in zip(th.prompt_ids.tolist(), th.prompt_mask.tolist(), th.ids.tolist(), th.mask.tolist()):
            p, r = [x for x, m in zip(p, pm) if m], [x for x, m in zip(r, rm) if m]
            tail = [] if not r or r[-1] == self.cfg.im_end_id else [self.cfg.im_end_id]
            rows.append(p + ([self.cfg.im_start_id] + r + tail if r else []))
            starts.append(len(p))
        ids, valid = self._pad(rows)
        return ids, valid, torch.tensor(starts, device=self.device)

    def _time(self, t, shape, name="t"):
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        if t.ndim > len(shape) or tuple(t.shape) != tuple(shape)[len(shape) - t.ndim:]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected a float or {tuple(shape)}")
        return t.expand(shape)

    # -------------------------------------------------------------------------------- text
    def forward_text(self, ids: torch.Tensor, valid: torch.Tensor, past: Context | None = None):
        """Causal und-expert pass over new text ids (R, L) (right-padded, `valid`) after `past`.
        Returns (final hidden (R, L, H), the context extended by these tokens)."""
        past = past if past is not None else self.empty_context(ids.shape[0])
        R, L = ids.shape
        pos = past.rope_next[:, None] + torch.arange(L, device=ids.device)
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        mask = torch.cat([past.key_mask[:, None, :].expand(R, L, -1), causal & valid[:, None, :]], -1)
        cells = self.model.ground_cells(ids, past.ground) if self.cfg.ground_token_ids else None
        h, present = self.model(self.model.embed_text(ids, cells=cells), None, pos, _visible(mask)[:, None],
                                past.past)
        ground = None
        if self.cfg.ground_span_end_ids:  # the span open after the last valid token, for the next call
            last = (valid.sum(1) - 1).clamp(min=0)[:, None]
            ground = torch.where(valid.any(1), cells.gather(1, last)[:, 0],
                                 past.ground if past.ground is not None else -1)
        return h, Context([torch.cat([pk, k], 2) for pk, (k, _) in zip(past.keys, present)],
                          [torch.cat([pv, v], 2) for pv, (_, v) in zip(past.values, present)],
                          torch.cat([past.key_mask, valid], 1), past.rope_next + valid.sum(1), ground)

    @torch.no_grad()
    def think(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
              generator: torch.Generator | None = None) -> Thoughts:
        """Sample n reasoning chains per prompt with a KV cache: prefill [system?, prompt chunk] once per prompt,
        feed im_start, sample until im_end (kept, with its log-prob) or max_new_tokens. temperature 0 = greedy."""
        if n < 1 or max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"need n >= 1, max_new_tokens >= 0, temperature >= 0; "
                             f"got {n}, {max_new_tokens}, {temperature}")
        thinking = max_new_tokens > 0
        P_ids, P_mask = self._pad([self._prompt_prefix(p, i, max_new_tokens, thinking) for i, p in enumerate(prompts)])
        R, c, dev = len(prompts) * n, self.cfg, self.device
        prompt_ids, prompt_mask = P_ids.repeat_interleave(n, 0), P_mask.repeat_interleave(n, 0)
        if not thinking:
            return Thoughts(prompt_ids, prompt_mask, torch.zeros(R, 0, dtype=torch.long, device=dev),
                            torch.zeros(R, 0, dtype=torch.bool, device=dev), torch.zeros(R, 0, device=dev), [""] * R)
        ctx = self.forward_text(P_ids, P_mask)[1].repeat_interleave(n)
        tok = torch.full((R,), c.im_start_id, dtype=torch.long, device=dev)
        alive = torch.ones(R, dtype=torch.bool, device=dev)
        ids, mask, logp = [], [], []
        for _ in range(max_new_tokens):
            h, ctx = self.forward_text(tok[:, None], alive[:, None], ctx)
            logits = self.model.language_model.lm_head(h[:, -1]).float()
            if temperature == 0:
                tok = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                gdev = generator.device if generator is not None else probs.device   # a CPU generator on GPU runs
                tok = torch.multinomial(probs.to(gdev), 1, generator=generator).squeeze(1).to(probs.device)
            lp = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
            ids.append(torch.where(alive, tok, c.pad_id)), mask.append(alive), logp.append(torch.where(alive, lp, 0.0))
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
        P_ids, P_mask = self._pad([self._prompt_prefix(p, i, 0, True) for i, p in enumerate(prompts)])
        ids, mask = self._pad([self._encode_text(r) + [self.cfg.im_end_id] for r in reasonings])
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
        ids, valid = self._pad([[self.cfg.im_start_id] + self._encode_text(s) + [self.cfg.im_end_id]] * R)
        return self.forward_text(ids, valid)[1]

    # -------------------------------------------------------------------------------- images
    def _blocks(self, x_t, t, h, w):
        """[vision_start, latents, vision_end] embeddings of x_t (R, K, N, D) at t (R, K) -> (R, K*(N+2), H)."""
        R, K = x_t.shape[:2]
        mark = lambda i: self.model.embed_text(torch.full((R, K, 1), i, dtype=torch.long, device=self.device))
        lat = self.model.embed_latents(x_t, t, h, w)
        return rearrange(torch.cat([mark(self.cfg.vision_start_id), lat, mark(self.cfg.vision_end_id)], 2),
                         "r k n h -> r (k n) h")

    def _check_latents(self, x_t, image_hw, ndim):
        h, w = self.cfg.grid(image_hw or self.cfg.image_hw)
        if x_t.ndim != ndim or tuple(x_t.shape[-2:]) != (h * w, self.cfg.patch_dim):
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}, expected {ndim - 2} batch dims then "
                             f"(N, D) = ({h * w}, {self.cfg.patch_dim}) for image_hw={image_hw or self.cfg.image_hw}")
        return h, w

    def velocity(self, x_t, t, context: Context, cfg_scale: float = 1.0, uncond: Context | None = None,
                 image_hw=None) -> torch.Tensor:
        """v_theta(x_t, t) (R, N, D): gen expert over [vision_start, N latents, vision_end] at rope_next, full
        attention over the cached context + the block, no cache write. cfg_scale != 1: v_u + s*(v - v_u)."""
        h, w = self._check_latents(x_t, image_hw, 3)
        R, N = x_t.shape[:2]
        if context.key_mask.shape[0] != R:
            raise ValueError(f"context has {context.key_mask.shape[0]} rows, x_t {R}")
        t = self._time(t, (R,))

        def v_of(ctx):
            is_gen, pos = block_layout(ctx.rope_next, 1, N)
            mask = torch.cat([ctx.key_mask, torch.ones(R, N + 2, dtype=torch.bool, device=self.device)], 1)
            hid, _ = self.model(self._blocks(x_t[:, None], t[:, None], h, w), is_gen, pos,
                                mask[:, None, None, :], ctx.past)
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
        t = self._time(t, (R, K))
        ids, valid, starts = self._text_rows(thoughts)
        Lt, T = ids.shape[1], thoughts.ids.shape[1]
        is_gen, pos, mask = packed_layout(valid, K, N)
        emb = torch.cat([self.model.embed_text(ids), self._blocks(x_t, t, h, w)], 1)
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
        """images (R, 3, H, W) in [-1, 1] -> x_0 tokens (R, N, D): codec (FLUX: 0.3611*(mu - 0.1159)) then patchify."""
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


def _weight_files(folder: Path) -> list[Path]:
    if (folder / "ema.safetensors").is_file():
        return [folder / "ema.safetensors"]
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        files = [folder / f for f in sorted(set(json.loads(index[0].read_text())["weight_map"].values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} listed in {index[0]} is missing")
        return files
    raise FileNotFoundError(f"missing checkpoint file: {folder / 'ema.safetensors'} (nor a *.safetensors.index.json)")


SPECIAL_TOKENS = {"im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>",
                  "vision_start_id": "<|vision_start|>", "vision_end_id": "<|vision_end|>"}


def _check_tokenizer(tokenizer, cfg: BagelConfig):
    """The tokenizer must fit the embedding table and agree with the config on Bagel's special-token ids."""
    if tokenizer is None:
        return
    for role, name in SPECIAL_TOKENS.items():
        got = getattr(tokenizer, role, None)
        if got is None and hasattr(tokenizer, "convert_tokens_to_ids"):
            got = tokenizer.convert_tokens_to_ids(name)
        if got is not None and got != getattr(cfg, role):
            raise ValueError(f"tokenizer: {name} has id {got}, the checkpoint config says {role}={getattr(cfg, role)}")
    if hasattr(tokenizer, "pad_id") and tokenizer.pad_id != cfg.pad_id:
        raise ValueError(f"tokenizer: pad id {tokenizer.pad_id}, the config says pad_id={cfg.pad_id}")
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 0)
    if n > cfg.vocab_size:
        raise ValueError(f"tokenizer has {n} tokens, more than the model's vocab_size={cfg.vocab_size}")


def _load_tokenizer(folder: Path):
    """WordTokenizer (word_tokenizer.json) or the Qwen2 tokenizer files via AutoTokenizer (offline); else None."""
    if (folder / "word_tokenizer.json").is_file():
        return WordTokenizer(json.loads((folder / "word_tokenizer.json").read_text()))
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return None


def _atomic(path: Path, write):
    """Write `path` via write(tmp) into a temp file in the same folder, then rename (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
