"""Ground-truth object masks and the resumable training stream."""
from __future__ import annotations

import numpy as np
import pytest

from lvlm_probe.errors import InputError
from lvlm_probe.worlds import PALETTE, ShapesWorld
from lvlm_probe.worlds.masks import object_mask, patch_objects


@pytest.fixture(scope="module")
def scenes():
    return ShapesWorld(seed=3, image_size=64).scenes(40, split="train")


def test_mask_marks_each_object_where_it_is_drawn(scenes):
    for scene in scenes:
        mask = object_mask(scene)
        pixels = np.asarray(scene.render()).astype(int)
        background = np.array(PALETTE[scene.background])
        for k, obj in enumerate(scene.objects):
            cx, cy = (int(v) for v in obj.center)
            assert mask[cy, cx] == k + 1
            # a pixel labelled k is at least half k's colour: nearer to it than to the background
            labelled = pixels[mask == k + 1]
            colour = np.array(PALETTE[obj.color])
            assert np.all(np.abs(labelled - colour).sum(-1) <= np.abs(labelled - background).sum(-1) + 3)


def test_patch_objects_take_the_majority_owner(scenes):
    scene = scenes[0]
    mask = object_mask(scene)
    owners = patch_objects(scene, 8, min_fraction=0.0)
    for r in range(8):
        for c in range(8):
            block = mask[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
            counts = np.bincount(block.reshape(-1), minlength=len(scene.objects) + 1)
            counts[0] = 0
            assert owners[r, c] == (counts.argmax() if counts.max() > 0 else 0)
    with pytest.raises(InputError, match="not a multiple of the grid 7"):
        patch_objects(scene, 7)


def test_training_stream_reads_in_any_batches():
    world = ShapesWorld(seed=5, image_size=32)
    whole = world.training_questions(12)
    parts = world.training_questions(5) + world.training_questions(7, start=5)
    assert [q.id for q in whole] == [q.id for q in parts]
    assert [q.prompt for q in whole] == [q.prompt for q in parts]
    with pytest.raises(InputError, match="-1"):
        world.training_questions(3, start=-1)
