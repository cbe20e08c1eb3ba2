"""The reward interface (reward.py): the toy's verifier implements the protocol; GenEval metadata
loads with errors that name the file and line."""
import json

import pytest

import reward
import toy


def test_toy_reward_is_a_reward_model():
    assert isinstance(toy.ToyReward(), reward.RewardModel)


def test_load_geneval(tmp_path):
    rows = [{"tag": "counting", "include": [{"class": "clock", "count": 2}],
             "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"},
            {"tag": "single_object", "include": [{"class": "cow", "count": 1}],
             "prompt": "a photo of a cow"}]
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    got = reward.load_geneval(path)
    assert got == [rows[0], {**rows[1], "exclude": []}]
    for text, msg in [('{"tag": "colors", "include": []', "bad JSON"),
                      ('{"tag": "colors", "include": []}', "'prompt'"),
                      ('{"tag": "nope", "include": [], "prompt": "x"}', "unknown tag"),
                      ("[1]", "JSON object")]:
        path.write_text(json.dumps(rows[1]) + "\n" + text + "\n")
        with pytest.raises(ValueError, match=f"meta.jsonl:2: .*{msg}"):
            reward.load_geneval(path)
    with pytest.raises(FileNotFoundError):
        reward.load_geneval(tmp_path / "missing.jsonl")
