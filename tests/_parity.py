"""What the parity tests against the official BAGEL fixtures share: loading a fixture checkpoint the way
the official harness ran it, and comparing at the fixtures' tolerances (README: atol = rtol = 1e-4 for
floats, integers exact)."""
import json

import pytest
import torch

import checkpoint

TOL = dict(atol=1e-4, rtol=1e-4)


def load_fixture_policy(folder, tokenizer):
    """The fixture checkpoint in fp32, no think-mode system prompt, on 1 thread (the fixtures' setting)."""
    torch.set_num_threads(1)
    return checkpoint.from_pretrained(folder, dtype=torch.float32, tokenizer=tokenizer,
                                      think_system_prompt=None).eval()


def close(actual, expected, what, **tol):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    torch.testing.assert_close(actual.float(), expected.float(), **(tol or TOL), msg=lambda m: f"{what}: {m}")


def exact(actual, expected, what):
    assert actual.tolist() == expected.tolist(), f"{what}: {actual.tolist()} vs {expected.tolist()}"


def fixtures_of(folder):
    """The module-scoped `meta` (meta.json) and `policy` fixtures of a fixture folder: in a test module,
    `meta, policy = fixtures_of(FIX)`."""
    @pytest.fixture(scope="module")
    def meta():
        return json.loads((folder / "meta.json").read_text())

    @pytest.fixture(scope="module")
    def policy(id_tokenizer):
        return load_fixture_policy(folder / "model", id_tokenizer)
    return meta, policy
