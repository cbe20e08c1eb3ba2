"""Prompt files (prompts.py): the three formats, errors naming file and line, the training stream."""
import json
from pathlib import Path

import pytest

import prompts

GENEVAL = Path(__file__).parent / "fixtures" / "geneval" / "evaluation_metadata.jsonl"


def test_text_file_one_prompt_a_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n  two cats  \n")
    got = prompts.load_prompts(f)
    assert [p.text for p in got] == ["a red cube", "two cats"]
    assert all(p.metadata == {} and p.category == "" for p in got)


def test_jsonl_keeps_other_keys_as_metadata(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a dog", "source": "x", "id": 3}) + "\n\n"
                 + json.dumps({"prompt": "a cat"}) + "\n")
    got = prompts.load_prompts(f)
    assert [(p.text, p.metadata) for p in got] == [("a dog", {"source": "x", "id": 3}), ("a cat", {})]


def test_genevals_own_metadata_file():
    rows = [json.loads(line) for line in GENEVAL.read_text().splitlines() if line.strip()]
    got = prompts.load_prompts(GENEVAL)
    assert len(got) == len(rows) > 500
    assert [p.text for p in got] == [r["prompt"] for r in rows]
    assert [p.category for p in got] == [r["tag"] for r in rows]
    assert got[0].metadata["include"] == rows[0]["include"]
    assert prompts.needs_metadata_error(got, GENEVAL) is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "bad JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "a dog"}', 'non-empty string "prompt"'),
    ('{"prompt": "  "}', 'non-empty string "prompt"'),
    ('{"prompt": "a dog", "tag": "colour", "include": [{"class": "dog", "count": 1}]}', "colour"),
    ('{"prompt": "a dog", "tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}]}',
     "teal"),
])
def test_a_bad_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3") as e:
        prompts.load_prompts(f)
    assert message in str(e.value)


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        prompts.load_prompts(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        prompts.load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8"):
        prompts.load_prompts(tmp_path / "bin.txt")


def test_prompts_without_metadata_are_named(tmp_path):
    rows = [prompts.Prompt("a", {"tag": "single_object", "include": []}), prompts.Prompt("plain text")]
    message = prompts.needs_metadata_error(rows, "f.txt")
    assert "f.txt: prompt 2" in message and "plain text" in message


def test_batches_cover_each_epoch_once_and_repeat_with_the_seed():
    ps = [prompts.Prompt(f"p{i}") for i in range(7)]
    stream = [p.text for step in range(7) for p in prompts.batch(ps, seed=3, step=step, n=3)]
    for epoch in range(3):                                 # 21 draws = 3 epochs of 7
        assert sorted(stream[7 * epoch:7 * epoch + 7]) == sorted(p.text for p in ps)
    assert stream[:7] != stream[7:14]                      # each epoch is its own shuffle
    assert [p.text for p in prompts.batch(ps, 3, 4, 3)] == stream[12:15]   # resumable: step-addressed
    assert [p.text for p in prompts.batch(ps, 4, 0, 7)] != stream[:7]
