"""Prompt sets of the Bagel path: a file of prompts in, a list of `Prompt` (text + metadata) out,
and the deterministic stream of training batches drawn from it.

    --prompts=train.txt           one prompt a line (blank lines skipped)
    --prompts=train.jsonl         {"prompt": "...", any other keys kept as metadata}
    --prompts=evaluation_metadata.jsonl   GenEval's own file: JSONL whose rows carry tag / include

A JSONL row with GenEval keys (`tag` or `include`) is checked against GenEval's metadata rules
(geneval.check_metadata), so a wrong tag stops the run here, naming the file and line, before any
model is loaded. The toy world draws its own prompts (toy.train_prompts).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

GENEVAL_KEYS = ("tag", "include")


@dataclass(frozen=True)
class Prompt:
    """One prompt: the text the policy reads and the metadata a reward may need (GenEval's
    tag / include / exclude; {} for plain text)."""
    text: str
    metadata: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def category(self) -> str:
        """GenEval's tag, or "" (per-category scores group by it)."""
        return str(self.metadata.get("tag", ""))


def load_prompts(path) -> list[Prompt]:
    """Every prompt of a .txt or .jsonl file; a bad line raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompt file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jsonl = path.suffix == ".jsonl"
    rows = [(_row(path, i, line) if jsonl else Prompt(line.strip()))
            for i, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return rows


def json_object(where: str, line: str) -> dict:
    """One JSONL line as a dict; a ValueError starting with `where` (file:line) otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: bad JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _row(path: Path, line_no: int, line: str) -> Prompt:
    where = f"{path}:{line_no}"
    row = json_object(where, line)
    text = row.pop("prompt", None)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: needs a non-empty string \"prompt\"")
    if any(k in row for k in GENEVAL_KEYS):
        import geneval
        geneval.check_metadata(row, where)
    return Prompt(text.strip(), row)


def batch(prompts: list[Prompt], seed: int, step: int, n: int) -> list[Prompt]:
    """The n prompts of RL step `step`: epochs of seeded shuffles of the set, read in order, so
    every prompt is seen once per epoch and a resumed run draws the same batches."""
    out, orders = [], {}
    for k in range(step * n, (step + 1) * n):
        epoch, i = divmod(k, len(prompts))
        if epoch not in orders:
            orders[epoch] = list(range(len(prompts)))
            random.Random(f"{seed}:{epoch}").shuffle(orders[epoch])
        out.append(prompts[orders[epoch][i]])
    return out


def needs_metadata_error(prompts: list[Prompt], path) -> str | None:
    """A message naming the first prompt without GenEval metadata, or None when all have it."""
    for i, p in enumerate(prompts):
        if not all(k in p.metadata for k in GENEVAL_KEYS):
            return (f"{path}: prompt {i + 1} ({p.text[:40]!r}) has no GenEval metadata (tag, include), "
                    f"which the geneval reward needs")
    return None
