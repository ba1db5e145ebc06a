"""Capture engine on every family's tiny model: names, attention outputs rebuilt from z and result,
position selectors and reductions, hook removal and error messages (logits unchanged by capture
and resid_post against the HF hidden states: test_conformance.py)."""
from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS
from einops import rearrange

import lvlm_probe as lp
from lvlm_probe.errors import HookNameError, InputError, LayoutError, LVLMProbeError


def _hook_counts(model):
    """Forward hooks and pre-hooks of the capture engine left on any module of the HF model.

    transformers installs its own output-capturing hooks on first use (for output_hidden_states)
    and keeps them; those are not ours, so hooks are told apart by the function that defines them.
    """
    hooks = [h for m in model.hf.modules()
             for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum(getattr(h, "__qualname__", "").startswith("Capture.") for h in hooks)


def _all_hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def test_z_and_result_reproduce_attention_output(tiny_batch):
    model, batch = tiny_batch
    names = [n for n in model.hook_names() if n.endswith(("hook_z", "hook_result", "hook_attn_out"))]
    with model.capture(names) as cache:
        model.forward(batch)
    layers = model.module(model.family.lm_layers)
    unmasked = model.family.unmasked_mixing_layers(model.config)  # no heads: no z, no result
    checked = 0
    for layer in range(model.n_layers):
        if layer in unmasked:
            continue
        write = None  # the module between the out-projection and the residual stream, if any
        kind = "cross_attn" if f"blocks.{layer}.cross_attn.hook_z" in cache else "attn"
        if kind == "cross_attn":  # Mllama: the attention output is named under cross_attn
            out_name, out_path = f"blocks.{layer}.cross_attn.hook_attn_out", model.family.lm_cross_attn_out
        else:
            out_name, out_path = f"blocks.{layer}.hook_attn_out", model.family.lm_attn_out
            if model.family.lm_attn_write:  # Gemma 3: hook_attn_out is after the post-attention norm
                write = layers[layer].get_submodule(model.family.lm_attn_write)
        proj = layers[layer].get_submodule(out_path)
        z = cache[f"blocks.{layer}.{kind}.hook_z"]
        result = cache[f"blocks.{layer}.{kind}.hook_result"]
        attn_out = cache[out_name]
        assert z.shape == (*attn_out.shape[:2], model.n_heads, model.d_head_of(layer))
        assert result.shape == (*attn_out.shape[:2], model.n_heads, model.d_model)
        bias = proj.bias if proj.bias is not None else 0.0
        with torch.no_grad():
            reprojected = proj(rearrange(z, "b p h d -> b p (h d)"))
            summed = result.sum(2) + bias
            if write is not None:
                reprojected, summed = write(reprojected), write(summed)
        torch.testing.assert_close(reprojected, attn_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(summed, attn_out, atol=1e-5, rtol=0)
        checked += 1
    assert checked == model.n_layers - len(unmasked)


def test_position_selectors_and_reductions(tiny_batch):
    model, batch = tiny_batch
    name = "blocks.0.hook_resid_post"
    with model.capture(name) as cache:
        model.forward(batch)
    full = cache[name]
    assert cache.positions() is None  # whole tensors kept
    layouts = batch.layouts

    with model.capture(name, positions="image", reduce="mean") as cache:
        model.forward(batch)
    expected = torch.stack([full[i, lay.positions("image")].mean(0) for i, lay in enumerate(layouts)])
    torch.testing.assert_close(cache[name], expected, atol=1e-5, rtol=1e-5)

    with model.capture(name, positions="last") as cache:
        model.forward(batch)
    last = torch.stack([lay.positions("all")[-1] for lay in layouts])
    assert torch.equal(cache.positions()[:, 0], last)
    assert torch.equal(cache[name], full[torch.arange(len(batch)), last][:, None])

    with model.capture(name, positions="prompt", reduce="last") as cache:
        model.forward(batch)
    last_prompt = torch.stack([lay.positions("prompt")[-1] for lay in layouts])
    assert torch.equal(cache[name], full[torch.arange(len(batch)), last_prompt])


def test_prompt_word_selects_its_sub_tokens(tiny_batch):
    model, batch = tiny_batch
    name = "blocks.0.hook_resid_post"
    with model.capture(name) as cache:
        model.forward(batch)
    full = cache[name]
    with model.capture(name, positions="heart") as cache:
        model.forward(batch)
    kept, values = cache.positions(), cache[name]
    for i, layout in enumerate(batch.layouts):
        word = layout.word_positions("heart")
        assert model.tokenizer.decode(batch.input_ids[i, word]).strip().lower() == "heart"
        assert torch.equal(kept[i][kept[i] >= 0], word)
        assert torch.equal(values[i, : word.numel()], full[i, word])

    # examples selecting different counts are padded: -1 positions, zero values
    with model.capture(name, positions="prompt") as cache:
        model.forward(batch)
    kept, values = cache.positions(), cache[name]
    counts = [lay.positions("prompt").numel() for lay in batch.layouts]
    assert counts[0] < counts[1] and kept.shape == (2, counts[1]) and values.shape[:2] == (2, counts[1])
    for i, layout in enumerate(batch.layouts):
        prompt = layout.positions("prompt")
        assert torch.equal(kept[i, : counts[i]], prompt) and (kept[i, counts[i]:] == -1).all()
        assert torch.equal(values[i, : counts[i]], full[i, prompt])
        assert not values[i, counts[i]:].any()

    # a selector that selects nothing names the example and the selector
    with (pytest.raises(LayoutError, match=r"example 0: positions='star'"),
          model.capture(name, positions="star")):
        model.forward(batch)

    def nothing(layout):
        return torch.empty(0, dtype=torch.long)

    with (pytest.raises(LayoutError, match=r"example 0: positions=nothing selects no position"),
          model.capture(name, positions=nothing)):
        model.forward(batch)
    assert _hook_counts(model) == 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_hooks_removed_after_errors_and_many_blocks(family, images):
    model = lp.zoo.tiny(family, device="cpu")
    batch = model.prepare(images=[images[0]], prompts=PROMPTS[:1])
    model.forward(batch, output_hidden_states=True)  # let transformers install its own hooks first
    before, total = _hook_counts(model), _all_hook_counts(model)
    globals_before = (len(torch.nn.modules.module._global_forward_hooks),
                      len(torch.nn.modules.module._global_forward_pre_hooks))
    with pytest.raises(RuntimeError, match="user code"), model.capture(model.hook_names()):
        assert _hook_counts(model) > before
        raise RuntimeError("user code")
    assert _hook_counts(model) == before == 0
    # a hook that raises (no known batch for a position selector) also leaves nothing behind
    with (pytest.raises(LVLMProbeError, match="without a known batch"),
          model.capture("blocks.*.hook_resid_post", positions="image")):
        model.hf(**batch.inputs)
    assert _hook_counts(model) == 0
    for _ in range(1000):
        with model.capture(["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"]):
            pass
    assert _hook_counts(model) == 0
    assert _all_hook_counts(model) == total
    assert (len(torch.nn.modules.module._global_forward_hooks),
            len(torch.nn.modules.module._global_forward_pre_hooks)) == globals_before
    # positions="all" without a reduction needs no batch: the HF model can be called directly
    with model.capture("blocks.0.hook_resid_post") as cache:
        out = model.hf(**batch.inputs, output_hidden_states=True)
    assert torch.equal(cache["blocks.0.hook_resid_post"], out.hidden_states[1])


def test_generate_keeps_every_call(images):
    model = lp.zoo.tiny("llava", device="cpu")
    batch = model.prepare(images=[images[0]], prompts=PROMPTS[:1])
    with model.capture("blocks.0.hook_resid_post") as cache:
        model.generate(batch, max_new_tokens=3, min_new_tokens=3)
    calls = cache.calls("blocks.0.hook_resid_post")
    assert [c.shape[1] for c in calls] == [batch.input_ids.shape[1], 1, 1]
    with pytest.raises(LVLMProbeError, match="ran 3 times"):
        cache["blocks.0.hook_resid_post"]
    # positions are those of the prompt's full pass; a later step (one new position) says so
    with (pytest.raises(InputError, match="full forward pass"),
          model.capture("blocks.0.hook_resid_post", positions="image")):
        model.generate(batch, max_new_tokens=2, min_new_tokens=2)


def test_names_and_errors(tiny_batch):
    model, _ = tiny_batch
    names = model.hook_names()
    assert len(names) == len(set(names))
    resid = [n for n in names if n.startswith("blocks.") and n.endswith(".hook_resid_post")]
    assert resid == [f"blocks.{layer}.hook_resid_post" for layer in range(model.n_layers)]
    vision = [n for n in names if n.startswith("vision.blocks.")]
    assert len(vision) == model.vision_layers
    assert {"hook_embed", "ln_final.hook_normalized", "ln_final.hook_out", "projector.hook_out"} <= set(names)
    cross = set(getattr(model.family, "cross_attention_layers", lambda c: [])(model.config))
    unmasked = set(model.family.unmasked_mixing_layers(model.config))
    assert len([n for n in names if n.endswith(".attn.hook_z")]) == model.n_layers - len(cross) - len(unmasked)
    assert {f"blocks.{layer}.hook_attn_out" for layer in unmasked} <= set(names)
    assert len([n for n in names if n.endswith(".cross_attn.hook_z")]) == len(cross)

    with pytest.raises(HookNameError, match=r"unknown hook 'blocks.\*.hook_resid_pots'.*did you mean.*"
                                            r"'blocks.\*.hook_resid_post'"):
        model.capture("blocks.*.hook_resid_pots")
    with pytest.raises(HookNameError, match=rf"unknown hook 'blocks.{model.n_layers}.hook_resid_post'"):
        model.capture(f"blocks.{model.n_layers}.hook_resid_post")
    with pytest.raises(InputError, match="reduce 'max'"):
        model.capture("hook_embed", reduce="max")
    with pytest.raises(InputError, match="not in the token sequence"):
        model.capture(["vision.blocks.0.hook_resid_post", "hook_embed"], positions="image")
