"""Attention-internal names on every family's tiny model: q/k/v, scores and patterns (eager only
while captured), resid_mid, and the names of the other towers (Q-Former, Mllama's global encoder)."""
from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, random_image
from einops import einsum, rearrange, repeat

import lvlm_probe as lp
from lvlm_probe.hooks import attention

ATTENTION = ("hook_pattern", "hook_attn_scores")


def attention_modules(model):
    """Every LM attention module (self- and cross-attention), with its layer's attention prefix."""
    fam = model.family
    cross = set(getattr(fam, "cross_attention_layers", lambda c: [])(model.config))
    unmasked = set(fam.unmasked_mixing_layers(model.config))  # linear attention, convolutions
    for layer in range(model.n_layers):
        if layer in unmasked:
            continue
        path = fam.lm_cross_attn if layer in cross else fam.lm_attn
        prefix = "cross_attn" if layer in cross else "attn"
        yield layer, prefix, model.module(f"{fam.lm_layers}.{layer}.{path}")


def implementations(model):
    return {m.config._attn_implementation for _, _, m in attention_modules(model)}


def lm_eager_logits(model, batch, **kwargs):
    """The logits with the language model's attention set to eager by hand (the vision tower keeps
    its own implementation, as during a capture)."""
    configs = {id(m.config): m.config for _, _, m in attention_modules(model)}.values()
    saved = [c._attn_implementation for c in configs]
    try:
        for config in configs:
            config._attn_implementation = "eager"
        return model.forward(batch, **kwargs)
    finally:
        for config, impl in zip(configs, saved):
            config._attn_implementation = impl


def test_patterns_run_eager_attention_and_only_while_captured(tiny_batch):
    model, batch = tiny_batch
    before = implementations(model)
    assert "eager" not in before and attention.IMPLEMENTATION not in before
    sdpa = model.forward(batch).logits
    eager = lm_eager_logits(model, batch, output_attentions=True)
    with model.capture(model.hook_names()) as cache:
        assert implementations(model) == {attention.IMPLEMENTATION}
        logits = model.forward(batch).logits
    assert implementations(model) == before and attention.active() == (0, 0)
    # exactly the eager model's logits and patterns; on real tokens within float error of sdpa
    assert torch.equal(logits, eager.logits)
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], sdpa[valid], atol=1e-5, rtol=0)
    hf_patterns = getattr(eager, "language_model_outputs", eager).attentions
    # Mllama includes its cross-attention layers; layers without attention report none
    assert len(hf_patterns) == len(list(attention_modules(model)))
    for (layer, prefix, _), expected in zip(attention_modules(model), hf_patterns):
        assert torch.equal(cache[f"blocks.{layer}.{prefix}.hook_pattern"], expected)
    # a capture without patterns leaves the configured implementation alone
    with model.capture("blocks.*.hook_resid_post"):
        assert implementations(model) == before


def test_qkv_scores_pattern_and_z_agree(tiny_batch):
    """softmax(scores) is the pattern; the pattern applied to the captured values gives z."""
    model, batch = tiny_batch
    fam, gates, handles = model.family, {}, []
    if fam.lm_q_gate:  # Qwen3.5: q_proj emits [query, gate] per head; z is after sigmoid(gate)
        for layer, _, attn in attention_modules(model):
            handles.append(attn.get_submodule(fam.lm_qkv[0]).register_forward_hook(
                lambda mod, args, out, layer=layer: gates.__setitem__(layer, out.detach())))
    try:
        with model.capture(model.hook_names()) as cache:
            model.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    attends_ahead = False
    # layers that attend with an earlier layer's keys and values (Gemma 4's KV sharing) offer no
    # hook_k / hook_v of their own: theirs are the source layer's
    kv_shared = fam.kv_shared_layers(model.config)
    for layer, prefix, _ in attention_modules(model):
        name = f"blocks.{layer}.{prefix}"
        source = kv_shared.get(layer, layer)
        d, n_kv = model.d_head_of(layer), model.n_kv_heads_of(layer)
        if fam.lm_q_gate:
            assert f"{name}.hook_q" not in model.hook_names()
            both = rearrange(gates[layer], "b p (h two d) -> b p h two d", h=model.n_heads, two=2)
            q, gate = both[..., 0, :], both[..., 1, :]
        else:
            q, gate = cache[f"{name}.hook_q"], None
        if source != layer:
            assert not {f"{name}.hook_k", f"{name}.hook_v"} & set(model.hook_names())
        k, v = (cache[f"blocks.{source}.{prefix}.hook_{x}"] for x in "kv")
        scores, pattern, z = (cache[f"{name}.{leaf}"] for leaf in ("hook_attn_scores", "hook_pattern", "hook_z"))
        b, p = batch.input_ids.shape
        n_keys = k.shape[1]
        assert q.shape == (b, p, model.n_heads, d)
        assert k.shape == v.shape == (b, n_keys, n_kv, d)
        assert scores.shape == pattern.shape == (b, model.n_heads, p, n_keys)
        torch.testing.assert_close(torch.softmax(scores, dim=-1), pattern, atol=1e-6, rtol=0)
        if model.family.lm_v_norm:  # Gemma 4 normalises each value head before mixing
            attn = model.module(model.family.lm_layers)[source].get_submodule(model.family.lm_attn)
            with torch.no_grad():
                v = attn.get_submodule(model.family.lm_v_norm)(v)
        v = repeat(v, "b k kv d -> b k (kv g) d", g=model.n_heads // n_kv)
        mixed = einsum(pattern, v, "b h q k, b k h d -> b q h d")
        if gate is not None:
            mixed = mixed * torch.sigmoid(gate)
        torch.testing.assert_close(mixed, z, atol=1e-5, rtol=0)
        if prefix == "attn":
            later = torch.ones(p, p, dtype=torch.bool).triu(1)
            for i, valid in enumerate(batch.inputs["attention_mask"].bool()):
                real = pattern[i][:, valid]  # [head, real query, key]
                assert not real[..., ~valid].any()  # no real token attends to padding
                # causal, except where the family declares that some positions attend both ways
                # (Gemma 3's and Molmo2's image tokens, PaliGemma's prefix)
                ahead = bool(real[:, later[valid]].any())
                assert not ahead or model.family.bidirectional_attention
                attends_ahead = attends_ahead or ahead
    # the declaration is true: some position does attend to a later one
    assert attends_ahead == model.family.bidirectional_attention


def test_pattern_positions_select_queries(tiny_batch):
    model, batch = tiny_batch
    name = next(f"blocks.{layer}.{prefix}.hook_pattern" for layer, prefix, _ in attention_modules(model))
    with model.capture(name) as cache:
        model.forward(batch)
    full = cache[name]
    last = torch.stack([lay.positions("all")[-1] for lay in batch.layouts])
    rows = torch.arange(len(batch))
    with model.capture(name, positions="last", reduce="last") as cache:
        model.forward(batch)
    assert torch.equal(cache[name], full[rows, :, last])  # [batch, head, key]
    with model.capture(name, positions="prompt") as cache:
        model.forward(batch)
    kept = cache.positions()
    assert cache[name].shape == (len(batch), model.n_heads, kept.shape[1], full.shape[-1])
    for i, lay in enumerate(batch.layouts):
        n = len(lay.positions("prompt"))
        assert torch.equal(cache[name][i, :, :n], full[i, :, lay.positions("prompt")])
        assert not cache[name][i, :, n:].any()  # padding rows


def test_resid_mid_splits_each_layer(tiny_batch):
    """resid_pre + attn_out = resid_mid; resid_mid + mlp_out = resid_post (the two outputs are the
    writes into the residual stream, also for Gemma 3's sandwich norms)."""
    model, batch = tiny_batch
    layers = model.module(model.family.lm_layers)
    fam, extra, handles = model.family, {}, []
    if fam.lm_extra_write:  # Gemma 4: a third write (per-layer embeddings) after the MLP
        for i, block in enumerate(layers):
            handles.append(block.get_submodule(fam.lm_extra_write).register_forward_hook(
                lambda mod, args, out, i=i: extra.__setitem__(i, out.detach())))
    try:
        with model.capture(model.hook_names()) as cache:
            model.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    checked = 0
    for layer, prefix, _ in attention_modules(model):
        block = layers[layer]
        attn_out = cache[f"blocks.{layer}.cross_attn.hook_attn_out" if prefix == "cross_attn"
                         else f"blocks.{layer}.hook_attn_out"]
        mlp_out = cache[f"blocks.{layer}.hook_mlp_out"]
        pre, post = cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"]
        if model.family.lm_resid_mid is None:  # parallel attention and MLP: both writes at once
            assert f"blocks.{layer}.hook_resid_mid" not in model.hook_names()
            torch.testing.assert_close(post, pre + attn_out + mlp_out, atol=1e-5, rtol=0)
            checked += 1
            continue
        mid = cache[f"blocks.{layer}.hook_resid_mid"]
        if prefix == "cross_attn":  # Mllama gates both writes (and masks text rows)
            with torch.no_grad():
                gated = pre + block.cross_attn_attn_gate.tanh() * attn_out
            torch.testing.assert_close(mid, gated, atol=1e-5, rtol=0)
            continue
        torch.testing.assert_close(mid, pre + attn_out, atol=1e-5, rtol=0)
        expected = mid + mlp_out + extra.get(layer, 0.0)
        if fam.lm_layer_scale:  # Gemma 4 rescales each layer's output
            expected = expected * getattr(block, fam.lm_layer_scale)
        torch.testing.assert_close(post, expected, atol=1e-5, rtol=0)
        checked += 1
    assert checked >= 1


def test_other_towers_are_named(tiny_batch):
    model, batch = tiny_batch
    names = model.hook_names()
    fam = model.family
    if getattr(fam, "qformer_layers", None):  # Q-Former families name its layers
        qformer = [n for n in names if n.startswith("qformer.blocks.")]
        assert qformer == [f"qformer.blocks.{i}.hook_resid_post"
                           for i in range(model.config.qformer_config.num_hidden_layers)]
        with model.capture("qformer.blocks.*.hook_resid_post") as cache:
            out = model.forward(batch)
        # the last Q-Former layer's states, normalised by nothing further, are the query output
        torch.testing.assert_close(cache.stack("qformer.blocks.*.hook_resid_post")[-1],
                                   out.qformer_outputs.last_hidden_state, atol=1e-6, rtol=0)
    elif fam.name == "mllama":
        n_global = model.config.vision_config.num_global_layers
        assert [n for n in names if n.startswith("vision.global_blocks.")] == [
            f"vision.global_blocks.{i}.hook_resid_post" for i in range(n_global)]
        with model.capture("vision.global_blocks.*.hook_resid_post") as cache:
            model.forward(batch)
        assert len(cache.names()) == n_global
        # cross-attention keys and values run over the vision states: captured whole only
        cross = next(layer for layer, prefix, _ in attention_modules(model) if prefix == "cross_attn")
        with model.capture(f"blocks.{cross}.cross_attn.hook_k") as alone:  # without other LM names
            model.forward(batch)
        assert alone[f"blocks.{cross}.cross_attn.hook_k"].shape[0] == len(batch)
        with pytest.raises(lp.InputError, match="not in the token sequence"):
            model.capture(f"blocks.{cross}.cross_attn.hook_k", positions="image")
    else:
        assert not [n for n in names if n.startswith(("qformer.", "vision.global_blocks."))]


def test_attention_switch_never_leaks(tiny_batch):
    model, batch = tiny_batch
    first = model.family.self_attention_layers(model.config)[0]
    before = implementations(model)
    with pytest.raises(RuntimeError, match="user code"), model.capture("blocks.*.attn.hook_pattern"):
        raise RuntimeError("user code")
    # nested captures: the implementation comes back only when the outer one exits
    with model.capture("blocks.*.attn.hook_pattern") as outer:
        with model.capture(f"blocks.{first}.attn.hook_attn_scores") as inner:
            model.forward(batch)
        assert implementations(model) == {attention.IMPLEMENTATION}
        model.forward(batch)
    assert len(outer.calls(f"blocks.{first}.attn.hook_pattern")) == 2
    assert len(inner.calls(f"blocks.{first}.attn.hook_attn_scores")) == 1
    for _ in range(200):
        with model.capture(f"blocks.{first}.attn.hook_pattern"):
            pass
    assert implementations(model) == before and attention.active() == (0, 0)


def test_opt_scores_are_scaled_dot_products():
    """OPT (BLIP-2) has no rotary embedding, so captured q and k give the scores directly."""
    model = lp.zoo.tiny("blip2", device="cpu")
    batch = model.prepare(images=[random_image(40, 56, seed=1)], prompts=PROMPTS[:1])
    with model.capture(["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_attn_scores"]) as cache:
        model.forward(batch)
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    scores = cache["blocks.0.attn.hook_attn_scores"]
    expected = einsum(q, k, "b q h d, b k h d -> b h q k") * model.d_head ** -0.5
    allowed = ~torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1)
    torch.testing.assert_close(scores[..., allowed], expected[..., allowed], atol=1e-5, rtol=0)
    assert rearrange(scores[..., ~allowed], "... -> (...)").max() < -1e30  # masked keys
