"""Stage 1 of shapes-llava training: teach the vision tower what is where, and align the projector.

Each patch token of the CLIP vision tower is trained to predict the shape, colour and size of the
object covering its patch (or background), read off the world's ground-truth object masks. This is
dense supervision (one label per patch) that a from-scratch tower learns in minutes, playing the
role CLIP pre-training plays for LLaVA. At the same time the projector learns to map each patch into
the language model's input-embedding space, onto the sum of the embeddings of the words naming its
object ("small", "red", "heart"); that is what LLaVA's feature-alignment stage achieves with
captions. Stage 2 then trains the projector and the language model on the frozen tower.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..worlds.masks import patch_objects


class PatchHeads(nn.Module):
    """Linear read-outs from each patch state of its object's shape, colour and size (0 =
    background) and of the patch's own row and column, so that what and where both stay linearly
    readable for the language model."""

    def __init__(self, d_model: int, n_shapes: int, n_colors: int, n_sizes: int, grid: int,
                 shape_weight: float = 1.0):
        super().__init__()
        self.shape = nn.Linear(d_model, n_shapes + 1)
        self.color = nn.Linear(d_model, n_colors + 1)
        self.size = nn.Linear(d_model, n_sizes + 1)
        self.row = nn.Linear(d_model, grid)
        self.col = nn.Linear(d_model, grid)
        self.grid = grid
        # shape is the hardest label for a small tower (a 9-pixel hexagon against a circle)
        self.shape_weight = shape_weight

    def loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """states ``[batch, patches, d]``; targets ``[batch, 3, patches]`` -> weighted mean
        cross-entropy (shape weighted ``shape_weight``, the others 1)."""
        cells = torch.arange(states.shape[1], device=states.device)
        where = torch.stack([cells // self.grid, cells % self.grid]).unsqueeze(0).expand(len(states), -1, -1)
        heads = ((self.shape, targets[:, 0], self.shape_weight), (self.color, targets[:, 1], 1.0),
                 (self.size, targets[:, 2], 1.0), (self.row, where[:, 0], 1.0), (self.col, where[:, 1], 1.0))
        return sum(weight * nn.functional.cross_entropy(head(states).flatten(0, 1), target.flatten())
                   for head, target, weight in heads) / sum(weight for _, _, weight in heads)


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


def word_table(config, tokenizer, embed: nn.Embedding) -> torch.Tensor:
    """``[3, max_values + 1, d]``: input embeddings of each shape / colour / size word, as it appears
    after a space in a prompt (row 0 of each attribute, background, is zero)."""
    groups = (config.shapes, config.colors, config.sizes)
    table = torch.zeros(3, max(map(len, groups)) + 1, embed.embedding_dim)
    with torch.no_grad():
        for a, words in enumerate(groups):
            for v, word in enumerate(words):
                ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
                table[a, v + 1] = embed.weight[ids].sum(0).float().cpu()
    return table


def position_basis(tokenizer, embed: nn.Embedding) -> torch.Tensor:
    """``[2, d]``: half the difference of the embeddings of "right" and "left", and of "below" and
    "above" (the words relation answers use)."""
    def word(w: str) -> torch.Tensor:
        return embed.weight[tokenizer(" " + w, add_special_tokens=False)["input_ids"]].sum(0)

    with torch.no_grad():
        return torch.stack([word("right") - word("left"), word("below") - word("above")]).float().cpu() / 2


def vision_loss(vision_tower, heads: PatchHeads, pixel_values: torch.Tensor, targets: torch.Tensor,
                projector: nn.Module | None = None, words: torch.Tensor | None = None,
                basis: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-label loss of the patch states (the CLS state is dropped, as LLaVA's "default" strategy
    does), plus, with a projector, :func:`alignment_loss`."""
    states = vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
    loss = heads.loss(states, targets)
    if projector is not None:
        loss = loss + alignment_loss(projector(states), targets, words, heads.grid, basis)
    return loss


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor, words: torch.Tensor, grid: int,
                   basis: torch.Tensor | None = None) -> torch.Tensor:
    """Relative squared error between each projected patch state ``[batch, patches, d]`` and the
    sum of its object's word embeddings (``words`` from :func:`word_table`, ``targets`` from
    :func:`patch_targets`); with a position ``basis``, the goal also holds the patch's column and
    row (scaled to [-1, 1]) along the right-left and below-above word directions, so where a patch
    is reads like the relation words."""
    device = projected.device
    goal = sum(words[a].to(device)[targets[:, a]] for a in range(3))  # [batch, patches, d]
    if basis is not None:
        cells = torch.arange(projected.shape[1], device=device)
        half = (grid - 1) / 2
        col, row = (cells % grid - half) / half, (cells // grid - half) / half
        goal = goal + col[:, None] * basis[0].to(device) + row[:, None] * basis[1].to(device)
    return ((projected - goal) ** 2).mean() / (goal ** 2).mean().clamp_min(1e-12)
