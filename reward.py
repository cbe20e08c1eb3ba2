"""The reward interface: images and their prompts in, one float per image out. A reward scores
only the final image (UniGRPO's sparse terminal reward); it knows no model of ours and no RL.

    reward_fn(images (R, 3, H, W) in [0, 1], prompts (R,)) -> rewards (R,)

The toy world's exact verifier is toy.ToyReward. GenEval's prompt metadata (its six categories,
which the toy world's prompts share) is read here, for the GenEval-style rewards and evaluation of
the Bagel path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

# GenEval's tags
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@runtime_checkable
class RewardModel(Protocol):
    """What every reward model implements: images (R, 3, H, W) in [0, 1] and their R prompts in,
    one float reward per image out, shape (R,). The toy world's is toy.ToyReward; real ones
    (GenEval-style checkers, learned scorers) for the Bagel path load their weights in __init__ and
    implement the same call."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor: ...


def load_geneval(path: str | Path) -> list[dict]:
    """GenEval's evaluation_metadata.jsonl: one dict per non-blank line with tag, include,
    exclude ([] when absent) and prompt."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: bad JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            for key in ("tag", "include", "prompt"):
                if key not in row:
                    raise ValueError(f"{path}:{line_no}: missing key {key!r}")
            if row["tag"] not in CATEGORIES:
                raise ValueError(f"{path}:{line_no}: unknown tag {row['tag']!r}")
            rows.append({"tag": row["tag"], "include": row["include"],
                         "exclude": row.get("exclude", []), "prompt": row["prompt"]})
    return rows

