"""Attention knockout between token groups over windows of layers: the information-flow curve.

Following Zhang et al. 2025 ("Cross-modal Information Flow in Multimodal Large Language Models"),
attention from the ``dest`` group's queries to the ``source`` group's keys is blocked in a window of
``window`` consecutive layers starting at each layer of ``layers``, and the target's probability at
the last position is compared with the unblocked run: ``relative_change = (p_knocked - p) / p``.
A window where blocking image -> last drops the answer's probability is where image information
flows to the answer. Every window of a batch runs in one batched forward pass.
"""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch

from ..errors import InputError
from ..hooks import attention
from .groups import group_mask, repeat_inputs
from .source_split import self_attention_layers
from .targets import Answer, target_ids


def knockout(
    model, batch, source: str = "image", dest: str = "last", layers: Iterable[int] | None = None, *,
    window: int = 1, target: Answer | list[Answer] | None = None,
) -> pd.DataFrame:
    """Block attention from ``dest`` queries to ``source`` keys in windows of layers.

    Args:
        model: an :class:`~lvlm_probe.LVLM` (self-attention layers; Mllama's cross-attention
            layers are not knocked out).
        batch: from ``model.prepare``.
        source, dest: token groups (``GROUPS``): whose keys are blocked, and for which queries.
        layers: the first layer of each window (default: every layer).
        window: consecutive layers per window (clipped at the last layer).
        target: the answer whose probability is tracked (string or token id, one or per example);
            default: each example's most probable next token without knockout.

    Returns:
        DataFrame with one row per (window, example): ``layer`` (first of the window),
        ``window``, ``example``, ``target``, ``p`` (unblocked), ``p_knocked``, ``relative_change``.

    Raises:
        InputError: for an unknown or empty group, a window < 1, or a layer outside the model.

    Example:
        >>> curve = lp.attribution.knockout(model, batch, source="image", dest="last", window=2)
        >>> curve.groupby("layer")["relative_change"].mean()
    """
    layers = list(range(model.n_layers) if layers is None else layers)
    if window < 1:
        raise InputError(f"window must be at least 1, got {window}")
    bad = [la for la in layers if not 0 <= la < model.n_layers]
    if bad:
        raise InputError(f"layers {bad} are outside the model's [0, {model.n_layers})")
    pairs = group_mask(batch, dest)[:, :, None] & group_mask(batch, source)[:, None, :]  # [b, q, k]
    n = len(batch)
    runs = len(layers) + 1  # the unblocked run first
    blocked = {layer: torch.zeros(runs * n, *pairs.shape[1:], dtype=torch.bool)
               for layer in self_attention_layers(model)}
    for w, start in enumerate(layers, start=1):
        for layer in range(start, min(start + window, model.n_layers)):
            if layer in blocked:
                blocked[layer][w * n:(w + 1) * n] = pairs
    masks = {model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn}"): mask.to(model.device)
             for layer, mask in blocked.items()}
    inputs = repeat_inputs(batch.inputs, runs)
    with torch.no_grad(), attention.hiding_each(masks):
        probs = torch.softmax(model.hf(**inputs).logits[:, -1].float(), dim=-1).cpu()
    probs = probs.reshape(runs, n, -1)
    if target is None:
        ids = probs[0].argmax(-1)
    else:
        ids = target_ids(model, batch, target, None)[2][:, 0]
    p = probs[:, torch.arange(n), ids]  # [runs, batch]
    rows = []
    for w, start in enumerate(layers, start=1):
        for i in range(n):
            rows.append(dict(layer=start, window=window, example=i,
                             target=model.tokenizer.decode([int(ids[i])]),
                             p=float(p[0, i]), p_knocked=float(p[w, i]),
                             relative_change=float((p[w, i] - p[0, i]) / p[0, i])))
    return pd.DataFrame(rows)
