"""Qwen3-VL-MoE on its tiny model: Qwen3-VL's layout (one merged grid per image, shaped from
``image_grid_thw`` and laid row-major over exactly that image's ``<|image_pad|>`` run, as the
model's interleaved M-RoPE sees it), its chat template, and the sparse MoE blocks: ``hook_mlp_out``
is the whole block's write (the router's top-k experts, weighted) at every position."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

import lvlm_probe as lp
from lvlm_probe.errors import LayoutError

FAMILY = "qwen3_vl_moe"
PROMPT = "Is there a red heart?"
OTHER_PROMPT = "Is the blue star above the green circle? Answer yes or no."
# (height, width) of three images of different aspect ratios (tall, wide, very wide).
SIZES = [(40, 56), (72, 48), (80, 32)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny(FAMILY, device="cpu")


@pytest.fixture(scope="module")
def pictures():
    return [_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]


def _expected_thw(model, which: int) -> list[int]:
    """``image_grid_thw`` by the image processor's own arithmetic: smart_resize to multiples of
    patch * merge pixels within its pixel bounds, then one patch per ``patch_size`` pixels."""
    ip = model.processor.image_processor
    height, width = smart_resize(*SIZES[which], factor=ip.patch_size * ip.merge_size,
                                 min_pixels=ip.size["shortest_edge"],
                                 max_pixels=ip.size["longest_edge"])
    return [1, height // ip.patch_size, width // ip.patch_size]


def _runs(ids: torch.Tensor, token_id: int) -> list[torch.Tensor]:
    """Maximal runs of consecutive positions holding ``token_id``, in order."""
    pos = (ids == token_id).nonzero().flatten()
    if not pos.numel():
        return []
    breaks = (pos.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist()))


def _check_example(model, batch, example: int, image_rows: list[int]):
    """Each image's grid is its own placeholder run, shaped (h / merge, w / merge) from its row of
    image_grid_thw, between the vision boundary tokens, and row-major in the M-RoPE positions."""
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
    expected = _expected_thw(model, which)
    assert batch.inputs["image_grid_thw"].tolist() == [expected]
    merge = model.processor.image_processor.merge_size
    assert batch.layouts[0].image_grids == [(expected[1] // merge, expected[2] // merge)]
    _check_example(model, batch, 0, [0])


def test_two_images_of_different_shapes(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    expected = [_expected_thw(model, k) for k in (0, 1)]
    assert batch.inputs["image_grid_thw"].tolist() == expected
    assert len({tuple(e) for e in expected}) == 2  # the two grids differ
    _check_example(model, batch, 0, [0, 1])


def test_batch_indexes_the_flat_grid_list(model, pictures):
    """image_grid_thw lists the batch's images flat: example 1's images are rows 1 and 2."""
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]],
                          prompts=[PROMPT, OTHER_PROMPT])
    assert batch.inputs["image_grid_thw"].tolist() == [_expected_thw(model, i) for i in (0, 2, 1)]
    _check_example(model, batch, 0, [0])
    _check_example(model, batch, 1, [1, 2])


def test_template_tokens_are_classified(model, pictures):
    """The vision boundary tokens and the chat template's turn markers are not image positions;
    every image position is a placeholder token."""
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    layout, ids = batch.layouts[0], batch.input_ids[0]
    image = layout.mask("image")
    assert torch.equal(image, ids == model.processor.image_token_id)
    for token in ("<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"):
        at = ids == model.tokenizer.convert_tokens_to_ids(token)
        assert at.any() and not (at & image).any(), token


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


# --- mixture of experts ------------------------------------------------------------------------

def test_every_layer_is_sparse_and_deepstack_is_kept(model):
    text = model.config.text_config
    sparse = [layer for layer in range(model.n_layers)
              if layer not in text.mlp_only_layers and (layer + 1) % text.decoder_sparse_step == 0]
    assert sparse == list(range(model.n_layers))
    for layer in model.hf.model.language_model.layers:
        assert layer.mlp.experts.num_experts == text.num_experts > text.num_experts_per_tok
    assert model.family.image_injection_layers(model.config) == [0]


def test_mlp_out_is_the_routed_experts_sum(model, pictures):
    """hook_mlp_out equals the top-k experts' outputs, recomputed from the router's logits (the
    first output of ``mlp.gate``) and weighted by their renormalised probabilities; the tokens do
    not all pick the same experts."""
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]],
                          prompts=[PROMPT, OTHER_PROMPT])
    text = model.config.text_config
    names = [f"blocks.{layer}.{hook}" for layer in range(model.n_layers)
             for hook in ("hook_resid_mid", "hook_mlp_out")]
    with torch.no_grad(), model.capture(names) as cache:
        model.forward(batch)
    with torch.no_grad():
        for layer, block in enumerate(model.hf.model.language_model.layers):
            x = block.post_attention_layernorm(cache[f"blocks.{layer}.hook_resid_mid"])
            flat = x.reshape(-1, x.shape[-1])
            logits = block.mlp.gate(flat)[0]
            assert logits.shape == (flat.shape[0], text.num_experts)
            probs = logits.float().softmax(-1)
            top, chosen = probs.topk(text.num_experts_per_tok, dim=-1)
            top = top / top.sum(-1, keepdim=True)
            assert chosen.unique().numel() > text.num_experts_per_tok
            experts = block.mlp.experts
            out = torch.zeros_like(flat)
            for k in range(text.num_experts_per_tok):
                gate, up = torch.einsum("nd,nfd->nf", flat, experts.gate_up_proj[chosen[:, k]]).chunk(2, -1)
                hidden = experts.act_fn(gate) * up
                out += top[:, k, None] * torch.einsum("nf,ndf->nd", hidden, experts.down_proj[chosen[:, k]])
            torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_out"].reshape(flat.shape), out,
                                       atol=1e-5, rtol=1e-4)
