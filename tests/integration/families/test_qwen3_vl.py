"""Qwen3-VL on its tiny model, beyond the layout it shares with Qwen2-VL
(``test_qwen2_vl.py``) and the conformance suite: its chat template, and DeepStack (visual features
added to the image positions after the first LM layers): it writes only at the image positions,
and whole-residual patches restore a clean run only after the last DeepStack layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.circuits import editing

PROMPT = "Is there a red heart?"
OTHER_PROMPT = "Is the blue star above a green circle?"
SIZES = [(40, 56), (72, 48), (80, 32)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny("qwen3_vl", device="cpu")


@pytest.fixture(scope="module")
def pictures():
    return [_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]


def test_chat_template_has_no_default_system_turn(model):
    text = model.family.format_prompt(model.processor, PROMPT, 1)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n")


# --- DeepStack ---------------------------------------------------------------------------------

def test_image_injection_layers(model):
    assert model.config.vision_config.deepstack_visual_indexes == [0]
    assert model.family.image_injection_layers(model.config) == [0]


def test_deepstack_writes_only_at_image_positions(model, pictures):
    """resid_pre of the layer after a DeepStack layer is that layer's output plus the DeepStack
    features at the image positions (in image order), and equal to it everywhere else; those
    features are the ``projector.injection.0.hook_out`` hook's value."""
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]],
                          prompts=[PROMPT, OTHER_PROMPT])
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "projector.injection.0.hook_out"]
    with torch.no_grad(), model.capture(names) as cache:
        model.forward(batch)
    with torch.no_grad():
        features = model.hf.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]).deepstack_features[0]
    added = cache["blocks.1.hook_resid_pre"] - cache["blocks.0.hook_resid_post"]
    image = torch.stack([lay.mask("image") for lay in batch.layouts])
    assert torch.equal(added[~image], torch.zeros_like(added[~image]))
    torch.testing.assert_close(added[image], torch.cat(features), atol=1e-5, rtol=0)
    assert added[image].abs().amax() > 1e-2  # the DeepStack merger is not a zero write
    # the hook on DeepStack merger 0 holds exactly what is added after layer 0
    torch.testing.assert_close(cache["projector.injection.0.hook_out"], torch.cat(features), atol=0, rtol=0)


def test_whole_residual_patch_restores_only_after_deepstack(model, pictures):
    """Same prompts and image sizes, other pixels: patching the whole resid_pre of a layer after
    the last DeepStack layer restores the clean logits; patching one at or before it does not (the
    DeepStack addition carries the corrupted image again)."""
    clean = model.prepare(images=[[_image(40, 56, seed=1)], [_image(72, 48, seed=2)]],
                          prompts=[PROMPT, OTHER_PROMPT])
    corrupted = model.prepare(images=[[_image(40, 56, seed=11)], [_image(72, 48, seed=12)]],
                              prompts=clean.prompts)
    last = max(model.family.image_injection_layers(model.config))
    with torch.no_grad(), model.capture("blocks.*.hook_resid_pre") as cache:
        clean_logits = model.forward(clean).logits[:, -1]
    with torch.no_grad():
        for layer in range(model.n_layers):
            name = f"blocks.{layer}.hook_resid_pre"
            with editing(model, {name: lambda x, name=name: cache[name]}):
                patched = model.forward(corrupted).logits[:, -1]
            if layer > last:
                torch.testing.assert_close(patched, clean_logits, atol=1e-4, rtol=1e-4)
            else:
                assert not torch.allclose(patched, clean_logits, atol=1e-3), layer
