"""Loading and saving the official BAGEL layout (checkpoint.py): lossless round trip of the golden
tiny checkpoint (extra ViT/connector keys included), dtype, shards, the toy checkpoint, clear
errors, and the 7B layout built on the meta device and checked against the SPEC.md numbers."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import model as M
from policy import Policy
import toy_policy

FIX = Path(__file__).parent / "fixtures" / "bagel" / "model"


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the golden checkpoint folder."""
    torch.set_num_threads(1)
    return Path(shutil.copytree(FIX, tmp_path / "src"))


def _edit(folder, fn):
    sd = load_file(str(folder / "ema.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "ema.safetensors"))


def spec_keys(n_layers, vit_keys=()):
    """The official key names, written out from SPEC.md's description (und names + _moe_gen
    duplicates)."""
    keys = {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
            "language_model.model.norm.weight", "language_model.model.norm_moe_gen.weight",
            "time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias", "time_embedder.mlp.2.weight",
            "time_embedder.mlp.2.bias", "vae2llm.weight", "vae2llm.bias", "llm2vae.weight",
            "llm2vae.bias", "latent_pos_embed.pos_embed", *vit_keys}
    for i in range(n_layers):
        pre = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            keys |= {pre + f"self_attn.{x}_proj{s}.{w}" for x in "qkv" for w in ("weight", "bias")}
            keys |= {pre + f"self_attn.o_proj{s}.weight", pre + f"self_attn.q_norm{s}.weight",
                     pre + f"self_attn.k_norm{s}.weight", pre + f"input_layernorm{s}.weight",
                     pre + f"post_attention_layernorm{s}.weight"}
            keys |= {pre + f"mlp{s}.{x}_proj.weight" for x in ("gate", "up", "down")}
    return keys


# -------------------------------------------------------------------------------------- 7B layout
def test_bagel_7b_on_meta_matches_spec():
    # SPEC.md: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 kv heads, head_dim 128,
    # vocab 152064, q/k/v with bias, o_proj without, q/k norm of head_dim; latent patch
    # 2 x 2 x 16 channels; 64 x 64 pos table.
    H, I, L, nq, nkv, d, V, D, side = 3584, 18944, 28, 28, 4, 128, 152064, 2 * 2 * 16, 64
    cfg = M.BagelConfig.bagel_7b()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.patch_dim,
            cfg.max_latent_size) == \
        (H, I, L, nq, nkv, d, V, D, side)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.im_start_id, cfg.im_end_id, cfg.vision_start_id,
            cfg.vision_end_id) == (1e6, 1e-6, 151644, 151645, 151652, 151653)
    with torch.device("meta"):
        model = M.BagelMoT(cfg)
    expert = ((H * nq * d + nq * d) + 2 * (H * nkv * d + nkv * d) + nq * d * H + 2 * d + 3 * H * I
              + 2 * H)
    expected = (2 * L * expert + 2 * V * H + 2 * H + (256 * H + H + H * H + H) + (D * H + H)
                + (H * D + D) + side * side * H)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert all(p.is_meta for p in model.parameters())
    assert set(model.state_dict()) == spec_keys(L)
    assert not model.latent_pos_embed.pos_embed.requires_grad


def test_spec_keys_match_the_official_golden_file():
    """The key generator above reproduces the keys the official code wrote for the tiny model."""
    llm = json.loads((FIX / "llm_config.json").read_text())
    assert set(load_file(str(FIX / "ema.safetensors"))) == spec_keys(llm["num_hidden_layers"])


# -------------------------------------------------------------------------------------- round trips
def test_roundtrip_golden_with_extra_keys(ckpt, tmp_path, id_tokenizer):
    vit = {"vit_model.vision_model.embeddings.patch_embedding.weight": torch.randn(8, 6).bfloat16(),
           "connector.fc1.weight": torch.randn(4, 8), "vit_pos_embed.pos_embed": torch.randn(9, 4)}
    _edit(ckpt, lambda sd: sd.update(vit))
    pol = checkpoint.from_pretrained(ckpt, dtype=torch.float32, tokenizer=id_tokenizer)
    assert (set(pol.extra_state) == set(vit)
            and pol.extra_state[next(iter(vit))].dtype == torch.bfloat16)
    out = tmp_path / "out"
    checkpoint.save_pretrained(pol, out)
    src, dst = load_file(str(ckpt / "ema.safetensors")), load_file(str(out / "ema.safetensors"))
    assert set(src) == set(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    assert checkpoint.config_from_folder(out) == checkpoint.config_from_folder(ckpt)
    assert (out / "ae_tiny.safetensors").read_bytes() == (ckpt / "ae_tiny.safetensors").read_bytes()
    # atomic writes left no temp files
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")]
    again = checkpoint.from_pretrained(out, dtype=torch.float32, tokenizer=id_tokenizer)
    assert all(torch.equal(a, b)
               for a, b in zip(pol.model.state_dict().values(), again.model.state_dict().values()))


def test_dtype_and_frozen_table(ckpt, id_tokenizer):
    pol = checkpoint.from_pretrained(ckpt, dtype=torch.bfloat16, tokenizer=id_tokenizer,
                                     think_system_prompt=None)
    assert {p.dtype for p in pol.model.parameters()} == {torch.bfloat16}
    assert not pol.model.latent_pos_embed.pos_embed.requires_grad
    ref = load_file(str(ckpt / "ema.safetensors"))
    assert torch.equal(pol.model.vae2llm.weight, ref["vae2llm.weight"].bfloat16())
    # bf16 runs end to end and stays within bf16 rounding of fp32 (README: ~0.1 abs on O(1) values)
    f32 = checkpoint.from_pretrained(ckpt, dtype=torch.float32, tokenizer=id_tokenizer,
                                     think_system_prompt=None)
    th = f32.think(["5 6 7"], n=2, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    hw = (2 * pol.cfg.stride, 2 * pol.cfg.stride)
    N, D = f32.latent_shape(hw)
    x_t = torch.randn(2, 1, N, D, generator=torch.Generator().manual_seed(1))
    a, b = (p.train_forward(th, x_t, torch.tensor([0.6]), image_hw=hw) for p in (f32, pol))
    assert b.v.dtype == torch.float32 and b.logp.dtype == torch.float32
    torch.testing.assert_close(b.v, a.v, atol=0.15, rtol=0.05)
    torch.testing.assert_close(b.logp, a.logp, atol=0.15, rtol=0.05)
    v = pol.velocity(x_t[:, 0], 0.6, pol.context(th), image_hw=hw)
    torch.testing.assert_close(v, a.v[:, 0], atol=0.15, rtol=0.05)


def test_sharded_checkpoint(ckpt, id_tokenizer):
    sd = load_file(str(ckpt / "ema.safetensors"))
    keys = sorted(sd)
    halves = {"ema-00001-of-00002.safetensors": keys[::2],
              "ema-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(ckpt / name))
    (ckpt / "ema.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, ks in halves.items() for k in ks}}))
    (ckpt / "ema.safetensors").unlink()
    pol = checkpoint.from_pretrained(ckpt, dtype=torch.float32, tokenizer=id_tokenizer)
    assert all(torch.equal(v, sd[k]) for k, v in pol.model.state_dict().items())


def test_toy_checkpoint_roundtrip(tmp_path):
    tok = toy_policy.WordTokenizer("red blue circle square".split())
    cfg = M.BagelConfig.toy(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    hook = toy_policy.Grounding.from_words(tok, ["red", "blue"])
    pol = Policy.from_config(cfg, tok, seed=3, embed_hook=hook)
    checkpoint.save_pretrained(pol, tmp_path / "toy")
    back = toy_policy.from_pretrained(tmp_path / "toy", dtype=torch.float32)
    assert (back.cfg == cfg and back.tokenizer.vocab == tok.vocab
            and back.embed_hook.spec() == hook.spec())
    assert all(torch.equal(v, back.model.state_dict()[k])
               for k, v in pol.model.state_dict().items())
    a = pol.think(["red circle"], n=2, max_new_tokens=3, temperature=0)
    b = back.think(["red circle"], n=2, max_new_tokens=3, temperature=0)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logp, b.logp)
    # not silently without its tokenizer
    with pytest.raises(ValueError, match="toy_policy.from_pretrained"):
        checkpoint.from_pretrained(tmp_path / "toy")


# -------------------------------------------------------------------------------------- errors
def test_missing_folder_and_files(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.from_pretrained(tmp_path / "nowhere")
    (ckpt / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        checkpoint.from_pretrained(ckpt)
    (ckpt / "llm_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="llm_config.json"):
        checkpoint.from_pretrained(ckpt)


def test_missing_key(ckpt):
    _edit(ckpt, lambda sd: sd.pop("language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"))
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.k_norm_moe_gen\.weight"):
        checkpoint.from_pretrained(ckpt)


def test_unexpected_key(ckpt):
    _edit(ckpt, lambda sd: sd.update({"language_model.model.layers.0.mlp.extra_proj.weight":
                                      torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"mlp\.extra_proj\.weight"):
        checkpoint.from_pretrained(ckpt)


def test_wrong_shape(ckpt):
    _edit(ckpt, lambda sd: sd.update({"llm2vae.bias": torch.zeros(sd["llm2vae.bias"].numel() + 1)}))
    with pytest.raises(ValueError, match=r"llm2vae\.bias"):
        checkpoint.from_pretrained(ckpt)


def test_image_size_errors_and_missing_codec(ckpt):
    pol = checkpoint.from_pretrained(ckpt, dtype=torch.float32)
    stride = pol.cfg.stride
    assert stride == pol.cfg.latent_downsample * pol.cfg.latent_patch_size
    with pytest.raises(ValueError, match="image_hw"):
        pol.latent_shape((4 * stride, 4 * stride + stride // 2))
    with pytest.raises(ValueError, match="images"):
        pol.encode(torch.zeros(1, 3, 4 * stride, 3 * stride + 1))
    # the tiny folder ships ae_tiny only
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        pol.encode(torch.zeros(1, 3, 4 * stride, 4 * stride))
    assert pol.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        pol.think(["1 2 3"], n=1, max_new_tokens=1)


def test_sharded_export_streams_and_round_trips(ckpt, id_tokenizer, tmp_path, monkeypatch):
    """save_pretrained(max_shard_bytes=...) writes size-capped shards and an index that from_pretrained
    reads back; tensors stream one at a time (none is fetched before the previous one is written);
    re-exporting replaces the files."""
    pol = checkpoint.from_pretrained(ckpt, dtype=torch.float32, tokenizer=id_tokenizer)
    state = pol.model.state_dict()
    cap = 64 * 1024
    written, live = [], []
    real = checkpoint.write_safetensors

    def spy(path, entries):
        def tracked(get):
            def fetch():
                live.append(len(live))       # a fetch while an earlier tensor is unwritten would show as >1
                return get()
            return fetch
        written.append({k: torch.empty(shape, dtype=kind) for k, (kind, shape, _) in entries.items()})
        return real(path, {k: (kind, shape, tracked(get)) for k, (kind, shape, get) in entries.items()})

    monkeypatch.setattr(checkpoint, "write_safetensors", spy)
    out = tmp_path / "sharded"
    checkpoint.save_pretrained(pol, out, max_shard_bytes=cap)
    assert len(live) == len(state)
    sizes = [sum(v.numel() * v.element_size() for v in d.values()) for d in written]
    assert len(written) > 3 and all(s <= cap or len(d) == 1 for s, d in zip(sizes, written))
    index = json.loads((out / "ema.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(sizes)
    assert sorted(index["weight_map"]) == sorted({k for d in written for k in d})
    assert not (out / "ema.safetensors").exists()
    back = checkpoint.from_pretrained(out, dtype=torch.float32, tokenizer=id_tokenizer)
    assert all(torch.equal(v, state[k]) for k, v in back.model.state_dict().items())
    checkpoint.save_pretrained(back, out)                   # one file again: the shards and index go
    assert (out / "ema.safetensors").is_file() and not list(out.glob("ema-*-of-*.safetensors"))
    assert not (out / "ema.safetensors.index.json").exists()
    again = checkpoint.from_pretrained(out, dtype=torch.float32, tokenizer=id_tokenizer)
    assert all(torch.equal(v, state[k]) for k, v in again.model.state_dict().items())
