"""LoRA (lora.py): the adapted model starts equal to the base, one step moves only the adapters (and the
unadapted expert, which trains fully), the optimizer holds exactly those, and merging gives the same
function, also through an official-layout folder loaded by checkpoint.from_pretrained."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import config
import lora
import toy
import toy_policy
import unigrpo
from tiny_bagel import save_tiny_bagel

torch.set_num_threads(1)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2)
FIX = Path(__file__).parent / "fixtures" / "bagel"


def cfg_of(experts="both", **kw):
    """The toy preset with LoRA on and large rates, so that one step visibly moves what it trains."""
    return config.preset("toy", lora_rank=4, lora_alpha=8.0, lora_experts=experts, lr_reasoning=1e-2,
                         lr_denoising=1e-2, **kw)


@pytest.fixture
def base(randomize):
    """A small toy policy with non-trivial weights (Bagel's init zeroes llm2vae)."""
    return randomize(toy_policy.build_policy(0, "cpu", **SMALL), seed=3).eval()


def batch(policy, prompts=None, image_hw=None, K=2):
    """A fixed rollout-free training batch: 2 reasoning chains per prompt, K noisy blocks per row."""
    prompts = prompts or [p.text for p in toy.train_prompts(0, 0, 2)]
    th = policy.think(prompts, n=2, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    N, D = policy.latent_shape(image_hw)
    g = torch.Generator().manual_seed(1)
    R = th.ids.shape[0]
    return th, torch.randn(R, K, N, D, generator=g), torch.rand(R, K, generator=g), image_hw


def outputs(policy, data):
    th, x_t, t, hw = data
    with torch.no_grad():
        return policy.train_forward(th, x_t, t, image_hw=hw)


def one_step(policy, data, cfg, steps=1):
    """`steps` AdamW steps of -sum logp + mean v^2 with unigrpo.make_optimizer's groups."""
    opt = unigrpo.make_optimizer(policy, cfg)
    th, x_t, t, hw = data
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = policy.train_forward(th, x_t, t, image_hw=hw)
        (-out.logp.sum() + out.v.square().mean()).backward()
        opt.step()
    return opt


def adapted(policy, cfg):
    return lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_experts)


def assert_same_outputs(a, b, atol=1e-5):
    """Equal within fp32 rounding (a merged W + BA sums in another order; values are O(1), so the bound is
    relative too, and the rounding differs between CPUs); atol=0: bit-exact."""
    torch.testing.assert_close(a.logp, b.logp, atol=atol, rtol=atol)
    torch.testing.assert_close(a.v, b.v, atol=atol, rtol=atol)


# ------------------------------------------------------------------------------------- the layer
def test_layer_closed_form_and_bf16(base):
    """y = W_0 x + b + (alpha/r) (x A^T) B^T; adapters stay fp32 on a bf16 base, the output is bf16."""
    policy = lora.add_lora(base.to(torch.bfloat16), rank=3, alpha=6.0)
    m = policy.model.language_model.model.layers[1].mlp_moe_gen.up_proj
    assert isinstance(m, lora.LoRALinear) and m.lora_A.dtype == m.lora_B.dtype == torch.float32
    assert m.lora_A.shape == (3, m.in_features) and m.lora_B.shape == (m.out_features, 3)
    with torch.no_grad():
        m.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, m.in_features).to(torch.bfloat16)
    delta = (x.float() @ m.lora_A.T @ m.lora_B.T * 2.0).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.functional.linear(x, m.weight, m.bias) + delta, atol=0, rtol=0)
    W = lora.merged_weight(m.weight, m.lora_A, m.lora_B, m.lora_scale)
    assert W.dtype == torch.bfloat16
    torch.testing.assert_close(W.float(), m.weight.float() + 2.0 * m.lora_B @ m.lora_A, atol=0.02, rtol=0.01)


def test_keys_and_start_equal_to_base(base):
    data = batch(base)
    before, keys = outputs(base, data), list(base.model.state_dict())
    policy = adapted(base, cfg_of())
    assert lora.is_lora(policy)
    assert_same_outputs(outputs(policy, data), before, atol=0)      # B = 0: exact
    names = lora.lora_parameters(policy)
    # 2 layers x 2 experts x (q, k, v, o, gate, up, down) x (A, B)
    assert len(names) == 2 * 2 * 7 * 2
    assert "language_model.model.layers.0.self_attn.q_proj.lora_A" in names
    assert "language_model.model.layers.1.mlp_moe_gen.down_proj.lora_B" in names
    assert [k for k in policy.model.state_dict() if k not in names] == keys   # official keys kept
    assert all(not p.requires_grad for n, p in policy.model.named_parameters() if n not in names)
    # seeded init: the same A every time
    again = lora.lora_parameters(lora.add_lora(toy_policy.build_policy(0, "cpu", **SMALL), 4, 8.0))
    assert all(torch.equal(p, again[n]) for n, p in names.items())


# ---------------------------------------------------------------------------- what trains, and how
@pytest.mark.parametrize("experts", ["both", "reasoning", "denoising"])
def test_step_moves_only_adapters_and_unadapted_expert(base, experts):
    cfg = cfg_of(experts)
    data = batch(base)
    policy = adapted(base, cfg)
    before = outputs(policy, data)
    state0 = {k: v.clone() for k, v in policy.model.state_dict().items()}
    opt = one_step(policy, data, cfg, steps=2)
    names = lora.lora_parameters(policy)
    chosen = lora.EXPERTS[experts]
    expect = {n for n, p in policy.model.named_parameters()
              if n in names or policy.model.expert_of(n) not in (*chosen, None)}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(policy.model.named_parameters())
    assert in_opt == {id(named[n]) for n in expect}
    assert {n for n, p in named.items() if p.requires_grad} == expect
    assert {policy.model.expert_of(n) for n in names} == set(chosen)
    state = policy.model.state_dict()
    for k, v in state.items():
        if k not in expect:
            assert torch.equal(v, state0[k]), f"{k} (frozen) changed"
    assert all(not torch.equal(state[n], state0[n]) for n in names if n.endswith("lora_B"))
    assert any(not torch.equal(state[n], state0[n]) for n in expect - set(names)) == (experts != "both")
    after = outputs(policy, data)
    assert (after.v - before.v).abs().max() > 1e-3 and (after.logp - before.logp).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ merging
def test_merged_state_dict_and_merge_in_place(base):
    cfg = cfg_of()
    data = batch(base)
    policy = adapted(base, cfg)
    one_step(policy, data, cfg, steps=2)
    want = outputs(policy, data)
    merged = lora.merged_state_dict(policy)
    fresh = toy_policy.build_policy(5, "cpu", **SMALL).eval()
    assert list(merged) == list(fresh.model.state_dict())
    fresh.model.load_state_dict(merged, strict=True)
    assert_same_outputs(outputs(fresh, data), want)
    lora.merge_(policy)
    assert not lora.is_lora(policy) and lora.lora_parameters(policy) == {}
    assert all(type(m) is torch.nn.Linear for m in policy.model.modules() if isinstance(m, torch.nn.Linear))
    assert list(policy.model.state_dict()) == list(merged)
    assert_same_outputs(outputs(policy, data), want)
    assert all(p.requires_grad for n, p in policy.model.named_parameters()
               if policy.model.expert_of(n) is not None)
    assert lora.merged_state_dict(policy).keys() == merged.keys()      # no adapters: the plain state


def test_official_folder_round_trip(tmp_path, id_tokenizer):
    """merged_state_dict written as ema.safetensors of a full official folder (the golden weights, a copy
    of the source folder), read back by checkpoint.from_pretrained: the outputs of the adapted policy."""
    load = dict(dtype=torch.float32, tokenizer=id_tokenizer, think_system_prompt=None)
    source = save_tiny_bagel(tmp_path / "source")
    policy = checkpoint.from_pretrained(source, **load).eval()
    ids = json.loads((FIX / "meta.json").read_text())["text_prefill"]["prompt_ids"]
    hw = (2 * policy.cfg.stride, 3 * policy.cfg.stride)
    data = batch(policy, [" ".join(map(str, ids[:3])), " ".join(map(str, ids[::-1]))], hw)
    start = outputs(policy, data)
    cfg = cfg_of("denoising")
    adapted(policy, cfg)
    one_step(policy, data, cfg)
    want = outputs(policy, data)
    assert (want.v - start.v).abs().max() > 1e-3 and (want.logp - start.logp).abs().max() > 1e-3
    folder = Path(shutil.copytree(source, tmp_path / "export"))
    save_file({k: v.contiguous() for k, v in lora.merged_state_dict(policy).items()},
              folder / "ema.safetensors")
    loaded = checkpoint.from_pretrained(folder, **load).eval()
    assert not lora.is_lora(loaded)
    assert_same_outputs(outputs(loaded, data), want)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input(base):
    for kw, match in ((dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(rank=2.0), "rank"),
                      (dict(alpha=0.0), "alpha"), (dict(alpha=-1.0), "alpha"),
                      (dict(alpha=math.nan), "alpha"), (dict(experts="gen"), "experts")):
        with pytest.raises(ValueError, match=match):
            lora.add_lora(base, **{"rank": 4, "alpha": 8.0, **kw})
    assert not lora.is_lora(base)
    with pytest.raises(ValueError, match="no adapters"):
        lora.merge_(base)
    lora.add_lora(base, 4, 8.0, "reasoning")
    with pytest.raises(ValueError, match="already holds adapters"):
        lora.add_lora(base, 4, 8.0, "denoising")
