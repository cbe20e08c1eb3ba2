"""The toy world and its verifier: renders of valid layouts score 100%, each targeted mistake costs
exactly its exam point, prompts mean what their text says (an independent interpreter), held-out
combos are disjoint, and the vectorised component labeller agrees with a plain BFS."""

import hashlib
import json
import random
from collections import Counter, deque

import pytest
import torch

import evaluate
import toy

# --- an independent reading of the prompt language ------------------------------------------------
# (written from the module docstring, not the code)
NUM = {"one": 1, "two": 2, "three": 3, "four": 4}
REF = {"grass": "green", "sky": "blue", "blood": "red", "sun": "yellow"}
PARA = {"on_its_left": "left_of", "on_its_right": "right_of", "above_it": "above",
        "below_it": "below"}
INVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def interpret(text):
    """Text -> (set of (shape, colour, count), relation as (kind, (shape, colour), (shape, colour))
    or None)."""
    w = text.split()
    if w[0] in NUM:  # counting: "<n> [plus <m>] <colour> <shapes>"
        n = NUM[w[0]] + (NUM[w[2]] if w[1] == "plus" else 0)
        return {(w[-1].rstrip("s"), w[-2], n)}, None
    objs, rel = [], None
    i = 0
    while i < len(w):
        assert w[i] == "a", text
        if w[i + 1] in toy.SHAPES:  # "a <shape>" or "a <shape> colour_of <ref>"
            if i + 2 < len(w) and w[i + 2] == "colour_of":
                objs.append((w[i + 1], REF[w[i + 3]]))
                i += 4
            else:
                objs.append((w[i + 1], None))
                i += 2
        else:  # "a <colour> <shape>"
            objs.append((w[i + 2], w[i + 1]))
            i += 3
        if i < len(w) and w[i] in INVERSE:
            rel, i = (w[i], len(objs) - 1, len(objs)), i + 1
        elif i < len(w) and w[i] in ("and", "with"):
            i += 1
        elif i < len(w) and w[i] in PARA:
            rel, i = (PARA[w[i]], len(objs) - 1, len(objs) - 2), i + 1
    groups = {(s, c, 1) for s, c in objs}
    return groups, None if rel is None else (rel[0], objs[rel[1]], objs[rel[2]])


def semantics(p):
    groups = {(g.shape, g.colour, g.count) for g in p.groups}
    r = p.relation
    rel = None if r is None else (r.kind, (p.groups[r.a].shape, p.groups[r.a].colour),
                                   (p.groups[r.b].shape, p.groups[r.b].colour))
    return groups, rel


def expected_key(p):
    """Combination key re-derived from a prompt's meaning (module docstring table)."""
    g = p.groups
    if p.category == "single_object":
        return (g[0].shape,)
    if p.category == "two_object":
        return tuple(sorted((x.shape for x in g), key=toy.SHAPES.index))
    if p.category == "counting":
        return (g[0].count, g[0].colour, g[0].shape)
    if p.category == "colors":
        return (g[0].shape, g[0].colour, "ref" if "colour_of" in p.text else "word")
    if p.category == "position":
        kind, a, b = p.relation.kind, g[p.relation.a], g[p.relation.b]
        if kind in ("right_of", "below"):
            kind, a, b = INVERSE[kind], b, a
        return ("horizontal" if kind == "left_of" else "vertical", a.colour, a.shape, b.colour,
                b.shape)
    return tuple(sorted(((x.colour, x.shape) for x in g),
                        key=lambda cs: (list(toy.COLOURS).index(cs[0]), toy.SHAPES.index(cs[1]))))


@pytest.fixture(scope="module")
def world():
    ps = toy.prompts("train", 100, seed=1) + toy.prompts("eval", 100, seed=2)
    rng = random.Random(3)
    layouts = [toy.random_layout(p, rng) for p in ps]
    return ps, layouts, toy.render_batch(layouts)


# --- the verifier on the renderer's own images ----------------------------------------------------
def test_renders_and_plans_of_random_layouts_score_100_percent(world):
    ps, layouts, images = world
    assert (len(ps) >= 1000 and {p.split for p in ps} == set(toy.SPLITS)
            and {p.category for p in ps} == set(toy.CATEGORIES))
    assert images.shape == (len(ps), 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    s = toy.score_images(images, ps)
    assert (s.all_correct.dtype == torch.bool and s.points.dtype == torch.float32
            and s.points.shape == (len(ps),))
    assert s.all_correct.all() and torch.all(s.points == 1)
    sp = toy.score_plans([toy.plan_text(lay) for lay in layouts], ps)
    assert sp.all_correct.all() and torch.all(sp.points == 1)
    assert torch.equal(toy.ToyReward()(images, ps), s.points)


def test_detect_recovers_every_layout(world):
    _, layouts, images = world
    for lay, found in zip(layouts, toy.detect_batch(images)):
        got = {(d.colour, d.shape, int(d.y // toy.CELL) * toy.GRID + int(d.x // toy.CELL))
               for d in found}
        assert got == {(o.colour, o.shape, o.cell) for o in lay} and len(found) == len(lay)


def test_layouts_satisfy_the_independent_reading_of_their_prompt(world):
    ps, layouts, _ = world
    for p, lay in zip(ps, layouts):
        groups, rel = interpret(p.text)
        for shape, colour, n in groups:  # exactly n objects of that shape, in the named colour
            objs = [o for o in lay if o.shape == shape]
            assert len(objs) == n and all(colour in (None, o.colour) for o in objs), p.text
        assert len(lay) == sum(n for *_, n in groups)
        if rel:
            a = next(o for o in lay if o.shape == rel[1][0])
            b = next(o for o in lay if o.shape == rel[2][0])
            ra, ca, rb, cb = a.cell // 4, a.cell % 4, b.cell // 4, b.cell % 4
            assert {"left_of": ca < cb, "right_of": ca > cb, "above": ra < rb,
                    "below": ra > rb}[rel[0]], p.text


def test_fill_ratios_separate_the_shapes_with_margin():
    for shape in toy.SHAPES:
        img = toy.render([toy.Obj("red", shape, 5)])
        on = img.sum(0) > 0
        ys, xs = torch.nonzero(on, as_tuple=True)
        fill = on.sum().item() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)).item()
        assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (toy.OBJ, toy.OBJ)
        low, high = {"square": (toy.SQUARE_FILL + 0.05, 1.0),
                     "circle": (toy.CIRCLE_FILL + 0.05, toy.SQUARE_FILL - 0.1),
                     "triangle": (0.3, toy.CIRCLE_FILL - 0.1)}[shape]
        assert low <= fill <= high, (shape, fill)


def _bfs_components(img):
    """Plain-Python oracle: [(colour code, area, x0, x1, y0, y1)] of 4-connected equal-code
    components."""
    on = (img > 0.5).int()
    code = (on[0] * 4 + on[1] * 2 + on[2]).tolist()
    seen, comps = set(), []
    for y in range(32):
        for x in range(32):
            if code[y][x] == 0 or (y, x) in seen:
                continue
            q, pix = deque([(y, x)]), []
            seen.add((y, x))
            while q:
                cy, cx = q.popleft()
                pix.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if (0 <= ny < 32 and 0 <= nx < 32 and (ny, nx) not in seen
                            and code[ny][nx] == code[y][x]):
                        seen.add((ny, nx))
                        q.append((ny, nx))
            yy, xx = [p[0] for p in pix], [p[1] for p in pix]
            comps.append((code[y][x], len(pix), min(xx), max(xx), min(yy), max(yy),
                          sum(xx) / len(pix)))
    return comps


def test_vectorised_labeller_matches_bfs_on_random_blobs():
    g = torch.Generator().manual_seed(0)
    # random rectangles and snakes in 8 codes, overlapping: concave, nested and touching components
    imgs = torch.zeros(12, 3, 32, 32)
    for r in range(12):
        for _ in range(10):
            c = torch.randint(1, 8, (1,), generator=g).item()
            rgb = torch.tensor([(c >> 2) & 1, (c >> 1) & 1, c & 1], dtype=torch.float32)
            y0, x0 = torch.randint(0, 30, (2,), generator=g).tolist()
            h, w = torch.randint(1, 12, (2,), generator=g).tolist()
            imgs[r, :, y0:y0 + h, x0:x0 + w] = rgb[:, None, None] * 0.9 + 0.05
        # holes, below threshold
        imgs[r] = torch.where(torch.rand(1, 32, 32, generator=g) < 0.1, 0.3, imgs[r])
    names = {4: "red", 2: "green", 1: "blue", 6: "yellow"}
    for img, found in zip(imgs, toy.detect_batch(imgs)):
        want = sorted((names.get(c, "unknown"), a, round(cx, 6))
                      for c, a, *_, cx in _bfs_components(img) if a >= toy.MIN_AREA)
        assert sorted((d.colour, d.area, round(d.x, 6)) for d in found) == want
        assert len(want) > 0


# --- targeted mistakes cost exactly their point ---------------------------------------------------
def _lost(objects, p):
    return {n for n, ok in zip(toy.point_names(p), toy.exam_points(objects, p)) if not ok}


def _free_cell(lay, rng):
    return rng.choice([k for k in range(16) if k not in {o.cell for o in lay}])


def _mutations(p, lay, rng):
    """(name, mutated layout, expected lost points) for mistakes that apply to p."""
    out = []
    g = p.groups[0]
    other = next(c for c in toy.COLOURS if c != g.colour)
    if g.colour is not None:  # recolour one object of the first group
        i = next(i for i, o in enumerate(lay) if o.shape == g.shape)
        out.append(("colour", lay[:i] + [toy.Obj(other, g.shape, lay[i].cell)] + lay[i + 1:],
                    {f"colour {g.shape}"}))
    if p.category == "counting":
        i = next(i for i, o in enumerate(lay) if o.shape == g.shape)
        out.append(("one fewer", lay[:i] + lay[i + 1:],
                    {f"count {g.shape}"}
                    | ({f"present {g.shape}", f"colour {g.shape}"} if g.count == 1 else set())))
        if g.count < 4:
            out.append(("one more", lay + [toy.Obj(g.colour, g.shape, _free_cell(lay, rng))],
                        {f"count {g.shape}", "no_extra"}))
    if p.relation is not None:  # swap the two objects' cells
        a, b = lay
        out.append(("swap",
                    [toy.Obj(a.colour, a.shape, b.cell), toy.Obj(b.colour, b.shape, a.cell)],
                    {"relation"}))
    unused = [s for s in toy.SHAPES if s not in {x.shape for x in p.groups}]
    if unused:
        out.append(("extra", lay + [toy.Obj("red", unused[0], _free_cell(lay, rng))], {"no_extra"}))
    if p.category in ("single_object", "two_object"):
        out.append(("missing", [o for o in lay if o.shape != g.shape], {f"present {g.shape}"}))
    if p.category == "single_object":
        out.append(("duplicate", lay + [toy.Obj("blue", g.shape, _free_cell(lay, rng))],
                    {"no_extra"}))
    return out


def test_each_mistake_loses_exactly_its_point_in_plans_and_images():
    rng = random.Random(0)
    cases = []
    for p in toy.prompts("train", 15, seed=5) + toy.prompts("eval", 15, seed=6):
        for name, lay, lost in _mutations(p, toy.random_layout(p, rng), rng):
            assert _lost(lay, p) == lost, (p.text, name)
            cases.append((p, lay, lost, name))
    assert ({n for *_, n in cases}
            == {"colour", "one fewer", "one more", "swap", "extra", "missing", "duplicate"})
    images = toy.render_batch([lay for _, lay, _, _ in cases])
    for (p, _, lost, name), found in zip(cases, toy.detect_batch(images)):
        assert _lost(found, p) == lost, (p.text, name)
    s = toy.score_images(images, [c[0] for c in cases])
    n_points = torch.tensor([len(toy.point_names(c[0])) for c in cases], dtype=torch.float32)
    want = 1 - torch.tensor([len(c[2]) for c in cases]) / n_points
    assert torch.allclose(s.points, want) and not s.all_correct.any()


def test_unknown_colour_and_specks():
    p = toy.make_prompt("colors", 0)
    lay = toy.random_layout(p, 0)
    img = toy.render(lay)
    k = _free_cell(lay, random.Random(0))
    y, x = (k // 4) * 8, (k % 4) * 8
    speck = img.clone()
    speck[:, y:y + 3, x:x + 3] = 1.0  # 9 px white < MIN_AREA: ignored
    speck[0, y + 5, x + 5] = 0.45  # below threshold: black
    assert toy.score_images(speck[None], [p]).all_correct.item()
    white = img.clone()
    white[:, y:y + 7, x:x + 7] = 1.0  # a white (unknown) square is an extra object
    assert _lost(toy.detect(white), p) == {"no_extra"}
    assert [d.colour for d in toy.detect(white)].count(toy.UNKNOWN) == 1


@pytest.mark.parametrize("kind", toy.RELATIONS)
def test_relation_margin_on_centroids(kind):
    """a <kind> b needs the centroids more than MARGIN px apart along the relation's axis,
    in its direction."""
    p = toy.Prompt("", "position", (toy.Group("circle", "red", 1), toy.Group("square", "blue", 1)),
                 toy.Relation(kind, 0, 1), (), "train")
    sign = -1 if kind in ("left_of", "above") else 1  # a's coordinate minus b's must have this sign
    for gap, ok in ((toy.MARGIN + 0.5, True), (toy.MARGIN - 0.5, False),
                    (-(toy.MARGIN + 0.5), False)):
        dx, dy = (sign * gap, 0.0) if kind in ("left_of", "right_of") else (0.0, sign * gap)
        a = toy.Detected("red", "circle", 12.0 + dx, 12.0 + dy, 37)
        b = toy.Detected("blue", "square", 12.0, 12.0, 49)
        assert toy.exam_points([a, b], p)[toy.point_names(p).index("relation")] is ok, (kind, gap)


# --- plans ----------------------------------------------------------------------------------------
def test_plan_round_trip(world):
    ps, layouts, _ = world
    for lay in layouts:
        text = toy.plan_text(lay)
        assert toy.parse_plan(text) == lay
        assert toy.plan_text(toy.parse_plan(text)) == text
        assert text == " ; ".join(f"c{o.cell} {o.colour} {o.shape}" for o in lay)
    shuffled = " ; ".join(reversed(toy.plan_text(layouts[-1]).split(" ; ")))
    assert toy.parse_plan(shuffled) == toy.parse_plan(toy.plan_text(layouts[-1]))[::-1]


def test_canonical_plan_follows_the_prompt_order(world):
    """random_layout's order: the prompt's groups as the text names them, each group's objects by
    cell; so "a red circle and a blue square" plans the circle first wherever it lies."""
    ps, layouts, _ = world
    firsts = set()
    for p, lay in zip(ps, layouts):
        words = p.text.split()
        named = sorted({o.shape for o in lay}, key=lambda s: min(i for i, w in enumerate(words)
                                                                  if w in (s, toy.PLURAL[s])))
        assert [o.shape for o in lay] == [s for s in named for o in lay if o.shape == s]
        for s in named:
            cells = [o.cell for o in lay if o.shape == s]
            assert cells == sorted(cells)
        if p.category == "color_attr":
            assert [(o.colour, o.shape) for o in lay] == [tuple(words[i:i + 2]) for i in (1, 5)]
            firsts.add(lay[0].cell < lay[1].cell)
    assert firsts == {True, False}          # not cell order in disguise


@pytest.mark.parametrize("bad", ["", "c1 red", "c16 red circle", "c1 purple circle", "1 red circle",
                                 "c1 circle red", "c1 red circle ;", "; c1 red circle",
                                 "c1 red circle c2 blue square", "c1 red circle ; c1 blue square",
                                 "c1 red circle , c2 blue square",
                                 "c1 red circle ; ; c2 blue square", "c1 red circles",
                                 "red circle c1"])
def test_parse_plan_rejects(bad):
    assert toy.parse_plan(bad) is None


def test_score_plans_unparsable_is_zero_and_partial_is_fractional():
    p = toy.make_prompt("colors", 1)
    s = toy.score_plans(["c3 red", f"c3 {next(c for c in toy.COLOURS if c != p.groups[0].colour)} "
                                   f"{p.groups[0].shape}"], [p, p])
    assert (s.points.tolist() == pytest.approx([0.0, 2 / 3])
            and s.all_correct.tolist() == [False, False])


# --- prompts, splits, vocabulary ------------------------------------------------------------------
def test_prompts_mean_what_they_say_and_carry_their_key():
    for split in toy.SPLITS:
        for p in toy.prompts(split, 60, seed=7):
            assert interpret(p.text) == semantics(p), p.text
            assert p.key == expected_key(p), p.text
            assert p.key in toy.combination_keys(p.category, split) and p.split == split
            assert len(p.text.split()) <= 10


def test_eval_combos_are_held_out_of_training():
    for c in toy.CATEGORIES:
        train, ev = set(toy.combination_keys(c, "train")), set(toy.combination_keys(c, "eval"))
        if c in ("single_object", "two_object"):  # too few combos: eval = train (documented)
            assert train == ev
            continue
        assert not train & ev and train | ev == set(toy._all_keys(c))
        assert 0.15 <= len(ev) / (len(ev) + len(train)) <= 0.25, c
        # the documented rule: per stratum, the round(20%) keys of smallest md5(repr(key))
        field = {"counting": 0, "colors": 2, "position": 0, "color_attr": None}[c]
        want = set()
        for value in {None if field is None else k[field] for k in train | ev}:
            stratum = sorted((k for k in train | ev if field is None or k[field] == value),
                             key=lambda k: hashlib.md5(repr(k).encode()).hexdigest())
            want |= set(stratum[:round(0.2 * len(stratum))])
        assert ev == want, c
    # every stratum (count, phrasing, axis) is represented in eval
    assert {k[0] for k in toy.combination_keys("counting", "eval")} == {1, 2, 3, 4}
    assert {k[2] for k in toy.combination_keys("colors", "eval")} == {"word", "ref"}
    assert {k[0] for k in toy.combination_keys("position", "eval")} == {"horizontal", "vertical"}
    # every phrasing of a held-out position arrangement stays in eval
    eval_prompts = [p for p in toy.prompts("eval", 400, seed=8) if p.category == "position"]
    assert ({("with" in p.text, p.relation.kind) for p in eval_prompts}
            == {(w, k) for w in (0, 1) for k in toy.RELATIONS})


def test_prompts_are_deterministic_per_seed():
    assert toy.prompts("train", 20, seed=3) == toy.prompts("train", 20, seed=3)
    assert toy.prompts("train", 20, seed=3) != toy.prompts("train", 20, seed=4)
    assert (toy.make_prompt("position", random.Random(9), "eval")
            == toy.make_prompt("position", 9, "eval"))
    p = toy.make_prompt("counting", 1)
    assert toy.random_layout(p, random.Random(2)) == toy.random_layout(p, 2)


def test_random_layout_is_uniform_over_valid_layouts():
    p = toy.Prompt("a red circle left_of a blue square", "position", (toy.Group("circle", "red", 1),
                 toy.Group("square", "blue", 1)), toy.Relation("left_of", 0, 1), (), "train")
    rng = random.Random(0)
    counts = Counter(tuple(o.cell for o in sorted(toy.random_layout(p, rng), key=lambda o: o.shape))
                     for _ in range(4800))
    # 96 pairs, 50 expected each
    valid = [(a, b) for a in range(16) for b in range(16) if a % 4 < b % 4]
    assert set(counts) == set(valid)
    chi2 = sum((counts[v] - 50) ** 2 / 50 for v in valid)
    assert chi2 < 150  # df 95: the 0.999 quantile is about 145
    single = toy.Prompt("a circle", "single_object", (toy.Group("circle", None, 1),), None,
                        ("circle",), "train")
    colours = Counter(toy.random_layout(single, rng)[0].colour for _ in range(2000))
    assert set(colours) == set(toy.COLOURS) and min(colours.values()) > 400


def test_vocabulary_covers_every_prompt_and_plan(world):
    ps, layouts, _ = world
    vocab = toy.vocabulary()
    assert len(vocab) == len(set(vocab)) <= 60
    assert (toy.cell_tokens() == [f"c{k}" for k in range(16)]
            and set(toy.cell_tokens()) <= set(vocab))
    words = {w for p in ps + toy.prompts("train", 200, 11) for w in p.text.split()}
    words |= {w for lay in layouts for w in toy.plan_text(lay).split()}
    assert words <= set(vocab)


# --- summaries and the reward interface -----------------------------------------------------------
def test_summarize_on_a_hand_built_case():
    one = toy.make_prompt("single_object", 0)
    col = toy.make_prompt("colors", 0)
    s = toy.Scores(torch.tensor([1.0, 0.5, 1 / 3, 2 / 3]),
                   torch.tensor([True, False, False, False]))
    out = toy.summarize(s, [one, one, col, col])
    assert (out["ta/single_object"] == pytest.approx(0.75)
            and out["accuracy/single_object"] == pytest.approx(0.5))
    assert out["ta/colors"] == pytest.approx(0.5) and out["accuracy/colors"] == pytest.approx(0.0)
    assert out["ta"] == pytest.approx(0.625) and out["accuracy"] == pytest.approx(0.25)
    assert set(out) == {"ta", "accuracy", "ta/single_object", "accuracy/single_object", "ta/colors",
                        "accuracy/colors"}


def test_value_errors():
    p = toy.make_prompt("colors", 0)
    cases = [(lambda: toy.prompts("test", 1, 0), "split"),
             (lambda: toy.make_prompt("bogus", 0), "category"),
             (lambda: toy.combination_keys("counting", "dev"), "split"),
             (lambda: toy.make_prompt("colors", 1.5), "rng"),
             (lambda: toy.score_images(torch.zeros(2, 3, 32, 32), [p]), "images"),
             (lambda: toy.score_images(torch.zeros(1, 3, 16, 16), [p]), "images"),
             (lambda: toy.detect(torch.zeros(3, 32)), "image"),
             (lambda: toy.score_plans(["c1 red circle"], [p, p]), "texts"),
             (lambda: toy.summarize(toy.Scores(torch.ones(1), torch.ones(1, dtype=torch.bool)),
                                    [p, p]), "scores"),
             (lambda: toy.Obj("purple", "circle", 0), "Obj"),
             (lambda: toy.Obj("red", "circle", 16), "Obj"),
             (lambda: toy.plan_text([toy.Obj("red", "circle", 1), toy.Obj("blue", "square", 1)]),
              "layout"),
             (lambda: toy.plan_text([]), "layout"),
             (lambda: toy.render_batch([[toy.Obj("red", "circle", 1),
                                         toy.Obj("blue", "square", 1)]]), r"layouts\[0\]"),
             (lambda: toy.parse_plan(3), "text"),
             (lambda: toy.prompts("train", -1, 0), "n_per_category"),
             (lambda: toy.Prompt("x", "counting", (toy.Group("circle", "red", 1),) * 2, None, (),
                                 "train"), "groups"),
             (lambda: toy.Prompt("x", "position",
                                 (toy.Group("circle", "red", 1), toy.Group("square", "red", 1)),
                                 toy.Relation("near", 0, 1), (), "train"), "relation")]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_plan_following_counts_planned_objects_drawn_in_their_cell(world):
    ps, layouts, _ = world
    texts = [toy.plan_text(l) for l in layouts]
    n = sum(len(l) for l in layouts)
    assert evaluate.plan_following(texts, toy.render_batch(layouts)) == (n, n)
    # the planned object drawn one cell to the right (wrapping within its row):
    # not where the plan put it
    firsts = [l[0] for l in layouts]
    shifted = [[toy.Obj(o.colour, o.shape, o.cell - o.cell % 4 + (o.cell + 1) % 4)] for o in firsts]
    assert (evaluate.plan_following([toy.plan_text([o]) for o in firsts], toy.render_batch(shifted))
            == (0, len(firsts)))
    # right cell, wrong colour or shape: not followed; an unparsable plan plans nothing
    one = [toy.Obj("red", "circle", 5)]
    assert evaluate.plan_following(["c5 red circle"],
                              toy.render_batch([[toy.Obj("blue", "circle", 5)]])) == (0, 1)
    assert evaluate.plan_following(["c5 red circle"],
                              toy.render_batch([[toy.Obj("red", "square", 5)]])) == (0, 1)
    assert evaluate.plan_following(["c5 red"], toy.render_batch([one])) == (0, 0)
    with pytest.raises(ValueError, match="texts"):
        evaluate.plan_following(["c5 red circle"], toy.render_batch([one, one]))


def test_corrupt_layout_makes_exactly_one_error_of_each_kind():
    """Each corruption is one edit of the layout: the multiset difference has the size
    of its kind."""
    rng = random.Random(0)
    seen = Counter()
    for i in range(600):
        p = toy.make_prompt(toy.CATEGORIES[i % len(toy.CATEGORIES)], rng)
        layout = toy.random_layout(p, rng)
        bad = toy.corrupt_layout(layout, rng)
        assert len({o.cell for o in bad}) == len(bad)                          # distinct cells
        kept = [o for o in layout if o in bad]
        assert [o for o in bad if o in kept] == kept                   # the others keep their order
        before, after = Counter(layout), Counter(bad)
        gone, new = sum((before - after).values()), sum((after - before).values())
        kind = {(1, 0): "drop", (0, 1): "add"}.get((gone, new))
        if kind is None:
            assert (gone, new) == (1, 1)
            (o,), (q,) = list(before - after), list(after - before)
            changed = (o.colour != q.colour, o.shape != q.shape, o.cell != q.cell)
            assert sum(changed) == 1
            kind = ("recolour", "reshape", "move")[changed.index(True)]
        if kind == "drop":
            assert len(layout) >= 2                                           # never an empty scene
        seen[kind] += 1
    assert set(seen) == set(toy.CORRUPTIONS) and min(seen.values()) > 60
    with pytest.raises(ValueError, match="layout"):
        toy.corrupt_layout([], rng)


def test_corrupted_layouts_lose_points_and_never_score_above_the_truth():
    """What noisy SFT data teaches: a corrupted layout keeps at most the points of the true one, and
    loses at least one in most cases (recolouring an unnamed colour or moving an object without a
    relation is free)."""
    rng = random.Random(1)
    lost = total = 0
    for i in range(600):
        p = toy.make_prompt(toy.CATEGORIES[i % len(toy.CATEGORIES)], rng)
        layout = toy.random_layout(p, rng)
        pts = toy.exam_points(toy.corrupt_layout(layout, rng), p)
        assert sum(pts) <= sum(toy.exam_points(layout, p)) == len(pts)
        lost += sum(pts) < len(pts)
        total += 1
    assert 0.5 < lost / total < 1.0


def test_background_noise_is_zero_on_renders_and_reads_only_dark_pixels(world):
    _, _, images = world
    assert evaluate.background_noise(images) == 0.0
    noisy = images.clone()
    dark = (images < 0.5).all(1, keepdim=True).expand_as(images)
    noisy[:, 2][dark[:, 2]] = 0.3           # a blue haze on the background, below the 0.5 threshold
    assert evaluate.background_noise(noisy) == pytest.approx(0.3)
    objects = images.clone()
    objects[~dark] = 0.9                           # brighter objects do not count
    assert evaluate.background_noise(objects) == 0.0
    with pytest.raises(ValueError, match="images"):
        evaluate.background_noise(torch.zeros(3, 32, 32))
