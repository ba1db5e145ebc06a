"""Qwen3-VL on the tiny models: the layout (one merged grid per image, shaped from
``image_grid_thw`` and laid over exactly that image's ``<|image_pad|>`` run, row-major as the
model's interleaved M-RoPE sees it), and DeepStack (visual features added to the image positions
after the first LM layers) on a tiny model built with it: it writes only at the image positions,
``source_split`` still removes the image exactly, and whole-residual patches restore a clean run
only after the last DeepStack layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.attribution import source_split
from lvlm_probe.circuits import editing
from lvlm_probe.errors import LayoutError
from lvlm_probe.zoo.tiny_builders import qwen3_vl as builder

PROMPT = "Is there a red heart?"
OTHER_PROMPT = "Is the blue star above a green circle?"
# same token count as OTHER_PROMPT, sharing only the first word and the final "?"
SPLIT_PROMPT = "Is there a red heart in the image?"
# Tiny processor: 8 px patches, 2x2 merge, so sides are rounded to multiples of 16 px
# (smart_resize: round(side / 16) * 16, area within [32*32, 80*80]).
#   40x56 -> 32x64 px -> 4x8 patches -> 2x4 merged;  72x48 -> 64x48 px -> 8x6 patches -> 4x3 merged;
#   80x32 -> 80x32 px -> 10x4 patches -> 5x2 merged.
SIZES = [(40, 56), (72, 48), (80, 32)]
EXPECTED_THW = [(1, 4, 8), (1, 8, 6), (1, 10, 4)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def deepstack_model(tmp_path_factory):
    """The tiny model with one DeepStack merger (vision layer 0 -> after LM layer 0), saved and
    loaded through ``lp.load`` as a checkpoint is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf, processor = builder.build(deepstack=True)
    path = tmp_path_factory.mktemp("qwen3_vl_deepstack")
    hf.save_pretrained(path)
    processor.save_pretrained(path)
    return lp.load(path, device="cpu")


@pytest.fixture(scope="module", params=["registered", "deepstack"])
def model(request):
    if request.param == "deepstack":
        return request.getfixturevalue("deepstack_model")
    return lp.zoo.tiny("qwen3_vl", device="cpu")


@pytest.fixture(scope="module")
def pictures():
    return [_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]


def _runs(ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    """Maximal runs of consecutive positions holding ``token_id``, in order."""
    pos = (ids == token_id).nonzero().flatten()
    if not pos.numel():
        return []
    breaks = (pos.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist()))


def _check_example(model, batch, example: int, image_rows: list[int]):
    layout = batch.layouts[example]
    ids = batch.input_ids[example]
    thw = batch.inputs["image_grid_thw"]
    merge = model.processor.image_processor.merge_size
    assert merge == model.config.vision_config.spatial_merge_size
    runs = _runs(ids, model.processor.image_token_id)
    assert len(layout.images) == len(runs) == len(image_rows)
    rope, _ = model.hf.model.get_rope_index(
        input_ids=batch.input_ids, mm_token_type_ids=batch.inputs["mm_token_type_ids"],
        image_grid_thw=thw, attention_mask=batch.inputs["attention_mask"],
    )
    start, end = model.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    for lay, run, row in zip(layout.images, runs, image_rows):
        t, h, w = thw[row].tolist()
        assert t == 1
        assert lay.grid is not None and len(lay.grids) == 1 and not lay.separators
        assert lay.grid.shape == (h // merge, w // merge)
        assert torch.equal(lay.grid.positions.flatten(), run)
        assert ids[run[0] - 1] == start and ids[run[-1] + 1] == end
        # Row-major: the M-RoPE (height, width) positions of cell (r, c) are (base + r, base + c).
        hpos, wpos = rope[1, example][lay.grid.positions], rope[2, example][lay.grid.positions]
        base = hpos[0, 0]
        rows, cols = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge),
                                    indexing="ij")
        assert torch.equal(hpos - base, rows)
        assert torch.equal(wpos - base, cols)


# --- layout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", [0, 2])
def test_one_image_grid(model, pictures, which):
    batch = model.prepare(images=[pictures[which]], prompts=PROMPT)
    assert batch.inputs["image_grid_thw"].tolist() == [list(EXPECTED_THW[which])]
    _, h, w = EXPECTED_THW[which]
    assert batch.layouts[0].image_grids == [(h // 2, w // 2)]
    _check_example(model, batch, 0, [0])


def test_two_images_of_different_shapes(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    assert batch.inputs["image_grid_thw"].tolist() == [list(x) for x in EXPECTED_THW[:2]]
    assert batch.layouts[0].image_grids == [(2, 4), (4, 3)]
    _check_example(model, batch, 0, [0, 1])


def test_batch_indexes_the_flat_grid_list(model, pictures):
    """image_grid_thw lists the batch's images flat: example 1's images are rows 1 and 2."""
    prompts = [PROMPT, "Is the blue star above the green circle? Answer yes or no."]
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]], prompts=prompts)
    assert batch.inputs["image_grid_thw"].tolist() == [list(EXPECTED_THW[i]) for i in (0, 2, 1)]
    assert batch.layouts[0].image_grids == [(2, 4)]
    assert batch.layouts[1].image_grids == [(5, 2), (4, 3)]
    _check_example(model, batch, 0, [0])
    _check_example(model, batch, 1, [1, 2])


def test_placeholder_count_mismatch_raises(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    layouts = model.family.image_layouts
    with pytest.raises(LayoutError, match="placeholder tokens"):
        layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config, model.processor)
    with pytest.raises(LayoutError, match="image_grid_thw"):
        layouts(batch.inputs, 0, [0, 2], placeholders, model.config, model.processor)


def test_chat_template_has_no_default_system_turn(model):
    text = model.family.format_prompt(model.processor, PROMPT, 1)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n")


# --- DeepStack ---------------------------------------------------------------------------------

def test_image_injection_layers(deepstack_model):
    assert deepstack_model.family.image_injection_layers(deepstack_model.config) == [0]
    registered = lp.zoo.tiny("qwen3_vl", device="cpu")  # built with DeepStack too
    assert registered.family.image_injection_layers(registered.config) == [0]


def test_deepstack_writes_only_at_image_positions(deepstack_model, pictures):
    """resid_pre of the layer after a DeepStack layer is that layer's output plus the DeepStack
    features at the image positions (in image order), and equal to it everywhere else."""
    model = deepstack_model
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]],
                          prompts=[PROMPT, OTHER_PROMPT])
    with torch.no_grad(), model.capture(["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]) as cache:
        model.forward(batch)
        features = model.hf.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]).deepstack_features[0]
    added = cache["blocks.1.hook_resid_pre"] - cache["blocks.0.hook_resid_post"]
    image = torch.stack([lay.mask("image") for lay in batch.layouts])
    assert torch.equal(added[~image], torch.zeros_like(added[~image]))
    torch.testing.assert_close(added[image], torch.cat(features), atol=1e-5, rtol=0)
    assert added[image].abs().amax() > 1e-2  # the DeepStack merger is not a zero write


@pytest.fixture(scope="module")
def split(deepstack_model):
    """source_split of three examples: 0 and 1 differ only in their image (same size), 0 and 2
    only in their prompt (same token count)."""
    model = deepstack_model
    image, other = _image(48, 48, seed=1), _image(48, 48, seed=2)
    batch = model.prepare(images=[[image], [other], [image]], prompts=[SPLIT_PROMPT, SPLIT_PROMPT, OTHER_PROMPT])
    lengths = [lay.positions("prompt").numel() for lay in batch.layouts]
    assert lengths[0] == lengths[2], f"the two prompts must have one token count, got {lengths}"
    yes, no = (model.continuation_tokens(batch, 0, answer)[0] for answer in ("yes", "no"))
    return batch, source_split(model, batch, target=yes, foil=no)


def test_source_split_removes_the_image_despite_deepstack(split):
    """Hiding the image positions from attention at every layer also hides the DeepStack writes,
    which land only at those positions: without the image, two different images give one score;
    without the prompt, two prompts do."""
    _, result = split
    torch.testing.assert_close(result.prior + result.prompt + result.image, result.full, atol=1e-5,
                               rtol=0)
    assert abs(float(result.full[0] - result.full[1])) > 1e-4, "the image does not change the answer"
    assert abs(float(result.full[0] - result.full[2])) > 1e-4, "the prompt does not change the answer"
    for coalition in ("prompt", "empty"):
        torch.testing.assert_close(result.values[coalition][0], result.values[coalition][1],
                                   atol=1e-6, rtol=0, msg=coalition)
    for coalition in ("image", "empty"):
        torch.testing.assert_close(result.values[coalition][0], result.values[coalition][2],
                                   atol=1e-6, rtol=0, msg=coalition)


def test_whole_residual_patch_restores_only_after_deepstack(deepstack_model, pictures):
    """Same prompts and image sizes, other pixels: patching the whole resid_pre of a layer after
    the last DeepStack layer restores the clean logits; patching one at or before it does not (the
    DeepStack addition carries the corrupted image again)."""
    model = deepstack_model
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
