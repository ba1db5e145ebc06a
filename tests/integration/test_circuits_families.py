"""Patching in every family's tiny model: writing the clean run's residual stream at the first
layer restores the clean logits wherever the image enters the token sequence, and an empty edit
changes nothing; the explorer builds and follows its controls."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

from lvlm_probe.circuits import editing, patch
from lvlm_probe.errors import InputError


def test_patching_the_first_residual_restores_the_clean_run(tiny_batch):
    model, clean = tiny_batch
    # same prompts and image sizes, other pixels: the same token layout
    corrupted = model.prepare(images=[[random_image(40, 56, seed=11)], [random_image(72, 48, seed=12)]],
                              prompts=clean.prompts)
    with torch.no_grad(), model.capture("blocks.0.hook_resid_pre") as cache:
        clean_logits = model.forward(clean).logits[:, -1]
    with torch.no_grad():
        corrupted_logits = model.forward(corrupted).logits[:, -1]
        with editing(model, {}):
            assert torch.equal(model.forward(corrupted).logits[:, -1], corrupted_logits)
        with editing(model, {"blocks.0.hook_resid_pre": lambda x: cache["blocks.0.hook_resid_pre"]}):
            patched = model.forward(corrupted).logits[:, -1]
    if model.family.image_mode == "cross_attention":
        # the image is read by cross-attention layers, not from the sequence: patching the
        # sequence alone cannot restore it
        pytest.skip("Mllama reads the image through cross-attention")
    torch.testing.assert_close(patched, clean_logits, atol=1e-4, rtol=1e-4)
    token = int(clean_logits[0].argmax())

    def logit(logits):
        return logits[:, token]
    if torch.allclose(clean_logits[:, token], corrupted_logits[:, token], atol=1e-6):
        # some random tiny models' last position does not see the image at all
        with pytest.raises(InputError, match="nothing to restore"):
            patch(model, clean, corrupted, "blocks.0.hook_resid_pre", positions="all", metric=logit)
        return
    table = patch(model, clean, corrupted, "blocks.0.hook_resid_pre", positions="all", metric=logit)
    assert table["metric"].item() == pytest.approx(1.0, abs=1e-3)


def test_the_explorer_works_in_every_family(tiny_batch):
    import lvlm_probe as lp

    model, batch = tiny_batch
    explorer = lp.widgets.explore(model, batch, example=1)
    counted = []
    handle = model.hf.register_forward_pre_hook(lambda module, args: counted.append(1))
    try:
        before = bytes(explorer.image.value)
        explorer.layer.value = 0
        explorer.head.value = model.n_heads - 1
        assert bytes(explorer.image.value) != before
    finally:
        handle.remove()
    assert not counted
    shown = explorer.shown()
    grid = batch.layouts[1].images[0].grid
    if grid is None:  # BLIP-2's queries, Mllama's cross-attended tiles: no grid in the sequence
        assert shown["cells"] is None
    else:
        assert shown["cells"].shape == grid.shape
        assert np.all(shown["cells"] >= 0)
