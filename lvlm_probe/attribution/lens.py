"""The logit lens (nostalgebraist 2020; for image tokens, Neo et al. 2024, "Towards Interpreting
Visual Information Processing in Vision-Language Models"): every layer's residual stream decoded
through the final norm and the unembedding, as if the model stopped there.

At the last layer this is the model's own output (the final norm, the unembedding and any final
soft cap are applied as the model applies them), so the lens's last layer equals the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from .results import AttributionResult, legacy_calls, moved_to_keywords


def unembed(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits from residual-stream states: final norm, unembedding, and the final logit scale and
    soft cap that the model's forward applies (the family's ``final_logit_scale``, e.g. Cohere's,
    and ``final_logit_softcap``, e.g. PaliGemma's), in float32."""
    norm = model.module(model.family.lm_norm)
    head = model.module(model.family.lm_head)
    with torch.no_grad():
        logits = head(norm(resid.to(model.dtype))).float()
    scale = model.family.final_logit_scale(model.config)
    if scale is not None:
        logits = logits * scale
    cap = model.family.final_logit_softcap(model.config)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class LogitLens(AttributionResult):
    """Top-k decoded tokens per layer and kept position (no target: ``targets`` is None).

    Attributes:
        top_ids: ``[layer, batch, pos, k]`` token ids, most probable first.
        top_probs: ``[layer, batch, pos, k]`` their probabilities.
        positions: ``[batch, pos]`` sequence positions kept, ``-1`` at padding.
        layers: the layer index of each entry of the first axis.
        tokenizer: to turn ids into strings (:meth:`tokens`).
        grids: ``(rows, cols)`` of each example's first image, for :meth:`plot`.
        layouts, method: see :class:`~lvlm_probe.attribution.results.AttributionResult`.
    """

    top_ids: Int[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    positions: Int[Tensor, "batch pos"]
    layers: list[int]
    tokenizer: Any
    grids: list[tuple[int, int] | None]

    def tokens(self, layer: int, example: int) -> list[str]:
        """The top-1 token of every kept position of one example at one layer (index into ``layers``)."""
        keep = self.positions[example] >= 0
        ids = self.top_ids[layer, example, keep, 0].tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, example, kept position, rank): ``layer``, ``example``, ``position``
        (in the sequence), ``rank`` (0 = most probable), ``token_id``, ``token`` and ``prob``."""
        n_layers, n, n_pos, k = self.top_ids.shape
        index = pd.MultiIndex.from_product([range(n_layers), range(n), range(n_pos), range(k)],
                                           names=["layer", "example", "slot", "rank"])
        table = pd.DataFrame({"token_id": self.top_ids.reshape(-1).numpy(),
                              "prob": self.top_probs.reshape(-1).float().numpy()}, index=index).reset_index()
        table["position"] = self.positions[table["example"], table["slot"]].numpy()
        table = table[table["position"] >= 0].drop(columns="slot").reset_index(drop=True)
        table["layer"] = np.asarray(self.layers)[table["layer"]]
        vocabulary = {i: self.tokenizer.decode([i]) for i in table["token_id"].unique().tolist()}
        table["token"] = table["token_id"].map(vocabulary)
        return table[["layer", "example", "position", "rank", "token_id", "token", "prob"]]

    def plot(self, example: int = 0, layer: int = -1) -> Figure:
        """The top-1 token of each image cell at one layer, shaded by its probability."""
        keep = self.positions[example] >= 0
        probs = self.top_probs[layer, example, keep, 0].numpy()
        words = self.tokens(layer, example)
        grid = self.grids[example]
        rows, cols = grid if grid and grid[0] * grid[1] == len(words) else (1, len(words))
        fig = Figure(figsize=(0.55 * cols + 1.5, 0.55 * rows + 1.0))
        ax = fig.subplots()
        image = ax.imshow(np.asarray(probs).reshape(rows, cols), cmap="Blues", vmin=0.0, vmax=1.0)
        for i, word in enumerate(words):
            ax.text(i % cols, i // cols, word.strip()[:6], ha="center", va="center", fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"logit lens, layer {self.layers[layer]}: top token per cell", fontsize=8)
        self.suptitle(fig, example, f"logit lens at layer {self.layers[layer]} (no target: each cell's most "
                                    "probable next token)", fontsize=7)
        fig.colorbar(image, ax=ax, label="probability")
        fig.tight_layout()
        return fig


@legacy_calls(moved_to_keywords(2, ["positions", "k"]), "logit_lens(model, batch, positions=..., k=...)")
def logit_lens(model, batch, *, positions: Any = "image", k: int = 5) -> LogitLens:
    """Decode every layer's residual stream at some positions through the final norm and unembedding.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        batch: from ``model.prepare``.
        positions: a position selector (see :mod:`lvlm_probe.hooks.selectors`), default the image tokens.
        k: how many top tokens to keep per position.

    Returns:
        A :class:`LogitLens`; one layer is decoded at a time and only its top ``k`` kept, so the
        memory never holds ``[layer, pos, vocab]``.

    Raises:
        InputError: for ``k`` outside ``[1, vocab]``; position errors as in ``model.capture``.

    Example:
        >>> lens = lp.attribution.logit_lens(model, batch, positions="image", k=5)
        >>> lens.tokens(layer=-1, example=0)
    """
    if not isinstance(k, int) or not 1 <= k <= model.d_vocab:
        raise InputError(f"k must be an integer in [1, {model.d_vocab}], got {k!r}")
    with model.capture("blocks.*.hook_resid_post", positions=positions) as cache:
        model.forward(batch)
    kept = cache.positions()
    if kept is None:  # positions="all": every position of the padded batch
        n, length = batch.input_ids.shape
        kept = torch.arange(length).expand(n, length).clone()
    top_ids, top_probs = [], []
    for layer in range(model.n_layers):
        probs = torch.softmax(unembed(model, cache[f"blocks.{layer}.hook_resid_post"]), dim=-1)
        values, ids = probs.topk(k, dim=-1)
        top_ids.append(ids.cpu())
        top_probs.append(values.cpu())
    return LogitLens(torch.stack(top_ids), torch.stack(top_probs), kept.cpu(), list(range(model.n_layers)),
                     model.tokenizer, [lay.image_grids[0] if lay.image_grids else None for lay in batch.layouts],
                     method="logit_lens", layouts=list(batch.layouts))
