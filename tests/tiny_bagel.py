"""A tiny BAGEL checkpoint folder in the official layout, complete enough for `train.py --bagel`: the golden
MoT weights and llm_config.json, a Qwen2-like tokenizer saved with save_pretrained, and a random FLUX AE
(official key names) whose vae_config in bagel_config.json matches it (16 latent channels, as the MoT's
patch size expects; downsample 2, so 32 px images fit the golden max_latent_size of 8)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from test_flux_vae import official_shapes
from test_model_tokenizer import tiny_qwen2_tokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "bagel" / "model"
TINY_AE = {"resolution": 32, "in_channels": 3, "downsample": 2, "ch": 32, "out_ch": 3, "ch_mult": [1, 2],
           "num_res_blocks": 1, "z_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159}


def save_tiny_bagel(folder, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("llm_config.json", "ema.safetensors"):
        shutil.copyfile(GOLDEN / f, folder / f)
    bag = json.loads((GOLDEN / "bagel_config.json").read_text())
    (folder / "bagel_config.json").write_text(json.dumps({**bag, "vae_config": TINY_AE}, indent=2))
    g = torch.Generator().manual_seed(seed)
    ae = {k: torch.ones(s) if ".norm" in k and k.endswith(".weight") else 0.05 * torch.randn(s, generator=g)
          for k, s in official_shapes(TINY_AE).items()}                  # GroupNorm scales start at 1
    save_file(ae, folder / "ae.safetensors")
    tiny_qwen2_tokenizer().save_pretrained(folder)
    return folder
