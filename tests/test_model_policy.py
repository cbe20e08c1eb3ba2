"""The Policy interface (policy.py): the rollout (cached) and training (packed) paths agree before
any update, on the toy preset and on the golden tiny BAGEL checkpoint, with ragged prompts and
reasoning; plus closed forms of the helpers (patchify, positions, tables, masks), the toy deviations
and the parameter groups."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import checkpoint
from _parity import load_fixture_policy
import model as M
from policy import Policy
import toy_policy

FIX = Path(__file__).parent / "fixtures" / "bagel"
WORDS = "red green blue circle square two plus one".split()


@pytest.fixture(scope="module")
def tok():
    return toy_policy.WordTokenizer(WORDS)


@pytest.fixture(scope="module")
def toy(tok, randomize):
    torch.set_num_threads(1)
    # 4 ground tokens -> cells 0..3 of the grid
    return small_toy(tok, toy_policy.Grounding(tok.encode("red green blue circle")), randomize, seed=1)


def small_toy(tok, hook, randomize, seed):
    """A 2-layer toy policy with `hook`, random weights, and softer logits so that the stop token is
    sampled within a few steps (ragged rows)."""
    cfg = M.BagelConfig.toy(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_key_value_heads=2)
    policy = randomize(Policy.from_config(cfg, tok, seed=0, embed_hook=hook), seed=seed).eval()
    with torch.no_grad():
        policy.model.language_model.lm_head.weight.mul_(0.3)
    return policy


@pytest.fixture(scope="module")
def golden(id_tokenizer):
    return load_fixture_policy(FIX / "model", id_tokenizer)


@pytest.fixture(scope="module")
def golden_prompts():
    """Two prompts of different lengths made of the fixture's own prompt ids."""
    ids = json.loads((FIX / "meta.json").read_text())["text_prefill"]["prompt_ids"]
    return [" ".join(map(str, ids[:3])), " ".join(map(str, ids[::-1]))]


# -------------------------------------------------------------------------------- tokenizer, config
def test_toy_preset(tok):
    cfg = M.BagelConfig.toy(tok)
    assert ((cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.rope_theta)
            == (128, 4, 4, 1e6))
    assert cfg.timestep_shift == 3.0 and M.BagelConfig.bagel_7b().timestep_shift == 1.0
    assert ((cfg.codec, cfg.prediction, cfg.latent_channels, cfg.latent_downsample)
            == ("pixels", "x0", 3, 1))
    assert cfg.grid(cfg.image_hw) == (4, 4) and cfg.patch_dim == 192 and cfg.max_latent_size == 4
    assert cfg.vocab_size == tok.vocab_size
    assert M.BagelConfig.toy(13).vocab_size == 13
    b = M.BagelConfig.bagel_7b()  # the toy-only fields are off in the 7B preset
    assert (b.codec, b.prediction, b.image_hw, b.stride) == ("flux", "velocity", (1024, 1024), 16)
    assert b.think_system_prompt == M.GEN_THINK_SYSTEM_PROMPT and cfg.think_system_prompt is None
    with pytest.raises(ValueError, match="prediction"):
        M.BagelConfig.toy(13, prediction="eps")


def test_from_config_seeded(tok):
    cfg = M.BagelConfig.toy(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    a, b, c = (Policy.from_config(cfg, tok, seed=s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["language_model.lm_head.weight"], c["language_model.lm_head.weight"])
    assert torch.equal(a["latent_pos_embed.pos_embed"], M.sincos_2d_table(32, cfg.max_latent_size))
    with pytest.raises(ValueError, match="im_end_id"):
        Policy.from_config(M.BagelConfig.toy(tok, im_end_id=7), tok)


# -------------------------------------------------------------------------------- closed forms
def test_patchify_closed_form():
    C, h, w, p = 3, 2, 3, 2
    z = torch.randn(2, C, h * p, w * p)
    x = M.patchify(z, p)
    assert x.shape == (2, h * w, p * p * C)
    for row in range(h):
        for col in range(w):
            for pi in range(p):
                for qi in range(p):
                    for c in range(C):
                        assert (x[1, row * w + col, (pi * p + qi) * C + c]
                                == z[1, c, p * row + pi, p * col + qi])
    assert torch.equal(M.unpatchify(x, h, w, p), z)


def test_position_tables_closed_form():
    assert M.latent_position_ids(2, 3, 8).tolist() == [0, 1, 2, 8, 9, 10]
    dim, side = 16, 5
    tab = M.sincos_2d_table(dim, side)
    q = dim // 4
    for r, c in ((0, 0), (1, 3), (4, 2)):
        f = [10000 ** (-k / q) for k in range(q)]
        want = [math.sin(c * fk) for fk in f] + [math.cos(c * fk) for fk in f] + \
               [math.sin(r * fk) for fk in f] + [math.cos(r * fk) for fk in f]
        torch.testing.assert_close(tab[r * side + c], torch.tensor(want), atol=1e-6, rtol=0)
    t = torch.tensor([0.0, 0.3])
    s = M.timestep_sinusoid(t, 8)
    f = torch.tensor([math.exp(-math.log(10000) * k / 4) for k in range(4)])
    torch.testing.assert_close(s, torch.cat([(t[:, None] * f).cos(), (t[:, None] * f).sin()], 1))
    raw = torch.tensor([-1.0, 0.0, 2.0])
    sig = 1 / (1 + torch.exp(-raw))
    torch.testing.assert_close(M.train_timesteps(raw, 3.0), 3 * sig / (1 + 2 * sig))


def test_packed_layout_rule():
    """Mask re-derived by the rule: text causal; a block sees all valid text and itself; nothing
    sees a block."""
    valid = torch.tensor([[True, True, True], [True, False, False]])
    K, N = 2, 2
    is_gen, pos, mask = M.packed_layout(valid, K, N)
    L = 3 + K * (N + 2)
    for r in range(2):
        n_text = int(valid[r].sum())
        assert pos[r].tolist() == [0, 1, 2] + [n_text] * (K * (N + 2))
        assert is_gen[r].tolist() == [False] * 3 + [False, True, True, False] * K
        for i in range(L):
            for j in range(L):
                bi, bj = (i - 3) // (N + 2) if i >= 3 else -1, (j - 3) // (N + 2) if j >= 3 else -1
                if bj < 0:
                    want = bool(valid[r, j]) and (j <= i or bi >= 0)
                else:
                    want = bi == bj
                assert bool(mask[r, 0, i, j]) == want, (r, i, j)


# -------------------------------------------------------------------------------- think
def test_think_contract(toy, tok):
    prompts = ["red circle", "two plus one blue square", ""]
    n, T = 4, 6
    th = toy.think(prompts, n=n, max_new_tokens=T, generator=torch.Generator().manual_seed(0))
    R = len(prompts) * n
    assert th.ids.shape[0] == R and th.ids.shape[1] <= T and th.mask.dtype == torch.bool
    for i, p in enumerate(prompts):  # group-contiguous rows, Bagel's wrapping
        want = [tok.im_start_id] + tok.encode(p) + [tok.im_end_id]
        for r in range(i * n, i * n + n):
            assert th.prompt_ids[r][th.prompt_mask[r]].tolist() == want
    lens = th.mask.sum(1)
    for r in range(R):
        L = int(lens[r])
        assert th.mask[r, :L].all() and not th.mask[r, L:].any() and (th.logp[r, L:] == 0).all()
        ids = th.ids[r, :L].tolist()
        stopped = tok.im_end_id in ids
        # stop token kept and counted
        assert (ids.index(tok.im_end_id) == L - 1) if stopped else L == T
        assert th.texts[r] == tok.decode([i for i in ids if i != tok.im_end_id])
        assert (th.logp[r, :L] < 0).all()
    same = toy.think(prompts, n=n, max_new_tokens=T, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.ids, th.ids)
    greedy = toy.think(prompts, n=3, max_new_tokens=T, temperature=0)
    assert all(torch.equal(greedy.ids[3 * i], greedy.ids[3 * i + k])
               for i in range(3) for k in (1, 2))
    off = toy.think(prompts, n=2, max_new_tokens=0)
    assert off.ids.shape == (6, 0) and off.logp.shape == (6, 0) and off.texts == [""] * 6


def test_think_prompt_too_long(tok):
    cfg = M.BagelConfig.toy(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            max_position_embeddings=12)
    pol = Policy.from_config(cfg, tok)
    pol.think(["red circle"], n=1, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        pol.think(["red", "two plus one red circle"], n=1, max_new_tokens=6)


# -------------------------------------------------------------------------------- agreement
def _agreement(policy, th, image_hw, K=2, seed=0):
    """train_forward (packed, one forward) vs think's logp and velocity() on the cached context."""
    g = torch.Generator().manual_seed(seed)
    R = th.ids.shape[0]
    N, D = policy.latent_shape(image_hw)
    x_t = torch.randn(R, K, N, D, generator=g)
    # x0 mode divides by t: keep the float error readable
    t = 0.2 + 0.8 * torch.rand(R, K, generator=g)
    out = policy.train_forward(th, x_t, t, image_hw=image_hw)
    ctx = policy.context(th)
    v_cached = torch.stack([policy.velocity(x_t[:, k], t[:, k], ctx, image_hw=image_hw)
                            for k in range(K)], 1)
    assert out.logp.shape == th.logp.shape and out.v.shape == x_t.shape
    assert (out.logp - th.logp).abs().max() < 2e-5
    ratio = (out.logp - th.logp)[th.mask].exp()
    assert ratio.numel() > 0 and (ratio - 1).abs().max() < 2e-5
    torch.testing.assert_close(out.v, v_cached, atol=2e-5, rtol=1e-5)
    assert (out.logp[~th.mask] == 0).all() and v_cached.abs().max() > 0.1
    return out, ctx


def test_agreement_toy_ragged(toy, tok):
    th = toy.think(["red circle", "two plus one blue square"], n=4, max_new_tokens=6,
                   temperature=0.7, generator=torch.Generator().manual_seed(0))
    lens = th.mask.sum(1).tolist()
    # ragged, truncated and stopped rows
    assert len(set(lens)) >= 3 and max(lens) == 6 and min(lens) < 6, lens
    _agreement(toy, th, toy.cfg.image_hw)


def test_agreement_golden_ragged(golden, golden_prompts):
    th = golden.think(golden_prompts, n=3, max_new_tokens=5,
                      generator=torch.Generator().manual_seed(0))
    # ragged prefixes are causal
    keep = torch.tensor([5, 2, 4, 1, 3, 5])[:, None] > torch.arange(th.ids.shape[1])
    th.mask, th.logp = th.mask & keep, th.logp * keep
    hw = json.loads((FIX / "meta.json").read_text())["image_hw"]
    _agreement(golden, th, hw, K=2)


@pytest.mark.parametrize("name, prompts", [("toy", ["red circle", "two plus one blue square"]),
                                            ("toy_span", ["red circle", "two plus one blue square"]),
                                            ("golden", None)])
@pytest.mark.parametrize("tokens", [0, 6])
def test_think_context_equals_a_fresh_prefill(request, name, prompts, tokens):
    """think(with_context=True) ends its cache where context(thoughts) would (cut-off chains get their
    last token and im_end, stopped ones im_end): the velocities agree, so denoising needs no prefill."""
    policy = request.getfixturevalue(name)
    prompts = prompts or request.getfixturevalue("golden_prompts")
    th, ctx = policy.think(prompts, n=4, max_new_tokens=tokens, temperature=0.8,
                           generator=torch.Generator().manual_seed(3), with_context=True)
    lens = th.mask.sum(1)
    if tokens and name != "golden":                           # the golden model never stops this early
        assert lens.max() == tokens and lens.min() < tokens, lens          # cut off and stopped rows
    fresh = policy.context(th)
    assert torch.equal(ctx.rope_next, fresh.rope_next) and ctx.key_mask.sum() == fresh.key_mask.sum()
    hw = policy.cfg.image_hw if name != "golden" else json.loads((FIX / "meta.json").read_text())["image_hw"]
    N, D = policy.latent_shape(hw)
    x_t = torch.randn(th.ids.shape[0], N, D, generator=torch.Generator().manual_seed(4))
    v = policy.velocity(x_t, 0.6, ctx, image_hw=hw)
    torch.testing.assert_close(v, policy.velocity(x_t, 0.6, fresh, image_hw=hw), atol=2e-5, rtol=1e-5)
    assert v.abs().max() > 0.1


def test_padding_and_batch_independence(golden, golden_prompts):
    """A row's velocity and log-probs do not depend on the other rows of the batch
    (padding is masked)."""
    th = golden.think(golden_prompts, n=2, max_new_tokens=3,
                      generator=torch.Generator().manual_seed(1))
    hw = (2 * golden.cfg.stride, 3 * golden.cfg.stride)
    N, D = golden.latent_shape(hw)
    x_t = torch.randn(4, N, D, generator=torch.Generator().manual_seed(2))
    v = golden.velocity(x_t, 0.7, golden.context(th), image_hw=hw)
    for r in (0, 3):
        one = th.select([r])
        torch.testing.assert_close(golden.velocity(x_t[r:r + 1], 0.7, golden.context(one),
                                                   image_hw=hw),
                                   v[r:r + 1], atol=2e-5, rtol=0)
        out = golden.train_forward(one, x_t[r:r + 1, None], torch.tensor([0.7]), image_hw=hw)
        torch.testing.assert_close(out.logp, th.logp[r:r + 1], atol=2e-5, rtol=0)


def test_gradients_reach_both_experts(toy):
    th = toy.think(["red circle"], n=2, max_new_tokens=4,
                   generator=torch.Generator().manual_seed(0))
    N, D = toy.latent_shape()
    x_t = torch.randn(2, 1, N, D)
    named = dict(toy.model.named_parameters())
    und = "language_model.model.layers.0.self_attn.k_proj.weight"
    gen = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    toy.zero_grad()
    toy.train_forward(th, x_t, torch.tensor([0.5])).v.square().mean().backward()
    # flow loss reaches the text expert
    assert named[und].grad.abs().sum() > 0 and named[gen].grad.abs().sum() > 0
    toy.zero_grad()
    out = toy.train_forward(th, x_t, torch.tensor([0.5]))
    out.logp.sum().backward()
    # text never attends to latents
    assert named[gen].grad is None or named[gen].grad.abs().sum() == 0
    toy.zero_grad()


# -------------------------------------------------------------------------------- velocity options
def test_cfg_and_uncond(toy):
    th = toy.think(["red circle", "blue square"], n=1, max_new_tokens=3,
                   generator=torch.Generator().manual_seed(0))
    N, D = toy.latent_shape()
    x_t = torch.randn(2, N, D)
    ctx, unc = toy.context(th), toy.uncond_context(2)
    assert unc.key_mask.shape == (2, 0)  # toy has no system prompt: the empty context
    v, v_u = toy.velocity(x_t, 0.4, ctx), toy.velocity(x_t, 0.4, unc)
    torch.testing.assert_close(toy.velocity(x_t, 0.4, ctx, cfg_scale=3.0, uncond=unc),
                               v_u + 3.0 * (v - v_u))
    with pytest.raises(ValueError, match="uncond"):
        toy.velocity(x_t, 0.4, ctx, cfg_scale=3.0)
    with pytest.raises(ValueError, match="x_t"):
        toy.velocity(x_t[:, :-1], 0.4, ctx)


def test_x0_prediction_is_velocity_of_x0_hat(toy):
    """model.py deviation 2b: the same weights in 'velocity' mode give x0_hat; 'x0' mode returns
    (x_t - x0_hat)/max(t, t_min)."""
    th = toy.think(["red circle"], n=2, max_new_tokens=2,
                   generator=torch.Generator().manual_seed(0))
    N, D = toy.latent_shape()
    x_t, t = torch.randn(2, N, D), torch.tensor([0.5, 0.01])
    ctx = toy.context(th)
    v = toy.velocity(x_t, t, ctx)
    toy.cfg.prediction = "velocity"
    try:
        x0_hat = toy.velocity(x_t, t, ctx)
    finally:
        toy.cfg.prediction = "x0"
    torch.testing.assert_close(v, (x_t - x0_hat) / t.clamp(min=0.05)[:, None, None])


@pytest.fixture(scope="module")
def toy_span(tok, randomize):
    """Spans (policy.py deviation 4): 'red' and 'blue' are cells 5 and 15; 'plus' ends a span
    (as do im_start/im_end)."""
    hook = toy_policy.Grounding.from_words(tok, [("red", 5), ("blue", 15)], span_end_words=["plus"])
    return small_toy(tok, hook, randomize, seed=4)


def test_agreement_toy_spans(toy_span, tok):
    """KV-cached decoding carries the open span across calls (Context.hook_carry): think's
    log-probs and the cached velocities equal the packed training pass, which grounds the whole
    sequence at once."""
    th = toy_span.think(["red circle", "two plus one blue square"], n=6, max_new_tokens=8,
                        temperature=1.0, generator=torch.Generator().manual_seed(5))
    spans = toy_span.embed_hook.cells(th.ids)
    # spans open while decoding
    assert ((spans >= 0) & th.mask).sum() > 4 and (spans[:, 1:] >= 0).any()
    _agreement(toy_span, th, toy_span.cfg.image_hw)


def test_pixel_codec_and_sizes(toy):
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    x_0 = toy.encode(img)
    assert x_0.shape == (2, *toy.latent_shape()) and torch.equal(x_0, M.patchify(img, 8))
    assert torch.equal(toy.decode(x_0), img)
    with pytest.raises(ValueError, match="images"):
        toy.encode(torch.zeros(1, 3, 32, 36))
    with pytest.raises(ValueError, match="image_hw"):
        toy.latent_shape((30, 32))


def test_param_groups_cover_trainable_once(toy):
    groups = toy.param_groups()
    assert set(groups) == {"reasoning", "denoising"}
    ids = [id(p) for ps in groups.values() for p in ps]
    trainable = {id(p) for p in toy.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert id(toy.model.latent_pos_embed.pos_embed) not in ids
    names = {id(p): n for n, p in toy.model.named_parameters()}
    for n in (names[i] for i in map(id, groups["denoising"])):
        assert "_moe_gen" in n or n.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae"), n
    for n in (names[i] for i in map(id, groups["reasoning"])):
        assert "_moe_gen" not in n and n.startswith("language_model."), n


def test_thoughts_from_text_and_select(toy, tok):
    th = toy.thoughts_from_text(["red circle", "blue square"], ["one red circle", "two"])
    assert th.ids[0][th.mask[0]].tolist() == tok.encode("one red circle") + [tok.im_end_id]
    assert th.ids[1][th.mask[1]].tolist() == tok.encode("two") + [tok.im_end_id]
    sub = th.select(torch.tensor([1]))
    assert sub.texts == ["two"] and torch.equal(sub.ids, th.ids[1:])
    x_t = torch.randn(2, 1, *toy.latent_shape())
    out = toy.train_forward(th, x_t, torch.tensor([0.3]))
    assert torch.isfinite(out.logp).all() and (out.logp[th.mask] < 0).all()


def test_tokenizer_must_agree_with_the_config(tok):
    """A tokenizer whose special ids or size disagree with the checkpoint config is refused,
    naming the token."""
    cfg = M.BagelConfig.toy(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    with pytest.raises(ValueError, match="im_end"):
        Policy.from_config(dataclasses.replace(cfg, im_end_id=cfg.vision_start_id,
                                               vision_start_id=cfg.im_end_id), tok)
    with pytest.raises(ValueError, match="vocab_size"):
        Policy.from_config(dataclasses.replace(cfg, vocab_size=tok.vocab_size - 1), tok)
