"""Qwen3.5 on its tiny model: Qwen2-VL's layout (one merged grid per image, shaped from
``image_grid_thw`` and laid row-major over exactly that image's ``<|image_pad|>`` run, as the
model's interleaved M-RoPE sees it), its chat template (thinking mode), no DeepStack, and the hybrid
language model: Gated DeltaNet layers mix tokens without an attention mask, so hiding positions
must cut them out of those layers too (masking keys alone leaks the hidden image). Qwen3.5-MoE runs
every check too, and its MoE blocks' ``hook_mlp_out`` is checked against the gated shared expert
plus the router's top-k experts."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

import lvlm_probe as lp
from lvlm_probe.attribution import dla, knockout
from lvlm_probe.errors import InputError, LayoutError
from lvlm_probe.hooks import attention

# Qwen3.5-MoE has the same layout, template and hybrid language model: every check runs on both
FAMILIES = ["qwen3_5", "qwen3_5_moe"]
PROMPT = "Is there a red heart?"
OTHER_PROMPT = "Is the blue star above the green circle? Answer yes or no."
# (height, width) of three images of different aspect ratios (tall, wide, very wide).
SIZES = [(40, 56), (72, 48), (80, 32)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return lp.zoo.tiny(request.param, device="cpu")


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
    """The vision boundary tokens, the turn markers and the opened <think> are template positions;
    every image position is a placeholder token; the prompt is between the images and the turn's
    end."""
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    layout, ids = batch.layouts[0], batch.input_ids[0]
    image, template = layout.mask("image"), layout.mask("template")
    assert torch.equal(image, ids == model.processor.image_token_id)
    for token in ("<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>", "<think>"):
        at = ids == model.tokenizer.convert_tokens_to_ids(token)
        assert at.any() and bool(template[at].all()), token
    prompt = layout.positions("prompt")
    assert model.tokenizer.decode(ids[prompt]).strip() == PROMPT
    assert int(prompt.min()) > int(layout.positions("image").max())


def test_placeholder_count_mismatch_raises(model, pictures):
    batch = model.prepare(images=[pictures[:2]], prompts=[PROMPT])
    placeholders = batch.layouts[0].positions("image")
    layouts = model.family.image_layouts
    with pytest.raises(LayoutError, match="placeholder tokens"):
        layouts(batch.inputs, 0, [0, 1], placeholders[:-1], model.config, model.processor)
    with pytest.raises(LayoutError, match="image_grid_thw"):
        layouts(batch.inputs, 0, [0, 2], placeholders, model.config, model.processor)


def test_chat_template_opens_a_thinking_turn(model):
    text = model.family.format_prompt(model.processor, PROMPT, 1)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_no_deepstack(model, pictures):
    """The image enters only at its placeholder embeddings: each layer's output is the next
    layer's input everywhere."""
    assert not hasattr(model.config.vision_config, "deepstack_visual_indexes")
    assert model.family.image_injection_layers(model.config) == []
    batch = model.prepare(images=[pictures[0]], prompts=PROMPT)
    with torch.no_grad(), model.capture(["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"]) as cache:
        model.forward(batch)
    for layer in range(model.n_layers - 1):
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], cache[f"blocks.{layer + 1}.hook_resid_pre"])


# --- hybrid language model ---------------------------------------------------------------------

def test_layer_kinds_follow_the_config(model):
    kinds = model.config.text_config.layer_types
    assert set(kinds) == {"linear_attention", "full_attention"}  # the tiny model has both
    linear = [i for i, kind in enumerate(kinds) if kind == "linear_attention"]
    assert model.family.unmasked_mixing_layers(model.config) == linear
    assert model.family.self_attention_layers(model.config) == [i for i in range(model.n_layers)
                                                                if i not in linear]
    layers = model.module(model.family.lm_layers)
    for i in range(model.n_layers):
        assert hasattr(layers[i], "linear_attn") == (i in linear)
        assert hasattr(layers[i], "self_attn") == (i not in linear)


def test_final_norm_is_zero_centred(model, pictures):
    """The final RMSNorm scales by 1 + weight (what the adapter's offset says)."""
    norm = model.module(model.family.lm_norm)
    assert model.family.final_norm_weight_offset(norm) == 1.0
    with torch.no_grad():
        norm.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 5, model.d_model, generator=torch.Generator().manual_seed(1))
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
        torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=0)
        norm.weight.zero_()


def _last_logits(model, batch, hidden, hide):
    with torch.no_grad(), hide(hidden):
        return model.hf(**batch.inputs).logits[:, -1].float()


def test_hiding_cuts_the_image_out_of_the_linear_attention(model):
    """Two examples that differ only in their image (same size). With the image hidden, masking
    its keys in the full-attention layers alone still lets it reach the answer through the linear
    attention's state; cutting it out of the linear attention too removes it: equal logits."""
    batch = model.prepare(images=[[_image(48, 48, seed=1)], [_image(48, 48, seed=2)]],
                          prompts=[PROMPT, PROMPT])
    image = torch.stack([lay.mask("image") for lay in batch.layouts])
    attending = [model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn}")
                 for layer in model.family.self_attention_layers(model.config)]
    masked_only = _last_logits(model, batch, image, lambda h: attention.hiding(attending, h))
    assert not torch.allclose(masked_only[0], masked_only[1], atol=1e-4)
    removed = _last_logits(model, batch, image, lambda h: attention.hiding_positions(model, h))
    torch.testing.assert_close(removed[0], removed[1], atol=1e-6, rtol=0)
    full = _last_logits(model, batch, torch.zeros_like(image), lambda h: attention.hiding_positions(model, h))
    with torch.no_grad():
        # nothing hidden: the model's own logits (eager attention there, hence float error)
        torch.testing.assert_close(full, model.hf(**batch.inputs).logits[:, -1].float(), atol=1e-5, rtol=0)


def test_linear_attention_sees_the_visible_sequence_alone(model, pictures):
    """Under hiding, a linear-attention layer's output at the visible positions is its output on
    the sequence of visible positions alone, also for a padded row: the same as for that sequence
    given without padding and without the hidden tokens."""
    batch = model.prepare(images=[[pictures[0]], [pictures[1]]], prompts=[PROMPT, OTHER_PROMPT])
    hidden = torch.stack([lay.mask("image") for lay in batch.layouts])
    layer = model.family.unmasked_mixing_layers(model.config)[0]
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out"]
    with torch.no_grad(), attention.hiding_positions(model, hidden), model.capture(names) as cache:
        model.forward(batch)
    block = model.module(f"{model.family.lm_layers}.{layer}")
    for row, lay in enumerate(batch.layouts):
        visible = lay.positions("all")[~hidden[row, lay.positions("all")]]
        assert batch.inputs["attention_mask"][row, visible].all()
        with torch.no_grad():
            states = block.input_layernorm(cache[names[0]][row:row + 1, visible])
            alone = block.linear_attn(states)
        torch.testing.assert_close(cache[names[1]][row, visible], alone[0], atol=1e-5, rtol=0)
    assert batch.layouts[0].positions("pad").numel()  # row 0 is padded


def test_knockout_over_linear_attention_raises(model, pictures):
    batch = model.prepare(images=[pictures[0]], prompts=PROMPT)
    linear = model.family.unmasked_mixing_layers(model.config)
    with pytest.raises(InputError, match=re.escape(f"{model.family.name}'s layers {linear}") + ".*without an attention mask"):
        knockout(model, batch, target="yes", layers=linear)
    with pytest.raises(lp.LVLMProbeError, match="some queries only"):
        with attention.removing([model.module(f"{model.family.lm_layers}.{linear[0]}.linear_attn")],
                                torch.zeros(1, 3, 3, dtype=torch.bool)):
            pass


def test_dla_raises_the_declared_reason(model, pictures):
    batch = model.prepare(images=[pictures[0]], prompts=PROMPT)
    yes = model.answer_token_ids(batch, ["yes"], first_token=True)[0, 0].item()
    with pytest.raises(InputError, match=re.escape(model.family.nonlinear_writes)):
        dla(model, batch, target=yes)


# --- mixture of experts ------------------------------------------------------------------------

def test_mlp_out_is_the_shared_and_routed_experts_sum(pictures):
    """hook_mlp_out equals the shared expert scaled by its sigmoid gate plus the top-k experts,
    recomputed from the router's logits (the first output of ``mlp.gate``) and weighted by their
    renormalised probabilities; the tokens do not all pick the same experts."""
    model = lp.zoo.tiny("qwen3_5_moe", device="cpu")
    batch = model.prepare(images=[[pictures[0]], [pictures[2], pictures[1]]],
                          prompts=[PROMPT, OTHER_PROMPT])
    text = model.config.text_config
    names = [f"blocks.{layer}.{hook}" for layer in range(model.n_layers)
             for hook in ("hook_resid_mid", "hook_mlp_out")]
    with torch.no_grad(), model.capture(names) as cache:
        model.forward(batch)
    with torch.no_grad():
        for layer, block in enumerate(model.module(model.family.lm_layers)):
            x = block.post_attention_layernorm(cache[f"blocks.{layer}.hook_resid_mid"])
            flat = x.reshape(-1, x.shape[-1])
            logits = block.mlp.gate(flat)[0]
            assert logits.shape == (flat.shape[0], text.num_experts)
            top, chosen = logits.float().softmax(-1).topk(text.num_experts_per_tok, dim=-1)
            top = top / top.sum(-1, keepdim=True)
            assert chosen.unique().numel() > text.num_experts_per_tok
            experts = block.mlp.experts
            out = torch.sigmoid(block.mlp.shared_expert_gate(flat)) * block.mlp.shared_expert(flat)
            for k in range(text.num_experts_per_tok):
                gate, up = torch.einsum("nd,nfd->nf", flat, experts.gate_up_proj[chosen[:, k]]).chunk(2, -1)
                hidden = experts.act_fn(gate) * up
                out += top[:, k, None] * torch.einsum("nf,ndf->nd", hidden, experts.down_proj[chosen[:, k]])
            torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_out"].reshape(flat.shape), out,
                                       atol=1e-5, rtol=1e-4)
