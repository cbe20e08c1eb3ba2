"""BAGEL's image-understanding path: how an image is read into the context by the ViT (SigLIP-NaViT and
its connector), and Bagel's image preprocessing shared by the VAE and the ViT.

    pixels = preprocess(image, *VAE_TRANSFORM)        # PIL image -> (3, H, W) in [-1, 1]
    vit = ViT(vit_config, hidden_size, ...)            # model.BagelMoT holds it when the checkpoint has one
    tokens = vit(pixels[None])                         # (R, n, H) LLM input embeddings of the patches

The ViT is transformers' SigLIP encoder with Bagel's own patch embedding (a Linear on 14x14 patches, (p, q, c)
with c fastest) and position ids row * max_patches_per_side + col; its output (after post_layernorm, the
penultimate layer's features: the loader drops the last layer) goes through the connector
fc2(gelu_tanh(fc1(.))) plus a frozen 2-D sincos table `vit_pos_embed`. Facts: shared/reference/bagel_context.

Glossary
    R images, n patches per image (h x w grid, row-major), P = patch_size, H the LLM's hidden size.

Deviations / borrowed defaults
    1. Images of one batch share one size, so NaViT's packing over images of different sizes (cu_seqlens)
       becomes a batch dim; attention is full within an image and never across images, as there.
"""
from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig
from transformers.activations import ACT2FN
from transformers.models.siglip.modeling_siglip import SiglipEncoder

# ImageTransform(max_image_size, min_image_size, image_stride) of BAGEL-7B's inferencer
VAE_TRANSFORM = (1024, 512, 16)
VIT_TRANSFORM = (980, 224, 14)
MAX_PIXELS = 14 * 14 * 9 * 1024


# ---------------------------------------------------------------------------------------- preprocessing
def _snap(side: float, stride: int) -> int:
    # Python's round is half-to-even (72 / 16 = 4.5 -> 64 px), as in Bagel's transform
    return max(stride, int(round(side / stride) * stride))


def resize_hw(height: int, width: int, max_size: int, min_size: int, stride: int,
              max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The (H, W) Bagel resizes an image to: scale = max(min(max_size / long, 1), min_size / short), each
    side rounded and snapped to a multiple of `stride`; then the max_pixels and long-edge caps, each with
    the same rounding."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {(height, width)}: both sides must be positive")
    if min(max_size, min_size, stride) < 1:
        raise ValueError(f"transform (max {max_size}, min {min_size}, stride {stride}) must be positive")
    scale = max(min(max_size / max(height, width), 1.0), min_size / min(height, width))
    h, w = (_snap(round(s * scale), stride) for s in (height, width))
    if h * w > max_pixels:
        scale = max_pixels / (h * w)
        h, w = (_snap(round(s * scale), stride) for s in (h, w))
    if max(h, w) > max_size:
        scale = max_size / max(h, w)
        h, w = (_snap(round(s * scale), stride) for s in (h, w))
    return h, w


def as_rgb(image) -> Image.Image:
    """A PIL image, or an (H, W, 3) uint8 array / tensor, as an RGB PIL image (alpha composited on white)."""
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image, max_size: int, min_size: int, stride: int) -> Image.Image:
    """Bagel's resize: resize_hw, PIL bicubic (with its antialiasing)."""
    image = as_rgb(image)
    h, w = resize_hw(image.height, image.width, max_size, min_size, stride)
    return image if (h, w) == (image.height, image.width) else image.resize((w, h), Image.BICUBIC)


def preprocess(image, max_size: int, min_size: int, stride: int) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]: resize, then /255 and (x - 0.5) / 0.5."""
    x = torch.from_numpy(np.asarray(resize(image, max_size, min_size, stride), dtype=np.uint8).copy())
    return (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------ the ViT
def siglip_config(vit_config: dict) -> SiglipVisionConfig:
    """The SigLIP config Bagel builds from vit_config.json: one layer fewer (penultimate features), no RoPE."""
    known = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
             "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout"}
    kw = {k: v for k, v in vit_config.items() if k in known}
    if kw.get("num_hidden_layers", 0) < 2:
        raise ValueError(f"vit_config num_hidden_layers={kw.get('num_hidden_layers')}: Bagel drops the last "
                         f"layer, so at least 2 are needed")
    kw["num_hidden_layers"] -= 1
    cfg = SiglipVisionConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


class _Embeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        P, C, E = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_embedding = nn.Linear(P * P * C, E)          # Bagel's conv, as a Linear on (p, q, c)
        self.position_embedding = nn.Embedding((cfg.image_size // P) ** 2, E)


class _VisionModel(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class VisionTower(nn.Module):
    """SigLIP-NaViT under the official keys vit_model.vision_model.*; vit_forward runs it."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.vision_model = _VisionModel(cfg)
        self.patch_size = cfg.patch_size


class Connector(nn.Module):
    """fc2(act(fc1(x))): ViT width -> the LLM's hidden size (Bagel's MLPconnector)."""

    def __init__(self, d_in: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden)
        self.act = ACT2FN[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def patchify_pixels(pixels: torch.Tensor, P: int) -> torch.Tensor:
    """(R, C, h*P, w*P) -> (R, h*w, P*P*C), row-major, C fastest (Bagel's ViT patches)."""
    return rearrange(pixels, "r c (h p) (w q) -> r (h w) (p q c)", p=P, q=P)


def vit_position_ids(h: int, w: int, side: int, device=None) -> torch.Tensor:
    """(h*w,) ids row * side + col, side = vit_max_num_patch_per_side (not the grid width)."""
    return (torch.arange(h, device=device)[:, None] * side + torch.arange(w, device=device)).flatten()


def vit_forward(tower: VisionTower, pixels: torch.Tensor, side: int, trace: dict | None = None):
    """The SigLIP-NaViT features (R, n, E) of same-size images pixels (R, 3, H, W) in [-1, 1].
    trace: filled with the intermediates (patch_linear, embeddings, layer{i}_out) when given."""
    vm, P = tower.vision_model, tower.patch_size
    H, W = pixels.shape[-2:]
    if H % P or W % P or H // P > side or W // P > side:
        raise ValueError(f"ViT pixels {(H, W)}: each side must be a multiple of the patch size {P} and at "
                         f"most {P * side} px (vit_max_num_patch_per_side={side})")
    h, w = H // P, W // P
    x = vm.embeddings.patch_embedding(patchify_pixels(pixels.to(vm.post_layernorm.weight.dtype), P))
    pos = vit_position_ids(h, w, side, pixels.device)
    e = x + vm.embeddings.position_embedding(pos)
    if trace is not None:
        trace.update(patch_linear=x, embeddings=e)
    hid = e
    for i, layer in enumerate(vm.encoder.layers):
        hid = layer(hid, None)
        hid = hid[0] if isinstance(hid, tuple) else hid
        if trace is not None:
            trace[f"layer{i}_out"] = hid
    return vm.post_layernorm(hid), (h, w)
