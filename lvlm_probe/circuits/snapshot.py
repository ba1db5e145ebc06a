"""One example's attention, logit lens and per-token head attribution, computed in one forward pass.

A :class:`Snapshot` holds what an interactive view needs to slice by layer, head and position
without running the model again (:func:`lvlm_probe.widgets.explore` is built on it): every
layer's attention patterns, every layer's logit-lens top token at every position, and each head's
write from each key position onto the answer's unembedding direction (direct logit attribution
per token, with the final norm's scale frozen at the query position, as in
:func:`lvlm_probe.attribution.dla`), plus the answer's source split.

Where direct logit attribution does not apply (the family's ``nonlinear_writes``), the snapshot
holds no writes and says why (``Snapshot.no_writes``); the explorer then shows attention weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import einsum, rearrange, reduce, repeat
from jaxtyping import Float, Int
from torch import Tensor

from ..attribution.direct_logit import FinalNorm
from ..attribution.lens import unembed
from ..attribution.results import count, number, summary_repr
from ..attribution.sources import SourceSplit, source_split
from ..attribution.targets import Answer, target_ids
from ..errors import InputError
from ..inputs import Batch


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
class Snapshot:
    """Cached views of one example (``S`` positions, ``L`` layers, ``H`` heads).

    Attributes:
        tokens: the ``S`` token strings.
        groups: the ``S`` position groups (image, prompt, template, pad).
        image: the example's first image (PIL) or None.
        grid: ``[rows, cols]`` sequence positions of its heatmap grid, or None.
        patterns: ``[L, H, S, S]`` attention (query, key).
        lens_tokens: ``[L][S]`` logit-lens top-1 token per layer and position.
        lens_probs: ``[L, S]`` its probability.
        writes: ``[L, H, S]`` each head's value write from each key onto the answer direction,
            before the attention weight and the query's frozen norm scale; None for families
            whose writes are not linear.
        scales: ``[S]`` the final norm's scale at each query position.
        target, foil: the scored answer tokens (foil None: the target's logit alone).
        split: the answer's source split (None when unavailable).
        prompt: the example's prompt (the question).
        no_writes: why ``writes`` is None: "<family> <its nonlinear_writes reason>", else None.
    """

    tokens: list[str]
    groups: list[str]
    image: Any
    grid: Int[Tensor, "rows cols"] | None
    patterns: Float[Tensor, "layer head query key"]
    lens_tokens: list[list[str]]
    lens_probs: Float[Tensor, "layer pos"]
    writes: Float[Tensor, "layer head key"] | None
    scales: Float[Tensor, " pos"]
    target: str
    foil: str | None
    split: SourceSplit | None
    prompt: str = ""
    no_writes: str | None = None

    def __repr__(self) -> str:
        groups = pd.Series(self.groups).value_counts()
        size = [count(len(self.tokens), "position"), f"{int(groups.get('image', 0))} image",
                f"{count(self.n_layers, 'layer')} x {count(self.n_heads, 'head')}"]
        if self.grid is not None:
            size.append(f"grid {self.grid.shape[0]}x{self.grid.shape[1]}")
        answer = [f"target {self.target.strip()!r}" + (f" vs foil {self.foil.strip()!r}" if self.foil is not None else "")]
        split = [] if self.split is None else [
            "split " + " ".join(f"{name} {number(getattr(self.split, name)[0])}"
                                for name in ("prior", "prompt", "image", "full"))]
        writes = [f"no writes ({self.no_writes})"] if self.writes is None else []
        return summary_repr("Snapshot", size, answer, split, writes)

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position): ``layer``, ``position``, ``token`` (the input token),
        ``group`` (image, prompt, template, pad), ``lens_token`` and ``lens_prob`` (the logit
        lens's top token and its probability there)."""
        n_layers, n_pos = self.lens_probs.shape
        return pd.DataFrame({
            "layer": np.repeat(np.arange(n_layers), n_pos), "position": np.tile(np.arange(n_pos), n_layers),
            "token": self.tokens * n_layers, "group": self.groups * n_layers,
            "lens_token": [t for row in self.lens_tokens for t in row],
            "lens_prob": self.lens_probs.reshape(-1).numpy()})

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[1]

    def attention(self, layer: int, head: int | None, query: int) -> Float[Tensor, " key"]:
        """Attention of one query position over keys; ``head=None`` averages the heads."""
        rows = self.patterns[layer, :, query]
        return reduce(rows, "h k -> k", "mean") if head is None else rows[head]

    def contributions(self, layer: int, head: int | None, query: int) -> Float[Tensor, " key"]:
        """Per key position: the head's (or, with None, the layer's heads' summed) direct
        contribution to the answer's logit (difference) at the query position. Falls back to
        attention weights for families whose writes are not linear (``writes`` is None)."""
        if self.writes is None:
            return self.attention(layer, head, query)
        terms = self.patterns[layer, :, query] * self.writes[layer] * self.scales[query]  # [h, k]
        return reduce(terms, "h k -> k", "sum") if head is None else terms[head]

    def cells(self, values: Tensor) -> np.ndarray | None:
        """Per-position values on the image grid, ``[rows, cols]`` (None without a grid)."""
        if self.grid is None:
            return None
        return values[self.grid].numpy()


def snapshot(model, batch: Batch, example: int = 0, target: Answer | None = None, foil: Answer | None = None,
             *, split: bool = True) -> Snapshot:
    """Compute the :class:`Snapshot` of one example of a batch (one forward pass, plus one batched
    pass for the source split).

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        batch: from ``model.prepare``.
        example: which example.
        target: the answer to attribute (string of one token, or id); default the model's top token.
        foil: an alternative answer for a logit difference; default none (the target's logit).
        split: also compute the source split (needs image and prompt tokens).

    Returns:
        A :class:`Snapshot`.

    Raises:
        InputError: for a batch that is not a Batch, an example out of range, or a bad target.
    """
    if not isinstance(batch, Batch):
        raise InputError(f"batch must be a Batch from model.prepare, got {type(batch).__name__}")
    if not isinstance(example, int) or not 0 <= example < len(batch):
        raise InputError(f"example must be an index in [0, {len(batch)}), got {example!r}")
    images = batch.images[example]
    one = model.prepare(images=[images] if images else None, prompts=[batch.prompts[example]])
    layout = one.layouts[0]
    L = model.n_layers
    names = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_v", "blocks.*.hook_resid_post"]
    with torch.no_grad(), model.capture(names) as cache:
        logits = model.forward(one, last_position=True).logits[0, -1].float()
    if target is None:
        target = int(logits.argmax())
    targets, foils, ids = target_ids(model, one, target, foil)
    resid = cache.stack("blocks.*.hook_resid_post")[:, 0]  # [L, S, d]
    probs = torch.softmax(unembed(model, resid), dim=-1)
    lens_probs, lens_ids = probs.max(-1)
    decode = model.tokenizer.convert_ids_to_tokens
    lens_tokens = [decode(row.tolist()) for row in lens_ids.cpu()]
    patterns = cache.stack("blocks.*.attn.hook_pattern")[:, 0].float().cpu()  # [L, H, S, S]
    writes, scales = _writes(model, cache, resid[L - 1].float(), ids[0])
    group_of = ["pad"] * layout.length
    for group in ("image", "prompt", "template"):
        for p in layout.positions(group).tolist():
            group_of[p] = group
    grid = layout.images[0].grid.positions if layout.images and layout.images[0].grid is not None else None
    result = None
    if split and layout.images and len(layout.positions("prompt")):
        result = source_split(model, one, ids[0, 0].item(), foil=ids[0, 1].item() if foils else None)
    reason = model.family.nonlinear_writes
    return Snapshot(tokens=list(layout.tokens), groups=group_of, image=images[0] if images else None, grid=grid,
                    patterns=patterns, lens_tokens=lens_tokens, lens_probs=lens_probs.float().cpu(),
                    writes=writes, scales=scales, target=targets[0], foil=foils[0] if foils else None,
                    split=result, prompt=layout.prompt,
                    no_writes=None if reason is None else f"{model.family.name}: {reason}")


def _writes(model, cache, final: Tensor, ids: Tensor) -> tuple[Tensor | None, Tensor]:
    """``([L, H, S] value writes onto the answer direction, [S] frozen final-norm scales)``."""
    norm = FinalNorm.of(model)
    scales = norm.scale(final)[..., 0].cpu()  # [S]
    if model.family.nonlinear_writes is not None:  # direct logit attribution does not apply
        return None, scales
    head = model.module(model.family.lm_head)
    direction = head.weight[ids[0]].float().cpu()
    if len(ids) > 1:
        direction = direction - head.weight[ids[1]].float().cpu()
    logit_scale = model.family.final_logit_scale(model.config)
    if logit_scale is not None:
        direction = direction * logit_scale
    weight = norm.weight.cpu() if norm.weight is not None else torch.ones_like(direction)
    writes = []
    for layer in range(model.n_layers):
        o_proj = model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn_out}")
        w_o = rearrange(o_proj.weight.float(), "m (h d) -> h d m", h=model.n_heads)
        v = repeat(cache[f"blocks.{layer}.attn.hook_v"][0].float(), "k kv d -> k (kv g) d",
                   g=model.n_heads // model.n_kv_heads_of(layer))
        out = einsum(v, w_o, "k h d, h d m -> h k m")
        out = norm.centre(out)
        # layers of a model spread over devices each compute on their own
        writes.append(einsum(out, (weight * direction).to(out.device), "h k m, m -> h k").cpu())
    return torch.stack(writes).detach(), scales
