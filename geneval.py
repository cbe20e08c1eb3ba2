"""GenEval's decision rules in plain Python: which detections count, and whether an image satisfies
its prompt's metadata. No detector and no CLIP live here; detections come in as a list and colours
come from a callback, so the rules can be tested on their own and shared by every GenEval-style
reward and evaluation.

Written from the golden fixtures' README (tests/fixtures/geneval_rules/README.md; GenEval's
evaluation/evaluate_images.py, commit af4902f) and held to its cases by tests/test_geneval_rules.py.

    check_metadata(metadata)                   cheap validation, run by the prompt loader
    filter_detections(detections, tag)         per class: threshold, sort, cap, optional NMS
    relation_set(box_a, box_b)                 where box A lies relative to box B
    evaluate_metadata(metadata, detections, classify_colour) -> Verdict

Glossary
  clause       one entry of `include` ({class, count, color?, position?}) or `exclude` ({class, count})
  kept         a class's detections after filtering, highest score first
  candidates   an include clause's first `count` kept objects; only they are colour- or position-checked
  group i      the candidates of include clause i if it passed, else none; `position: [REL, i]` refers
               to it (the target)
  relation set the subset of {left of, right of, above, below} that describes box A relative to box B
  exam points  one boolean per check (see evaluate_metadata); TA-style score = their mean,
               GenEval's correct = all of them

Where ours differs from GenEval
- Detections are a flat list of Detection rather than mmdet's per-class arrays. Equal scores within a
  class are ordered like GenEval's np.argsort(scores)[::-1] applied to the list order.
- Masks are optional: the rules never read them, and a colour classifier given a detection without
  one crops the unmasked box, as GenEval's own no-mask path does (Mask2Former always has masks).
- Colour classification is the caller's callback (GenEval: open_clip ViT-L-14 on grey-backed crops).
- A position reason line lists its relation words in the fixed order left of, right of, above,
  below; GenEval joins a Python set, whose order changes with PYTHONHASHSEED.
- Malformed metadata and unknown option keys raise ValueError before anything is evaluated;
  GenEval fails mid-way (KeyError, IndexError) or silently ignores unknown keys.
- Exam points and the TA-style score are ours; GenEval only says correct or not.
The rules themselves (thresholds, cap, NMS, counts, colours, relations, excludes, reason strings)
are GenEval's, with its float32 arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

PALETTE = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
DEFAULT_OPTIONS = {"threshold": 0.3, "counting_threshold": 0.9, "max_objects": 16, "max_overlap": 1.0,
                   "position_threshold": 0.1}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

_OPTION_TYPES = {"threshold": float, "counting_threshold": float, "max_objects": int,
                 "max_overlap": float, "position_threshold": float}
_CROP_OPTIONS = ("bgcolor", "crop")  # GenEval options that only shape the colour crops
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


@dataclass(frozen=True)
class Detection:
    """One detected instance: GenEval class name, box (x1, y1, x2, y2) in pixels (x right, y down),
    score, a free label, and optionally a boolean HxW mask for colour crops."""
    cls: str
    box: tuple
    score: float
    id: str = ""
    mask: object = field(default=None, compare=False, repr=False)  # arrays do not compare as bools

    def __post_init__(self):
        if not isinstance(self.cls, str):
            raise TypeError(f"Detection.cls must be a str, got {type(self.cls).__name__}")
        box = tuple(float(v) for v in self.box)
        if len(box) != 4:
            raise ValueError(f"Detection.box must be (x1, y1, x2, y2), got {len(box)} values")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "score", float(self.score))


@dataclass
class Verdict:
    """GenEval's verdict on one image plus what led to it (see evaluate_metadata)."""
    correct: bool
    reason: str
    reason_lines: list[str]
    kept: dict[str, list[Detection]]
    color_queries: list[tuple[str, list[Detection], list[str]]]
    relations_checked: list[tuple[Detection, Detection, list[str]]]
    points: list[bool]

    @property
    def ta(self) -> float:
        """TA-style score: the mean of the exam points."""
        return sum(self.points) / len(self.points)


# ---- metadata and options -------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_clause(clause, where: str, allowed: set) -> None:
    if not isinstance(clause, dict):
        raise ValueError(f"{where}: expected an object {{class, count, ...}}, got {type(clause).__name__}")
    extra = sorted(set(clause) - allowed)
    if extra:  # a misspelt key would otherwise be ignored and the check silently skipped
        raise ValueError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")
    if not isinstance(clause.get("class"), str) or not clause["class"]:
        raise ValueError(f"{where}: 'class' must be a non-empty string, got {clause.get('class')!r}")
    if not _is_int(clause.get("count")) or clause["count"] < 1:
        raise ValueError(f"{where}: 'count' must be a positive int, got {clause.get('count')!r}")


def check_metadata(metadata: dict, where: str = "metadata") -> None:
    """Raise ValueError (message starting with `where`) unless `metadata` is a GenEval entry that
    evaluate_metadata can judge: a known tag, a non-empty include list of {class, count, color?,
    position?}, colours from PALETTE, positions [REL, j] naming an earlier include clause, and an
    optional exclude list of {class, count}. Other top-level keys (prompt, ...) are ignored."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    for key in ("tag", "include"):
        if key not in metadata:
            raise ValueError(f"{where}: missing key {key!r}")
    if metadata["tag"] not in TAGS:
        raise ValueError(f"{where}: unknown tag {metadata['tag']!r}; expected one of {', '.join(TAGS)}")
    include = metadata["include"]
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list of clauses")
    for i, clause in enumerate(include):
        at = f"{where}.include[{i}]"
        _check_clause(clause, at, _INCLUDE_KEYS)
        if "color" in clause and clause["color"] not in PALETTE:
            raise ValueError(f"{at}: colour {clause['color']!r} is not one of {', '.join(PALETTE)}")
        if "position" in clause:
            pos = clause["position"]
            if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not _is_int(pos[1])):
                raise ValueError(f"{at}: 'position' must be [REL, j] with REL one of "
                                 f"{', '.join(RELATIONS)} and j an int, got {pos!r}")
            if not 0 <= pos[1] < i:
                raise ValueError(f"{at}: position target {pos[1]} is not an earlier include clause "
                                 f"(0..{i - 1})")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{where}: 'exclude' must be a list of clauses")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"{where}.exclude[{i}]", _EXCLUDE_KEYS)


def _options(options: Mapping | None) -> dict:
    """DEFAULT_OPTIONS with `options` (strings, as on GenEval's command line, or numbers) merged over."""
    merged = dict(DEFAULT_OPTIONS)
    for key, value in (options or {}).items():
        if key in _CROP_OPTIONS:
            continue
        if key not in _OPTION_TYPES:
            raise ValueError(f"options: unknown key {key!r}; known: {', '.join(_OPTION_TYPES)}, "
                             f"{', '.join(_CROP_OPTIONS)}")
        kind = _OPTION_TYPES[key]
        bad = isinstance(value, bool) or (kind is int and isinstance(value, float)
                                           and not value.is_integer())
        try:
            merged[key] = kind(value)
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise ValueError(f"options: {key} must be a {kind.__name__}, got {value!r}")
    if merged["max_objects"] < 0:
        raise ValueError(f"options: max_objects must be >= 0, got {merged['max_objects']}")
    return merged


# ---- filtering --------------------------------------------------------------------------------------

def _iou(box_a, box_b) -> np.float32:
    """GenEval's IoU: inclusive pixel areas (+1), float32 like the detector's boxes."""
    a, b = np.asarray(box_a, np.float32), np.asarray(box_b, np.float32)

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return np.float32(inter / union) if union else np.float32(0)


def filter_detections(detections: Iterable[Detection], tag: str,
                      options: Mapping | None = None) -> dict[str, list[Detection]]:
    """Per class: keep score > T (T = counting_threshold for tag "counting", else threshold; float32,
    strict), highest score first, at most max_objects, then greedy NMS dropping IoU >= max_overlap
    (off at the default 1.0). Classes with nothing left are left out."""
    if tag not in TAGS:
        raise ValueError(f"tag: unknown tag {tag!r}; expected one of {', '.join(TAGS)}")
    opts = _options(options)
    threshold = np.float32(opts["counting_threshold"] if tag == "counting" else opts["threshold"])
    max_overlap = np.float32(opts["max_overlap"])
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if not isinstance(det, Detection):
            raise TypeError(f"detections must be Detection objects, got {type(det).__name__}")
        by_class.setdefault(det.cls, []).append(det)
    kept = {}
    for cls, dets in by_class.items():
        scores = np.array([d.score for d in dets], dtype=np.float32)
        order = np.argsort(scores)[::-1]
        order = order[scores[order] > threshold][:opts["max_objects"]].tolist()
        survivors = []
        while order:
            best = order.pop(0)
            survivors.append(dets[best])
            if opts["max_overlap"] != 1:
                order = [i for i in order if _iou(dets[best].box, dets[i].box) < max_overlap]
        if survivors:
            kept[cls] = survivors
    return kept


# ---- relations --------------------------------------------------------------------------------------

def relation_set(box_a, box_b, margin: float = 0.1) -> set[str]:
    """Where box A lies relative to box B, as a subset of RELATIONS (y grows downward, so "above" is a
    smaller y). The centre offset is shrunk towards zero on each axis by margin * (sum of the two
    sizes on that axis), then divided by the unshrunk offset's length; a component beyond +-0.5
    names a relation. Empty when the shrunk offset is (almost) zero. float32, as in GenEval."""
    boxes = np.array([list(box_a)[:4], list(box_b)[:4]], dtype=np.float32).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - np.float32(margin) * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    tests = (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)
    return {rel for rel, hit in zip(RELATIONS, tests) if hit}


# ---- the verdict ------------------------------------------------------------------------------------

def evaluate_metadata(metadata: dict, detections: Iterable[Detection],
                      classify_colour: Callable[[str, list[Detection]], list[str]],
                      options: Mapping | None = None) -> Verdict:
    """GenEval's verdict on one image: `detections` are the detector's raw output, `classify_colour`
    (class, candidates) -> one PALETTE colour per candidate, called only for a clause with a colour
    whose count passed; `options` override DEFAULT_OPTIONS (strings or numbers).

    Exam points, one boolean per check in this order:
      for each include clause, in order:
        count     the class has at least `count` kept objects;
        colour    (clause has a colour) all candidates came back in that colour; False if not checked;
        position  (clause has a position) the target group exists and every (candidate, target) pair
                  has the relation; False if not checked (count or colour failed);
      for each exclude clause, in order: True when it does not fire (fewer than `count` kept).
    all(points) == correct; the TA-style score is their mean (Verdict.ta).
    """
    check_metadata(metadata)
    opts = _options(options)
    kept = filter_detections(detections, metadata["tag"], opts)
    lines: list[str] = []
    points: list[bool] = []
    color_queries: list = []
    relations_checked: list = []
    groups: list[list[Detection] | None] = []  # per include clause: its candidates if it passed

    for clause in metadata["include"]:
        cls, n = clause["class"], clause["count"]
        candidates = kept.get(cls, [])[:n]
        passed = len(candidates) >= n
        points.append(passed)
        if not passed:
            lines.append(f"expected {cls}>={n}, found {len(candidates)}")
        if "color" in clause:
            colour_ok = False
            if passed:
                colours = list(classify_colour(cls, list(candidates)))
                if len(colours) != n or any(c not in PALETTE for c in colours):
                    raise ValueError(f"classify_colour({cls!r}) must return {n} colours from PALETTE, "
                                     f"got {colours!r}")
                color_queries.append((cls, list(candidates), colours))
                k, want = colours.count(clause["color"]), clause["color"]
                colour_ok = k >= n
                if not colour_ok:
                    tally = ", ".join(f"{colours.count(c)} {c}" for c in PALETTE if c in colours)
                    lines.append(f"expected {want} {cls}>={n}, found {k} {want}; and {tally}")
            passed = passed and colour_ok
            points.append(colour_ok)
        if "position" in clause:
            position_ok = False
            if passed:
                rel, j = clause["position"]
                targets = groups[j]
                if targets is None:
                    lines.append(f"no target for {cls} to be {rel}")
                else:
                    position_ok = _check_pairs(cls, rel, candidates, targets, opts, lines,
                                               relations_checked)
            passed = passed and position_ok
            points.append(position_ok)
        groups.append(list(candidates) if passed else None)

    for clause in metadata.get("exclude", []):
        cls, m = clause["class"], clause["count"]
        found = len(kept.get(cls, []))
        points.append(found < m)
        if found >= m:
            lines.append(f"expected {cls}<{m}, found {found}")

    return Verdict(correct=not lines, reason="\n".join(lines), reason_lines=lines, kept=kept,
                   color_queries=color_queries, relations_checked=relations_checked, points=points)


def _check_pairs(cls, rel, candidates, targets, opts, lines, relations_checked) -> bool:
    """Every (candidate, target) pair in score order must have `rel`; stops at the first that fails,
    so at most one reason line is written."""
    for obj in candidates:
        for target in targets:
            rels = relation_set(obj.box, target.box, opts["position_threshold"])
            relations_checked.append((obj, target, sorted(rels)))
            if rel not in rels:
                found = " and ".join(r for r in RELATIONS if r in rels)
                lines.append(f"expected {cls} {rel} target, found {found} target")
                return False
    return True
