"""GenEval's decision rules (geneval.py) against the golden cases in fixtures/geneval_rules/cases.json,
verdicts of GenEval's own evaluate_images.py with the detector and CLIP stubbed. Everything per case
comes from the JSON, so another case file of the same format can be dropped in. Then closed-form
checks of the relation set, thresholds, the cap and metadata validation, and the official metadata.
"""
import json
import re
from pathlib import Path

import pytest

from geneval import (DEFAULT_OPTIONS, PALETTE, TAGS, Detection, check_metadata, evaluate_metadata,
                     filter_detections, relation_set)

FIXTURES = Path(__file__).parent / "fixtures"
CASES = json.loads((FIXTURES / "geneval_rules" / "cases.json").read_text())["cases"]
POSITION_LINE = re.compile(r"^expected (.+) (left of|right of|above|below) target, found (.*) target$")


def test_cases_are_loaded():
    assert len(CASES) >= 10
    ids = [c["id"] for c in CASES]
    assert len(set(ids)) == len(ids)
    assert {c["metadata"]["tag"] for c in CASES} <= set(TAGS)
    assert any(c["expected"]["correct"] for c in CASES) and not all(c["expected"]["correct"] for c in CASES)
    for case in CASES:  # detection ids key the colour stub and the expected lists
        det_ids = [d["id"] for d in case["detections"]]
        assert len(set(det_ids)) == len(det_ids), case["id"]


def _relation_words(line):
    m = POSITION_LINE.match(line)
    assert m, f"not a position line: {line!r}"
    return m.group(1), m.group(2), set(m.group(3).split(" and ")) - {""}


def _same_reason_lines(got, want, unordered_relations):
    if not unordered_relations:
        return got == want
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if POSITION_LINE.match(w):
            if not POSITION_LINE.match(g) or _relation_words(g) != _relation_words(w):
                return False
        elif g != w:
            return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_golden_case(case):
    dets = [Detection(cls=d["class"], box=tuple(d["box"]), score=d["score"], id=d["id"])
            for d in case["detections"]]
    colour_of = {d["id"]: d.get("color") for d in case["detections"]}

    def stub(cls, candidates):
        for det in candidates:
            assert det.cls == cls
            if colour_of[det.id] is None:
                pytest.fail(f"colour asked for {det.id}, which has none in the case")
        return [colour_of[det.id] for det in candidates]

    v = evaluate_metadata(case["metadata"], dets, stub, case["options"])
    want = case["expected"]
    unordered = want["reason_relation_order_unspecified"]

    assert v.correct is want["correct"]
    assert _same_reason_lines(v.reason_lines, want["reason_lines"], unordered), (v.reason_lines,
                                                                               want["reason_lines"])
    assert _same_reason_lines(v.reason.split("\n") if v.reason else [],
                              want["reason"].split("\n") if want["reason"] else [], unordered)
    assert v.reason == "\n".join(v.reason_lines)
    if not unordered:
        assert v.reason == want["reason"]
    assert {cls: [d.id for d in ds] for cls, ds in v.kept.items()} == want["kept"]
    assert [(cls, [d.id for d in ds], colours) for cls, ds, colours in v.color_queries] == \
        [(q["class"], q["detections"], q["colors"]) for q in want["color_queries"]]
    assert [(a.id, b.id, rels) for a, b, rels in v.relations_checked] == \
        [(r["object"], r["target"], r["relations"]) for r in want["relations_checked"]]
    n_points = sum(1 + ("color" in c) + ("position" in c) for c in case["metadata"]["include"])
    assert len(v.points) == n_points + len(case["metadata"].get("exclude", []))
    assert all(v.points) == want["correct"]


# ---- the relation set, in closed form ------------------------------------------------------------

def _box(cx, cy, w, h):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


@pytest.mark.parametrize("w_a,w_b", [(100, 100), (40, 160), (30, 70)])
def test_relation_horizontal_gap_threshold(w_a, w_b):
    """Pure horizontal offset: A is left of B iff the centre gap exceeds 0.2 * (wA + wB)."""
    gap = 0.2 * (w_a + w_b)
    for delta, expect_left in [(0.5, True), (0.0, False), (-0.5, False)]:
        a, b = _box(200 - (gap + delta), 200, w_a, 50), _box(200, 200, w_b, 50)
        assert relation_set(a, b) == ({"left of"} if expect_left else set()), delta
        assert relation_set(b, a) == ({"right of"} if expect_left else set()), delta


def test_relation_vertical_gap_uses_heights():
    a, b = _box(200, 100, 10, 60), _box(200, 200, 10, 60)  # gap 100 > 0.2 * 120
    assert relation_set(a, b) == {"above"} and relation_set(b, a) == {"below"}
    a = _box(200, 200 - 24, 10, 60)  # gap 24 == 0.2 * 120
    assert relation_set(a, b) == set()


def test_relation_diagonal_needs_axis_share():
    a, b = _box(100, 100, 1, 1), _box(150, 200, 1, 1)  # offset (-50, -100): nx ~ -0.43
    assert relation_set(a, b) == {"above"}
    a = _box(50, 100, 1, 1)  # offset (-100, -100): both axes beyond 0.5
    assert relation_set(a, b) == {"left of", "above"}


def test_relation_coincident_centres_is_empty():
    assert relation_set((10, 10, 50, 50), (0, 0, 60, 60)) == set()
    assert relation_set((10, 10, 10, 10), (10, 10, 10, 10)) == set()
    # a shrunk offset under 1e-3 counts as none, though its direction is clear
    assert relation_set((0, 0, 0, 0), (0.0009, 0, 0.0009, 0)) == set()
    assert relation_set((0, 0, 0, 0), (0.002, 0, 0.002, 0)) == {"left of"}


def test_relation_margin_is_a_parameter():
    a, b = _box(100, 100, 100, 10), _box(150, 100, 100, 10)  # gap 50: 0.2*200 = 40 < 50 < 0.3*200
    assert relation_set(a, b) == {"left of"}
    assert relation_set(a, b, margin=0.15) == set()


# ---- filtering -----------------------------------------------------------------------------------

def _dets(cls, scores):
    return [Detection(cls, (10 * i, 0, 10 * i + 50, 50), s, id=f"d{i}") for i, s in enumerate(scores)]


def test_threshold_is_strict():
    kept = filter_detections(_dets("cow", [0.3, 0.3001, 0.2999]), "single_object")
    assert [d.id for d in kept["cow"]] == ["d1"]
    assert filter_detections(_dets("cow", [0.9, 0.8]), "counting") == {}
    kept = filter_detections(_dets("cow", [0.9, 0.9001, 0.95]), "counting")
    assert [d.id for d in kept["cow"]] == ["d2", "d1"]
    assert filter_detections(_dets("cow", [0.3]), "position", {"threshold": "0.25"})["cow"]


def test_cap_of_sixteen_per_class_after_threshold():
    scores = [0.31 + 0.01 * i for i in range(20)] + [0.1] * 5
    kept = filter_detections(_dets("cup", scores) + _dets("bowl", [0.5] * 3), "single_object")
    assert DEFAULT_OPTIONS["max_objects"] == 16
    assert [d.id for d in kept["cup"]] == [f"d{i}" for i in range(19, 3, -1)]
    assert len(kept["bowl"]) == 3
    assert len(filter_detections(_dets("cup", scores), "colors", {"max_objects": 3})["cup"]) == 3


def test_exclude_count_is_capped():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 2}],
            "exclude": [{"class": "cup", "count": 17}]}
    v = evaluate_metadata(meta, _dets("cup", [0.91 + 0.001 * i for i in range(20)]), None)
    assert v.correct and v.points == [True, True]


def test_duplicates_count_unless_nms_is_on():
    dets = [Detection("dog", (0, 0, 100, 100), 0.95, "a"), Detection("dog", (1, 0, 101, 100), 0.93, "b"),
            Detection("dog", (300, 0, 400, 100), 0.92, "c")]
    assert len(filter_detections(dets, "counting")["dog"]) == 3
    assert [d.id for d in filter_detections(dets, "counting", {"max_overlap": "0.5"})["dog"]] == ["a", "c"]


def test_nms_off_by_default_keeps_identical_boxes():
    dets = [Detection("dog", (0, 0, 100, 100), s, i) for s, i in [(0.95, "a"), (0.93, "b")]]
    assert [d.id for d in filter_detections(dets, "counting")["dog"]] == ["a", "b"]
    assert [d.id for d in filter_detections(dets, "counting", {"max_overlap": 0.99})["dog"]] == ["a"]


def test_nms_iou_counts_pixels_inclusively():
    """(0,0,9,9) vs (5,0,14,9): inclusive IoU 50/150 = 1/3 (exclusive would be 36/126 < 0.3)."""
    dets = [Detection("dog", (0, 0, 9, 9), 0.95, "a"), Detection("dog", (5, 0, 14, 9), 0.93, "b"),
            Detection("cat", (5, 0, 14, 9), 0.93, "c")]
    kept = filter_detections(dets, "counting", {"max_overlap": "0.3"})
    assert [d.id for d in kept["dog"]] == ["a"] and [d.id for d in kept["cat"]] == ["c"]
    kept = filter_detections(dets, "counting", {"max_overlap": "0.34"})
    assert [d.id for d in kept["dog"]] == ["a", "b"]


def test_options_accept_strings_and_numbers_and_reject_unknown():
    dets = _dets("cat", [0.5])
    assert filter_detections(dets, "two_object", {"threshold": "0.6"}) == {}
    assert filter_detections(dets, "two_object", {"threshold": 0.6}) == {}
    with pytest.raises(ValueError, match="^options: unknown key 'treshold'"):
        filter_detections(dets, "two_object", {"treshold": 0.6})
    with pytest.raises(ValueError, match="^options: max_objects"):
        filter_detections(dets, "two_object", {"max_objects": "2.5"})


# ---- metadata validation -------------------------------------------------------------------------

def _meta(**kw):
    meta = {"tag": "position", "include": [{"class": "bowl", "count": 1},
                                           {"class": "cup", "count": 1, "position": ["left of", 0]}]}
    meta.update(kw)
    return meta


def test_check_metadata_accepts_a_valid_entry():
    check_metadata(_meta())
    check_metadata(_meta(exclude=[]))


@pytest.mark.parametrize("meta,pattern", [
    ([], r"^m: expected a JSON object"),
    ({"include": [{"class": "cup", "count": 1}]}, r"^m: missing key 'tag'"),
    ({"tag": "colors"}, r"^m: missing key 'include'"),
    (_meta(tag="countng"), r"^m: unknown tag 'countng'.*single_object, two_object, counting"),
    (_meta(include=[]), r"^m: 'include' must be a non-empty list"),
    (_meta(include=[{"class": 3, "count": 1}]), r"^m\.include\[0\]: 'class'"),
    (_meta(include=[{"class": "cup", "count": 0}]), r"^m\.include\[0\]: 'count'"),
    (_meta(include=[{"class": "cup", "count": True}]), r"^m\.include\[0\]: 'count'"),
    (_meta(include=[{"class": "cup", "count": 1, "color": "grey"}]), r"^m\.include\[0\]: colour 'grey'"),
    (_meta(include=[{"class": "cup", "count": 1, "position": ["left of", 1]},
                    {"class": "bowl", "count": 1}]), r"^m\.include\[0\]: position target 1"),
    (_meta(include=[{"class": "bowl", "count": 1}, {"class": "cup", "count": 1, "position": ["left of", 1]}]),
     r"^m\.include\[1\]: position target 1"),
    (_meta(include=[{"class": "bowl", "count": 1}, {"class": "cup", "count": 1, "position": ["near", 0]}]),
     r"^m\.include\[1\]: 'position'"),
    (_meta(include=[{"class": "bowl", "count": 1}, {"class": "cup", "count": 1, "position": ["above", "0"]}]),
     r"^m\.include\[1\]: 'position'"),
    (_meta(exclude={"class": "cup", "count": 2}), r"^m: 'exclude' must be a list"),
    (_meta(exclude=[{"class": "cup"}]), r"^m\.exclude\[0\]: 'count'"),
    (_meta(exclude=[{"class": "cup", "count": 2, "color": "red"}]), r"^m\.exclude\[0\]: unknown key"),
])
def test_check_metadata_errors(meta, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_metadata(meta, where="m")


def test_evaluate_rejects_bad_colour_callback():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    dets = [Detection("car", (0, 0, 10, 10), 0.8)]
    with pytest.raises(ValueError, match="classify_colour"):
        evaluate_metadata(meta, dets, lambda cls, c: ["grey"])


# ---- the official prompt set ---------------------------------------------------------------------

def test_official_metadata_passes_check_and_uses_known_classes():
    names = (FIXTURES / "geneval" / "object_names.txt").read_text().split("\n")
    names = {n.strip() for n in names if n.strip()}
    assert len(names) == 80
    lines = [ln for ln in (FIXTURES / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
             if ln.strip()]
    assert len(lines) == 553
    for i, line in enumerate(lines, 1):
        meta = json.loads(line)
        check_metadata(meta, where=f"line {i}")
        for clause in meta["include"] + meta.get("exclude", []):
            assert clause["class"] in names, (i, clause["class"])
            assert clause.get("color", "red") in PALETTE
