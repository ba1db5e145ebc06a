"""Activation patching: copy activations from a clean run into a corrupted one, one site at a time.

A site is a hook name, a set of positions (a token group, a prompt word, a single position) and,
for per-head names (``attn.hook_z``, ``hook_q``, ``hook_k``, ``hook_v``), one head. For each site
the corrupted batch runs with that site's values replaced by the clean run's, and a metric of the
last position's logits is compared with the clean and corrupted runs (1 = clean restored, 0 =
unchanged; see :mod:`lvlm_probe.circuits.metrics`). Many sites run in one batched forward pass:
the corrupted inputs are repeated once per site and every site's rows edit only their own values.

Example:
    >>> pairs = world.pairs(8, change="color")
    >>> clean = model.prepare([c.image for c, _ in pairs], [c.prompt for c, _ in pairs])
    >>> corrupted = model.prepare([x.image for _, x in pairs], [x.prompt for _, x in pairs])
    >>> table = lp.circuits.patch(model, clean, corrupted, "blocks.*.hook_resid_pre",
    ...                           positions=["image", "prompt", "last"])
    >>> lp.circuits.heatmap(table)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Bool
from torch import Tensor

from ..attribution.groups import repeat_inputs
from ..errors import InputError
from ..hooks.names import HookPoint
from ..hooks.patching import editing, writable_points
from ..hooks.selectors import check as check_selector
from ..hooks.selectors import resolve
from .metrics import Metric, Scorer, check_pair, normalise, scorer

DEFAULT_POSITIONS = ("image", "prompt", "template", "last")
EACH = "each"  # every position on its own, counted from the end of the sequence


@dataclass(frozen=True)
class Site:
    """One patched site: hook point, positions label and mask ``[batch, seq]``, head or None."""

    point: HookPoint
    label: str
    mask: Bool[Tensor, "batch seq"]
    head: int | None = None


def position_masks(batch, selectors: Any) -> list[tuple[str, Tensor]]:
    """``(label, mask [batch, seq])`` for each selector (the ``positions=`` argument of :func:`patch`).

    Args:
        batch: the (clean) batch.
        selectors: a selector or a list of them: ``"all"``, ``"image"``, ``"prompt"``,
            ``"template"``, ``"last"``, a prompt word, a callable ``layout -> LongTensor``, or
            ``"each"`` for every position on its own, aligned from the end of each example
            (labels ``"-1 :"``, ``"-2 ASSISTANT"``, ... with the first example's tokens), over the
            shortest example's length.

    Raises:
        InputError: for an empty list or a bad selector; LayoutError for a selector that selects
            nothing in some example.
    """
    entries = [selectors] if isinstance(selectors, str) or callable(selectors) else list(selectors or [])
    if not entries:
        raise InputError(f"positions must be a selector or a non-empty list of them, got {selectors!r}")
    n, length = batch.input_ids.shape
    out = []
    for entry in entries:
        if entry == EACH:
            valid = [lay.positions("all") for lay in batch.layouts]
            for back in range(1, min(len(v) for v in valid) + 1):
                mask = torch.zeros(n, length, dtype=torch.bool)
                for i, v in enumerate(valid):
                    mask[i, v[-back]] = True
                token = batch.layouts[0].tokens[int(valid[0][-back])].replace("Ġ", " ").strip()
                out.append((f"{-back} {token}", mask))
            continue
        check_selector(entry, "none")
        mask = torch.zeros(n, length, dtype=torch.bool)
        for i, layout in enumerate(batch.layouts):
            mask[i, resolve(entry, layout, i)] = True
        label = entry if isinstance(entry, str) else getattr(entry, "__name__", "custom")
        out.append((label, mask))
    return out


def patch(
    model, clean, corrupted, hooks: str | list[str] = "blocks.*.hook_resid_pre",
    positions: Any = DEFAULT_POSITIONS, metric: Metric = "logit_diff", *,
    answers: tuple[Any, Any] | None = None, per_example: bool = False, sites_per_pass: int = 16,
) -> pd.DataFrame:
    """Patch clean activations into the corrupted run, site by site, and score each.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        clean, corrupted: batches from ``model.prepare`` with equal token layouts (same prompts,
            different images, e.g. ``ShapesWorld.pairs``).
        hooks: language-model names or ``*`` patterns; per-head names are patched head by head.
        positions: a selector or a list of them (see :func:`position_masks`); each is one site
            per hook (and head).
        metric: ``"logit_diff"`` (default: clean answer minus corrupted answer), ``"logprob"``,
            ``"prob"``, or a function ``logits [batch, vocab] -> [batch]``.
        answers: ``(clean answers, corrupted answers)``, one each or one per example; default each
            run's top token.
        per_example: one row per site and example (normalised per example) instead of the mean.
        sites_per_pass: sites run together in one forward pass (``sites * batch`` rows).

    Returns:
        A DataFrame, one row per site (and example): ``hook``, ``layer``, ``positions``, ``head``
        (None for whole names), [``example``], ``metric`` (normalised: 1 = clean, 0 = corrupted) and
        ``value`` (the raw metric). ``table.attrs`` holds ``clean`` and ``corrupted`` (raw metric
        of the two runs, mean or per example), ``answers`` and ``metric_name``.

    Raises:
        InputError: for batches whose layouts differ, names outside the language model or that
            cannot be written, bad positions or answers, or equal clean and corrupted metrics.
        HookNameError: for a name the model does not offer.

    Example:
        >>> table = lp.circuits.patch(model, clean, corrupted, ["blocks.*.hook_resid_pre",
        ...                           "blocks.*.attn.hook_z"], positions=["image", "last"])
    """
    check_pair(clean, corrupted)
    if not isinstance(sites_per_pass, int) or sites_per_pass < 1:
        raise InputError(f"sites_per_pass must be a positive integer, got {sites_per_pass!r}")
    points = writable_points(model, hooks)
    outside = [p.name for p in points if p.space != "lm"]
    if outside:
        raise InputError(f"patch works on the language model's token sequence; {outside[:3]} are not in it "
                         "(write them whole with lvlm_probe.hooks.patching.editing)")
    masks = position_masks(clean, positions)
    sites = [Site(p, label, mask, head)
             for p in points for label, mask in masks
             for head in (range(p.heads) if p.transform == "heads" else [None])]
    with torch.no_grad(), model.capture([p.name for p in points]) as cache:
        clean_logits = model.forward(clean, last_position=True).logits[:, -1]
    with torch.no_grad():
        corrupted_logits = model.forward(corrupted, last_position=True).logits[:, -1]
    score = scorer(model, clean, corrupted, metric, answers, clean_logits, corrupted_logits)
    m_clean, m_corrupted = score(clean_logits), score(corrupted_logits)
    values = run_sites(model, corrupted, sites, {p.name: cache[p.name] for p in points}, score, sites_per_pass)
    table = _table(sites, values, m_clean, m_corrupted, per_example)
    table.attrs.update(clean=_summary(m_clean, per_example), corrupted=_summary(m_corrupted, per_example),
                       answers=score.answers, metric_name=score.name)
    return table


def run_sites(model, corrupted, sites: Sequence[Site], sources: dict[str, Tensor], score: Scorer | Callable,
              sites_per_pass: int = 16) -> Tensor:
    """The metric of the corrupted batch with each site patched from ``sources``.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        corrupted: the batch that runs.
        sites: the sites; each run patches one.
        sources: ``{hook name: value [batch, seq, ...]}`` to patch in (whole tensors).
        score: logits ``[rows, vocab] -> [rows]``.
        sites_per_pass: sites per forward pass.

    Returns:
        ``[site, batch]`` raw metric values.
    """
    n = len(corrupted)
    out = []
    for start in range(0, len(sites), sites_per_pass):
        chunk = sites[start:start + sites_per_pass]
        edits = {}
        for name in dict.fromkeys(s.point.name for s in chunk):
            edits[name] = _where(name, chunk, sources[name], n)
        inputs = repeat_inputs(corrupted.inputs, len(chunk), model.family.packed_inputs)
        with torch.no_grad(), editing(model, edits):
            logits = model.run(inputs, last_position=True).logits[:, -1]
        out += [score(run) for run in rearrange(logits, "(r b) v -> r b v", b=n)]
    return torch.stack(out) if out else torch.zeros(0, n)


def _where(name: str, chunk: Sequence[Site], source: Tensor, n: int):
    """The edit of one hook for a chunk of sites: each site's rows take ``source`` at its mask
    (and head), every other row and position keeps the running value. Only the rows of sites on
    this hook are touched, and ``source`` is never tiled, so a pass holds one extra copy of the
    value whatever the number of sites."""
    rows = [(r, site) for r, site in enumerate(chunk) if site.point.name == name]

    def edit(value: Tensor) -> Tensor:
        out = value.clone()
        src = source.to(value.device, value.dtype)
        for r, site in rows:
            mask = site.mask.to(value.device)[..., None]  # [b, seq, 1]: over d_model / d_head
            block = out[r * n:(r + 1) * n]
            if site.head is None:
                out[r * n:(r + 1) * n] = torch.where(mask, src, block)
            else:
                block[:, :, site.head] = torch.where(mask, src[:, :, site.head], block[:, :, site.head])
        return out
    return edit


def _summary(values: Tensor, per_example: bool) -> Any:
    return values.tolist() if per_example else float(values.mean())


def _table(sites: Sequence[Site], values: Tensor, clean: Tensor, corrupted: Tensor, per_example: bool
           ) -> pd.DataFrame:
    rows = []
    if per_example:
        normalised = normalise(values, clean, corrupted)
    else:
        raw = values.mean(1)
        normalised = normalise(raw, clean.mean(), corrupted.mean())
    for s, site in enumerate(sites):
        base = dict(hook=site.point.name, layer=site.point.layer, positions=site.label, head=site.head)
        if per_example:
            for i in range(values.shape[1]):
                rows.append(dict(base, example=i, metric=float(normalised[s, i]), value=float(values[s, i])))
        else:
            rows.append(dict(base, metric=float(normalised[s]), value=float(raw[s])))
    table = pd.DataFrame(rows)
    table["head"] = table["head"].astype("Int64")
    return table
