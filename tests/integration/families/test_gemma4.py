"""Gemma 4 layout on the tiny model: each image is one run of soft tokens between ``<|image>`` and
``<image|>``, forming a grid whose shape follows the image's aspect ratio; the grids equal the
processor's own arithmetic and token counts, and each grid cell is the pooled block of patches the
vision tower's pooler puts there. The tiny model has the real checkpoints' per-layer attention
shapes (wider full-attention heads with their own key/value head count, keys doubling as values, a
KV-shared last layer); the attention checks compare each layer's hooks with its modules."""
from __future__ import annotations

import pytest
import torch
from conftest import random_image
from einops import einsum, rearrange, repeat
from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

import lvlm_probe as lp
from lvlm_probe.hooks.patching import editing

FAMILY = "gemma4"
PROMPT = "Is there a red heart?"


@pytest.fixture(scope="module")
def model():
    return lp.zoo.tiny(FAMILY, device="cpu")


def _ids(model, token: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(token)


def _expected_grid(model, height: int, width: int) -> tuple[int, int]:
    """The soft-token grid from the image processor's resize arithmetic."""
    proc = model.processor.image_processor
    k = proc.pooling_kernel_size
    h, w = get_aspect_ratio_preserving_size(height, width, proc.patch_size,
                                            proc.max_soft_tokens * k * k, k)
    return h // proc.patch_size // k, w // proc.patch_size // k


def test_soft_token_is_the_placeholder(model):
    assert model.image_token_id == _ids(model, "<|image|>") == model.processor.image_token_id
    assert model.config.boi_token_id == _ids(model, "<|image>") != model.image_token_id
    assert model.config.eoi_token_id == _ids(model, "<image|>") != model.image_token_id


@pytest.mark.parametrize("n_images", [1, 2])
def test_grids_match_the_processor(model, images, n_images):
    imgs = images[:n_images]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])
    layout = batch.layouts[0]
    expected = [_expected_grid(model, img.height, img.width) for img in imgs]
    assert layout.image_grids == expected
    assert len(set(expected)) == n_images  # the two test images really differ in shape
    # the image processor's own token counts, and the processor's count for these sizes
    counts = model.processor.image_processor(imgs)["num_soft_tokens_per_image"]
    assert [r * c for r, c in expected] == [int(n) for n in counts]
    data = model.processor._get_num_multimodal_tokens(image_sizes=[(i.height, i.width) for i in imgs])
    assert data.num_image_tokens == [int(n) for n in counts]
    assert layout.positions("image").numel() == sum(int(n) for n in counts)


@pytest.mark.parametrize("n_images", [1, 2])
def test_each_grid_sits_between_boi_and_eoi(model, images, n_images):
    batch = model.prepare(images=[images[:n_images]], prompts=[PROMPT])
    ids = batch.input_ids[0]
    layout = batch.layouts[0]
    boi = (ids == _ids(model, "<|image>")).nonzero().flatten()
    eoi = (ids == _ids(model, "<image|>")).nonzero().flatten()
    assert len(boi) == len(eoi) == n_images
    for lay, b, e in zip(layout.images, boi.tolist(), eoi.tolist()):
        rows, cols = lay.grid.shape
        # every token strictly between BOI and EOI is a soft token, laid out row-major
        assert torch.all(ids[b + 1:e] == model.image_token_id)
        assert torch.equal(lay.grid.positions, torch.arange(b + 1, e).reshape(rows, cols))
    template = set(layout.positions("template").tolist())
    assert set(boi.tolist()) | set(eoi.tolist()) <= template
    assert ids[0] == model.tokenizer.bos_token_id and 0 in template
    assert model.tokenizer.decode(ids[layout.positions("prompt")]) == PROMPT


def test_grid_cells_are_the_pooled_patch_blocks(model, images):
    """Feed the vision tower's pooler each patch's own (x, y) as its state: the soft token at grid
    cell (r, c) must be the mean over the k x k block of patches x // k = c, y // k = r."""
    batch = model.prepare(images=[images], prompts=[PROMPT])
    pos = batch.inputs["image_position_ids"]
    vision = model.hf.model.vision_tower
    k = vision.config.pooling_kernel_size
    padding = (pos == -1).all(dim=-1)
    states = pos.clamp(min=0).float()  # [images, patches, 2]: (x, y)
    with torch.no_grad():
        pooled, mask = vision.pooler(states, pos, padding, output_length=pos.shape[1] // (k * k))
    pooled = pooled / vision.pooler.root_hidden_size
    for i, lay in enumerate(batch.layouts[0].images):
        rows, cols = lay.grid.shape
        cells = pooled[i][mask[i]]
        assert cells.shape[0] == rows * cols
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        centre = torch.stack([c * k + (k - 1) / 2, r * k + (k - 1) / 2], dim=-1).reshape(-1, 2)
        torch.testing.assert_close(cells, centre)


def test_text_only_prompt_has_no_images(model):
    batch = model.prepare(images=None, prompts=[PROMPT])
    layout = batch.layouts[0]
    assert layout.images == () and layout.positions("image").numel() == 0
    assert model.tokenizer.decode(batch.input_ids[0][layout.positions("prompt")]) == PROMPT


# --- attention shapes -------------------------------------------------------------------------

def _attn(model, layer: int):
    return model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn}")


def _producer(model, layer: int) -> int:
    """The layer whose keys and values a KV-shared layer attends with: the last layer of the same
    attention type before the shared ones (transformers' kv_sharing_modes)."""
    config = model.text_config
    types = config.layer_types
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    return max(i for i in range(first_shared) if types[i] == types[layer])


def test_full_layers_keys_double_as_values(model):
    """A full-attention layer with ``attention_k_eq_v`` has no value projection: its hook_v is its
    value norm's input, the key projection's output, so it equals hook_k; sliding layers keep their
    own value projection."""
    names, points = set(model.hook_names()), lp.hooks.hook_points(model)
    assert model.text_config.attention_k_eq_v
    full = [i for i, t in enumerate(model.text_config.layer_types) if t == "full_attention"]
    owners = [i for i in range(model.n_layers) if not _attn(model, i).is_kv_shared_layer]
    assert set(full) & set(owners) and set(owners) - set(full)
    for layer in owners:
        attn, prefix = _attn(model, layer), f"{model.family.lm_layers}.{layer}.{model.family.lm_attn}"
        assert (attn.v_proj is None) == (layer in full)
        assert {f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_v"} <= names
        leaf = model.family.lm_v_norm if layer in full else model.family.lm_qkv[2]
        assert points[f"blocks.{layer}.attn.hook_v"].path == f"{prefix}.{leaf}"
    batch = model.prepare(images=[[random_image(40, 56, seed=1)]], prompts=[PROMPT])
    layer = next(i for i in owners if i in full)
    with model.capture([f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_v"]) as cache:
        model.forward(batch)
    assert torch.equal(cache[f"blocks.{layer}.attn.hook_k"], cache[f"blocks.{layer}.attn.hook_v"])


def test_per_layer_head_shapes(model):
    config = model.text_config
    widths = [_attn(model, layer).head_dim for layer in range(model.n_layers)]
    kv = [config.per_layer_config[layer].num_key_value_heads for layer in range(model.n_layers)]
    assert [model.d_head_of(layer) for layer in range(model.n_layers)] == widths
    assert [model.n_kv_heads_of(layer) for layer in range(model.n_layers)] == kv
    assert len(set(widths)) > 1 and len(set(kv)) > 1  # the shapes really differ per layer
    for layer in range(model.n_layers):
        attn = _attn(model, layer)
        assert attn.q_proj.out_features == model.n_heads * widths[layer]
        assert attn.o_proj.in_features == model.n_heads * widths[layer]
        if hasattr(attn, "k_proj"):
            assert attn.k_proj.out_features == kv[layer] * widths[layer]
    with pytest.raises(lp.errors.LVLMProbeError, match=r"model\.d_head_of\(layer\)"):
        _ = model.d_head
    with pytest.raises(lp.errors.LVLMProbeError, match=r"model\.n_kv_heads_of\(layer\)"):
        _ = model.n_kv_heads


def test_kv_shared_layers_offer_no_keys_or_values(model):
    names = set(model.hook_names())
    shared = [layer for layer in range(model.n_layers) if _attn(model, layer).is_kv_shared_layer]
    assert shared == list(range(model.n_layers - model.text_config.num_kv_shared_layers, model.n_layers))
    # the adapter names each shared layer's source: the layer HF stores the keys and values from
    modes = model.text_config.kv_sharing_modes
    assert model.family.kv_shared_layers(model.config) == {layer: _producer(model, layer) for layer in shared}
    assert all(modes[source] == "store" for source in model.family.kv_shared_layers(model.config).values())
    for layer in range(model.n_layers):
        attn, prefix = _attn(model, layer), f"blocks.{layer}.attn"
        offered = {f"{prefix}.hook_k", f"{prefix}.hook_v"} <= names
        assert offered == (layer not in shared) == hasattr(attn, "k_proj")
        assert {f"{prefix}.hook_q", f"{prefix}.hook_pattern", f"{prefix}.hook_z"} <= names


def test_qkv_pattern_and_z_agree_per_layer(model):
    """Per layer: q, k, v, pattern and z have that layer's head width and head counts; the
    pattern applied to the (value-normed) values gives z, a KV-shared layer's values being its
    producer's; the layer outputs equal HF's hidden states."""
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    batch = model.prepare(images=images, prompts=[PROMPT, PROMPT + " Answer yes or no."])
    with torch.no_grad(), model.capture(model.hook_names()) as cache:
        out = model.forward(batch, output_hidden_states=True)
    b, p = batch.input_ids.shape
    hidden = getattr(out, "language_model_outputs", out).hidden_states
    for layer in range(model.n_layers):
        prefix, attn = f"blocks.{layer}.attn", _attn(model, layer)
        d, n_kv = model.d_head_of(layer), model.n_kv_heads_of(layer)
        source = _producer(model, layer) if attn.is_kv_shared_layer else layer
        k, v = cache[f"blocks.{source}.attn.hook_k"], cache[f"blocks.{source}.attn.hook_v"]
        q, pattern, z = (cache[f"{prefix}.{leaf}"] for leaf in ("hook_q", "hook_pattern", "hook_z"))
        assert q.shape == z.shape == (b, p, model.n_heads, d)
        assert k.shape == v.shape == (b, p, n_kv, d)
        assert pattern.shape == (b, model.n_heads, p, p)
        torch.testing.assert_close(torch.softmax(cache[f"{prefix}.hook_attn_scores"], dim=-1), pattern,
                                   atol=1e-6, rtol=0)
        with torch.no_grad():
            values = _attn(model, source).get_submodule(model.family.lm_v_norm)(v)
        values = repeat(values, "b k kv d -> b k (kv g) d", g=model.n_heads // n_kv)
        torch.testing.assert_close(einsum(pattern, values, "b h q k, b k h d -> b q h d"), z,
                                   atol=1e-5, rtol=0)
        result = cache[f"{prefix}.hook_result"]
        assert result.shape == (b, p, model.n_heads, model.d_model)
        with torch.no_grad():
            torch.testing.assert_close(attn.o_proj(rearrange(z, "b p h d -> b p (h d)")), result.sum(2),
                                       atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=0, rtol=0)


def test_writing_hook_v_of_shared_keys_changes_values_only(model):
    """Where keys double as values, hook_v is written after the keys split off: the pattern (keys)
    stays, z changes."""
    layer = next(i for i in range(model.n_layers)
                 if _attn(model, i).v_proj is None and not _attn(model, i).is_kv_shared_layer)
    batch = model.prepare(images=[[random_image(40, 56, seed=1)]], prompts=[PROMPT])
    names = [f"blocks.{layer}.attn.hook_{leaf}" for leaf in ("k", "v", "pattern", "z")]
    with torch.no_grad(), model.capture(names) as clean:
        model.forward(batch)
    with torch.no_grad(), editing(model, {names[1]: lambda v: v.flip(-1)}), \
            model.capture(names) as edited:
        model.forward(batch)
    for name in names[:1] + names[2:3]:
        assert torch.equal(edited[name], clean[name])
    torch.testing.assert_close(edited[names[1]], clean[names[1]].flip(-1))
    assert not torch.allclose(edited[names[3]], clean[names[3]], atol=1e-4)


def test_per_layer_config_survives_save_and_load(model, tmp_path):
    batch = model.prepare(images=[[random_image(72, 48, seed=2)]], prompts=[PROMPT])
    again = lp.load(model.save_pretrained(tmp_path / "model"), device="cpu")
    assert [again.d_head_of(i) for i in range(again.n_layers)] == [model.d_head_of(i) for i in range(model.n_layers)]
    assert again.hook_names() == model.hook_names()
    with torch.no_grad():
        assert torch.equal(again.forward(batch).logits, model.forward(batch).logits)


def test_kv_shared_layer_is_declared_as_reading_an_earlier_stream(model):
    """A residual stream patched whole at the KV-shared last layer does not restore the clean run:
    that layer attends with keys and values computed from an earlier layer's stream, which is why
    the adapter declares it in image_injection_layers."""
    last = model.n_layers - 1
    assert _attn(model, last).is_kv_shared_layer
    assert model.family.image_injection_layers(model.config) == list(range(model.n_layers))
    clean = model.prepare(images=[[random_image(40, 56, seed=1)]], prompts=[PROMPT])
    corrupted = model.prepare(images=[[random_image(40, 56, seed=11)]], prompts=[PROMPT])
    name = f"blocks.{last}.hook_resid_pre"
    with torch.no_grad(), model.capture([name, f"blocks.{last}.attn.hook_z"]) as cache:
        clean_logits = model.forward(clean).logits[:, -1]
    with torch.no_grad(), editing(model, {name: lambda x: cache[name]}), \
            model.capture(f"blocks.{last}.attn.hook_z") as patched:
        patched_logits = model.forward(corrupted).logits[:, -1]
    # the queries are the clean ones, the keys and values are not
    assert not torch.allclose(patched[f"blocks.{last}.attn.hook_z"], cache[f"blocks.{last}.attn.hook_z"],
                              atol=1e-5)
    assert not torch.allclose(patched_logits, clean_logits, atol=1e-4)


# --- the conformance suite on the checkpoint attention shapes ------------------------------------
