"""Stage 2's auxiliary read-outs: what the answer position should have gathered from the image.

Answering "Is the heart left of the star?" takes two steps: find each named object among the image
tokens and bring its position to the answer position, then compare the two positions. Learnt from
the answers alone, a language model this small leaves relation answers at chance within a
15-minute budget. Linear heads on the residual stream at the answer position (the last prompt
token) are therefore trained beside the answer loss: at one middle layer they read off the grid
cell (row, column) of each object the question is about and the colour and size of the first (the
gathering), one layer later the order of the two objects along each axis (the comparison). With the
gathering heads alone, shapes-llava learnt "where" questions (0.84) but not relation yes/no ones
(0.51); with the comparison heads too, both (0.99). Turning the order into a yes/no or a relation
word is still learnt from the answers. The heads are dropped after training: the checkpoint is a
plain ``LlavaForConditionalGeneration``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..worlds.scene import GRID

IGNORE = -100  # no target (a caption, an absent shape, no second object)
# targets per example: row and column of the first and second asked object, colour and size of the
# first (read at the heads' layer); the first object's order against the second's along the rows and
# the columns, 0 = before (above / left), 1 = same, 2 = after (read one layer later)
FIELDS = ("row_a", "col_a", "row_b", "col_b", "color_a", "size_a", "order_rows", "order_cols")
COMPARISONS = 2  # the last fields, read one layer later


def cell(obj, image_size: int) -> tuple[int, int]:
    """(row, column) of the world's layout cell that holds ``obj``'s centre."""
    x, y = obj.center
    return min(int(y / image_size * GRID), GRID - 1), min(int(x / image_size * GRID), GRID - 1)


def answer_targets(config, questions: list) -> torch.Tensor:
    """``[batch, 8]`` targets in the order of :data:`FIELDS`; ``None`` (a caption) gets none."""
    out = torch.full((len(questions), len(FIELDS)), IGNORE, dtype=torch.long)
    for b, q in enumerate(questions):
        if q is None or not q.about:
            continue
        first = q.scene.objects[q.about[0]]
        out[b, 0:2] = torch.tensor(cell(first, q.scene.image_size))
        out[b, 4] = config.colors.index(first.color)
        out[b, 5] = config.sizes.index(first.size)
        if len(q.about) > 1:
            out[b, 2:4] = torch.tensor(cell(q.scene.objects[q.about[1]], q.scene.image_size))
            out[b, 6:8] = torch.sign(out[b, 0:2] - out[b, 2:4]) + 1
    return out


class AnswerHeads(nn.Module):
    """Linear read-outs of :data:`FIELDS` from the residual stream at the answer position.

    Args:
        d_model: the language model's width.
        n_colors, n_sizes: the world's numbers of colours and sizes.
        layer: index into the language model's hidden states (0 = embeddings, ``l`` = the output of
            block ``l - 1``) at which the heads read; the comparisons read at ``layer + 1``.
    """

    def __init__(self, d_model: int, n_colors: int, n_sizes: int, layer: int):
        super().__init__()
        sizes = (GRID, GRID, GRID, GRID, n_colors, n_sizes, 3, 3)
        self.heads = nn.ModuleList(nn.Linear(d_model, n) for n in sizes)
        self.layers = [layer] * (len(FIELDS) - COMPARISONS) + [layer + 1] * COMPARISONS

    def loss(self, hidden_states: tuple[torch.Tensor, ...], labels: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the targets present.

        Args:
            hidden_states: the language model's hidden states, each ``[batch, pos, d_model]``.
            labels: ``[batch, pos]`` answer labels (``-100`` before the answer), which locate the
                answer position: the token before the first label.
            targets: ``[batch, 8]`` from :func:`answer_targets`.
        """
        position = (labels != IGNORE).int().argmax(1) - 1
        rows = torch.arange(len(labels), device=labels.device)
        targets = targets.to(labels.device)
        total = hidden_states[0].new_zeros(())
        for k, (head, layer) in enumerate(zip(self.heads, self.layers)):
            at_answer = hidden_states[layer][rows, position]  # [batch, d_model]
            total = total + nn.functional.cross_entropy(
                head(at_answer).float(), targets[:, k], ignore_index=IGNORE, reduction="sum")
        return total / (targets != IGNORE).sum().clamp_min(1)
