"""FLUX autoencoder (Bagel's VAE) run by diffusers' `AutoencoderKL`, loaded from the official
`ae.safetensors`.

Bagel encodes images with the FLUX AE (`modeling/autoencoder.py`, official keys `encoder.*`,
`decoder.*`) and works on z = scale_factor * (mu - shift_factor). Here the same network is
diffusers' `AutoencoderKL` built from the FLUX params; the official state dict is renamed to
diffusers' layout by a small table (our own code, no `from_single_file`, no network). Topology
match: FLUX `encoder.down.{i}` = `encoder.down_blocks.{i}`; FLUX `decoder.up.{i}`
(num_res_blocks + 1 resnets, indexed by resolution level) = `decoder.up_blocks.{n-1-i}` (diffusers
lists up blocks from the lowest resolution); `mid.block_1/attn_1/block_2` = `mid_block.resnets.0/
attentions.0/resnets.1`; the mid attention's 1x1 convs q/k/v/proj_out = Linear
to_q/to_k/to_v/to_out.0 (one head of width C, scale 1/sqrt(C) in both);
`nin_shortcut` = `conv_shortcut`; norms: 32 groups, eps 1e-6.

Glossary
    x           image (R, in_channels, H, W) in [-1, 1]
    mu, logvar  encoder moments, each (R, z_channels, H/f, W/f), f = 2**(len(ch_mult) - 1)
                (8 for FLUX)
    z           Bagel latent scale_factor * (mu or mu + exp(logvar/2)*eps - shift_factor)
    n           number of resolution levels, len(ch_mult)

Deviations / borrowed defaults
    1. `encode` returns the mean by default (sample=False); Bagel's `AutoEncoder.encode` samples by
       default.
    2. Sampling uses the raw logvar as FLUX does; diffusers' DiagonalGaussianDistribution clamps it
       to [-30, 20], so `ae.encode(x).latent_dist.sample()` is not used.
    3. diffusers feeds its first down block with block_out_channels[0] = ch*ch_mult[0] channels
       while FLUX's conv_in gives ch, so ch_mult[0] must be 1 (true for FLUX); other values raise
       ValueError.
"""
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

# `load_ae` in Bagel (the 7B checkpoint's AE).
FLUX_AE_7B_PARAMS = {
    "resolution": 256, "in_channels": 3, "downsample": 8, "ch": 128, "out_ch": 3,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 16, "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}
_REQUIRED_PARAMS = ("resolution", "in_channels", "ch", "out_ch", "ch_mult", "num_res_blocks",
                    "z_channels", "scale_factor", "shift_factor")
# FLUX hard-codes GroupNorm(32, eps=1e-6); diffusers' encoder/decoder also use eps=1e-6
_NORM_GROUPS = 32

# Sub-module names inside one block: official -> diffusers.
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_SHORTCUT = ("nin_shortcut", "conv_shortcut")  # only where a resnet changes width
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LINEAR_FROM_CONV = {"q", "k", "v", "proj_out"}  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)


def flux_vae_config(params: dict) -> dict:
    """diffusers `AutoencoderKL` config equivalent to FLUX `AutoEncoderParams` `params` (a dict)."""
    missing = [k for k in _REQUIRED_PARAMS if k not in params]
    if missing:
        raise KeyError(f"params is missing FLUX AE keys {missing}")
    ch, ch_mult = int(params["ch"]), [int(m) for m in params["ch_mult"]]
    n = len(ch_mult)
    if n < 1 or ch_mult[0] != 1:
        raise ValueError(f"params['ch_mult'] must be non-empty and start with 1 "
                         f"(diffusers topology), got {ch_mult}")
    if "downsample" in params and int(params["downsample"]) != 2 ** (n - 1):
        raise ValueError(f"params['downsample']={params['downsample']} does not match "
                         f"len(ch_mult)={n} (expected {2 ** (n - 1)})")
    block_out_channels = [ch * m for m in ch_mult]
    if any(c % _NORM_GROUPS for c in block_out_channels):
        raise ValueError(f"params['ch'] * params['ch_mult'] = {block_out_channels} must be "
                         f"multiples of {_NORM_GROUPS} (GroupNorm groups)")
    return {
        "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": block_out_channels,
        # diffusers' decoder adds the +1 resnet itself
        "layers_per_block": int(params["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(params["z_channels"]),
        "norm_num_groups": _NORM_GROUPS,
        "sample_size": int(params["resolution"]),
        "scaling_factor": float(params["scale_factor"]),
        "shift_factor": float(params["shift_factor"]),
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def _flux_ae_modules(num_levels: int, num_res_blocks: int, widens) -> list:
    """(official module, diffusers module) for every weight/bias pair; `widens(official resnet)` ->
    has shortcut."""
    resnets, modules = [], []
    for p in ("encoder", "decoder"):
        modules += [(f"{p}.conv_in", f"{p}.conv_in"), (f"{p}.norm_out", f"{p}.conv_norm_out"),
                    (f"{p}.conv_out", f"{p}.conv_out")]
        modules += [(f"{p}.mid.attn_1.{a}", f"{p}.mid_block.attentions.0.{b}")
                    for a, b in _ATTN_PARTS.items()]
        resnets += [(f"{p}.mid.block_1", f"{p}.mid_block.resnets.0"),
                    (f"{p}.mid.block_2", f"{p}.mid_block.resnets.1")]
    for i in range(num_levels):
        r = num_levels - 1 - i  # diffusers' up_blocks run from the lowest resolution
        resnets += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
                    for j in range(num_res_blocks)]
        resnets += [(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{r}.resnets.{j}")
                    for j in range(num_res_blocks + 1)]
        if i != num_levels - 1:
            modules.append((f"encoder.down.{i}.downsample.conv",
                            f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        if i != 0:
            modules.append((f"decoder.up.{i}.upsample.conv",
                            f"decoder.up_blocks.{r}.upsamplers.0.conv"))
    for off, dif in resnets:
        modules += [(f"{off}.{a}", f"{dif}.{b}") for a, b in _RESNET_PARTS.items()]
        if widens(off):
            modules.append((f"{off}.{_SHORTCUT[0]}", f"{dif}.{_SHORTCUT[1]}"))
    return modules


def convert_flux_ae_state_dict(sd: dict, num_levels: int, num_res_blocks: int) -> dict:
    """Rename an official FLUX AE state dict (`encoder.*`, `decoder.*`) to diffusers `AutoencoderKL`
    keys.

    A resnet has a shortcut exactly when its conv1 changes the width (as in FLUX). Raises KeyError
    naming every official key not in the FLUX topology and every diffusers key left unfilled."""
    if int(num_levels) < 1 or int(num_res_blocks) < 0:
        raise ValueError(f"num_levels={num_levels} must be >= 1 and num_res_blocks={num_res_blocks} "
                         f">= 0")

    def widens(resnet):
        w = sd.get(f"{resnet}.conv1.weight")
        return w is not None and w.ndim == 4 and w.shape[0] != w.shape[1]

    out, used, unfilled = {}, set(), []
    for off, dif in _flux_ae_modules(int(num_levels), int(num_res_blocks), widens):
        for t in ("weight", "bias"):
            key = f"{off}.{t}"
            if key not in sd:
                unfilled.append(f"{dif}.{t} (from {key})")
                continue
            w = sd[key]
            if (t == "weight" and off.rsplit(".", 1)[-1] in _LINEAR_FROM_CONV
                    and ".mid.attn_1." in off):
                w = w.reshape(w.shape[0], -1)
            out[f"{dif}.{t}"] = w
            used.add(key)
    unknown = sorted(set(sd) - used)
    if unknown or unfilled:
        raise KeyError(f"FLUX AE state dict does not match the topology (num_levels={num_levels}, "
                       f"num_res_blocks={num_res_blocks}): unknown official keys {unknown}; "
                       f"unfilled diffusers keys {unfilled}")
    return out


class FluxVAE(nn.Module):
    """diffusers `AutoencoderKL` (as `self.ae`) with Bagel's latent scale and shift."""

    def __init__(self, params: dict):
        super().__init__()
        self.ae = AutoencoderKL(**flux_vae_config(params))
        self.scale_factor = float(params["scale_factor"])
        self.shift_factor = float(params["shift_factor"])
        self.downsample = 2 ** (len(params["ch_mult"]) - 1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (R, 2*z_channels, H/f, W/f) = [mu | logvar] on dim 1 (no quant_conv in
        FLUX)."""
        if x.ndim != 4 or x.shape[1] != self.ae.config.in_channels:
            raise ValueError(f"x must be (R, {self.ae.config.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return self.ae.encode(x).latent_dist.parameters

    def encode(self, x: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None):
        """z = scale_factor * (mu - shift_factor), or with mu + exp(logvar/2)*eps, eps ~ N(0, I)
        from `generator`."""
        mu, logvar = self.moments(x).chunk(2, dim=1)
        if sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            mu = mu + torch.exp(0.5 * logvar) * eps
        return self.scale_factor * (mu - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x = decoder(z / scale_factor + shift_factor), (R, out_ch, f*h, f*w), roughly in
        [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.ae.config.latent_channels:
            raise ValueError(f"z must be (R, {self.ae.config.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        return self.ae.decode(z / self.scale_factor + self.shift_factor).sample


def load_flux_vae(path, params: dict | None = None, dtype=torch.float32, device="cpu") -> FluxVAE:
    """Build FluxVAE from `params` (default: Bagel-7B's FLUX AE) and load the official
    `ae.safetensors` at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLUX autoencoder weights not found: {path}")
    params = dict(FLUX_AE_7B_PARAMS if params is None else params)
    with torch.device("meta"):  # no random init; real tensors are assigned below
        vae = FluxVAE(params)
    try:
        official = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = convert_flux_ae_state_dict(official, len(params["ch_mult"]), params["num_res_blocks"])
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from None
    expected = vae.ae.state_dict()
    unfilled, unknown = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if unfilled or unknown:
        raise KeyError(f"{path}: converted keys do not match AutoencoderKL for these params: "
                       f"missing {unfilled}; unexpected {unknown}")
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in sd.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"{path}: tensor shapes do not match params {params}: {bad}")
    vae.ae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()},
                           strict=True, assign=True)
    left = [k for k, t in list(vae.named_parameters()) + list(vae.named_buffers()) if t.is_meta]
    if left:
        raise KeyError(f"{path}: tensors left uninitialised after loading: {left}")
    return vae.eval()
