"""Tests for flux_vae.py: golden outputs of the official FLUX AE
(tests/fixtures/bagel/ae.safetensors), the key mapping against an independent enumeration of the
FLUX topology, the sampled path, and the error messages."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_vae import (FLUX_AE_7B_PARAMS, FluxVAE, convert_flux_ae_state_dict, flux_vae_config,
                      load_flux_vae)

FIXTURES = Path(__file__).parent / "fixtures" / "bagel"
WEIGHTS = FIXTURES / "model" / "ae_tiny.safetensors"
GOLDEN = FIXTURES / "ae.safetensors"
ATOL = RTOL = 1e-4

# Bagel-7B's FLUX AE as written in SPEC.md (VAE section).
SPEC_7B = {"resolution": 256, "in_channels": 3, "downsample": 8, "ch": 128, "out_ch": 3,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 16, "scale_factor": 0.3611,
           "shift_factor": 0.1159}


def official_shapes(p: dict) -> dict:
    """Every tensor of FLUX's AutoEncoder(params) with its shape, re-derived from the official
    Encoder/Decoder."""
    shapes = {}

    def conv(name, c_in, c_out, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out), conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c), resnet(f"{prefix}.mid.block_2", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for a in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{a}", c, c, 1)

    ch, mult, nrb, n = p["ch"], p["ch_mult"], p["num_res_blocks"], len(p["ch_mult"])
    conv("encoder.conv_in", p["in_channels"], ch, 3)
    c = ch
    for i in range(n):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", c, 2 * p["z_channels"], 3)
    c = ch * mult[-1]
    conv("decoder.conv_in", p["z_channels"], c, 3)
    mid("decoder", c)
    for i in reversed(range(n)):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, p["out_ch"], 3)
    return shapes


@pytest.fixture(scope="module")
def params():
    return json.loads((FIXTURES / "meta.json").read_text())["ae"]["params"]


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def vae(params):
    return load_flux_vae(WEIGHTS, params)


def _close(name, got, want):
    assert got.shape == want.shape, name
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"{name}: max abs err {err:.3g}"
    return err


# --- golden vectors -------------------------------------------------------------------------------

GOLDEN_OUTPUTS = {  # fixture name -> how to reproduce it
    "encoder_moments": lambda v, g: v.moments(g["image"]),
    "z_mean_scaled": lambda v, g: v.encode(g["image"], sample=False),
    "decoded_from_z_mean": lambda v, g: v.decode(g["z_mean_scaled"]),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_OUTPUTS))
@torch.no_grad()
def test_golden_outputs(vae, golden, name):
    _close(name, GOLDEN_OUTPUTS[name](vae, golden), golden[name])


@torch.no_grad()
def test_golden_closed_forms(vae, golden, params):
    # z = scale*(mu - shift) on the fixture's own moments; decode undoes it before the decoder.
    mu = golden["encoder_moments"].chunk(2, dim=1)[0]
    _close("z from fixture moments", params["scale_factor"] * (mu - params["shift_factor"]),
           golden["z_mean_scaled"])
    z = golden["z_mean_scaled"]
    _close("decode vs raw decoder", vae.decode(z),
           vae.ae.decoder(z / params["scale_factor"] + params["shift_factor"]))
    f = 2 ** (len(params["ch_mult"]) - 1)
    assert vae.downsample == f and z.shape[-2:] == tuple(s // f for s in golden["image"].shape[-2:])


@torch.no_grad()
def test_fp64_load(golden, params):
    v64 = load_flux_vae(WEIGHTS, params, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in v64.parameters())
    _close("fp64 z", v64.encode(golden["image"].double()).float(), golden["z_mean_scaled"])


# --- sampled path ---------------------------------------------------------------------------------

@torch.no_grad()
def test_sample_rederived_with_generator(vae, golden, params):
    x = golden["image"]
    mu, logvar = vae.moments(x).chunk(2, dim=1)
    z = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    want = params["scale_factor"] * (mu + torch.exp(0.5 * logvar) * eps - params["shift_factor"])
    _close("sampled z", z, want)
    again = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    other = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(z, again) and not torch.allclose(z, other)


def test_fixture_sample_is_mean_plus_std_noise(golden, params):
    # The official sampled z, unscaled and standardised with the official moments,
    # must look like N(0, 1).
    mu, logvar = golden["encoder_moments"].chunk(2, dim=1)
    z = golden["z_sampled_scaled"] / params["scale_factor"] + params["shift_factor"]
    eps = ((z - mu) / torch.exp(0.5 * logvar)).flatten().double()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)


# --- key mapping and topology ---------------------------------------------------------------------

def _assert_maps_onto(official: dict, p: dict, model: FluxVAE):
    converted = convert_flux_ae_state_dict(official, len(p["ch_mult"]), p["num_res_blocks"])
    target = model.ae.state_dict()
    assert set(converted) == set(target)  # nothing left over either way
    assert len(converted) == len(official)
    for k, v in converted.items():
        assert tuple(v.shape) == tuple(target[k].shape), k


def test_fixture_keys_are_official_and_map_both_ways(params):
    sd = load_file(str(WEIGHTS))
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(params)
    with torch.device("meta"):
        model = FluxVAE(params)
    _assert_maps_onto(sd, params, model)


def test_flux_7b_topology_on_meta():
    assert FLUX_AE_7B_PARAMS == SPEC_7B
    shapes = official_shapes(SPEC_7B)
    # the 7B net exercises the width-changing resnets
    assert any("nin_shortcut" in k for k in shapes)
    with torch.device("meta"):
        model = FluxVAE(SPEC_7B)
        official = {k: torch.empty(s) for k, s in shapes.items()}
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in shapes.values())
    _assert_maps_onto(official, SPEC_7B, model)


def test_config_matches_flux_params(params):
    for p in (params, SPEC_7B):
        cfg = flux_vae_config(p)
        assert cfg["block_out_channels"] == [p["ch"] * m for m in p["ch_mult"]]
        assert (cfg["layers_per_block"] == p["num_res_blocks"]
                and cfg["latent_channels"] == p["z_channels"])
        assert len(cfg["down_block_types"]) == len(cfg["up_block_types"]) == len(p["ch_mult"])
        assert (not cfg["use_quant_conv"] and not cfg["use_post_quant_conv"]
                and cfg["mid_block_add_attention"])
        assert ((cfg["scaling_factor"], cfg["shift_factor"])
                == (p["scale_factor"], p["shift_factor"]))


# --- errors ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path, params):
    missing = tmp_path / "no_ae.safetensors"
    with pytest.raises(FileNotFoundError, match="no_ae.safetensors"):
        load_flux_vae(missing, params)


def test_corrupted_key(tmp_path, params):
    sd = load_file(str(WEIGHTS))
    sd["encoder.mid.attn_1.qq.weight"] = sd.pop("encoder.mid.attn_1.q.weight")
    with pytest.raises(KeyError) as e:
        convert_flux_ae_state_dict(sd, len(params["ch_mult"]), params["num_res_blocks"])
    assert "encoder.mid.attn_1.qq.weight" in str(e.value)
    assert "encoder.mid_block.attentions.0.to_q.weight" in str(e.value)
    bad = tmp_path / "ae_bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(KeyError, match="attn_1.qq.weight") as e:
        load_flux_vae(bad, params)
    assert "ae_bad.safetensors" in str(e.value)


def test_wrong_params(params):
    deeper = dict(params, num_res_blocks=params["num_res_blocks"] + 1)
    with pytest.raises(KeyError, match=r"encoder\.down\.0\.block\.\d+\.conv1\.weight"):
        load_flux_vae(WEIGHTS, deeper)
    wider_z = dict(params, z_channels=params["z_channels"] + 1)
    with pytest.raises(ValueError, match="encoder.conv_out.weight"):
        load_flux_vae(WEIGHTS, wider_z)
    with pytest.raises(KeyError, match="z_channels"):
        flux_vae_config({k: v for k, v in params.items() if k != "z_channels"})
    with pytest.raises(ValueError, match="ch_mult"):
        flux_vae_config(dict(params, ch_mult=[2] + list(params["ch_mult"][1:])))
