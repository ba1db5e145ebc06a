"""ShapesWorld: determinism, gold answers against the scene graph, priors, rendering, pairs, export, errors.

Gold answers are re-derived here from bounding boxes and attributes, independently of the world's
own relation code.
"""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from lvlm_probe.errors import InputError
from lvlm_probe.worlds import PALETTE, ShapesWorld

MARGIN = 0.15  # relation margin, as a fraction of the image side
RELS = ("left", "right", "above", "below")
PHRASE = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(seed=0, image_size=64)


def true_relations(scene, i, j):
    """Relations of object i to object j that hold by more than the margin, from bbox centres."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = scene.objects[i].bbox, scene.objects[j].bbox
    dx = ((bx0 + bx1) - (ax0 + ax1)) / 2 / scene.image_size
    dy = ((by0 + by1) - (ay0 + ay1)) / 2 / scene.image_size
    sep = {"left": dx, "right": -dx, "above": dy, "below": -dy}
    return {r for r in RELS if sep[r] > MARGIN}, sep


def gold(q):
    """The answer to a question, derived from its prompt and scene graph only."""
    words = q.prompt.rstrip("?.").split("?")[0].split()
    objs = {o.shape: (k, o) for k, o in enumerate(q.scene.objects)}
    if q.kind == "exist":
        return "yes" if words[3] in objs else "no"
    if q.kind == "color":
        return objs[words[4].rstrip("?")][1].color
    if q.kind == "size":
        return objs[words[2]][1].size
    if q.kind == "color_yesno":
        return "yes" if objs[words[2]][1].color == words[3] else "no"
    if q.kind == "relation_yesno":
        body = q.prompt.split("?")[0][len("Is the ") :]
        a, rest = body.split(" ", 1)
        phrase, b = rest.rsplit(" the ", 1)
        held, sep = true_relations(q.scene, objs[a][0], objs[b][0])
        rel = PHRASE[phrase]
        assert abs(sep[rel]) > MARGIN, f"ambiguous relation asked: {q.prompt}"
        return "yes" if rel in held else "no"
    if q.kind == "where":
        a, b = words[3], words[7]
        held, _ = true_relations(q.scene, objs[a][0], objs[b][0])
        assert len(held) == 1, f"'where' asked with {held}: {q.prompt}"
        return held.pop()
    raise AssertionError(q.kind)


def pixels(q):
    return np.asarray(q.image)


# -- determinism ---------------------------------------------------------------------------------


def test_same_seed_same_questions_and_pixels(world):
    again = ShapesWorld(seed=0, image_size=64)
    for level in ("object", "attribute", "relation"):
        a, b = world.questions(6, level=level), again.questions(6, level=level)
        assert [q.to_dict()["prompt"] for q in a] == [q.prompt for q in b]
        assert [q.scene for q in a] == [q.scene for q in b]
        assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))


def test_streams_are_per_item_and_seeds_differ(world):
    # item k does not depend on how many items or which other sets were generated before
    world.questions(3, level="relation")
    long, short = world.questions(10, level="attribute"), world.questions(4, level="attribute")
    assert long[:4] == short
    assert world.scenes(8)[5] == world.scenes(6)[5]
    other = ShapesWorld(seed=1, image_size=64)
    assert [s for s in world.scenes(10)] != other.scenes(10)
    assert world.scenes(10, split="train") != world.scenes(10, split="typical")  # disjoint streams


# -- gold answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "level,pope",
    [
        ("object", "random"),
        ("object", "popular"),
        ("object", "adversarial"),
        ("attribute", None),
        ("relation", None),
    ],
)
@pytest.mark.parametrize("split", ["train", "typical", "counterfactual"])
def test_answers_match_scene_graph(world, level, pope, split):
    qs = world.questions(60, level=level, split=split, pope=pope)
    assert len({q.id for q in qs}) == 60
    for q in qs:
        assert q.answer == gold(q), q
        assert q.answer.islower() and " " not in q.answer
        for k in q.about:
            assert q.scene.objects[k].shape in q.prompt
        shapes = [o.shape for o in q.scene.objects]
        assert len(set(shapes)) == len(shapes) >= 1
    yesno = [q.answer for q in qs if q.answer in ("yes", "no")]
    if yesno:
        assert abs(yesno.count("yes") - yesno.count("no")) <= 1


def test_kinds_select_and_mix(world):
    assert {q.kind for q in world.questions(9, level="attribute")} == {
        "color",
        "size",
        "color_yesno",
    }
    assert {q.kind for q in world.questions(6, level="attribute", kind="size")} == {"size"}
    assert {q.kind for q in world.questions(6, level="relation")} == {"relation_yesno", "where"}
    where = world.questions(40, level="relation", kind="where")
    assert {q.answer for q in where} == set(RELS)


def test_relations_are_unambiguous_for_every_pair(world):
    # the layout leaves a gap around the margin: each axis is clearly apart or clearly aligned
    for scene in world.scenes(300):
        for i, j in combinations(range(len(scene)), 2):
            held, sep = true_relations(scene, i, j)
            assert held, "two objects in distinct cells differ on at least one axis"
            for s in sep.values():
                assert abs(s) < MARGIN - 0.05 or abs(s) > MARGIN + 0.05
            assert set(scene.relations(i, j)) == held
        for o in scene.objects:
            assert 0 <= o.bbox[0] < o.bbox[2] <= 64 and 0 <= o.bbox[1] < o.bbox[3] <= 64


# -- POPE sampling -------------------------------------------------------------------------------


def test_pope_negatives(world):
    partner = {a: b for p in world.cooccurring for a, b in (p, p[::-1])}
    freq = {s: 0 for s in world.config.shapes}
    train = world.scenes(3000, split="train")
    for scene in train:
        for o in scene.objects:
            freq[o.shape] += 1 / len(train)
    for mode in ("random", "popular", "adversarial"):
        negatives = [q for q in world.questions(80, level="object", pope=mode) if q.answer == "no"]
        assert len(negatives) == 40
        for q in negatives:
            present = {o.shape for o in q.scene.objects}
            assert q.shape not in present and q.about == ()
            if mode == "adversarial":
                assert partner[q.shape] in present and q.other == partner[q.shape]
            if mode == "popular":
                best = max(freq[s] for s in freq if s not in present)
                assert freq[q.shape] >= best - 0.03
    # random negatives follow the scenes: a present shape's partner is absent (and asked about)
    # only in the scenes that break the pair, so far less often than adversarial sampling asks
    partners = [q for q in world.questions(400, level="object", pope="random") if q.answer == "no"
                and partner.get(q.shape) in {o.shape for o in q.scene.objects}]
    assert len(partners) < 0.15 * 200
    # paired shapes are more frequent, so popular negatives are paired shapes
    popular = {
        q.shape for q in world.questions(40, level="object", pope="popular") if q.answer == "no"
    }
    assert popular <= set(partner)


# -- priors and splits ---------------------------------------------------------------------------


def test_prior_frequencies_match_knobs():
    for p_color, p_co in ((0.85, 0.8), (0.3, 0.5)):
        w = ShapesWorld(seed=2, p_typical_color=p_color, p_cooccur=p_co)
        typical, n_objects, either, both = 0, 0, 0, 0
        for scene in w.scenes(3000):
            shapes = {o.shape for o in scene.objects}
            for o in scene.objects:
                typical += o.color == w.typical_colors[o.shape]
                n_objects += 1
            for a, b in w.cooccurring:
                either += a in shapes or b in shapes
                both += a in shapes and b in shapes
        assert abs(typical / n_objects - p_color) < 0.03
        assert abs(both / either - p_co) < 0.03


def test_splits_steer_colors_and_cooccurrence(world):
    typ = world.questions(60, level="attribute", split="typical")
    assert all(
        q.scene.objects[q.about[0]].color == world.typical_colors[q.shape] == q.typical_color
        for q in typ
    )
    cf = world.questions(60, level="attribute", split="counterfactual")
    assert all(q.scene.objects[q.about[0]].color != world.typical_colors[q.shape] for q in cf)
    for scene in world.scenes(300, split="counterfactual"):
        shapes = {o.shape for o in scene.objects}
        assert all(o.color != world.typical_colors[o.shape] for o in scene.objects)
        assert not any(a in shapes and b in shapes for a, b in world.cooccurring)
    # counterfactual colour "no" questions name the typical colour, the prior's answer
    for q in cf:
        if q.kind == "color_yesno" and q.answer == "no":
            assert q.asked_color == world.typical_colors[q.shape]


# -- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 336])
def test_rendered_colour_at_bbox_centres(world, size):
    names = [*world.config.colors, world.config.background]
    ref = np.array([PALETTE[c] for c in names], dtype=float)
    for scene in world.scenes(12):
        img = np.asarray(scene.render(size)).astype(float)
        assert img.shape == (size, size, 3)
        big = scene.scaled(size)
        for o in big.objects:
            cx, cy = o.center
            px = img[int(cy), int(cx)]
            nearest = names[int(np.argmin(((ref - px) ** 2).sum(1)))]
            assert nearest == o.color
            if size == 336:
                assert np.abs(px - PALETTE[o.color]).max() <= 2


def test_render_rescales_and_caption_mentions_everything(world):
    scene = world.scenes(1)[0]
    assert scene.render(128).size == (128, 128) and scene.render().size == (64, 64)
    assert scene.scaled(128).objects[0].bbox == tuple(
        round(v * 2, 4) for v in scene.objects[0].bbox
    )
    for s in world.scenes(20):
        cap, desc = world.caption(s), world.describe(s)
        assert cap[0].isupper() and cap.endswith(".")
        for o in s.objects:
            assert (
                f"{o.size} {o.color} {o.shape}" in cap and f"{o.size} {o.color} {o.shape}" in desc
            )
    corpus = " ".join(world.corpus()).lower()
    for q in world.questions(10, level="relation") + world.questions(10, level="attribute"):
        assert all(
            word in corpus for word in q.prompt.lower().replace("?", " ").replace(".", " ").split()
        )


def test_training_examples_mix_levels(world):
    qs = world.training_questions(120)
    assert {q.level for q in qs} == {"object", "attribute", "relation"} and {
        q.split for q in qs
    } == {"train"}
    assert {q.pope for q in qs if q.level == "object"} == {"random", "popular", "adversarial"}
    assert all(q.answer == gold(q) for q in qs)
    img, prompt, answer = world.training_examples(3)[2]
    assert img.size == (64, 64) and (prompt, answer) == (qs[2].prompt, qs[2].answer)


def test_training_mix_weights_and_limits_the_tasks(world):
    mix = [("object", "exist", "random")] * 3 + [("relation", "where", None)]
    qs = world.training_questions(400, mix=mix)
    tasks = {(q.level, q.kind, q.pope) for q in qs}
    assert tasks == {("object", "exist", "random"), ("relation", "where", None)}
    share = sum(q.level == "object" for q in qs) / len(qs)
    assert 0.68 < share < 0.82  # 3 of 4
    assert all(q.answer == gold(q) for q in qs)
    for bad, match in ((["object"], "level, kind, pope"), ([("object", "color", None)], "kind"),
                       ([("object", "exist", None)], "POPE mode"),
                       ([("relation", "where", "random")], "only object tasks"), ([], "at least one")):
        with pytest.raises(InputError, match=match):
            world.training_questions(2, mix=bad)


# -- counterfactual pairs ------------------------------------------------------------------------


def _diff(a, b):
    return [(x, y) for x, y in zip(a.scene.objects, b.scene.objects) if x != y]


def test_pairs_differ_in_exactly_one_thing(world):
    for clean, bad in world.pairs(20, change="color"):
        ((x, y),) = _diff(clean, bad)
        assert (x.shape, x.size, x.bbox) == (y.shape, y.size, y.bbox) and x.color != y.color
        assert clean.prompt == bad.prompt and (clean.answer, bad.answer) == (x.color, y.color)
    for clean, bad in world.pairs(20, change="object"):
        ((x, y),) = _diff(clean, bad)
        assert (x.color, x.size, x.bbox) == (
            y.color,
            y.size,
            y.bbox,
        ) and y.shape not in clean.scene.shapes
        assert clean.prompt == bad.prompt and (clean.answer, bad.answer) == ("yes", "no") == (
            gold(clean),
            gold(bad),
        )
    for clean, bad in world.pairs(20, change="relation"):
        i, j = clean.about
        assert len(_diff(clean, bad)) == 2
        assert bad.scene.objects[i].center == pytest.approx(clean.scene.objects[j].center, abs=1e-3)
        assert bad.scene.objects[j].center == pytest.approx(clean.scene.objects[i].center, abs=1e-3)
        assert [o.shape for o in bad.scene.objects] == [o.shape for o in clean.scene.objects]
        assert clean.prompt == bad.prompt and (clean.answer, bad.answer) == ("yes", "no") == (
            gold(clean),
            gold(bad),
        )


# -- export --------------------------------------------------------------------------------------


def test_export_round_trips(world, tmp_path):
    qs = world.questions(6, level="object", pope="adversarial") + world.questions(
        4, level="relation"
    )
    qs += [q for pair in world.pairs(2, change="color") for q in pair]
    path = world.export(tmp_path, qs)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(qs)
    assert {"question_id", "image", "text", "label"} <= set(lines[0])
    assert [ln["label"] for ln in lines] == [q.answer for q in qs]
    assert (tmp_path / "scenes.jsonl").is_file()
    back = ShapesWorld.load_export(tmp_path)
    assert back == qs
    saved = np.asarray(Image.open(tmp_path / lines[0]["image"]).convert("RGB"))
    assert np.array_equal(saved, pixels(qs[0]))


def test_a_malformed_export_line_is_named(world, tmp_path):
    path = world.export(tmp_path, world.questions(3, level="attribute"))
    lines = path.read_text().splitlines()
    for bad, shown in (("{not json", "line 2: invalid JSON"),
                       (json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "about"}),
                        "line 2: no 'about'"),
                       (json.dumps({**json.loads(lines[1]), "scene_id": 99}), "line 2: no 99")):
        path.write_text("\n".join([lines[0], bad, lines[2]]) + "\n")
        with pytest.raises(InputError, match=shown):
            ShapesWorld.load_export(tmp_path)


# -- bad knobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,shown",
    [
        ({"p_typical_color": 1.5}, "1.5"),
        ({"p_cooccur": -0.1}, "-0.1"),
        ({"image_size": 16}, "16"),
        ({"max_objects": 10}, "10"),
        ({"max_objects": 0}, "0"),
        ({"shapes": ("circle", "blob")}, "blob"),
        ({"colors": ("red", "mauve")}, "mauve"),
        ({"seed": -1}, "-1"),
        ({"background": "red"}, "red"),
        ({"cooccurring": [("heart", "heart")]}, "heart"),
        ({"typical_colors": {"heart": "cyan"}}, "cyan"),
    ],
)
def test_bad_knobs_raise(kwargs, shown):
    with pytest.raises(InputError, match=shown):
        ShapesWorld(**kwargs)


@pytest.mark.parametrize(
    "call,shown",
    [
        (lambda w: w.questions(-1), "-1"),
        (lambda w: w.questions(2, level="scene"), "scene"),
        (lambda w: w.questions(2, split="test"), "test"),
        (lambda w: w.questions(2, pope="frequent"), "frequent"),
        (lambda w: w.questions(2, level="attribute", kind="shape"), "shape"),
        (lambda w: w.questions(2, level="attribute", pope="random"), "random"),
        (lambda w: w.pairs(2, change="size"), "size"),
        (lambda w: w.scenes(2, split="val"), "val"),
        (lambda w: w.scenes(1)[0].render(20), "20"),
    ],
)
def test_bad_arguments_raise(world, call, shown):
    with pytest.raises(InputError, match=shown):
        call(world)


def test_range_in_messages():
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ShapesWorld(p_cooccur=2)
    with pytest.raises(InputError, match=r"\[1, 3\]"):
        ShapesWorld(shapes=("circle", "square", "star"), max_objects=4)
    with pytest.raises(InputError, match="max_objects >= 2"):
        ShapesWorld(max_objects=1).questions(2, level="relation")


def test_concept_rows_pair_modalities_over_the_same_scenes():
    world = ShapesWorld(seed=0, image_size=64)
    images = world.concepts(20, objects=2, modality="image")
    texts = world.concepts(30, objects=2, modality="text")
    assert [r["scene"] for r in images] == [r["scene"] for r in texts[:20]]  # k independent of n
    for img, txt in zip(images, texts):
        assert img["image"].size == (64, 64) and txt["image"] is None
        assert img["prompt"] == "Describe the image."
        # the description names the labelled concepts of the first object, and the relation
        assert f"{txt['size']} {txt['color']} {txt['shape']}" in txt["prompt"]
        assert {k: img[k] for k in ("shape", "color", "size", "relation")} == \
               {k: txt[k] for k in ("shape", "color", "size", "relation")}
        if txt["relation"] is not None:
            assert txt["relation"] in txt["prompt"]
    single = world.concepts(10, objects=1)
    assert all(r["n_objects"] == 1 and r["relation"] is None for r in single)
    with pytest.raises(InputError, match="modality"):
        world.concepts(1, modality="audio")
    with pytest.raises(InputError, match="objects must be 1 or 2"):
        world.concepts(1, objects=3)
