"""Training of the reference model: an interrupted run resumes to the same weights; every example
counts the same in the loss; the answer-position heads read their targets off the scene graph."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lvlm_probe.errors import InputError
from lvlm_probe.worlds import ShapesWorld
from lvlm_probe.worlds.evaluation import CAPTION_PROMPT
from lvlm_probe.zoo.answer_heads import FIELDS, IGNORE, AnswerHeads, answer_targets, cell
from lvlm_probe.zoo.shapes_llava import Recipe, build_untrained
from lvlm_probe.zoo.train import STATE, collate, example_mean_loss, train, training_batch

MICRO = Recipe(
    steps=5, batch_size=2, warmup=1, vocab_size=300, vision_steps=3, vision_batch_size=2, position_code=True,
    projector_alignment_weight=0.5,
    answer_heads_layer=0,
    world=dict(image_size=32, max_objects=2, p_typical_color=0.85, p_cooccur=0.8),
    vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                patch_size=16),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=128),
)


class Interrupt(Exception):
    pass


def _stop_at(n):
    def on_step(step, loss):
        if step == n:
            raise Interrupt
    return on_step


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    straight = train(tmp_path / "straight", MICRO, device="cpu", checkpoint_every=2, progress=False)

    resumed = tmp_path / "resumed"
    # killed in stage 1 (vision), then in stage 2 (answers): each time the last state on disk is
    # older than the step that died, so work is redone from a checkpoint
    for stop, saved in ((1, 0), (5, 5)):
        with pytest.raises(Interrupt):
            train(resumed, MICRO, device="cpu", checkpoint_every=2, progress=False, on_step=_stop_at(stop))
        progress = resumed / STATE / "progress.json"
        assert (json.loads(progress.read_text())["step"] if progress.exists() else 0) == saved
    train(resumed, MICRO, device="cpu", checkpoint_every=2, progress=False)

    a = load_file(straight / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (resumed / STATE).exists()
    log = json.loads((resumed / "training.json").read_text())
    assert len(log["losses"]) == MICRO.vision_steps + MICRO.steps
    recipe = json.loads((resumed / "recipe.json").read_text())
    assert Recipe.from_dict(recipe) == MICRO and "Recipe.from_dict" in recipe["command"]


def test_training_lowers_the_loss(tmp_path):
    recipe = dataclasses.replace(MICRO, steps=30, batch_size=8, vision_steps=0, lr=1e-2)
    losses = []
    train(tmp_path / "m", recipe, device="cpu", progress=False,
          on_step=lambda step, loss: losses.append(loss))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_every_example_counts_the_same_in_the_loss():
    """The batch loss is the mean of each example's own loss (HF's would weight by token count)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, processor = build_untrained(MICRO)
    recipe = dataclasses.replace(MICRO, batch_size=2, caption_rate=0.5)
    world = recipe.training_world()
    (answers, asked, _), (captions, none, scenes) = (training_batch(world, recipe, 0),
                                                      training_batch(world, recipe, 1))
    assert {len(a.split()) for _, _, a in answers} == {1} and all(len(a.split()) > 4 for _, _, a in captions)
    assert asked == world.training_questions(2, mix=recipe.tasks) and none == [None, None]
    assert scenes == [q.scene for q in world.training_questions(2, start=2, mix=recipe.tasks)]
    examples = answers + captions
    with torch.no_grad():
        batched = example_mean_loss(model, collate(processor, examples, torch.device("cpu")))
        alone = [model(**collate(processor, [ex], torch.device("cpu"))).loss for ex in examples]
    assert torch.allclose(batched, torch.stack(alone).mean(), atol=1e-5)


def test_targets_are_the_asked_objects_cells_and_attributes():
    world = ShapesWorld(seed=3, image_size=64)
    relations = world.questions(60, level="relation")
    targets = answer_targets(world.config, relations)
    for q, t in zip(relations, targets.tolist()):
        a, b = q.about
        row_a, col_a, row_b, col_b, color, size, order_rows, order_cols = t
        # the layout cells and their order agree with the scene graph's relations
        for rel, holds in (("left", order_cols == 0), ("right", order_cols == 2),
                           ("above", order_rows == 0), ("below", order_rows == 2)):
            if q.scene.holds(a, rel, b) is not None:
                assert q.scene.holds(a, rel, b) == holds, (q.id, rel)
        assert (order_rows, order_cols) == (1 + (row_a > row_b) - (row_a < row_b),
                                            1 + (col_a > col_b) - (col_a < col_b))
        assert (world.config.colors[color], world.config.sizes[size]) == (q.color, q.size)
        assert (row_a, col_a) == cell(q.scene.objects[a], 64) and (row_b, col_b) == cell(q.scene.objects[b], 64)
    absent = [q for q in world.questions(20, level="object") if not q.about]
    assert absent and (answer_targets(world.config, absent + [None]) == IGNORE).all()
    present = answer_targets(world.config, world.questions(20, level="attribute"))
    assert (present[:, [2, 3, 6, 7]] == IGNORE).all() and (present[:, [0, 1, 4, 5]] != IGNORE).all()


def test_heads_read_the_last_prompt_position_of_their_layers():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, processor = build_untrained(MICRO)
    world = MICRO.training_world()
    qs = world.questions(2, level="relation")
    batch = collate(processor, [(q.image, q.prompt, q.answer) for q in qs] +
                    [(qs[0].image, CAPTION_PROMPT, world.caption(qs[0].scene))], torch.device("cpu"))
    targets = answer_targets(world.config, qs + [None])
    d = MICRO.text["hidden_size"]
    heads = AnswerHeads(d, len(world.config.colors), len(world.config.sizes), layer=1)
    states = [torch.randn(3, batch["labels"].shape[1], d) for _ in range(3)]
    base = heads.loss(tuple(states), batch["labels"], targets)
    answer_at = [int((row != -100).nonzero()[0]) - 1 for row in batch["labels"]]
    for b, pos in enumerate(answer_at):
        moved = [s.clone() for s in states]
        for layer in (1, 2):
            moved[layer][b, pos + 1:] += 10  # after the answer position: not read
            moved[layer][b, :pos] += 10  # before it: not read
        moved[0][b] += 10  # a layer no head reads
        assert torch.equal(heads.loss(tuple(moved), batch["labels"], targets), base)
        for layer in (1, 2):  # gathering heads at layer 1, comparisons at layer 2
            again = [s.clone() for s in moved]
            again[layer][b, pos] += 10
            changed = heads.loss(tuple(again), batch["labels"], targets)
            assert (changed != base) == (b < 2)  # the caption has no targets
    at = [torch.stack([states[layer][b, p] for b, p in enumerate(answer_at)]) for layer in range(3)]
    by_hand = sum(torch.nn.functional.cross_entropy(head(at[layer]), targets[:, k], ignore_index=IGNORE,
                                                    reduction="sum")
                  for k, (head, layer) in enumerate(zip(heads.heads, [1] * 6 + [2] * 2)))
    assert torch.allclose(base, by_hand / (targets != IGNORE).sum())
    assert len(FIELDS) == targets.shape[1] == 8


def test_answer_heads_need_a_layer_to_compare_in(tmp_path):
    with pytest.raises(InputError, match=r"answer_heads_layer must be in \[0, 0\].*got 1"):
        train(tmp_path / "m", dataclasses.replace(MICRO, answer_heads_layer=1), device="cpu", progress=False)
    assert not (tmp_path / "m").exists()


def test_stage_one_weighs_the_shape_label():
    """The patch loss is the weighted mean of the five labels' cross-entropies."""
    from lvlm_probe.zoo.vision_pretrain import PatchHeads

    torch.manual_seed(0)
    states = torch.randn(3, 4, 16)
    targets = torch.stack([torch.randint(0, 9, (3, 4)), torch.randint(0, 7, (3, 4)), torch.randint(0, 3, (3, 4))], 1)
    plain, weighted = PatchHeads(16, 8, 6, 2, 2), PatchHeads(16, 8, 6, 2, 2, shape_weight=3.0)
    weighted.load_state_dict(plain.state_dict())
    cells = torch.arange(4)
    labels = (targets[:, 0], targets[:, 1], targets[:, 2], (cells // 2).expand(3, 4), (cells % 2).expand(3, 4))
    heads = (plain.shape, plain.color, plain.size, plain.row, plain.col)
    ce = [torch.nn.functional.cross_entropy(h(states).flatten(0, 1), y.flatten()) for h, y in zip(heads, labels)]
    assert torch.allclose(plain.loss(states, targets), sum(ce) / 5)
    assert torch.allclose(weighted.loss(states, targets), (3 * ce[0] + sum(ce[1:])) / 7)


def test_stage_one_world_takes_its_overrides():
    """``vision_world`` changes only stage 1's scenes; without it both stages read one world."""
    plain = MICRO.vision_training_world().training_questions(8, start=0)
    same = MICRO.training_world().training_questions(8, start=0)
    assert [q.scene for q in plain] == [q.scene for q in same]
    uniform = dataclasses.replace(MICRO, vision_world={"p_typical_color": 0.0})
    world = uniform.vision_training_world()
    assert world.config.p_typical_color == 0.0 and uniform.training_world().config.p_typical_color == 0.85
    typical = world.config.typical
    scenes = [q.scene for q in world.training_questions(40, start=0)]
    assert all(o.color != typical[o.shape] for s in scenes for o in s.objects)
    assert Recipe.from_dict(uniform.to_dict()) == uniform


def test_stage_two_alignment_reads_the_forwards_own_projected_patches():
    """The alignment loss of stage 2 equals stage 1's projector term on the same images: the
    patches the forward projected are the tower's patch states (CLS dropped) through the projector."""
    from lvlm_probe.zoo.train import _outputs, _projector_alignment
    from lvlm_probe.zoo.vision_pretrain import (
        PatchHeads,
        patch_targets,
        position_basis,
        vision_loss,
        word_table,
    )

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, processor = build_untrained(MICRO)
    model.eval()
    world, cfg = MICRO.training_world(), MICRO.training_world().config
    examples, _, scenes = training_batch(world, dataclasses.replace(MICRO, batch_size=3), 0)
    batch = collate(processor, examples, torch.device("cpu"))
    grid = MICRO.world["image_size"] // MICRO.vision["patch_size"]
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        with _outputs(projector) as projected:
            example_mean_loss(model, batch)
        assert len(projector._forward_hooks) == 0 and len(projected) == 1
        aligned = _projector_alignment(model, processor, cfg, scenes, projected[0], grid, position_code=True)
        embed = model.get_input_embeddings()
        heads = PatchHeads(MICRO.vision["hidden_size"], len(cfg.shapes), len(cfg.colors), len(cfg.sizes), grid)
        targets = patch_targets(cfg, scenes, grid)
        tower = model.model.vision_tower
        words, basis = word_table(cfg, processor.tokenizer, embed), position_basis(processor.tokenizer, embed)
        both = vision_loss(tower, heads, batch["pixel_values"], targets, projector, words, basis)
        labels_only = heads.loss(tower(pixel_values=batch["pixel_values"]).last_hidden_state[:, 1:], targets)
    assert aligned > 0
    assert torch.allclose(aligned, both - labels_only, rtol=1e-5, atol=1e-6)
