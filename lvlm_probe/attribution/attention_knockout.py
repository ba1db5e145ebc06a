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
from dataclasses import dataclass

import pandas as pd
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..hooks import attention
from .groups import GROUPS, group_mask, repeat_inputs
from .results import AttributionTable, decoded, legacy_calls, number
from .targets import Answer, target_ids


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)  # AttributionTable.__repr__ summarises it
class KnockoutCurve(AttributionTable):
    """The information-flow curve of :func:`knockout`.

    Attributes:
        table: one row per (window, example): ``layer`` (first of the window), ``window``,
            ``example``, ``target``, ``p`` (unblocked), ``p_knocked``, ``relative_change``; with a
            foil also ``foil``, ``logodds`` and ``logodds_knocked`` (``log p(target) - log p(foil)``).
        source, dest: the blocked token groups (keys, queries); window: layers per window.
    """

    source: str = "image"
    dest: str = "last"
    window: int = 1

    def _summary(self) -> list[str]:
        """The blocked edge and the window whose knockout lowers p(target) most, on average."""
        parts = [f"{self.source} -> {self.dest}, window {self.window}"]
        if len(self.table):
            mean = self.table.groupby("layer")["relative_change"].mean()
            parts.append(f"largest mean drop at layer {mean.idxmin()}: relative change {number(mean.min())}")
        return parts

    def figure(self) -> Figure:
        """The relative change of the target's probability per window: each example (thin) and
        their mean (thick)."""
        fig = Figure(figsize=(5.6, 3.6))
        ax = fig.subplots()
        table = self.table
        if len(table):
            wide = table.pivot(index="layer", columns="example", values="relative_change")
            ax.plot(wide.index, wide.to_numpy(), color="0.75", lw=0.6)
            ax.plot(wide.index, wide.mean(axis=1).to_numpy(), color="tab:red", lw=2.0, label="mean")
            ax.legend(fontsize=7)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xlabel(f"first layer of the window ({self.window} layer{'s' if self.window > 1 else ''})")
        ax.set_ylabel("relative change of p(target)")
        self.suptitle(fig, None, f"attention knockout {self.source} -> {self.dest}")
        fig.tight_layout()
        return fig


def _legacy(args: tuple, kwargs: dict):
    """``knockout(model, batch, source, dest, layers, ...)``: the groups and layers were positional."""
    old = args[2:]
    if not old or (len(old) == 1 and not (isinstance(old[0], str) and old[0] in GROUPS)):
        return None  # (model, batch) or (model, batch, target)
    if len(old) > 3:
        return None  # too many arguments either way: let the call raise TypeError
    kwargs = dict(kwargs)
    for name, value in zip(("source", "dest", "layers"), old):
        if name in kwargs:
            raise TypeError(f"knockout() got multiple values for argument {name!r}")
        kwargs[name] = value
    return args[:2], kwargs, "passing source, dest or layers positionally"


@legacy_calls(_legacy, "knockout(model, batch, target, source=..., dest=..., layers=..., window=...) "
                       "(a target spelled like a token group, e.g. 'image', goes by keyword: target=...)")
def knockout(
    model, batch, target: Answer | list[Answer] | None = None, *, foil: Answer | list[Answer] | None = None,
    source: str = "image", dest: str = "last", layers: Iterable[int] | None = None, window: int = 1,
) -> KnockoutCurve:
    """Block attention from ``dest`` queries to ``source`` keys in windows of layers.

    Args:
        model: an :class:`~lvlm_probe.LVLM` (its self-attention layers: cross-attention layers,
            ``family.cross_attention_layers``, are not knocked out).
        batch: from ``model.prepare``.
        target: the answer whose probability is tracked (string or token id, one or per example);
            default: each example's most probable next token without knockout.
        foil: an alternative answer: adds the target's log-odds against it, unblocked and
            knocked out; default None.
        source, dest: token groups (``GROUPS``): whose keys are blocked, and for which queries.
        layers: the first layer of each window (default: every layer).
        window: consecutive layers per window (clipped at the last layer).

    Returns:
        A :class:`KnockoutCurve`; ``to_frame()`` has one row per (window, example): ``layer``
        (first of the window), ``window``, ``example``, ``target``, ``p`` (unblocked),
        ``p_knocked``, ``relative_change`` (and with a foil ``foil``, ``logodds``,
        ``logodds_knocked``).

    Raises:
        InputError: for an unknown or empty group, a window < 1, no layers or a layer outside the
            model, a window over a layer that mixes tokens without an attention mask
            (``family.unmasked_mixing_layers``), or bad targets.

    Example:
        >>> curve = lp.attribution.knockout(model, batch, source="image", dest="last", window=2)
        >>> curve.to_frame().groupby("layer")["relative_change"].mean()
        >>> curve.plot()
    """
    received = layers
    layers = list(range(model.n_layers) if layers is None else layers)
    if window < 1:
        raise InputError(f"window must be at least 1, got {window}")
    if not layers:
        raise InputError(f"layers is empty (got {received!r}); expected the first layer of at least one "
                         f"window, in [0, {model.n_layers}), or None for every layer")
    bad = [la for la in layers if not 0 <= la < model.n_layers]
    if bad:
        raise InputError(f"layers {bad} are outside the model's [0, {model.n_layers})")
    if target is None and foil is not None:
        raise InputError(f"a foil ({foil!r}) needs a target; pass target= too")
    unmasked = sorted({layer for start in layers for layer in range(start, min(start + window, model.n_layers))}
                      & set(model.family.unmasked_mixing_layers(model.config)))
    if unmasked:
        raise InputError(
            f"knockout cannot block {dest} queries from {source} keys in {model.family.name}'s layers "
            f"{unmasked}: they mix tokens without an attention mask (a recurrence or convolution has no "
            "per-query keys to block, and leaving them open would not block the flow); choose windows "
            f"of self-attention layers only: {model.family.self_attention_layers(model.config)}")
    pairs = group_mask(batch, dest)[:, :, None] & group_mask(batch, source)[:, None, :]  # [b, q, k]
    if target is not None:  # validated before the model runs
        targets, foils, answer_ids = target_ids(model, batch, target, foil)
    n = len(batch)
    runs = len(layers) + 1  # the unblocked run first
    blocked = {layer: torch.zeros(runs * n, *pairs.shape[1:], dtype=torch.bool)
               for layer in model.family.self_attention_layers(model.config)}
    for w, start in enumerate(layers, start=1):
        for layer in range(start, min(start + window, model.n_layers)):
            if layer in blocked:
                blocked[layer][w * n:(w + 1) * n] = pairs
    masks = {model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn}"): mask.to(model.device)
             for layer, mask in blocked.items()}
    inputs = repeat_inputs(batch.inputs, runs, model.family.packed_inputs)
    with torch.no_grad(), attention.hiding_each(masks):
        probs = torch.softmax(model.run(inputs, last_position=True).logits[:, -1].float(), dim=-1).cpu()
    probs = probs.reshape(runs, n, -1)
    if target is None:
        ids = probs[0].argmax(-1)
        targets, foils, foil_ids = decoded(model.tokenizer, ids), None, None
    else:
        ids = answer_ids[:, 0]
        foil_ids = answer_ids[:, 1] if foils else None
    p = probs[:, torch.arange(n), ids]  # [runs, batch]
    if foil_ids is not None:
        logodds = p.log() - probs[:, torch.arange(n), foil_ids].log()
    rows = []
    for w, start in enumerate(layers, start=1):
        for i in range(n):
            row = dict(layer=start, window=window, example=i, target=targets[i],
                       p=float(p[0, i]), p_knocked=float(p[w, i]),
                       relative_change=float((p[w, i] - p[0, i]) / p[0, i]))
            if foil_ids is not None:
                row.update(foil=foils[i], logodds=float(logodds[0, i]), logodds_knocked=float(logodds[w, i]))
            rows.append(row)
    return KnockoutCurve(table=pd.DataFrame(rows), method="knockout", targets=targets, foils=foils,
                         target_ids=ids, foil_ids=foil_ids, layouts=list(batch.layouts),
                         source=source, dest=dest, window=window)
