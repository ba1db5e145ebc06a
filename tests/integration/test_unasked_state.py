"""No operation keeps state its call did not ask for: no KV cache in a single pass, and logits at the
last position only where an operation scores the next token (the rest of a pass's values are what
the caller captures). At 7B widths the cache and the full logits cost as much memory as the values
a capture keeps (docs/scaling.md, section 5)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import PROMPTS, random_image

import lvlm_probe as lp


@contextlib.contextmanager
def recording_passes(model):
    """Each HF forward pass run inside the block, as (use_cache given, logits shape, cache returned)."""
    passes = []

    def after(module, args, kwargs, output):
        passes.append((kwargs.get("use_cache"), tuple(output.logits.shape),
                       getattr(output, "past_key_values", None)))

    handle = model.hf.register_forward_hook(after, with_kwargs=True)
    try:
        yield passes
    finally:
        handle.remove()


# Gemma 4 skips work at positions HF is told it will not unembed; BLIP-2's images enter by
# queries, so image_map is undefined there
FAMILIES = ["llava", "qwen2_vl", "gemma3", "gemma4"]


@pytest.fixture(scope="module", params=[*FAMILIES, "blip2"])
def model_and_batch(request):
    model = lp.zoo.tiny(request.param, device="cpu")
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    return model, model.prepare(images=images, prompts=PROMPTS)


def test_a_bare_forward_builds_no_cache_unless_asked(model_and_batch):
    model, batch = model_and_batch
    names = [n for n in model.hook_names() if n.startswith("blocks.")]
    with recording_passes(model) as passes:
        with model.capture(names) as everywhere:
            full = model.forward(batch)
        with model.capture(names) as scored:
            last = model.forward(batch, last_position=True)
        cached = model.forward(batch, use_cache=True)
    assert [p[0] for p in passes] == [False, False, True]
    assert passes[0][2] is None and passes[1][2] is None
    if hasattr(cached, "past_key_values"):  # BLIP-2 returns no cache at all
        assert cached.past_key_values is not None
    assert full.logits.shape[1] == batch.input_ids.shape[1]
    # the last position's logits are the same whether or not the others are computed
    torch.testing.assert_close(last.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert last.logits.shape[1] == 1
    # hooks see every position either way
    assert all(torch.equal(everywhere[n], scored[n]) for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_and_capture_passes_keep_no_cache_and_one_position(family, tmp_path):
    model = lp.zoo.tiny(family, device="cpu")
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    batch = model.prepare(images=images, prompts=PROMPTS)
    rows = [{"id": str(k), "image": random_image(40, 56, seed=k), "prompt": PROMPTS[0]} for k in range(2)]
    with recording_passes(model) as passes:
        lp.attribution.source_split(model, batch, target=5, foil=6)
        lp.attribution.knockout(model, batch, target=5, foil=6)
        one = model.prepare(images=[[random_image(40, 56, seed=1)]], prompts=PROMPTS[:1])
        lp.attribution.image_map(model, one, target=5, method="ablation")
        lp.extract(model, rows, hooks="blocks.*.hook_resid_post", out=tmp_path / "store", progress=False)
    assert passes
    assert all(use_cache is False and cache is None for use_cache, _, cache in passes)
    assert all(shape[1] == 1 for _, shape, _ in passes)


def _weights_in_graph(tensor, parameters) -> int:
    """How many of ``parameters`` the autograd graph behind ``tensor`` leads to."""
    ids, found, seen, stack = {id(p) for p in parameters}, set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that wants a gradient
        if variable is not None and id(variable) in ids:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(found)


def test_integrated_gradients_differentiate_the_gates_only():
    """IG takes gradients with respect to its gates only: its passes' graphs lead to no weight
    (which would keep every layer's inputs, and the vision tower's graph, for the weights'
    gradients), and the weights' trainable flags are as they were afterwards (a frozen one too)."""
    model = lp.zoo.tiny("llava", device="cpu")
    batch = model.prepare(images=[[random_image(40, 56, seed=1)]], prompts=PROMPTS[:1])
    parameters = list(model.hf.parameters())
    frozen = parameters[0]
    frozen.requires_grad_(False)
    graphs = []

    def after(module, args, output):
        graphs.append((output.logits.requires_grad, _weights_in_graph(output.logits, parameters)))

    handle = model.hf.register_forward_hook(after)
    try:
        lp.attribution.image_map(model, batch, target=5, method="ig", n_steps=4)
        assert not frozen.requires_grad and all(p.requires_grad for p in parameters[1:])
    finally:
        handle.remove()
        frozen.requires_grad_(True)
    # the integration passes carry the gates' graph (the other passes, scoring the full input,
    # none), and no graph leads to a weight
    assert any(on_gates for on_gates, _ in graphs)
    assert all(weights == 0 for _, weights in graphs)
    # a pass with trainable weights leads to them: the check can fail
    assert _weights_in_graph(model.forward(batch, grad=True).logits, parameters) > 0
