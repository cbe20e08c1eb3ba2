"""Golden parity of an image in the context (tests/fixtures/bagel_context, see its README and NOTES.md):
Bagel's preprocessing, the VAE and ViT cache updates, text and generation after the image, and the packed
training forward on the interleaved sequence [text, clean VAE image, ViT image, text, noisy image].

Every setting (ids, transforms, image sizes, cases, update lengths, timesteps, split lengths) comes from
meta.json and the safetensors files, so a second fixture set runs unchanged.
Float tensors: atol = rtol = 1e-4 (CFG: atol 2e-4); integer tensors: exact.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import model as M
import vit
from flux_vae import load_flux_vae
from _parity import close as _close, exact as _exact, fixtures_of
from policy import ContextImage, Thoughts, Turn

FIX = Path(__file__).parent / "fixtures" / "bagel_context"

meta, policy = fixtures_of(FIX)


@pytest.fixture(scope="module")
def ae(meta):
    bag = json.loads((FIX / "model" / "bagel_config.json").read_text())
    return load_flux_vae(FIX / "model" / "ae_tiny.safetensors", bag["vae_config"])


def _load(name):
    return load_file(str(FIX / name))


def _text(ids):
    return " ".join(str(int(i)) for i in ids)


def _image(case, meta):
    """The ContextImage of a case: the recorded VAE latent tokens (the posterior sample) and ViT pixels."""
    flags = meta["cases"][case]
    inp, vv = _load("inputs.safetensors"), _load("context_vae_vit.safetensors")
    return ContextImage(vv["vae.latent_tokens"][None] if flags["vae"] else None,
                        inp["vit_pixels"][None] if flags["vit"] else None, tuple(meta["vae_image_hw"]))


def _kv(ctx, layer):
    return (ctx.keys[layer][0].transpose(0, 1), ctx.values[layer][0].transpose(0, 1))


# ----------------------------------------------------------------------------------------- preprocessing
def test_resize_rule_rounds_half_to_even():
    assert vit.resize_hw(72, 200, 1000, 10, 16) == (64, 192)       # 4.5 -> 4 and 12.5 -> 12 (half-up: 80, 208)
    assert vit.resize_hw(40, 2000, 100, 20, 16) == (16, 96)          # long edge capped, short snapped
    assert vit.resize_hw(10, 10, 1024, 512, 16) == (512, 512)        # upscaled to the short-edge minimum
    with pytest.raises(ValueError, match="positive"):
        vit.resize_hw(0, 10, 64, 32, 16)


def test_preprocessing(meta):
    inp = _load("inputs.safetensors")
    raw = inp["image_raw_uint8"]
    vae_t, vit_t = (tuple(meta[k][f] for f in ("max_image_size", "min_image_size", "image_stride"))
                    for k in ("vae_transform", "vit_transform"))
    assert vit.resize_hw(*raw.shape[:2], *vae_t) == tuple(meta["vae_image_hw"])
    resized = vit.resize(raw.numpy(), *vae_t)                       # what update_context_image receives
    _exact(torch.from_numpy(np.asarray(resized)), inp["image_vae_resized_uint8"],
           "image_vae_resized_uint8")
    assert vit.resize_hw(*meta["vae_image_hw"], *vit_t) == tuple(meta["vit_image_hw"])
    _close(vit.preprocess(resized, *vae_t), inp["vae_pixels"], "vae_pixels")
    _close(vit.preprocess(resized, *vit_t), inp["vit_pixels"], "vit_pixels (a re-resize of the VAE image)")
    rgba = Image.fromarray(raw.numpy()).convert("RGBA")
    assert vit.as_rgb(rgba).mode == "RGB"
    with pytest.raises(ValueError, match="uint8"):
        vit.preprocess(raw.float().numpy(), *vae_t)


# ------------------------------------------------------------------------------------------- the encoders
def test_vae_context_latent(policy, ae, meta):
    g, inp = _load("context_vae_vit.safetensors"), _load("inputs.safetensors")
    _exact(inp["vae_pixels"][None], g["vae.padded_images"], "padded_images")
    with torch.no_grad():
        moments = ae.moments(inp["vae_pixels"][None])
        _close(moments, g["vae.vae_encoder_moments"], "vae_encoder_moments")
        mu, logvar = moments.chunk(2, 1)                           # Bagel samples the posterior
        z = ae.scale_factor * (mu + torch.exp(logvar / 2) * g["vae.posterior_eps"] - ae.shift_factor)
        _close(z, g["vae.vae_latent"], "vae_latent from posterior_eps")
        drawn = ae.encode(inp["vae_pixels"][None], sample=True,     # the draw after manual_seed(seed + 100)
                          generator=torch.Generator().manual_seed(meta["seed"] + 100))
        _close(drawn, g["vae.vae_latent"], "vae_latent sampled")
        _close(ae.encode(inp["vae_pixels"][None]), g["vae.latent_mean_scaled"], "latent_mean_scaled")
    _close(M.patchify(g["vae.vae_latent"], policy.cfg.latent_patch_size)[0], g["vae.latent_tokens"],
           "latent_tokens")
    assert g["vae.patchified_vae_latent_shapes"].prod().item() == g["vae.latent_tokens"].shape[0]


def test_vit_and_connector(policy, meta):
    g, inp = _load("context_vae_vit.safetensors"), _load("inputs.safetensors")
    cfg = policy.cfg
    assert len(policy.model.vit_model.vision_model.encoder.layers) == \
        json.loads((FIX / "model" / "vit_config.json").read_text())["num_hidden_layers"] - 1
    P = policy.model.vit_model.patch_size
    _exact(vit.patchify_pixels(inp["vit_pixels"][None], P)[0], g["vit.packed_vit_tokens"], "packed_vit_tokens")
    h, w = (s // P for s in meta["vit_image_hw"])
    _exact(vit.vit_position_ids(h, w, cfg.vit_max_num_patch_per_side), g["vit.packed_vit_position_ids"],
           "packed_vit_position_ids")
    trace = {}
    with torch.no_grad():
        tokens = policy.model.embed_vit(inp["vit_pixels"][None], trace)
    for ours, theirs in (("patch_linear", "vit_patch_linear"), ("embeddings", "vit_embeddings"),
                         *((f"layer{i}_out", f"vit_layer{i}_out") for i in range(len(trace) - 2)
                           if f"vit.vit_layer{i}_out" in g),
                         ("vit_out", "vit_out"), ("connector_out", "connector_out")):
        _close(trace[ours][0], g[f"vit.{theirs}"], f"vit.{theirs}")
    _close(trace["vit_pos_embed"], g["vit.vit_pos_embed"], "vit_pos_embed")
    _close(tokens[0], g["vit.llm_input"][1:-1], "vit llm_input (patches)")


# --------------------------------------------------------------------------------------- the context cases
CASES = ("vae_vit", "vae_only", "vit_only")


@pytest.mark.parametrize("case", CASES)
def test_context_after_an_image(policy, meta, case):
    """text1 -> image (VAE and/or ViT update) -> text2: the kv lengths and RoPE counter after each update,
    the llm inputs and final hiddens of each update, the caches, and the reflection logits."""
    g, inp = _load(f"context_{case}.safetensors"), _load("inputs.safetensors")
    vv = _load("context_vae_vit.safetensors")
    updates = meta["cases"][case]["updates"]
    ctx = policy.context([_text(inp["prompt_ids"])])
    image = _image(case, meta)
    states = {"text1": ctx}
    with torch.no_grad():
        parts = policy.image_parts(image)
        for (emb, is_gen), name in zip(parts, [n for n in ("vae", "vit") if meta["cases"][case][n]]):
            _close(emb[0], g.get(f"{name}.llm_input", vv[f"{name}.llm_input"]), f"{case} {name}.llm_input")
            hid, _ = policy._image_pass(emb, is_gen, ctx)
            _close(hid[0], g[f"{name}.final_hidden"], f"{case} {name}.final_hidden")
            marks = (~is_gen).nonzero()[:, 0] if name == "vae" else torch.tensor([0, emb.shape[1] - 1])
            _exact(marks, g[f"{name}.packed_text_indexes"], f"{case} {name}.packed_text_indexes")
            if name == "vae":
                _exact(is_gen.nonzero()[:, 0], g["vae.packed_vae_token_indexes"], f"{case} vae token indexes")
                assert not is_gen[marks].any()
            else:
                assert not is_gen.any()                                 # the ViT update: all und expert
            ctx = policy.context_image(ctx, ContextImage(image.latents if name == "vae" else None,
                                                         image.vit_pixels if name == "vit" else None,
                                                         image.image_hw))
            states[f"{name}_image"] = ctx
        h, ctx = policy.forward_text(*_chunk(policy, inp["reflection_ids"]), ctx)
        states["text2"] = ctx
    for u in updates:
        c = states[u["step"]]
        assert [int(c.key_mask.sum())] == u["kv_lens"] and c.rope_next.tolist() == u["ropes"], u["step"]
    _close(h[0], g["text2.final_hidden"], f"{case} text2.final_hidden")
    _close(policy.model.logits(h)[0], g["text2.logits"], f"{case} text2.logits (reflection after the image)")
    n_img = int(states[updates[-2]["step"]].key_mask.sum())
    for layer in range(policy.cfg.num_hidden_layers):
        for which, tensor in zip(("key", "value"), _kv(ctx, layer)):
            _close(tensor[:n_img], g[f"kv_after_image.{layer}.{which}"], f"{case} kv_after_image.{layer}.{which}")
            _close(tensor, g[f"kv_final.{layer}.{which}"], f"{case} kv_final.{layer}.{which}")
    # the same context in one call, from interleaved segments
    seg = policy.context([_text(inp["prompt_ids"]), image, _text(inp["reflection_ids"])])
    _close(seg.keys[-1], ctx.keys[-1], "context(segments) keys")
    assert seg.rope_next.tolist() == ctx.rope_next.tolist()


def _chunk(policy, ids):
    c = policy.cfg
    row = torch.tensor([[c.im_start_id, *ids.tolist(), c.im_end_id]])
    return row, torch.ones_like(row, dtype=torch.bool)


def test_greedy_decoding_after_the_image(policy, meta):
    g, inp = _load("context_vae_vit.safetensors"), _load("inputs.safetensors")
    ctx = policy.context([_text(inp["prompt_ids"]), _image("vae_vit", meta), _text(inp["reflection_ids"])])
    fed, step_logits = g["decode_tokens"], g["decode_step_logits"]
    th = policy.think_from(ctx, max_new_tokens=fed.numel(), temperature=0)
    T = th.ids.shape[1]
    _exact(th.ids[0], step_logits[:T].argmax(-1), "greedy tokens")
    _exact(th.ids[0, :-1], fed[1:T], "decode_tokens")
    assert th.prompt_ids.shape == (1, 0)
    c = ctx
    with torch.no_grad():
        for k in range(fed.numel()):
            h, c = policy.forward_text(fed[k].view(1, 1), torch.ones(1, 1, dtype=torch.bool), c)
            _close(policy.model.logits(h)[0, 0], step_logits[k], f"decode_step_logits[{k}]")


@pytest.mark.parametrize("case", CASES)
def test_generation_step_after_the_image(policy, meta, case):
    g, inp = _load("gen_step.safetensors"), _load("inputs.safetensors")
    ctx = policy.context([_text(inp["prompt_ids"]), _image(case, meta), _text(inp["reflection_ids"])])
    N = g["x_t"].shape[0]
    is_gen, pos = M.block_layout(ctx.rope_next, 1, N)
    _exact(pos[0], g[f"{case}.packed_position_ids"], "packed_position_ids")
    _exact(is_gen[0].nonzero()[:, 0], g[f"{case}.packed_vae_token_indexes"], "packed_vae_token_indexes")
    _exact(ctx.key_mask.sum(1), g[f"{case}.key_values_lens"], "key_values_lens")
    t = g["t"]
    assert torch.all(t == t[0]) and abs(t[0].item() - meta["cfg_step"]["t"]) < 1e-6
    with torch.no_grad():
        v = policy.velocity(g["x_t"][None], t[:1], ctx, image_hw=tuple(meta["vae_image_hw"]))
    _close(v[0], g[f"{case}.v"], f"{case} gen step v")


def test_second_round_cfg_branches(policy, meta):
    """interleave_inference's second-round CFG: the text-unconditional context is the context before the last
    text chunk; the image-unconditional one has every text chunk and no image. The combination with global
    renorm is the test's own arithmetic (policy.py's CFG is plain text CFG)."""
    g, inp, m = _load("gen_step.safetensors"), _load("inputs.safetensors"), meta["cfg_step"]
    image, hw = _image("vae_vit", meta), tuple(meta["vae_image_hw"])
    ctx_text = policy.context([_text(inp["prompt_ids"]), image])
    ctx_img = policy.context([_text(inp["prompt_ids"]), _text(inp["reflection_ids"])])
    for c, name in ((ctx_text, "cfg_text_context"), (ctx_img, "cfg_img_context")):
        assert [int(c.key_mask.sum())] == m[name]["kv_lens"] and c.rope_next.tolist() == m[name]["ropes"]
    _exact(torch.full((g["x_t"].shape[0] + 2,), int(ctx_text.rope_next)), g["cfg.text.cfg_packed_position_ids"],
           "cfg text positions")
    with torch.no_grad():
        v_t = policy.velocity(g["x_t"][None], g["t"][:1], ctx_text, image_hw=hw)[0]
        v_i = policy.velocity(g["x_t"][None], g["t"][:1], ctx_img, image_hw=hw)[0]
    _close(v_t, g["cfg.text.v_branch"], "cfg.text.v_branch")
    _close(v_i, g["cfg.img.v_branch"], "cfg.img.v_branch")
    u = v_t + m["cfg_text_scale"] * (g["vae_vit.v"] - v_t)
    u = v_i + m["cfg_img_scale"] * (u - v_i)
    u = u * (g["vae_vit.v"].norm() / (u.norm() + 1e-8)).clamp(m["cfg_renorm_min"], 1.0)
    _close(u, g["cfg.v"], "cfg.v", atol=2e-4, rtol=1e-4)


def test_generation_loop_after_the_image(policy, meta, ae):
    g, m, inp = _load("gen_loop.safetensors"), meta["gen_loop"], _load("inputs.safetensors")
    ctx = policy.context([_text(inp["prompt_ids"]), _image("vae_vit", meta), _text(inp["reflection_ids"])])
    s, hw = m["timestep_shift"], tuple(m["image_hw"])
    grid = torch.linspace(1, 0, m["num_timesteps"])
    grid = s * grid / (1 + (s - 1) * grid)
    _exact(grid, g["timestep_grid"], "timestep_grid")
    x = g["init_noise"][None]
    with torch.no_grad():
        for i in range(m["n_forward_calls"]):
            _close(x[0], g[f"step{i}.x_t"], f"step{i}.x_t")
            v = policy.velocity(x, grid[i:i + 1], ctx, image_hw=hw)
            _close(v[0], g[f"step{i}.v"], f"step{i}.v")
            x = x - v * (grid[i] - grid[i + 1])
        _close(x[0], g["final_latent_packed"], "final_latent_packed")
        h, w = policy.cfg.grid(hw)
        z = M.unpatchify(x, h, w, policy.cfg.latent_patch_size)
        _close(z, g["final_latent_unpatchified"], "final_latent_unpatchified")
        _close(ae.decode(g["final_latent_unpatchified"]), g["decoded"], "decoded")


# --------------------------------------------------------------------------------------- training forward
def test_train_forward_on_the_interleaved_sequence(policy, meta):
    """Turns [text1, no noisy block, the image as clean context (VAE + ViT)] and [text2, one noisy block]: the
    packed layout (positions, mask, indexes) and the outputs of Bagel's training forward."""
    g, m, inp = _load("train_forward.safetensors"), meta["train_forward"], _load("inputs.safetensors")
    vv = _load("context_vae_vit.safetensors")
    assert m["attn_modes"] == ["causal", "full", "full", "causal", "noise"]
    c = policy.cfg
    p = c.latent_patch_size
    t_tok = M.train_timesteps(g["packed_timesteps_raw"], policy.cfg.timestep_shift)
    _close(t_tok, g["t_effective"], "t_effective")
    N = vv["vae.latent_tokens"].shape[0]
    assert t_tok[:N].eq(0).all()                                   # the context image: t = 0 exactly
    x_0 = M.patchify(g["padded_latent"], p).reshape(2 * N, -1)
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(meta["seed"] + 300))
    x_t = (1 - t_tok[:, None]) * x_0 + t_tok[:, None] * noise
    _close(x_t, g["x_t"], "x_t")
    _close(x_t[:N], vv["vae.latent_tokens"], "context rows of x_t")

    none = torch.zeros(1, 0, dtype=torch.long)
    text1 = Thoughts(_chunk(policy, inp["prompt_ids"])[0], torch.ones(1, m["split_lens"][0], dtype=torch.bool),
                     none, none.bool(), none.float(), [""])
    refl = torch.cat([inp["reflection_ids"], torch.tensor([c.im_end_id])])[None]
    text2 = Thoughts(none, none.bool(), refl, torch.ones_like(refl, dtype=torch.bool), torch.zeros(refl.shape),
                     [""])
    hw = tuple(meta["vae_image_hw"])
    D = x_0.shape[1]
    image = ContextImage(x_t[:N][None], inp["vit_pixels"][None], hw)
    turns = [Turn(text1, torch.zeros(1, 0, N, D), torch.zeros(1, 0), image),
             Turn(text2, x_t[N:].reshape(1, 1, N, D), t_tok[N:N + 1].reshape(1, 1))]

    # the layout, integer for integer
    parts = [("text", torch.zeros(m["split_lens"][0], dtype=torch.bool), None)]
    parts += [("image", is_gen, None) for _, is_gen in policy.image_parts(image)]
    parts += [("text", torch.zeros(m["split_lens"][3], dtype=torch.bool), None),
              ("noisy", M.block_layout(torch.zeros(1, dtype=torch.long), 1, N)[0][0], None)]
    is_gen, pos, mask, _ = M.interleaved_layout(parts, 1, "cpu")
    _exact(pos[0], g["packed_position_ids"], "packed_position_ids")
    _exact(mask[0, 0], g["attention_mask"] == 0, "attention_mask")
    _exact(is_gen[0].nonzero()[:, 0], g["packed_vae_token_indexes"], "packed_vae_token_indexes")
    vit_idx = torch.tensor([i for i, (k, gen, _) in enumerate(parts) for _ in range(gen.numel())])
    vit_cols = (vit_idx == 2).nonzero()[1:-1, 0]
    _exact(vit_cols, g["packed_vit_token_indexes"], "packed_vit_token_indexes")
    text_cols = torch.tensor(sorted(set(range(pos.shape[1])) - set(is_gen[0].nonzero()[:, 0].tolist())
                                    - set(vit_cols.tolist())))
    _exact(text_cols, g["packed_text_indexes"], "packed_text_indexes")
    _exact(g["mse_loss_indexes"].nonzero()[:, 0], is_gen[0].nonzero()[N:, 0], "mse_loss_indexes")

    with torch.no_grad():
        outs = policy.train_forward_turns(turns, image_hw=hw)
        logits_cols = g["ce_loss_indexes"].nonzero()[:, 0]
        text2_start = pos.shape[1] - (N + 2) - (refl.shape[1] + 1)
        assert logits_cols.tolist() == list(range(text2_start, text2_start + refl.shape[1]))
    _close(outs[1].v[0, 0], g["v_pred"], "v_pred")
    _close((outs[1].v[0, 0] - (noise[N:] - x_0[N:])) ** 2, g["mse"], "mse")
    _exact(refl[0, :-1], g["packed_label_ids"][:-1], "packed_label_ids")
    _close(-outs[1].logp[0], g["ce"], "ce")
    assert outs[0].v.shape == (1, 0, N, D) and outs[0].logp.shape == (1, 0)


# ------------------------------------------------------------------------------------- loading and saving
def test_vit_weights_loaded_and_saved_back_unchanged(policy, tmp_path):
    official = load_file(str(FIX / "model" / "ema.safetensors"))
    state = policy.model.state_dict()
    vit_keys = [k for k in official if k.startswith(checkpoint.EXTRA_PREFIXES)]
    assert vit_keys and not policy.extra_state
    for k in vit_keys:
        assert torch.equal(state[k], official[k]), k
    assert all(not p.requires_grad for n, p in policy.model.named_parameters() if n.startswith(tuple(vit_keys)))
    assert not any(n in vit_keys for g in policy.param_groups().values() for n in g)
    checkpoint.save_pretrained(policy, tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "ema.safetensors"))
    assert set(saved) == set(official)
    for k in official:
        assert torch.equal(saved[k], official[k]), k
    assert json.loads((tmp_path / "out" / "vit_config.json").read_text()) == \
        json.loads((FIX / "model" / "vit_config.json").read_text())
    assert json.loads((tmp_path / "out" / "bagel_config.json").read_text())["visual_und"] is True


def test_bad_image_inputs_name_the_problem(policy, id_tokenizer, tmp_path, meta):
    ctx = policy.context(["1 2 3"])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        policy.context_image(ctx, ContextImage(vit_pixels=torch.zeros(1, 3, 43, 56)))
    with pytest.raises(ValueError, match="neither"):
        policy.context_image(ctx, ContextImage())
    from flux_vae import convert_flux_ae_state_dict
    with pytest.raises(ValueError, match="num_res_blocks=-1"):
        convert_flux_ae_state_dict({}, 4, -1)
    with pytest.raises(ValueError, match="x_t has shape"):
        policy.context_image(ctx, ContextImage(latents=torch.zeros(1, 5, 64), image_hw=tuple(meta["vae_image_hw"])))
    folder = tmp_path / "no_vit"
    shutil.copytree(FIX / "model", folder)
    (folder / "vit_config.json").unlink()
    sd = {k: v for k, v in load_file(str(folder / "ema.safetensors")).items()
          if not k.startswith(checkpoint.EXTRA_PREFIXES)}
    (folder / "ema.safetensors").unlink()
    from safetensors.torch import save_file
    save_file(sd, str(folder / "ema.safetensors"))
    bare = checkpoint.from_pretrained(folder, dtype=torch.float32, tokenizer=id_tokenizer, think_system_prompt=None)
    with pytest.raises(ValueError, match="has no ViT"):
        bare.context_image(bare.context(["1 2"]), ContextImage(vit_pixels=torch.zeros(1, 3, 42, 56)))
    only_config = tmp_path / "config_no_weights"
    shutil.copytree(folder, only_config)
    shutil.copy(FIX / "model" / "vit_config.json", only_config / "vit_config.json")
    with pytest.raises(KeyError, match="missing keys.*vit_model"):
        checkpoint.from_pretrained(only_config, dtype=torch.float32, tokenizer=id_tokenizer)
