"""The toy world (a laptop GenEval): prompts, layouts, plans, the renderer and its exact verifier,
whose exam points give the toy's reward (ToyReward) and the paper's two metrics.

A scene is a 32x32 RGB image on black: a 4x4 grid of 8 px cells, each holding at most one 7 px
object drawn at the cell's top-left corner (so neighbouring objects never touch): a circle, square
or triangle in red, green, blue or yellow (pure RGB corners, so thresholding each channel at 0.5
recovers the colour exactly). Prompts come in GenEval's six categories and a share of them needs
reasoning: counts as sums ("one plus two red circles"), colours by reference
("a circle colour_of blood"), relations by paraphrase
("a blue square with a red circle on_its_left"). The reasoning writes a canonical plan, one chunk
`c<k> <colour> <shape>` per object joined by ` ; `, in the prompt's order: the groups as the prompt
names them, a group's objects by cell k (the cell comes first: the toy model grounds the chunk's
later tokens in that cell, toy_policy.Grounding). In prompt order the plan restates each object
where the prompt names it, so binding a colour to its shape is a copy. The verifier is exact: channel
thresholds -> colour codes, 4-connected components, shape by bounding-box fill ratio, relations by
centroids. Plans are scored by the same exam points with objects at their cell centres.

Glossary
  R         samples in a batch;  k = row*4 + col, the cell index, token `c{k}`
  group g   a required kind of object: (shape, colour or None, count n_g); a prompt's groups have
            distinct shapes
  M_g       the detected objects of g's shape with a palette colour ("unknown" colours never match)
  TA        mean of a sample's exam points (the paper's dense terminal reward);
            accuracy = all points right

Exam points (groups in prompt-text order; per group the points come in the order present, count,
colour):
| category      | example prompt(s)                            | points                                     |
|---------------|----------------------------------------------|--------------------------------------------|
| single_object | a circle                                     | present; no_extra (2)                      |
| two_object    | a circle and a square                        | present x2; no_extra (3)                   |
| counting      | three red circles / one plus two red circles | present, count, colour; no_extra (4)       |
| colors        | a red circle / a circle colour_of blood      | present, colour; no_extra (3)              |
| position      | a red circle left_of a blue square /         | present, colour x2; relation; no_extra (6) |
|               | a blue square with a red circle on_its_left  |                                            |
| color_attr    | a red circle and a blue square               | present, colour x2; no_extra (5)           |
  present(g): |M_g| >= 1.   count(g) (counting only): |M_g| == n_g.
  colour(g) (every group whose colour the prompt names): M_g is not empty and its min(n_g, |M_g|)
    best matches all have g's colour, i.e. at least that many objects of M_g have it (so a wrong
    count or an extra object does not also cost the colour point; a missing object does).
  relation a kind b: some pair in M_a x M_b with, on centroids, left_of x_a < x_b - 2,
    right_of x_a > x_b + 2, above y_a < y_b - 2, below y_a > y_b + 2 (pixels, y grows downwards;
    diagonal placements count).
  no_extra: no object of unknown colour, none of a shape the prompt does not name, and
    |M_g| <= n_g for all g.

Held-out evaluation. Each prompt has a combination key; `eval` prompts use only held-out keys,
`train` the rest. Within each stratum, the round(20%) keys of smallest md5(repr(key)) are held out
(deterministic, seed-free).
| category      | key                                          | keys | stratum   | held out            |
|---------------|----------------------------------------------|------|-----------|---------------------|
| single_object | (shape,)                                     | 3    | -         | none: eval = train  |
| two_object    | (shape, shape) in SHAPES order               | 3    | -         | none: eval = train  |
| counting      | (n, colour, shape), any phrasing of n        | 48   | n         | 2 per n = 8         |
| colors        | (shape, colour, "word" or "ref")             | 24   | phrasing  | 2 per phrasing = 4  |
| position      | (axis, colour, shape of the left/top object, | 192  | axis      | 19 per axis = 38    |
|               |  colour, shape of the right/bottom object)   |      |           |                     |
| color_attr    | ((colour, shape), (colour, shape)), in       | 36   | -         | 7                   |
|               |  COLOURS x SHAPES order                      |      |           |                     |
So a held-out position arrangement is never seen in training under any of its four phrasings
(left_of/right_of, direct/paraphrase), nor a held-out colour pair in either order.

Deviations / borrowed defaults
- GenEval detects classes with Mask2Former and colours with CLIP; here both are exact (thresholds,
  fill ratio).
- GenEval scores a prompt only as all-correct; TA (mean of the exam points) is this toy's dense
  score and reward.
- Relations: GenEval compares box centres with a size-relative margin and an angle test; here
  centroids and a fixed 2 px margin, and one pair suffices (GenEval: all pairs among the first n_g
  detections).
- Colour point: the min(n_g, |M_g|) best matches have the colour (GenEval: the n_g most confident
  detections).
- Counting and position prompts also name colours (GenEval's do not), so they carry colour points.
- Overall TA/accuracy = mean over the categories present (GenEval's overall score).
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np
import torch
from einops import rearrange

import reward
from reward import CATEGORIES

IMAGE_SIZE, GRID, CELL, OBJ = 32, 4, 8, 7
MIN_AREA = 10  # px; smaller components are noise (the smallest shape, the triangle, has 25 px)
MARGIN = 2.0  # px, for relations
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.68  # fill > 0.9 square, > 0.68 circle, else triangle
EVAL_FRACTION = 0.2
SUM_SHARE = 0.5  # share of counting prompts with n >= 2 written as a sum
PARAPHRASE_SHARE = 0.5  # share of position prompts written in swapped order

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {s: s + "s" for s in SHAPES}
NUMBERS = ("one", "two", "three", "four")
REFERENCES = {"grass": "green", "sky": "blue", "blood": "red", "sun": "yellow"}
RELATIONS = ("left_of", "right_of", "above", "below")
PARAPHRASES = {"left_of": "on_its_left", "right_of": "on_its_right", "above": "above_it",
               "below": "below_it"}
SPLITS = ("train", "eval")
SEP = ";"
UNKNOWN = "unknown"

_REFERENCE_OF = {c: r for r, c in REFERENCES.items()}
# channel bits -> colour
_CODE_COLOUR = {r * 4 + g * 2 + b: name for name, (r, g, b) in COLOURS.items()}
_CELL_INDEX = {f"c{k}": k for k in range(GRID * GRID)}


# ---------------------------------------------------------------- prompts, layouts, plans
class Group(NamedTuple):
    shape: str
    colour: str | None
    count: int


class Relation(NamedTuple):
    kind: str  # one of RELATIONS: groups[a] <kind> groups[b]
    a: int
    b: int


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    groups: tuple[Group, ...]
    relation: Relation | None
    key: tuple
    split: str

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"category: unknown {self.category!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split: unknown {self.split!r}, expected one of {SPLITS}")
        if not self.groups or len({g.shape for g in self.groups}) < len(self.groups):
            raise ValueError(f"groups: need >= 1 group with distinct shapes, got {self.groups}")
        r = self.relation
        if r is not None and (r.kind not in RELATIONS or {r.a, r.b} != {0, 1}
                              or len(self.groups) != 2):
            raise ValueError(f"relation: need a kind in {RELATIONS} between groups 0 and 1, "
                             f"got {r}")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: int

    def __post_init__(self):
        if (self.colour not in COLOURS or self.shape not in SHAPES
                or not 0 <= self.cell < GRID * GRID):
            raise ValueError(f"Obj: bad colour/shape/cell "
                             f"{self.colour!r}, {self.shape!r}, {self.cell!r}")

    @property
    def x(self) -> float:  # centre of the 7 px box, pixels
        return (self.cell % GRID) * CELL + (OBJ - 1) / 2

    @property
    def y(self) -> float:
        return (self.cell // GRID) * CELL + (OBJ - 1) / 2


@dataclass(frozen=True)
class Detected:
    colour: str  # a COLOURS name or "unknown"
    shape: str
    x: float  # centroid, pixels
    y: float
    area: int


def cell_tokens() -> list[str]:
    return list(_CELL_INDEX)


def vocabulary() -> list[str]:
    """Every word a prompt or a plan can contain (48), in a fixed order."""
    return ["a", "and", "plus", "with", "colour_of", SEP, *COLOURS, *SHAPES, *PLURAL.values(),
            *NUMBERS, *REFERENCES, *RELATIONS, *PARAPHRASES.values(), *cell_tokens()]


def _all_keys(category: str) -> list[tuple]:
    pairs = list(itertools.product(COLOURS, SHAPES))
    if category == "single_object":
        return [(s,) for s in SHAPES]
    if category == "two_object":
        return list(itertools.combinations(SHAPES, 2))
    if category == "counting":
        return [(n, c, s) for n in range(1, 5) for c in COLOURS for s in SHAPES]
    if category == "colors":
        return [(s, c, ph) for ph in ("word", "ref") for s in SHAPES for c in COLOURS]
    if category == "position":
        return [(axis, *p, *q) for axis in ("horizontal", "vertical") for p in pairs for q in pairs
                if p[1] != q[1]]
    if category == "color_attr":
        return [(p, q) for p, q in itertools.combinations(pairs, 2)
                if p[0] != q[0] and p[1] != q[1]]
    raise ValueError(f"category: unknown {category!r}, expected one of {CATEGORIES}")


# key field; absent = no hold-out
_STRATUM = {"counting": 0, "colors": 2, "position": 0, "color_attr": None}


@lru_cache(maxsize=None)
def combination_keys(category: str, split: str) -> tuple[tuple, ...]:
    """The combination keys prompts of `category` use in `split` (table in the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split: unknown {split!r}, expected one of {SPLITS}")
    keys = _all_keys(category)
    if category not in _STRATUM:
        return tuple(keys)
    field = _STRATUM[category]
    held = set()
    for value in {None if field is None else k[field] for k in keys}:
        stratum = [k for k in keys if field is None or k[field] == value]
        stratum.sort(key=lambda k: hashlib.md5(repr(k).encode()).hexdigest())
        held.update(stratum[: max(1, round(EVAL_FRACTION * len(stratum)))])
    return tuple(k for k in keys if (k in held) == (split == "eval"))


def _as_rng(rng) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, (int, np.integer)):
        return random.Random(int(rng))
    raise ValueError(f"rng: expected random.Random or int, got {type(rng).__name__}")


def make_prompt(category: str, rng: random.Random | int, split: str = "train") -> Prompt:
    """One prompt of `category` drawn uniformly from the split's combination keys, then a random
    phrasing."""
    rng = _as_rng(rng)
    key = rng.choice(combination_keys(category, split))
    relation = None
    if category == "single_object":
        text, groups = f"a {key[0]}", (Group(key[0], None, 1),)
    elif category == "two_object":
        shapes = key if rng.random() < 0.5 else key[::-1]
        text, groups = (" and ".join(f"a {s}" for s in shapes),
                        tuple(Group(s, None, 1) for s in shapes))
    elif category == "counting":
        n, c, s = key
        number = NUMBERS[n - 1]
        if n >= 2 and rng.random() < SUM_SHARE:
            i = rng.randint(1, n - 1)
            number = f"{NUMBERS[i - 1]} plus {NUMBERS[n - i - 1]}"
        text, groups = f"{number} {c} {s if n == 1 else PLURAL[s]}", (Group(s, c, n),)
    elif category == "colors":
        s, c, phrasing = key
        text = f"a {c} {s}" if phrasing == "word" else f"a {s} colour_of {_REFERENCE_OF[c]}"
        groups = (Group(s, c, 1),)
    elif category == "position":
        axis, c1, s1, c2, s2 = key  # (c1, s1) is the left / top object
        first, second = Group(s1, c1, 1), Group(s2, c2, 1)
        kinds = ("left_of", "right_of") if axis == "horizontal" else ("above", "below")
        # a <kind> b
        kind, a, b = rng.choice(((kinds[0], first, second), (kinds[1], second, first)))
        if rng.random() < PARAPHRASE_SHARE:
            text = f"a {b.colour} {b.shape} with a {a.colour} {a.shape} {PARAPHRASES[kind]}"
            groups, relation = (b, a), Relation(kind, 1, 0)
        else:
            text = f"a {a.colour} {a.shape} {kind} a {b.colour} {b.shape}"
            groups, relation = (a, b), Relation(kind, 0, 1)
    elif category == "color_attr":
        pair = key if rng.random() < 0.5 else key[::-1]
        text, groups = (" and ".join(f"a {c} {s}" for c, s in pair),
                        tuple(Group(s, c, 1) for c, s in pair))
    else:
        raise ValueError(f"category: unknown {category!r}, expected one of {CATEGORIES}")
    return Prompt(text, category, groups, relation, key, split)


def train_prompts(seed: int, step: int, n: int, split: str = "train") -> list[Prompt]:
    """The prompts of one training step, mixed categories, deterministic in (seed, split, step) so
    that a resumed run sees the same prompts."""
    rng = random.Random(f"{seed}/{split}/{step}")
    return [make_prompt(CATEGORIES[rng.randrange(len(CATEGORIES))], rng, split) for _ in range(n)]


def prompts(split: str, n_per_category: int, seed: int) -> list[Prompt]:
    """n_per_category prompts of every category (grouped by category, CATEGORIES order),
    deterministic in seed."""
    if split not in SPLITS:
        raise ValueError(f"split: unknown {split!r}, expected one of {SPLITS}")
    if n_per_category < 0:
        raise ValueError(f"n_per_category: must be >= 0, got {n_per_category}")
    rng = random.Random(seed)
    return [make_prompt(c, rng, split) for c in CATEGORIES for _ in range(n_per_category)]


def _holds(kind: str, a, b) -> bool:
    if kind == "left_of":
        return a.x < b.x - MARGIN
    if kind == "right_of":
        return a.x > b.x + MARGIN
    if kind == "above":
        return a.y < b.y - MARGIN
    if kind == "below":
        return a.y > b.y + MARGIN
    raise ValueError(f"relation kind: unknown {kind!r}")


def random_layout(prompt: Prompt, rng: random.Random | int) -> list[Obj]:
    """A uniformly random layout that gets every exam point: exactly the required objects in
    distinct random cells (rejection-sampled until the relation holds), unnamed colours uniform; in
    plan order (the prompt's groups in turn, each group's objects by cell)."""
    rng = _as_rng(rng)
    members = [(i, g) for i, g in enumerate(prompt.groups) for _ in range(g.count)]
    while True:
        cells = rng.sample(range(GRID * GRID), len(members))
        objs = [Obj(g.colour or rng.choice(list(COLOURS)), g.shape, k)
                for (_, g), k in zip(members, cells)]
        of_group = [[o for (i, _), o in zip(members, objs) if i == j]
                    for j in range(len(prompt.groups))]
        r = prompt.relation
        if r is None or any(_holds(r.kind, a, b) for a in of_group[r.a] for b in of_group[r.b]):
            return [o for group in of_group for o in sorted(group, key=lambda o: o.cell)]




CORRUPTIONS = ("drop", "add", "recolour", "reshape", "move")


def corrupt_layout(layout: Sequence[Obj], rng: random.Random | int) -> list[Obj]:
    """One random error of imperfect paired data (the toy's noisy SFT triples): drop an object
    (only when there are >= 2), add one in a free cell (last), recolour one, reshape one, or move
    one to a free cell. The other objects keep their order."""
    rng = _as_rng(rng)
    objs = list(layout)
    if not objs:
        raise ValueError("layout: need >= 1 object to corrupt")
    kinds = [k for k in CORRUPTIONS if not (k == "drop" and len(objs) < 2)
             and not (k in ("add", "move") and len(objs) == GRID * GRID)]
    kind, i = rng.choice(kinds), rng.randrange(len(objs))
    free = [k for k in range(GRID * GRID) if k not in {o.cell for o in objs}]
    o = objs[i]
    if kind == "drop":
        del objs[i]
    elif kind == "add":
        objs.append(Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(free)))
    elif kind == "recolour":
        objs[i] = Obj(rng.choice([c for c in COLOURS if c != o.colour]), o.shape, o.cell)
    elif kind == "reshape":
        objs[i] = Obj(o.colour, rng.choice([s for s in SHAPES if s != o.shape]), o.cell)
    else:
        objs[i] = Obj(o.colour, o.shape, rng.choice(free))
    return objs


def plan_text(layout: Sequence[Obj]) -> str:
    """The plan of a layout: `c<k> <colour> <shape>` per object, in the layout's order
    (random_layout's order is the canonical one), joined by ' ; '."""
    cells = [o.cell for o in layout]
    if not layout or len(set(cells)) < len(cells):
        raise ValueError(f"layout: need >= 1 object and distinct cells, got {list(layout)}")
    return f" {SEP} ".join(f"c{o.cell} {o.colour} {o.shape}" for o in layout)


def parse_plan(text: str) -> list[Obj] | None:
    """Objects of a plan in its order (scoring does not depend on the order), or None on bad
    grammar, an unknown token or two objects in one cell."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected str, got {type(text).__name__}")
    tokens = text.split()
    if len(tokens) % 4 != 3:
        return None
    objs = []
    for i in range(0, len(tokens), 4):
        cell, colour, shape = tokens[i:i + 3]
        if (i + 3 < len(tokens) and tokens[i + 3] != SEP) or colour not in COLOURS \
                or shape not in SHAPES or cell not in _CELL_INDEX:
            return None
        objs.append(Obj(colour, shape, _CELL_INDEX[cell]))
    if len({o.cell for o in objs}) < len(objs):
        return None
    return objs


# ---------------------------------------------------------------- renderer
def _shape_masks() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:OBJ, 0:OBJ]
    c = (OBJ - 1) / 2
    return {"circle": (yy - c) ** 2 + (xx - c) ** 2 <= (OBJ / 2) ** 2,  # 37 px, fill 0.755
            "square": np.ones((OBJ, OBJ), bool),  # 49 px, fill 1
            # apex up, rows 1,1,3,3,5,5,7 px: 25 px, fill 0.510
            "triangle": np.abs(xx - c) <= yy // 2}


# 0 = empty
_PATCH_INDEX = {(c, s): 1 + i for i, (c, s) in enumerate(itertools.product(COLOURS, SHAPES))}


@lru_cache(maxsize=1)
def _patches() -> torch.Tensor:
    """(1 + 12, 3, CELL, CELL) cell patches: empty, then every (colour, shape), object at the
    top-left."""
    masks = _shape_masks()
    table = torch.zeros(1 + len(_PATCH_INDEX), 3, CELL, CELL)
    for (c, s), i in _PATCH_INDEX.items():
        table[i, :, :OBJ, :OBJ] = torch.tensor(COLOURS[c], dtype=torch.float32)[:, None, None] * \
            torch.from_numpy(masks[s]).float()
    return table


def render_batch(layouts: Sequence[Sequence[Obj]]) -> torch.Tensor:
    """(R, 3, 32, 32) float images in [0, 1], black background."""
    index = [[0] * (GRID * GRID) for _ in layouts]
    for r, layout in enumerate(layouts):
        for o in layout:
            if index[r][o.cell]:
                raise ValueError(f"layouts[{r}]: two objects in cell {o.cell}")
            index[r][o.cell] = _PATCH_INDEX[(o.colour, o.shape)]
    patches = _patches()[torch.tensor(index, dtype=torch.long).reshape(len(layouts), GRID * GRID)]
    return rearrange(patches, "r (gy gx) c py px -> r c (gy py) (gx px)", gy=GRID)  # (R, 3, 32, 32)


def render(layout: Sequence[Obj]) -> torch.Tensor:
    """(3, 32, 32) float image in [0, 1]."""
    return render_batch([layout])[0]


# ---------------------------------------------------------------- verifier
def _label(codes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero codes in (R, H, W): each pixel gets the smallest
    flat index in its component (background: R*H*W). Label propagation over the joined neighbour
    pairs: hook the larger label onto the smaller, then follow labels to their roots; labels only
    decrease and stay inside their component."""
    n = codes.size
    fg = codes > 0
    dtype = np.int32 if n < 2**31 - 1 else np.int64
    lab = np.where(fg, np.arange(n, dtype=dtype).reshape(codes.shape), dtype(n)).reshape(-1)
    join_x = np.zeros_like(fg)
    # pixel joins its right neighbour
    join_x[:, :, :-1] = fg[:, :, 1:] & (codes[:, :, 1:] == codes[:, :, :-1])
    join_y = np.zeros_like(fg)
    # pixel joins the one below
    join_y[:, :-1, :] = fg[:, 1:, :] & (codes[:, 1:, :] == codes[:, :-1, :])
    # pairs (i, j), flat indices
    i = np.concatenate((np.flatnonzero(join_x), np.flatnonzero(join_y)))
    j = np.concatenate((np.flatnonzero(join_x) + 1, np.flatnonzero(join_y) + codes.shape[2]))
    fg_flat = np.flatnonzero(fg)
    while True:
        lab_i, lab_j = lab[i], lab[j]
        if np.array_equal(lab_i, lab_j):
            return lab.reshape(codes.shape)
        m = np.minimum(lab_i, lab_j)
        # hook: a label (a pixel) takes the smaller label of a joined neighbour
        np.minimum.at(lab, lab_i, m)
        np.minimum.at(lab, lab_j, m)
        while True:  # shortcut every pixel to its root
            root = lab[lab[fg_flat]]
            if np.array_equal(root, lab[fg_flat]):
                break
            lab[fg_flat] = root


def detect_batch(images: torch.Tensor) -> list[list[Detected]]:
    """Objects in each of (R, 3, 32, 32) images with values in [0, 1] (map [-1, 1] images with
    (x + 1) / 2 first): a channel > 0.5 is on; components of one colour code with area >= MIN_AREA;
    a code outside the palette gives colour "unknown"."""
    x = torch.as_tensor(images).detach().to("cpu", torch.float32).numpy()
    if x.ndim != 4 or x.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images: expected (R, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                         f"got {tuple(x.shape)}")
    R, _, H, W = x.shape
    on = x > 0.5
    codes = (on[:, 0] * 4 + on[:, 1] * 2 + on[:, 2]).astype(np.int8)  # (R, H, W), 0 = black
    out: list[list[Detected]] = [[] for _ in range(R)]
    fg_flat = np.flatnonzero(codes)
    if fg_flat.size == 0:
        return out
    roots, inv, area = np.unique(_label(codes).reshape(-1)[fg_flat], return_inverse=True,
                                 return_counts=True)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate(([0], np.cumsum(area)[:-1]))
    ys, xs = (fg_flat % (H * W)) // W, fg_flat % W
    x0, x1 = np.minimum.reduceat(xs[order], starts), np.maximum.reduceat(xs[order], starts)
    y0, y1 = np.minimum.reduceat(ys[order], starts), np.maximum.reduceat(ys[order], starts)
    fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
    shape = np.where(fill > SQUARE_FILL, 1, np.where(fill > CIRCLE_FILL, 0, 2))  # index into SHAPES
    cx, cy = np.bincount(inv, xs) / area, np.bincount(inv, ys) / area
    code = codes.reshape(-1)[roots]
    for j in np.flatnonzero(area >= MIN_AREA).tolist():
        out[int(roots[j]) // (H * W)].append(Detected(_CODE_COLOUR.get(int(code[j]), UNKNOWN),
                                                      SHAPES[shape[j]], float(cx[j]), float(cy[j]),
                                                      int(area[j])))
    return out


def detect(image: torch.Tensor) -> list[Detected]:
    """Objects in one (3, 32, 32) image with values in [0, 1]."""
    image = torch.as_tensor(image)
    if image.ndim != 3:
        raise ValueError(f"image: expected (3, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                         f"got {tuple(image.shape)}")
    return detect_batch(image[None])[0]


def point_names(prompt: Prompt) -> list[str]:
    """Names of the exam points of `prompt`, in exam_points' order."""
    names = []
    for g in prompt.groups:
        names.append(f"present {g.shape}")
        if prompt.category == "counting":
            names.append(f"count {g.shape}")
        if g.colour is not None:
            names.append(f"colour {g.shape}")
    return names + (["relation"] if prompt.relation else []) + ["no_extra"]


def exam_points(objects: Sequence[Obj | Detected], prompt: Prompt) -> list[bool]:
    """Binary exam points (module docstring table) of objects with .colour, .shape, .x, .y."""
    known = [o for o in objects if o.colour in COLOURS]
    matched = [[o for o in known if o.shape == g.shape] for g in prompt.groups]  # M_g
    points = []
    for g, m in zip(prompt.groups, matched):
        points.append(len(m) >= 1)
        if prompt.category == "counting":
            points.append(len(m) == g.count)
        if g.colour is not None:
            points.append(len(m) >= 1
                          and sum(o.colour == g.colour for o in m) >= min(g.count, len(m)))
    r = prompt.relation
    if r is not None:
        points.append(any(_holds(r.kind, a, b) for a in matched[r.a] for b in matched[r.b]))
    shapes = {g.shape for g in prompt.groups}
    points.append(len(known) == len(objects) and all(o.shape in shapes for o in known)
                  and all(len(m) <= g.count for g, m in zip(prompt.groups, matched)))
    return points


@dataclass
class Scores:
    points: torch.Tensor  # (R,) float: fraction of exam points right (TA-style)
    all_correct: torch.Tensor  # (R,) bool: every point right (GenEval-style)


def _scores(per_sample: list[list[bool] | None]) -> Scores:
    points = [sum(p) / len(p) if p else 0.0 for p in per_sample]
    return Scores(torch.tensor(points, dtype=torch.float32),
                  torch.tensor([bool(p) and all(p) for p in per_sample], dtype=torch.bool))


def _check_len(items, name: str, prompts: Sequence[Prompt]):
    if len(items) != len(prompts):
        raise ValueError(f"{name}: {len(items)} samples but {len(prompts)} prompts")


def score_images(images: torch.Tensor, prompts: Sequence[Prompt]) -> Scores:
    """Exam points of (R, 3, 32, 32) images in [0, 1] against their prompts."""
    detections = detect_batch(images)
    _check_len(detections, "images", prompts)
    return _scores([exam_points(d, p) for d, p in zip(detections, prompts)])


def score_plans(texts: Sequence[str], prompts: Sequence[Prompt]) -> Scores:
    """Exam points of plan texts (objects at cell centres); a plan that does not parse gets
    0 points. Plan validity = all_correct."""
    _check_len(texts, "texts", prompts)
    layouts = [parse_plan(t) for t in texts]
    return _scores([None if lay is None else exam_points(lay, p)
                    for lay, p in zip(layouts, prompts)])


def summarize(scores: Scores, prompts: Sequence[Prompt]) -> dict[str, float]:
    """{"ta", "accuracy"}: means over the categories present of the per-category means, and
    "ta/<category>", "accuracy/<category>" for each category present."""
    _check_len(scores.points, "scores", prompts)
    return reward.summarize({"ta": scores.points, "accuracy": scores.all_correct}, prompts)


class ToyReward:
    """The sparse terminal reward of the toy world: the fraction of exam points right (TA-style),
    (R,) float."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        return score_images(images, prompts).points

    def scores(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """(TA-style points (R,), all correct (R,)): the verdicts evaluation reports."""
        s = score_images(images, prompts)
        return s.points, s.all_correct


# ------------------------------------------------------------------- a learned, hackable proxy reward
class ProxyReward(torch.nn.Module):
    """A small learned scorer of toy images, fitted to the verifier's TA on images of one policy
    (experiments/fit_proxy.py): the stand-in for a learned reward model. It scores what resembles its
    training images, so a policy can climb it while the exact verifier falls (reward hacking, the
    paper's Fig. 5). `--reward=proxy:FILE` trains the toy on it; evaluation keeps the verifier.

    A per-cell CNN (one 8 px cell, one feature vector) and a GRU over the prompt's words, joined by an
    MLP; the score is a sigmoid in [0, 1], as TA is. Saved as safetensors, its words and width in the
    metadata."""

    def __init__(self, words: Sequence[str] = tuple(vocabulary()), width: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):                  # its init is its own: seeded, global RNG untouched
            torch.manual_seed(seed)
            self._build(words, width)

    def _build(self, words, width):
        self.words, self.width = list(words), int(width)
        self.index = {w: i + 1 for i, w in enumerate(self.words)}            # 0: padding
        nn = torch.nn
        # one feature vector per 8 px cell (what the cell holds), then the whole grid with the prompt
        self.image = nn.Sequential(nn.Conv2d(3, width, CELL, stride=CELL), nn.SiLU(),
                                   nn.Conv2d(width, width, 1), nn.SiLU(), nn.Flatten())
        self.embed = nn.Embedding(len(self.words) + 1, 64, padding_idx=0)
        self.text = nn.GRU(64, 64, batch_first=True)
        self.film = nn.Linear(64, 2 * width)                 # the prompt scales and shifts every cell
        self.head = nn.Sequential(nn.Linear(width * GRID * GRID + 64, 256), nn.SiLU(), nn.Linear(256, 1))

    def logits(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        """Pre-sigmoid scores (R,) of images (R, 3, 32, 32) in [0, 1], with gradients (for fitting)."""
        texts = [p.text if hasattr(p, "text") else str(p) for p in prompts]
        _check_len(images, "images", texts)
        rows = [[self.index[w] for w in t.split()] or [0] for t in texts]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                                         enforce_sorted=False)
        text = self.text(packed)[1][0]
        cells = self.image(images.float().cpu() * 2 - 1).unflatten(1, (self.width, GRID * GRID))
        scale, shift = self.film(text)[:, :, None].chunk(2, 1)
        cells = torch.nn.functional.silu(cells * (1 + scale) + shift)
        return self.head(torch.cat([cells.flatten(1), text], 1))[:, 0]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        return torch.sigmoid(self.logits(images, prompts))

    def save(self, path):
        from safetensors.torch import save_file
        meta = {"words": " ".join(self.words), "width": str(self.width)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> ProxyReward:
        """A saved proxy (safetensors, no pickle); a ValueError names the file when it is not one."""
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            proxy = cls(meta["words"].split(), int(meta["width"]))
            proxy.load_state_dict(state)
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"proxy reward {path}: not a saved toy.ProxyReward ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        return proxy.eval()
