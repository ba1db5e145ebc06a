"""Path patching: the effect of one head on the answer along chosen paths only.

A sender head's clean output reaches the answer through every later component. Path patching
(Wang et al. 2022, "Interpretability in the Wild"; Goldowsky-Dill et al. 2023) keeps only some
paths: the difference the sender makes, ``delta = (z_clean - z_corrupted)[head] W_O[head]``, is added
to the corrupted residual stream where the receivers read it, and nowhere else.

* ``receivers="logits"``: the direct path. ``delta`` is added to the final residual stream (the
  final norm's input), so the answer changes only through the unembedding.
* receivers ``[(layer, head, "q" | "k" | "v"), ...]``: the receivers' queries, keys or values are
  recomputed from ``resid_pre + delta`` at their layer (one pass per receiver layer, so no other
  component sees ``delta``), then patched into a corrupted run in which everything downstream of
  the receivers is recomputed. For grouped-query attention a key or value receiver's head is a key
  head.

Every sender runs in batched forward passes, like :func:`~lvlm_probe.circuits.patch`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from einops import einsum, rearrange, repeat
from torch import Tensor

from ..attribution.direct_logit import check_linear_writes
from ..attribution.groups import repeat_inputs
from ..errors import InputError
from ..hooks.patching import editing
from .metrics import Metric, check_pair, normalise, scorer
from .patching import position_masks

INPUTS = ("q", "k", "v")
Head = tuple[int, int]
Receiver = tuple[int, int, str]


def path_patch(
    model, clean, corrupted, senders: Head | Sequence[Head] | None = None,
    receivers: str | Sequence[Receiver] = "logits", metric: Metric = "logit_diff", *,
    answers: tuple[Any, Any] | None = None, positions: Any = "all", senders_per_pass: int = 8,
) -> pd.DataFrame:
    """Path-patch each sender head from the clean run into the corrupted one, to the receivers only.

    Args:
        model: an :class:`~lvlm_probe.LVLM` whose attention and MLP writes add to the residual
            stream (its family's ``nonlinear_writes`` is None: not Gemma 3's sandwich norms nor
            Mllama's gated cross-attention).
        clean, corrupted: batches with equal token layouts (see :func:`~lvlm_probe.circuits.patch`).
        senders: a ``(layer, head)`` or a list of them; default every head.
        receivers: ``"logits"`` (the direct path to the answer) or a list of
            ``(layer, head, "q" | "k" | "v")``.
        metric, answers: as in :func:`~lvlm_probe.circuits.patch`.
        positions: the sender positions whose output is patched (a selector, default all).
        senders_per_pass: senders run together in one forward pass.

    Returns:
        A DataFrame, one row per sender: ``layer``, ``head``, ``receivers`` (a label),
        ``metric`` (normalised: 1 = clean, 0 = corrupted) and ``value`` (raw, mean over examples).
        Senders at or after every receiver's layer have no path and get metric 0.

    Raises:
        InputError: for unequal layouts, a family with non-additive writes, a bad sender or
            receiver, or equal clean and corrupted metrics.

    Example:
        >>> lp.circuits.path_patch(model, clean, corrupted, receivers="logits")   # every head
        >>> lp.circuits.path_patch(model, clean, corrupted, senders=(1, 3), receivers=[(2, 2, "v")])
    """
    check_pair(clean, corrupted)
    check_linear_writes(model, "path_patch")
    senders = _senders(model, senders)
    receivers = _receivers(model, receivers)
    if not isinstance(senders_per_pass, int) or senders_per_pass < 1:
        raise InputError(f"senders_per_pass must be a positive integer, got {senders_per_pass!r}")
    (label, mask), *more = position_masks(clean, positions)
    if more:
        raise InputError(f"positions must be one selector for path_patch, got {positions!r}")
    L = model.n_layers
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in sorted({s[0] for s in senders})]
    with torch.no_grad(), model.capture(z_names) as clean_z:
        clean_logits = model.forward(clean, last_position=True).logits[:, -1]
    with torch.no_grad(), model.capture(z_names) as corrupted_z:
        corrupted_logits = model.forward(corrupted, last_position=True).logits[:, -1]
    score = scorer(model, clean, corrupted, metric, answers, clean_logits, corrupted_logits)
    m_clean, m_corrupted = score(clean_logits).mean(), score(corrupted_logits).mean()

    values = []
    for start in range(0, len(senders), senders_per_pass):
        chunk = senders[start:start + senders_per_pass]
        deltas = torch.stack([sender_delta(model, clean_z, corrupted_z, s, mask) for s in chunk])  # [k, b, p, d]
        if receivers == "logits":
            edits = {f"blocks.{L - 1}.hook_resid_post": _adding(deltas)}
        else:
            edits = _receiver_edits(model, corrupted, chunk, deltas, receivers)
        inputs = repeat_inputs(corrupted.inputs, len(chunk), model.family.packed_inputs)
        with torch.no_grad(), editing(model, edits):
            logits = model.run(inputs, last_position=True).logits[:, -1]
        values += [score(run).mean() for run in rearrange(logits, "(r b) v -> r b v", b=len(corrupted))]
    raw = torch.stack(values)
    normalised = normalise(raw, m_clean, m_corrupted)
    name = "logits" if receivers == "logits" else ", ".join(f"L{a}H{b}.{c}" for a, b, c in receivers)
    table = pd.DataFrame({"layer": [s[0] for s in senders], "head": [s[1] for s in senders],
                          "receivers": name, "positions": label,
                          "metric": normalised.numpy(), "value": raw.numpy()})
    table.attrs.update(clean=float(m_clean), corrupted=float(m_corrupted), answers=score.answers,
                       metric_name=score.name)
    return table


def sender_delta(model, clean_z, corrupted_z, sender: Head, mask: Tensor) -> Tensor:
    """``[batch, seq, d_model]``: what the sender head writes on the clean run minus what it writes
    on the corrupted run, at the masked positions (zero elsewhere)."""
    layer, head = sender
    name = f"blocks.{layer}.attn.hook_z"
    dz = (clean_z[name] - corrupted_z[name])[:, :, head]  # [b, p, d_head]
    o_proj = model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn_out}")
    w_o = rearrange(o_proj.weight, "m (h d) -> h d m", h=model.n_heads)[head]
    return einsum(dz, w_o, "b p d, d m -> b p m") * mask[..., None].to(dz.device, dz.dtype)


def _adding(deltas: Tensor):
    """An edit adding each run's delta ``[runs, batch, seq, d]`` to its rows."""
    flat = rearrange(deltas, "r b p d -> (r b) p d")

    def edit(value: Tensor) -> Tensor:
        return value + flat.to(value.device, value.dtype)  # layers may sit on other devices
    return edit


def _receiver_edits(model, corrupted, chunk: Sequence[Head], deltas: Tensor, receivers: Sequence[Receiver]):
    """Edits that patch each receiver's input with its value recomputed from ``resid_pre + delta``.

    One pass holds every (sender, receiver layer) run; run ``(s, layer)`` adds sender ``s``'s delta
    only at ``layer``'s input and only that layer's q/k/v are read from it, so ``delta`` reaches
    nothing but the receivers' inputs."""
    k, n = len(chunk), len(corrupted)
    layers = sorted({r[0] for r in receivers})
    names = [f"blocks.{layer}.attn.hook_{x}" for layer in layers for x in INPUTS]
    edits = {}
    for j, layer in enumerate(layers):
        runs = torch.zeros(len(layers), *deltas.shape, dtype=deltas.dtype, device=deltas.device)
        # a sender at or after the receiver's layer has no path to it
        before = torch.tensor([s[0] < layer for s in chunk], dtype=deltas.dtype, device=deltas.device)
        runs[j] = deltas * before[:, None, None, None]
        edits[f"blocks.{layer}.hook_resid_pre"] = _adding(rearrange(runs, "l k b p d -> (l k) b p d"))
    inputs = repeat_inputs(corrupted.inputs, len(layers) * k, model.family.packed_inputs)
    with torch.no_grad(), editing(model, edits), model.capture(names) as cache:
        model.run(inputs, last_position=True)
    patched = {}
    for j, layer in enumerate(layers):
        for x in INPUTS:
            name = f"blocks.{layer}.attn.hook_{x}"
            value = rearrange(cache[name], "(l k b) p h d -> l (k b) p h d", l=len(layers), k=k)[j]
            heads = [r[1] for r in receivers if r[0] == layer and r[2] == x]
            if heads:
                patched[name] = _replacing(value, heads, k, n)
    return patched


def _replacing(source: Tensor, heads: list[int], k: int, n: int):
    """An edit taking the given heads of every row from ``source`` ``[(k b), p, h, d]``. Rows of
    senders at or after the receiver's layer get the corrupted value back, as they should (their
    delta could not reach it)."""
    mask = torch.zeros(source.shape[2], dtype=torch.bool)
    mask[heads] = True
    mask = repeat(mask, "h -> 1 1 h 1")

    def edit(value: Tensor) -> Tensor:
        return torch.where(mask.to(value.device), source.to(value.device, value.dtype), value)
    return edit


def _senders(model, senders) -> list[Head]:
    if senders is None:
        return [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]
    items = [senders] if isinstance(senders, tuple) and len(senders) == 2 and isinstance(senders[0], int) \
        else list(senders)
    for item in items:
        ok = (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, int) for v in item)
              and 0 <= item[0] < model.n_layers and 0 <= item[1] < model.n_heads)
        if not ok:
            raise InputError(f"a sender must be (layer, head) with layer in [0, {model.n_layers}) and head in "
                             f"[0, {model.n_heads}); got {item!r}")
    if not items:
        raise InputError("senders is empty; expected (layer, head) pairs, or None for every head")
    return [tuple(item) for item in items]


def _receivers(model, receivers) -> str | list[Receiver]:
    if receivers == "logits":
        return receivers
    if isinstance(receivers, str) or not receivers:
        raise InputError(f"receivers must be 'logits' or a non-empty list of (layer, head, 'q'|'k'|'v'); "
                         f"got {receivers!r}")
    out = []
    for item in receivers:
        ok = isinstance(item, (tuple, list)) and len(item) == 3 and item[2] in INPUTS
        if ok:
            layer, head, x = item
            ok = isinstance(layer, int) and isinstance(head, int) and 0 <= layer < model.n_layers \
                and 0 <= head < (model.n_heads if x == "q" else model.n_kv_heads_of(layer))
        if not ok:
            raise InputError(f"a receiver must be (layer, head, 'q'|'k'|'v') with layer in [0, {model.n_layers}) "
                             f"and head below the layer's query ({model.n_heads}) or key/value heads "
                             f"(model.n_kv_heads_of(layer)); got {item!r}")
        out.append((item[0], item[1], item[2]))
    return out
