"""The tutorials as committed: four notebooks, outputs stripped, each opening with what it teaches and
what it assumes and ending with a code cell that states what the reader has seen. (Running them is
pytest's --nbmake, on tutorials/ itself.)"""
import json
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


def test_the_four_tutorials_exist_in_order():
    assert [p.name[:3] for p in TUTORIALS] == ["01_", "02_", "03_", "04_"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_their_frame(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), "strip the outputs"
    opening = "".join(cells[0]["source"])
    assert "**What this teaches.**" in opening and "**What it assumes.**" in opening
    assert "".join(cells[-2]["source"]).strip() == "## What you have seen" and cells[-1] in code
    assert any("plt.show()" in "".join(c["source"]) or "display(" in "".join(c["source"]) for c in code)
