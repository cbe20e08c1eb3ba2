"""The toy's base policy (toy_policy.py): its word tokenizer, the grounding hook (policy.py deviation
4: closed forms of the embedding term, spans, the carry of KV-cached decoding) and the toy build."""
import pytest
import torch

import model as M
from policy import Policy
import toy
import toy_policy

WORDS = "red green blue circle square two plus one".split()


@pytest.fixture(scope="module")
def tok():
    return toy_policy.WordTokenizer(WORDS)


def small(tok, hook, randomize=None):
    cfg = M.BagelConfig.toy(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    policy = Policy.from_config(cfg, tok, seed=0, embed_hook=hook)
    return policy if randomize is None else randomize(policy, seed=1)


def embed(policy, ids):
    """The input embeddings of ids (1, L) with and without the hook's term."""
    return (policy.text_embeddings(ids, torch.ones_like(ids, dtype=torch.bool))[0],
            policy.model.embed_text(ids))


def test_word_tokenizer(tok):
    assert ([tok.pad_id, tok.im_start_id, tok.im_end_id, tok.vision_start_id, tok.vision_end_id]
            == list(range(5)))
    assert tok.vocab_size == 5 + len(WORDS)
    ids = tok.encode("two plus one red circle")
    assert ids == [5 + WORDS.index(w) for w in "two plus one red circle".split()]
    assert tok.decode(ids) == "two plus one red circle" and tok.encode("") == []
    with pytest.raises(ValueError, match="purple"):
        tok.encode("a purple circle")


def test_word_tokenizer_file_roundtrip_and_bad_file(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert toy_policy.WordTokenizer.from_pretrained(tmp_path).vocab == tok.vocab
    (tmp_path / "word_tokenizer.json").write_text('["red", ')
    with pytest.raises(ValueError, match="word_tokenizer.json"):
        toy_policy.WordTokenizer.from_pretrained(tmp_path)


def test_grounding_from_words(tok):
    g = toy_policy.Grounding.from_words(tok, ["red", "blue"])
    assert (g.token_ids == tuple(tok.encode("red blue")) and g.token_cells == (0, 1)
            and g.scale == 0.1)


def test_grounding_embeddings(tok, randomize):
    """Policy deviation 4: ground token k gets latent_pos_embed[row*max_latent_size + col] of cell k."""
    hook = toy_policy.Grounding(tok.encode("red green blue circle"))
    policy = small(tok, hook, randomize)
    cfg = policy.cfg
    w = cfg.grid(cfg.image_hw)[1]
    ids = torch.tensor([list(hook.token_ids) + [tok.encode("two")[0]]])
    e, plain = embed(policy, ids)
    table = policy.model.latent_pos_embed.pos_embed
    assert hook.scale == 0.1  # the toy preset's weight of the grounding term
    for k in range(len(hook.token_ids)):
        torch.testing.assert_close(e[0, k] - plain[0, k],
                                   0.1 * table[(k // w) * cfg.max_latent_size + k % w])
    assert torch.equal(e[0, -1], plain[0, -1])


def test_grounding_with_explicit_cells(tok):
    """(word, cell) pairs: several tokens may share a cell; each gets that cell's latent position
    embedding."""
    pairs = [("red", 5), ("blue", 5), ("two", 15)]
    hook = toy_policy.Grounding.from_words(tok, pairs)
    assert hook.token_cells == (5, 5, 15)
    policy = small(tok, hook)
    ids = torch.tensor([tok.encode("blue two red circle")])
    e, plain = embed(policy, ids)
    e = e - plain
    table, side = policy.model.latent_pos_embed.pos_embed, policy.cfg.max_latent_size
    for j, k in enumerate([5, 15, 5]):
        torch.testing.assert_close(e[0, j], hook.scale * table[(k // 4) * side + k % 4])
    assert not e[0, 3].any()
    with pytest.raises(ValueError, match="token_cells"):
        toy_policy.Grounding.from_words(tok, [("red", 16)])


def test_grounding_spans(tok):
    """A ground token's cell also grounds the tokens after it, up to the next span end; a new ground
    token opens a new span; tokens before any ground token are plain."""
    hook = toy_policy.Grounding.from_words(tok, [("red", 5), ("blue", 15)], span_end_words=["plus"])
    policy = small(tok, hook)
    assert hook.span_end_ids == (*tok.encode("plus"), tok.im_start_id, tok.im_end_id)
    text = "two red circle square plus one blue circle red two plus circle"
    want = [-1, 5, 5, 5, -1, -1, 15, 15, 5, 5, -1, -1]
    ids = torch.tensor([tok.encode(text)])
    assert hook.cells(ids).tolist() == [want]
    e, plain = embed(policy, ids)
    e = e - plain
    table, side = policy.model.latent_pos_embed.pos_embed, policy.cfg.max_latent_size
    for j, k in enumerate(want):
        if k < 0:
            assert not e[0, j].any()
        else:
            torch.testing.assert_close(e[0, j], hook.scale * table[(k // 4) * side + k % 4])
    # token by token with the carried open span == the whole sequence at once
    carry, cells = torch.tensor([-1]), []
    for j in range(ids.shape[1]):
        c = hook.cells(ids[:, j:j + 1], carry)
        cells.append(c.item())
        carry = c[:, -1]
    assert cells == want
    with pytest.raises(ValueError, match="must not share"):
        toy_policy.Grounding.from_words(tok, [("red", 5)], span_end_words=["red"])


def test_grounding_hook_carry_through_the_policy(tok):
    """Policy.forward_text hands the hook's carry on in the Context: feeding a text in two calls
    gives the embeddings of one call (the open span continues)."""
    hook = toy_policy.Grounding.from_words(tok, [("red", 5), ("blue", 15)], span_end_words=["plus"])
    policy = small(tok, hook)
    ids = torch.tensor([tok.encode("two red circle square plus blue")])
    valid = torch.ones_like(ids, dtype=torch.bool)
    ctx = policy.forward_text(ids[:, :2], valid[:, :2])[1]
    assert ctx.hook_carry.tolist() == [5]
    assert policy.forward_text(ids, valid)[1].hook_carry.tolist() == [15]
    whole, _ = policy.text_embeddings(ids, valid)
    tail, _ = policy.text_embeddings(ids[:, 2:], valid[:, 2:], ctx.hook_carry)
    torch.testing.assert_close(tail, whole[:, 2:])


def test_grounding_spec_roundtrip(tok, tmp_path):
    hook = toy_policy.Grounding.from_words(tok, [("red", 5), ("blue", 15)], span_end_words=["plus"],
                                           scale=0.3)
    hook.save_pretrained(tmp_path)
    assert toy_policy.Grounding.from_pretrained(tmp_path).spec() == hook.spec()


def test_toy_build_grounds_the_plan_cells_and_bagel_has_no_hook():
    policy = toy_policy.build_policy(seed=0)
    hook = policy.embed_hook
    cells = toy.cell_tokens()
    assert (hook.token_ids == tuple(policy.tokenizer.encode(" ".join(cells)))
            and hook.token_cells == tuple(range(16)))
    assert hook.span_end_ids[0] == policy.tokenizer.encode(toy.SEP)[0]
    # Bagel's path carries no toy state
    assert Policy(M.BagelConfig.toy(13), None).embed_hook is None
