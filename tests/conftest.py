"""What the tests share: a tokenizer stub for the golden checkpoint (its prompts are ids written as
text) and a random init with non-trivial weights."""
import math

import pytest
import torch


class IdTokenizer:
    """Text of space-separated ids <-> ids (the golden fixtures' prompts are ids)."""

    def encode(self, text):
        return [int(x) for x in text.split()]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def randomize_weights(policy, seed):
    """Fixture-style weights (norms 1 + 0.1 N, biases 0.05 N, matrices N/sqrt(fan_in)) so nothing is
    trivial; Bagel's own init zeroes llm2vae, which would make every velocity path agree."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if name.startswith("latent_pos_embed."):
                continue
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if "norm" in name else 0.05 * r if p.ndim == 1
                    else r / math.sqrt(p.shape[-1]) if "embed_tokens" not in name else r)
    return policy


@pytest.fixture(scope="session")
def id_tokenizer():
    return IdTokenizer()


@pytest.fixture(scope="session")
def randomize():
    return randomize_weights


@pytest.fixture(scope="session")
def smoke():
    """The toy preset at smoke size: a short SFT, 4 RL steps of 2 prompts x 4 chains, a tiny eval."""
    return ["--toy", "--sft_steps=30", "--sft_batch=16", "--rl_steps=4", "--prompts_per_step=2",
            "--group_size=4", "--eval_per_category=2", "--eval_steps=4", "--num_steps=6",
            "--window_start=0,2", "--window_size=2", "--ckpt_every=2"]


def spread(images, prompts):
    """A reward with spread inside every group (the mean pixel), so that smoke-size RL steps really move
    the weights: the toy's verifier gives all of a barely trained policy's images the same score."""
    return images.mean((1, 2, 3))


@pytest.fixture
def spread_reward(monkeypatch):
    """train.main with the `spread` reward (returns the function, for a subprocess to install too)."""
    import train
    monkeypatch.setattr(train, "build_reward", lambda cfg: spread)
    return spread


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a policy, a reward model or a processor is loaded: bad input must be reported
    before any model work."""
    import checkpoint
    import reward

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")
    for module, name in ((checkpoint, "from_pretrained"), (reward, "_load"), (reward, "_processor")):
        monkeypatch.setattr(module, name, refuse)
