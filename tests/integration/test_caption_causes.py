"""Captions explained mention by mention on shapes-llava: CHAIR's token spans are the mentions'
tokens; a shape planted into a caption where the scene has none is flagged, and the image pushes it
less than the shapes that are there; every mention's sources add up to its token's log-probability;
the earlier word named for a mention is the one whose hiding lowers it most."""
from __future__ import annotations

import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.bench.caption_causes import cause_of
from lvlm_probe.errors import InputError
from lvlm_probe.hooks import attention
from lvlm_probe.worlds.evaluation import CAPTION_PROMPT

pytestmark = pytest.mark.skipif("shapes-llava" not in lp.zoo.checkpoints(),
                                reason="shapes-llava checkpoint not shipped")
N = 60


@pytest.fixture(scope="module")
def model():
    return lp.zoo.load("shapes-llava", device="cpu")


@pytest.fixture(scope="module")
def planted(model):
    """N scenes, each captioned by the world with its first object's shape replaced by a shape the
    scene does not hold: one planted hallucination per caption, every other mention true."""
    world = lp.worlds.ShapesWorld(seed=4242, image_size=64)
    scenes = world.scenes(N)
    captions, planted = [], []
    for k, scene in enumerate(scenes):
        present = {o.shape for o in scene.objects}
        absent = [s for s in world.config.shapes if s not in present]
        shape = scene.objects[0].shape
        other = absent[k % len(absent)]
        captions.append(world.caption(scene).replace(shape, other, 1))
        planted.append(other)
    return scenes, captions, planted, lp.bench.explain_captions(model, scenes, captions, maps=None, progress=False)


def test_chair_token_spans_are_the_mentions_tokens(model):
    world = lp.worlds.ShapesWorld(seed=77, image_size=64)
    batch = model.prepare(images=[s.render() for s in world.scenes(12)], prompts=[CAPTION_PROMPT] * 12)
    out = model.generation(batch, 40)
    found = lp.bench.chair(out.texts, world.scenes(12), token_ids=out.token_ids, tokenizer=model.tokenizer)
    assert len(found.mentions) >= 12
    for m in found.mentions.itertuples():
        ids = out.token_ids[m.caption]
        assert model.tokenizer.decode(ids[m.token_start:m.token_end]).strip().lower() == m.word
        assert out.texts[m.caption].lower()[m.char_start:m.char_end] == m.word
    with pytest.raises(InputError, match="is not the text of its token ids"):
        lp.bench.chair(["a red heart"], [["heart"]], token_ids=[out.token_ids[0]], tokenizer=model.tokenizer)


def test_planted_shapes_are_flagged_and_the_image_pushes_them_less(planted):
    scenes, captions, shapes, result = planted
    m = result.mentions
    first = m[m["mention"] == 0]
    assert len(first) == N and first["hallucinated"].all() and list(first["object"]) == shapes
    assert not m.loc[m["mention"] > 0, "hallucinated"].any()
    wrong, right = m[m["hallucinated"]], m[~m["hallucinated"]]
    assert wrong["image"].mean() < right["image"].mean() - 1.0
    assert wrong["image_share"].mean() < right["image_share"].mean()
    assert set(wrong["cause"]) <= set(lp.bench.CAPTION_CAUSES) and right["cause"].isna().all()
    assert all(cause_of(row) == row["cause"] for _, row in wrong.iterrows())
    summary = result.summary()
    assert summary["hallucinated"] == N and sum(summary[c] for c in lp.bench.CAPTION_CAUSES) == N


def test_each_mention_splits_its_first_tokens_log_probability(model, planted):
    scenes, captions, _, result = planted
    m = result.mentions
    torch.testing.assert_close(torch.tensor(m[["prior", "prompt", "image", "generated"]].sum(axis=1).values),
                               torch.tensor(m["full"].values), atol=1e-4, rtol=0)
    k = 3
    batch = model.prepare(images=[scenes[k].render()], prompts=[CAPTION_PROMPT])
    ids = model.continuation_tokens(batch, 0, captions[k])
    with torch.no_grad():
        logits = model.run(model.continued(batch, [ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = batch.input_ids.shape[1]
    for row in m[m["caption"] == k].itertuples():
        assert row.full == pytest.approx(float(logprobs[start - 1 + row.token_start, ids[row.token_start]]), abs=1e-4)


def test_the_strongest_earlier_word_is_the_one_whose_hiding_costs_most(model, planted):
    """For a planted mention after other words: hiding the named word lowers the token's
    log-probability by the reported drop, and hiding any other earlier word by no more."""
    scenes, captions, _, result = planted
    later = result.mentions[result.mentions["hallucinated"] & (result.mentions["token_start"] >= 3)]
    row = later.iloc[0]  # "A small red <star>": the reader is "red", the earlier words "A small"
    k = int(row["caption"])
    batch = model.prepare(images=[scenes[k].render()], prompts=[CAPTION_PROMPT])
    ids = model.continuation_tokens(batch, 0, captions[k])
    token = int(row["token_start"])
    forced = lp.attribution.teacher_forced(model, batch, [ids[:token]])
    start, length = batch.input_ids.shape[1], forced.input_ids.shape[1]
    drops = {}
    for first in range(token - 1):  # every earlier token on its own (words here are one token each)
        hidden = torch.zeros(1, length, dtype=torch.bool)
        hidden[0, start + first] = True
        with torch.no_grad(), attention.hiding_positions(model, hidden):
            logits = model.run(forced.inputs, last_position=True).logits[0, -1].float()
        drops[model.tokenizer.decode([ids[first]]).strip().strip(".,").lower()] = float(row["full"]) - float(
            torch.log_softmax(logits, -1)[ids[token]])
    assert drops[row["strongest_word"]] == pytest.approx(row["strongest_word_drop"], abs=1e-4)
    assert max(drops.values()) == pytest.approx(row["strongest_word_drop"], abs=1e-4)


def test_every_mention_gets_the_image_map_of_its_first_token(model, planted):
    """maps=: one map per mention, scoring the mention's first token (its value is the token's
    log-probability in the split)."""
    scenes, captions, _, _ = planted
    result = lp.bench.explain_captions(model, scenes[:3], captions[:3], maps="ablation", progress=False)
    m = result.mentions
    assert sorted(result.maps) == sorted(zip(m["caption"], m["mention"]))
    for row in m.itertuples():
        explained = result.maps[(row.caption, row.mention)]
        assert explained.method == "ablation" and explained.targets == [row.token]
        assert float(explained.values[0]) == pytest.approx(row.full, abs=1e-4)


def test_bad_caption_input_is_named(model):
    world = lp.worlds.ShapesWorld(seed=5, image_size=64)
    scenes = world.scenes(2)
    with pytest.raises(InputError, match="got 1 captions for 2 images"):
        lp.bench.explain_captions(model, scenes, ["a red heart"], progress=False)
    with pytest.raises(InputError, match="truths are needed"):
        lp.bench.explain_captions(model, [s.render() for s in scenes], progress=False)
    with pytest.raises(InputError, match="maps must be one of"):
        lp.bench.explain_captions(model, scenes, maps="gradcam", progress=False)
    with pytest.raises(InputError, match=r"captions\[1\] is int"):
        lp.bench.explain_captions(model, scenes, ["a red heart", 3], progress=False)
