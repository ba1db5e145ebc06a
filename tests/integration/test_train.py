"""Training of the reference model: an interrupted run resumes to the same weights."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lvlm_probe.zoo.shapes_llava import Recipe
from lvlm_probe.zoo.train import STATE, train

MICRO = Recipe(
    steps=5, batch_size=2, warmup=1, vocab_size=300, vision_steps=3, vision_batch_size=2, position_code=True,
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
    from lvlm_probe.zoo.shapes_llava import build_untrained
    from lvlm_probe.zoo.train import collate, example_mean_loss, training_batch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, processor = build_untrained(MICRO)
    recipe = dataclasses.replace(MICRO, batch_size=4, caption_rate=0.5)
    examples = training_batch(recipe.training_world(), recipe, 0)
    assert {len(a.split()) > 1 for _, _, a in examples} == {True, False}  # captions and one-word answers
    with torch.no_grad():
        batched = example_mean_loss(model, collate(processor, examples, torch.device("cpu")))
        alone = [model(**collate(processor, [ex], torch.device("cpu"))).loss for ex in examples]
    assert torch.allclose(batched, torch.stack(alone).mean(), atol=1e-5)
