"""Stage 1 of shapes-llava training: teach the vision tower what is where.

Each patch token of the CLIP vision tower is trained to predict the shape, colour and size of the
object covering its patch (or background), read off the world's ground-truth object masks. This is
dense supervision (one label per patch) that a from-scratch tower learns in minutes, playing the
role CLIP pre-training plays for LLaVA: stage 2 then trains the projector and the language model on
the frozen tower, as LLaVA does.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..worlds.masks import patch_objects


class PatchHeads(nn.Module):
    """Linear read-outs of shape, colour and size from each patch state (0 = background)."""

    def __init__(self, d_model: int, n_shapes: int, n_colors: int, n_sizes: int):
        super().__init__()
        self.shape = nn.Linear(d_model, n_shapes + 1)
        self.color = nn.Linear(d_model, n_colors + 1)
        self.size = nn.Linear(d_model, n_sizes + 1)

    def loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """states ``[batch, patches, d]``; targets ``[batch, 3, patches]`` -> mean cross-entropy."""
        heads = (self.shape, self.color, self.size)
        return sum(nn.functional.cross_entropy(head(states).flatten(0, 1), targets[:, k].flatten())
                   for k, head in enumerate(heads)) / 3


def patch_targets(config, scenes, grid: int) -> torch.Tensor:
    """``[batch, 3, grid * grid]`` shape / colour / size index + 1 of each patch's object, 0 for background."""
    out = np.zeros((len(scenes), 3, grid * grid), dtype=np.int64)
    for b, scene in enumerate(scenes):
        owner = patch_objects(scene, grid).reshape(-1)
        for p, k in enumerate(owner):
            if k:
                obj = scene.objects[k - 1]
                out[b, :, p] = (config.shapes.index(obj.shape) + 1, config.colors.index(obj.color) + 1,
                                config.sizes.index(obj.size) + 1)
    return torch.from_numpy(out)


def vision_loss(vision_tower, heads: PatchHeads, pixel_values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of the patch states (the CLS state is dropped, as LLaVA's "default" strategy does)."""
    states = vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
    return heads.loss(states, targets)
