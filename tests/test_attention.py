"""The packed training forward's two attention paths (model.py deviation 1, Policy.attention): "blocks"
(the text causal with no mask, each block a batch row on [its text, itself]) gives the dense mask's
log-probs, velocities and parameter gradients, on the toy and on the golden tiny BAGEL (GQA), with
padded and equal-length text and K = 0, 1, 3. The comparison is shown to catch a block that sees
another block."""
import json
from pathlib import Path

import pytest
import torch

import checkpoint
import model as M
import policy as P
import toy_policy
from policy import Thoughts

FIX = Path(__file__).parent / "fixtures" / "bagel"
EQUAL, RAGGED = ((3, 4), (3, 4)), ((3, 5), (2, 1))     # (prompt, reasoning) tokens per row


@pytest.fixture(scope="module")
def toy(randomize):
    torch.set_num_threads(1)
    return randomize(toy_policy.build_policy(0), seed=3).eval(), None


@pytest.fixture(scope="module")
def golden(id_tokenizer):
    torch.set_num_threads(1)
    pol = checkpoint.from_pretrained(FIX / "model", dtype=torch.float32, tokenizer=id_tokenizer,
                                     think_system_prompt=None).eval()
    assert pol.cfg.num_key_value_heads < pol.cfg.num_attention_heads           # GQA
    return pol, tuple(json.loads((FIX / "meta.json").read_text())["image_hw"])


def thoughts(rows, seed=0) -> Thoughts:
    """Right-padded Thoughts of (prompt length, reasoning length) per row, random non-special ids."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        return torch.randint(5, 50, (n,), generator=g).tolist()
    prompt_ids, prompt_mask = M.pad_rows([draw(p) for p, _ in rows], 0, "cpu")
    ids, mask = M.pad_rows([draw(r) for _, r in rows], 0, "cpu")
    return Thoughts(prompt_ids, prompt_mask, ids, mask, torch.zeros(ids.shape), [""] * len(rows))


def run(policy, attention, th, K, image_hw, seed=0):
    """train_forward under `attention` and the gradients of logp.sum() + mean(v^2)."""
    g = torch.Generator().manual_seed(seed)
    R, (N, D) = th.ids.shape[0], policy.latent_shape(image_hw)
    x_t = torch.randn(R, K, N, D, generator=g)
    t = 0.2 + 0.8 * torch.rand(R, K, generator=g)
    policy.attention = attention
    try:
        policy.zero_grad(set_to_none=True)
        out = policy.train_forward(th, x_t, t, image_hw=image_hw)
        (out.logp.sum() + out.v.square().sum() / max(out.v.numel(), 1)).backward()
    finally:
        policy.attention = "dense"
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return out, grads


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b.logp, out_a.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_b.v, out_a.v, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        err = (grads_b[name] - g).norm()
        assert err <= 1e-5 * g.norm() + 1e-9, (name, float(err), float(g.norm()))


@pytest.mark.parametrize("which", ["toy", "golden"])
@pytest.mark.parametrize("rows,K", [(RAGGED, 3), (RAGGED, 1), (EQUAL, 3), (EQUAL, 1), (RAGGED, 0)])
def test_blocks_equal_dense(which, rows, K, request):
    policy, image_hw = request.getfixturevalue(which)
    th = thoughts(rows)
    valid = P.text_rows(policy.cfg, th, "cpu")[1]
    # the no-mask branch is the one taken on equal rows
    assert (M.packed_blocks(valid, K, 2)[2].text_valid is None) == (rows == EQUAL)
    dense, blocks = run(policy, "dense", th, K, image_hw), run(policy, "blocks", th, K, image_hw)
    assert dense[0].v.numel() == 0 or dense[0].v.abs().max() > 0.1        # the velocity is not trivial
    assert_same(dense, blocks)


@pytest.mark.parametrize("rows", [RAGGED, EQUAL])
def test_a_block_seeing_another_block_is_caught(golden, rows, monkeypatch):
    """The mutant merges the K blocks into one, so every block sees the others: outputs differ."""
    policy, image_hw = golden
    th = thoughts(rows)
    dense = run(policy, "dense", th, 3, image_hw)

    def merged(valid, K, N):
        is_gen, pos, lay = M.packed_blocks(valid, K, N)
        return is_gen, pos, M.PackedBlocks(lay.text_len, 1, K * lay.block_len, lay.text_valid)
    monkeypatch.setattr(P, "packed_blocks", merged)
    mutant = run(policy, "blocks", th, 3, image_hw)
    assert (mutant[0].v - dense[0].v).abs().max() > 1e-3
    with pytest.raises(AssertionError):
        assert_same(dense, mutant)


def test_attend_equals_the_dense_mask():
    """attend on random q, k, v (GQA): the PackedBlocks path equals SDPA with packed_layout's mask on
    every query a valid row reads; padded text queries stay finite. One row has no valid text."""
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    K, N = 3, 4
    mask = M.packed_layout(valid, K, N)[2]
    blocks = M.packed_blocks(valid, K, N)[2]
    L = 5 + K * (N + 2)
    q, k, v = (torch.randn(3, h, L, 8, generator=g) for h in (4, 2, 2))
    dense, ours = M.attend(q, k, v, mask, True), M.attend(q, k, v, blocks, True)
    read = torch.cat([valid, torch.ones(3, L - 5, dtype=torch.bool)], 1)       # (R, L) queries read
    torch.testing.assert_close(ours.transpose(1, 2)[read], dense.transpose(1, 2)[read])
    assert torch.isfinite(ours).all()


def test_activation_checkpointing_gives_the_same_gradients():
    """checkpoint_layers recomputes each layer in the backward: same outputs and gradients."""
    import toy_policy
    policy = toy_policy.build_policy(0, "cpu")
    th = policy.think(["red circle", "two plus one blue square"], n=2, max_new_tokens=5,
                      generator=torch.Generator().manual_seed(0))
    N, D = policy.latent_shape()
    x_t = torch.randn(4, 2, N, D, generator=torch.Generator().manual_seed(1))
    grads = []
    for on in (False, True):
        policy.zero_grad(set_to_none=True)
        policy.model.checkpoint_layers = on
        out = policy.train_forward(th, x_t, torch.tensor([0.8, 0.4]))
        (out.logp.sum() + out.v.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    policy.model.checkpoint_layers = False
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)
