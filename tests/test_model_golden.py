"""Golden parity of model.py with the official BAGEL code (tests/fixtures/bagel, see its README).

Every setting (prompt ids, image size, timesteps, split lengths, layer count, special ids) is read
from meta.json, the safetensors files and the checkpoint folder, so a second fixture set runs
unchanged.
Float tensors: atol = rtol = 1e-4 (README); integer tensors (ids, positions, indexes): exact.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import model as M
from _parity import close as _close, exact as _exact, fixtures_of
from policy import Thoughts, text_rows

FIX = Path(__file__).parent / "fixtures" / "bagel"

meta, policy = fixtures_of(FIX)


def _load(name):
    return load_file(str(FIX / name))


def _prompt(meta):
    return " ".join(str(i) for i in meta["text_prefill"]["prompt_ids"])


def _prefill(policy, meta):
    """The text context of the fixtures: the prompt chunk, no system prompt, no reasoning."""
    th = policy.think([_prompt(meta)], n=1, max_new_tokens=0)
    ids, valid, _ = text_rows(policy.cfg, th, policy.device)
    h, ctx = policy.forward_text(ids, valid)
    return th, h, ctx


def test_config_read_from_folder(policy):
    llm = json.loads((FIX / "model" / "llm_config.json").read_text())
    bag = json.loads((FIX / "model" / "bagel_config.json").read_text())
    c = policy.cfg
    for k in checkpoint.LLM_FIELDS:
        assert getattr(c, k) == llm[k], k
    assert ((c.latent_patch_size, c.max_latent_size)
            == (bag["latent_patch_size"], bag["max_latent_size"]))
    assert ((c.latent_channels, c.latent_downsample)
            == (bag["vae_config"]["z_channels"], bag["vae_config"]["downsample"]))
    assert [c.im_start_id, c.im_end_id, c.vision_start_id, c.vision_end_id] == [
        bag["new_token_ids"][k]
        for k in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")]


def test_latent_pos_table_matches_checkpoint(policy):
    """Our sincos table (column half first) reproduces the official frozen table stored in the
    checkpoint."""
    stored = _load("model/ema.safetensors")["latent_pos_embed.pos_embed"]
    ours = M.sincos_2d_table(policy.cfg.hidden_size, policy.cfg.max_latent_size)
    torch.testing.assert_close(ours, stored, atol=1e-6, rtol=0)


def test_text_prefill(policy, meta):
    g = _load("text_prefill.safetensors")
    th, h, ctx = _prefill(policy, meta)
    _exact(th.prompt_ids[0], g["packed_text_ids"], "packed_text_ids")
    _exact(ctx.key_mask.sum(1), torch.tensor(meta["text_prefill"]["kv_lens_after"]),
           "kv_lens_after")
    _exact(ctx.rope_next, torch.tensor(meta["text_prefill"]["ropes_after"]), "ropes_after")
    _exact(ctx.rope_next - g["packed_text_position_ids"].numel(), g["key_values_lens"],
           "position ids start")
    _close(h[0], g["final_hidden"], "final_hidden")
    _close(policy.model.language_model.lm_head(h)[0], g["logits"], "logits")
    layers = sorted({int(k.split(".")[1]) for k in g if k.startswith("kv_cache.")})
    assert layers == list(range(policy.cfg.num_hidden_layers))
    for i in layers:  # cache layout (L, H_kv, d); ours (R, H_kv, L, d)
        _close(ctx.keys[i][0].transpose(0, 1), g[f"kv_cache.{i}.key"], f"kv_cache.{i}.key")
        _close(ctx.values[i][0].transpose(0, 1), g[f"kv_cache.{i}.value"], f"kv_cache.{i}.value")


def test_decode_steps_with_cache(policy, meta):
    """Greedy decoding: im_start is fed first at rope_next; every step reuses and extends the
    cache."""
    g = _load("text_prefill.safetensors")
    fed, step_logits = g["decode_tokens"], g["decode_step_logits"]
    assert fed[0].item() == policy.cfg.im_start_id
    _, _, ctx = _prefill(policy, meta)
    for k in range(fed.numel()):  # the cached primitive, fed the official tokens
        h, ctx = policy.forward_text(fed[k].view(1, 1), torch.ones(1, 1, dtype=torch.bool), ctx)
        _close(policy.model.language_model.lm_head(h)[0, 0], step_logits[k],
               f"decode_step_logits[{k}]")
    # think(temperature=0) is the same loop with its own greedy choices
    th = policy.think([_prompt(meta)], n=1, max_new_tokens=fed.numel(), temperature=0)
    greedy = step_logits.argmax(-1)
    T = th.ids.shape[1]
    _exact(th.ids[0], greedy[:T], "greedy tokens")
    _exact(th.ids[0, :-1], fed[1:T], "decode_tokens")
    _close(th.logp[0], torch.log_softmax(step_logits[:T], -1).gather(1, greedy[:T, None])[:, 0],
           "logp")


def test_gen_inputs_integers(policy, meta):
    g = _load("gen_inputs.safetensors")
    _, _, ctx = _prefill(policy, meta)
    h, w = policy.cfg.grid(meta["image_hw"])
    N = h * w
    assert policy.latent_shape(meta["image_hw"]) == tuple(g["packed_init_noises"].shape)
    is_gen, pos = M.block_layout(ctx.rope_next, 1, N)
    kv_len = int(ctx.key_mask.sum())
    _exact(pos[0], g["packed_position_ids"], "packed_position_ids")
    _exact(is_gen[0].nonzero()[:, 0], g["packed_vae_token_indexes"], "packed_vae_token_indexes")
    _exact((~is_gen[0]).nonzero()[:, 0], g["packed_text_indexes"], "packed_text_indexes")
    _exact(torch.tensor([policy.cfg.vision_start_id, policy.cfg.vision_end_id]),
           g["packed_text_ids"], "packed_text_ids")
    _exact(M.latent_position_ids(h, w, policy.cfg.max_latent_size), g["packed_vae_position_ids"],
           "packed_vae_position_ids")
    _exact(kv_len + torch.arange(N + 2), g["packed_indexes"], "packed_indexes")
    _exact(torch.arange(kv_len), g["packed_key_value_indexes"], "packed_key_value_indexes")
    _exact(ctx.key_mask.sum(1), g["key_values_lens"], "key_values_lens")
    _exact(torch.tensor([N + 2]), g["packed_seqlens"], "packed_seqlens")


def test_gen_step_velocity(policy, meta):
    g = _load("gen_step.safetensors")
    _, _, ctx = _prefill(policy, meta)
    t = g["timestep"]
    assert torch.all(t == t[0]) and abs(t[0].item() - meta["gen_step"]["t"]) < 1e-6
    v = policy.velocity(g["x_t"][None], t[:1], ctx, image_hw=meta["image_hw"])
    _close(v[0], g["v"], "gen_step v")


def test_gen_loop(policy, meta):
    """The full Euler ODE loop from the fixed noise on Bagel's float32 shifted grid, no CFG."""
    g, m = _load("gen_loop.safetensors"), meta["gen_loop"]
    s = m["timestep_shift"]
    grid = torch.linspace(1, 0, m["num_timesteps"])
    grid = s * grid / (1 + (s - 1) * grid)
    _exact(grid, g["timestep_grid"], "timestep_grid")  # float32 bit-exact
    assert m["cfg_text_scale"] == 1.0 and m["cfg_img_scale"] == 1.0
    _, _, ctx = _prefill(policy, meta)
    x = g["init_noise"][None]
    steps = sorted(int(k.split(".")[0][4:]) for k in g if k.endswith(".v"))
    assert steps == list(range(m["n_forward_calls"])) == list(range(len(grid) - 1))
    for i in steps:
        _close(x[0], g[f"step{i}.x_t"], f"step{i}.x_t")
        assert torch.all(g[f"step{i}.t"] == grid[i])
        v = policy.velocity(x, grid[i:i + 1], ctx, image_hw=meta["image_hw"])
        _close(v[0], g[f"step{i}.v"], f"step{i}.v")
        x = x - v * (grid[i] - grid[i + 1])
    _close(x[0], g["final_latent_packed"], "final_latent_packed")
    h, w = policy.cfg.grid(meta["image_hw"])
    _close(M.unpatchify(x, h, w, policy.cfg.latent_patch_size), g["final_latent_unpatchified"],
           "final_latent_unpatchified")


def test_train_forward(policy, meta):
    g, m = _load("train_forward.safetensors"), meta["train_forward"]
    assert m["sample_lens"] == [sum(m["split_lens"])] and m["attn_modes"][0] == "causal"
    assert set(m["attn_modes"][1:]) == {"noise"}
    text_len, K = m["split_lens"][0], len(m["split_lens"]) - 1
    shapes = m["patchified_vae_latent_shapes"]
    assert len(shapes) == K and all(tuple(s) == tuple(shapes[0]) for s in shapes)
    h, w = shapes[0]
    N, p = h * w, policy.cfg.latent_patch_size
    image_hw = (h * policy.cfg.stride, w * policy.cfg.stride)

    # t = shift(sigmoid(raw)); x_t = (1 - t) x_0 + t eps in token layout
    t_tok = M.train_timesteps(g["packed_timesteps_raw"], m["config_timestep_shift"])
    _close(t_tok, g["t_effective"], "t_effective")
    assert abs(g["packed_timesteps_raw"][0].item() - m["raw_timestep"]) < 1e-6
    x_0 = M.patchify(g["padded_latent"], p).reshape(K * N, -1)
    x_t = (1 - t_tok[:, None]) * x_0 + t_tok[:, None] * g["noise"]
    _close(x_t, g["x_t"], "x_t")

    # the sequence: text split [im_start, ids..., im_end] = our (empty prompt, reasoning = the rest)
    text_ids = g["packed_text_ids"][:text_len]
    assert (text_ids[0].item() == policy.cfg.im_start_id
            and text_ids[-1].item() == policy.cfg.im_end_id)
    reason = text_ids[1:][None]
    th = Thoughts(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool), reason,
                    torch.ones_like(reason, dtype=torch.bool), torch.zeros(reason.shape), [""])
    ids, valid, starts = text_rows(policy.cfg, th, policy.device)
    _exact(ids[0], text_ids, "text split ids")
    is_gen, pos, mask = M.packed_layout(valid, K, N)
    _exact(pos[0], g["packed_position_ids"], "packed_position_ids")
    _exact(mask[0, 0], g["attention_mask"] == 0, "attention_mask")
    _exact(is_gen[0].nonzero()[:, 0], g["packed_vae_token_indexes"], "packed_vae_token_indexes")
    _exact(is_gen[0].nonzero()[:, 0], g["mse_loss_indexes"], "mse_loss_indexes")
    _exact((~is_gen[0]).nonzero()[:, 0], g["packed_text_indexes"], "packed_text_indexes")
    _exact(torch.cat([text_ids, torch.tensor([policy.cfg.vision_start_id,
                                              policy.cfg.vision_end_id] * K)]).sort()[0],
           g["packed_text_ids"].sort()[0], "packed_text_ids")
    _exact(starts[0] + torch.arange(reason.shape[1]), g["ce_loss_indexes"], "ce_loss_indexes")
    _exact(reason[0], g["packed_label_ids"], "packed_label_ids")
    _exact(M.latent_position_ids(h, w, policy.cfg.max_latent_size).repeat(K),
           g["packed_latent_position_ids"], "packed_latent_position_ids")

    x_blocks = g["x_t"].reshape(1, K, N, -1)
    t_blocks = t_tok.reshape(K, N)[:, 0][None]
    logits, v = policy.packed_forward(th, x_blocks, t_blocks, image_hw=image_hw)
    _close(logits[0], g["text_logits"], "text_logits")
    _close(v.reshape(K * N, -1), g["v_pred"], "v_pred")
    _close((v.reshape(K * N, -1) - (g["noise"] - x_0)) ** 2, g["mse"], "mse")
    out = policy.train_forward(th, x_blocks, t_blocks, image_hw=image_hw)
    _close(-out.logp[0], g["ce"], "ce")
    _close(out.v, v, "train_forward v")
