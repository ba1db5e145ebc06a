"""The explorer in every family's tiny model builds and follows its controls (the patching
identities of every family are in test_conformance.py)."""
from __future__ import annotations

import numpy as np


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
