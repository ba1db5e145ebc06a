"""A chat template that puts the question before the image (as shapes-llava's does) still gets an
exact layout: prompt tokens before the image, spelled exactly, the rest template."""
from __future__ import annotations

import torch

import lvlm_probe as lp
from lvlm_probe.worlds import ShapesWorld
from lvlm_probe.zoo.shapes_llava import Recipe, build_untrained


def test_layout_of_question_before_image():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = lp.LVLM(*build_untrained(Recipe()))
    questions = ShapesWorld(seed=2).questions(2, level="relation")
    batch = model.prepare(images=[q.image for q in questions], prompts=[q.prompt for q in questions])
    for i, (q, layout) in enumerate(zip(questions, batch.layouts)):
        prompt, image = layout.positions("prompt"), layout.positions("image")
        assert prompt.max() < image.min()
        assert model.tokenizer.decode(batch.input_ids[i, prompt]).strip() == q.prompt
        assert layout.image_grids == [(4, 4)]
        assert torch.equal(image, (batch.input_ids[i] == model.image_token_id).nonzero().flatten())
