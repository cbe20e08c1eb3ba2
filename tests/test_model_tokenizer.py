"""The Qwen2 tokenizer path of model.py, offline: a tiny byte-level BPE tokenizer in Qwen2's format,
with Bagel's four special tokens at the ids the golden bagel_config.json names, saved next to the
golden tiny checkpoint. Policy.from_pretrained picks it up; prompts are encoded the way Bagel does
([im_start] + encode(text) + [im_end]); think() decodes its samples with it;
checkpoint.save_pretrained / from_pretrained round-trip it."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, Qwen2TokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

import checkpoint

FIX = Path(__file__).parent / "fixtures" / "bagel" / "model"
# Bagel's names in new_token_ids (data_utils.add_special_tokens) -> the Qwen2.5 token
# each one is the id of
BAGEL_TOKENS = {"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
                "start_of_image": "<|vision_start|>", "end_of_image": "<|vision_end|>"}
MERGES = [("Ġ", "c"), ("u", "b"), ("Ġc", "ub"), ("Ġcub", "e"), ("r", "e"), ("re", "d"),
          ("Ġ", "red"), ("a", "t"), ("Ġc", "at"), ("t", "w"), ("tw", "o")]
TEXTS = ["a red cube", "two cats", "A red cube, two cats!\n\n  x", "café 🐱 über", "",
         "<|im_start|>red"]


def special_ids():
    """{token: id} of the golden bagel_config.json; <|endoftext|> just below them, as in Qwen2.5."""
    ids = {BAGEL_TOKENS[k]: v
           for k, v in json.loads((FIX / "bagel_config.json").read_text())["new_token_ids"].items()}
    return {**ids, "<|endoftext|>": min(ids.values()) - 1}


def tiny_qwen2_tokenizer():
    special = special_ids()
    # GPT-2 / Qwen2 order
    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({a + b: len(vocab) + k for k, (a, b) in enumerate(MERGES)})
    assert len(vocab) <= min(special.values())
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), max(special.values()))
                  if i not in special.values()})
    vocab.update(special)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    backend = Tokenizer(BPE(vocab=vocab, merges=MERGES, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(tokenizer_object=backend, vocab=vocab, merges=MERGES, unk_token=None,
                              bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              additional_special_tokens=[t for t in special
                                                         if t != "<|endoftext|>"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(checkpoint folder = golden model files + the tiny tokenizer, that tokenizer)."""
    torch.set_num_threads(1)
    tok = tiny_qwen2_tokenizer()
    d = tmp_path_factory.mktemp("qwen2tok")
    for f in ("llm_config.json", "bagel_config.json", "ema.safetensors"):
        shutil.copyfile(FIX / f, d / f)
    tok.save_pretrained(d)
    return d, tok


def load(d):
    return checkpoint.from_pretrained(d, dtype=torch.float32).eval()


def test_tiny_tokenizer_is_qwen2_like():
    tok, V = tiny_qwen2_tokenizer(), json.loads((FIX / "llm_config.json").read_text())["vocab_size"]
    assert len(tok) <= V
    for t, i in special_ids().items():
        assert tok.convert_tokens_to_ids(t) == i and tok.decode([i]) == t
        assert tok.encode(t) == [i]                                 # special text -> the special id
    # merges apply
    assert tok.convert_ids_to_tokens(tok.encode("a red cube")) == ["a", "Ġred", "Ġcube"]
    for s in TEXTS:
        assert tok.encode(s) == tok.encode(s, add_special_tokens=False)      # Qwen2 adds no BOS/EOS
        assert tok.decode(tok.encode(s)) == s                                # byte-level: lossless


def test_from_pretrained_picks_up_the_tokenizer(folder):
    d, tok = folder
    policy = load(d)
    assert (isinstance(policy.tokenizer, PreTrainedTokenizerBase)
            and isinstance(policy.tokenizer, Qwen2TokenizerFast))
    c, sp = policy.cfg, special_ids()
    assert (c.im_start_id, c.im_end_id, c.vision_start_id, c.vision_end_id) == \
        tuple(sp[t] for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"))
    for t, i in sp.items():
        assert policy.tokenizer.convert_tokens_to_ids(t) == i
    for s in TEXTS:
        assert policy.tokenizer.encode(s) == tok.encode(s)
    prompts = ["a red cube", "two cats, and a red cube!"]
    th = policy.think(prompts, n=1, max_new_tokens=0)                # no reasoning: no system chunk
    assert th.ids.shape == (2, 0) and th.texts == ["", ""]
    for r, p in enumerate(prompts):
        want = [c.im_start_id] + tok.encode(p, add_special_tokens=False) + [c.im_end_id]
        assert th.prompt_ids[r][th.prompt_mask[r]].tolist() == want
        assert (th.prompt_mask[r].tolist()
                == [True] * len(want) + [False] * (th.prompt_ids.shape[1] - len(want)))
        assert (th.prompt_ids[r][~th.prompt_mask[r]] == c.pad_id).all()
    assert th.prompt_mask.sum(1).tolist()[0] < th.prompt_mask.sum(1).tolist()[1]   # ragged prompts


def test_think_texts_are_decoded_samples(folder):
    d, tok = folder
    policy = load(d)
    c = policy.cfg
    # a larger stop-token logit, so that some rows stop within a few steps (ragged rows)
    with torch.no_grad():
        policy.model.language_model.lm_head.weight[c.im_end_id].mul_(8.0)
    prompts, n, T = ["a red cube", "two cats"], 2, 4
    system = [c.im_start_id] + tok.encode(c.think_system_prompt) + [c.im_end_id]
    stopped = truncated = 0
    for seed in range(4):
        th = policy.think(prompts, n=n, max_new_tokens=T, temperature=1.0,
                          generator=torch.Generator().manual_seed(seed))
        R = len(prompts) * n
        assert (th.ids.shape == th.mask.shape == th.logp.shape and th.ids.shape[0] == R
                and th.ids.shape[1] <= T)
        assert len(th.texts) == R
        for r in range(R):
            L = int(th.mask[r].sum())
            # right-padded
            assert th.mask[r].tolist() == [True] * L + [False] * (th.ids.shape[1] - L)
            assert ((th.ids[r][~th.mask[r]] == c.pad_id).all()
                    and (th.logp[r][~th.mask[r]] == 0).all())
            assert (th.logp[r][th.mask[r]] < 0).all()
            ids = th.ids[r][th.mask[r]].tolist()
            if c.im_end_id in ids:                                           # stop token kept, last
                assert ids.index(c.im_end_id) == L - 1
                stopped += L < T
            else:
                assert L == T
                truncated += 1
            assert th.texts[r] == tok.decode([i for i in ids if i != c.im_end_id])
            want = system + [c.im_start_id] + tok.encode(prompts[r // n]) + [c.im_end_id]
            assert th.prompt_ids[r][th.prompt_mask[r]].tolist() == want
    assert stopped and truncated, (stopped, truncated)


def test_save_pretrained_round_trips_the_tokenizer(folder, tmp_path):
    d, tok = folder
    policy = load(d)
    checkpoint.save_pretrained(policy, tmp_path / "out")
    assert ((tmp_path / "out" / "tokenizer_config.json").is_file()
            and (tmp_path / "out" / "tokenizer.json").is_file())
    again = load(tmp_path / "out")
    assert type(again.tokenizer) is type(policy.tokenizer) and len(again.tokenizer) == len(tok)
    for s in TEXTS + [policy.cfg.think_system_prompt]:
        assert again.tokenizer.encode(s) == policy.tokenizer.encode(s) == tok.encode(s)
    for t, i in special_ids().items():
        assert again.tokenizer.convert_tokens_to_ids(t) == i
    a, b = (p.think(["a red cube", "two cats"], n=1, max_new_tokens=0) for p in (policy, again))
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
