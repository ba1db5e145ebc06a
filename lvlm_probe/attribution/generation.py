"""Credit for every token of a free-form generation among the prior, the prompt, the image and
the model's own earlier words.

A caption is explained teacher-forced: the prompt followed by the continuation (generated greedily
or given) runs as one sequence, and token ``t`` of the continuation is scored by its
log-probability at the position before it. There are three players: the image, the prompt and
the *generated* words before token ``t``; the template (BOS, role markers, the assistant's turn)
always stays. ``v(S)`` is that score with only the players in ``S`` present, a removed player's
tokens hidden from every query at every layer of the language model (positions kept, as in
:func:`~lvlm_probe.attribution.source_split`). Then

* ``prior = v({})``: the token from the template and the model's weights alone;
* ``image``, ``prompt``, ``generated``: the three players' exact Shapley values;
* ``full = v(image, prompt, generated)``, and ``prior + prompt + image + generated = full``.

What the reading position still sees. Token ``t`` is predicted at the position of token ``t - 1``
(for ``t = 0``, the template's last token). That position is the reader: it always sees itself,
so its own word, the one just before the scored token, is never removed; the *generated* player of
token ``t`` is the continuation's tokens ``0 .. t - 2``, and ``prior`` is what the model says from
the template and that one word. Token 0 has no generated player (its value is 0). When the generated
player is absent, the generated positions are hidden from every query but themselves, so each
reader computes exactly what it would with its own word directly after the template; when present,
the generated words themselves see only the players present (no image, say), as in any coalition.

All eight coalitions of all tokens of a batch run as whole teacher-forced sequences, several
coalitions per forward pass: the per-query mask lets every token's reader see its own coalition
in the same pass, so the cost does not grow with the number of tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from ..hooks import attention
from ..hooks.patching import editing
from ..inputs import Batch
from .groups import group_mask
from .results import AttributionResult, number
from .sources import ABLATIONS, removed_inputs

PLAYERS = ("image", "prompt", "generated")
# every coalition as (image, prompt, generated) present; the full one first, the empty one last
COALITIONS = tuple((bool(k & 4), bool(k & 2), bool(k & 1)) for k in range(7, -1, -1))
SOURCES = ("prior", "prompt", "image", "generated")


# --- continuations -------------------------------------------------------------------------------


def continuation_ids(model, batch, continuation: Any) -> list[list[int]]:
    """Token ids of each example's continuation.

    Args:
        continuation: a string per example (one string for a one-example batch), tokenized as it
            continues the text the model sees (:meth:`~lvlm_probe.LVLM.continuation_tokens`), or a
            list of token ids per example (e.g. ``Generation.token_ids``).

    Raises:
        InputError: for anything else, or a number of continuations other than the batch's.
    """
    if isinstance(continuation, str):
        continuation = [continuation]
    if not isinstance(continuation, (list, tuple)) or len(continuation) != len(batch):
        got = (f"{len(continuation)} continuations" if isinstance(continuation, (list, tuple))
               else f"{type(continuation).__name__} {continuation!r}")
        raise InputError(f"continuation must be one string (or list of token ids) per example "
                         f"({len(batch)}), got {got}")
    ids = []
    for i, text in enumerate(continuation):
        if isinstance(text, str):
            if not text.strip():
                raise InputError(f"continuation {i} is empty; expected the text to explain")
            ids.append(model.continuation_tokens(batch, i, text))
        elif isinstance(text, (list, tuple)) and text and all(
                isinstance(t, int) and not isinstance(t, bool) for t in text):
            ids.append([int(t) for t in text])
        else:
            raise InputError(f"continuation {i} must be a string or a non-empty list of token ids, "
                             f"got {type(text).__name__} {text!r}")
    return ids


def teacher_forced(model, batch, prefixes: list[list[int]]) -> Batch:
    """The batch with the same number of continuation tokens appended to every example: a batch
    whose last position predicts the next token of each continuation, for any method that scores
    the next token (``image_map``, ``source_split``, ...). The appended tokens join the template
    group (present in every coalition of those methods).

    Raises:
        InputError: for prefixes of different lengths (the examples would no longer end together).
    """
    lengths = {len(p) for p in prefixes}
    if len(lengths) > 1:
        raise InputError(f"teacher-forced prefixes must have one length to keep the examples' last "
                         f"positions aligned; got lengths {sorted(lengths)}")
    added = lengths.pop() if lengths else 0
    inputs = model.continued(batch, prefixes)
    layouts = []
    for layout, prefix in zip(batch.layouts, prefixes):
        new = torch.arange(layout.length, layout.length + added)
        groups = dict(layout.groups, template=torch.cat([layout.groups["template"], new]))
        layouts.append(dataclasses.replace(
            layout, length=layout.length + added, groups=groups,
            tokens=layout.tokens + tuple(model.tokenizer.convert_ids_to_tokens(prefix))))
    texts = [t + model.tokenizer.decode(p) for t, p in zip(batch.texts, prefixes)]
    return Batch(inputs=inputs, layouts=layouts, prompts=list(batch.prompts), texts=texts,
                 images=batch.images)


# --- the split -------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)  # AttributionResult.__repr__ prints a summary
class GenerationSplit(AttributionResult):
    """The split of every token of each example's continuation.

    Attributes:
        continuations: each example's continuation, decoded.
        tokens: each example's continuation tokens, decoded one by one.
        token_ids: their ids.
        prior, prompt, image, generated, full: ``[batch, n_max]`` (float32, NaN after an example's
            last token); ``prior + prompt + image + generated == full`` at every token.
        values: ``[8, batch, n_max]``, ``v(S)`` of every coalition in :data:`COALITIONS`.
        generation_logprobs: each token's log-probability when it was generated (None for a
            given continuation); equal to ``full``.
        ablation: how the image was removed.
        passes: the forward passes the split took.
    """

    continuations: list[str]
    tokens: list[list[str]]
    token_ids: list[list[int]]
    prior: Tensor
    prompt: Tensor
    image: Tensor
    generated: Tensor
    full: Tensor
    values: Tensor
    generation_logprobs: list[Tensor] | None
    ablation: str
    passes: int

    def to_frame(self) -> pd.DataFrame:
        """One row per (example, token): ``example``, ``index`` (in the continuation), ``token``,
        ``token_id``, the four sources and ``full``, and each source's ``*_share`` of the total
        absolute credit (``|prior| + |prompt| + |image| + |generated|``)."""
        rows = []
        for i, tokens in enumerate(self.tokens):
            for t, token in enumerate(tokens):
                row = {"example": i, "index": t, "token": token, "token_id": self.token_ids[i][t]}
                row.update({source: float(getattr(self, source)[i, t]) for source in (*SOURCES, "full")})
                rows.append(row)
        table = pd.DataFrame(rows, columns=["example", "index", "token", "token_id", *SOURCES, "full"])
        total = table[list(SOURCES)].abs().sum(axis=1).where(lambda t: t > 0)
        for source in SOURCES:
            table[f"{source}_share"] = table[source].abs() / total
        return table

    def _summary(self) -> list[str]:
        table = self.to_frame()
        shares = " ".join(f"{s} {table[f'{s}_share'].mean():.2f}" for s in SOURCES)
        return [f"{len(table)} tokens", f"ablation {self.ablation!r}", f"{self.passes} passes",
                f"mean log-probability {number(table['full'].mean())}", f"mean shares {shares}"]

    def plot(self, examples: int | list[int] | None = None, source: str = "image", width: int = 12) -> Figure:
        """Each example's continuation as text, every token on a background coloured by its
        ``source``'s share of the token's credit (white 0, dark 1).

        Args:
            examples: the example(s) shown (default: all, up to 12).
            source: one of ``prior``, ``prompt``, ``image``, ``generated``.
            width: tokens per line.
        """
        if source not in SOURCES:
            raise InputError(f"source must be one of {SOURCES}, got {source!r}")
        chosen = list(range(min(len(self.tokens), 12))) if examples is None else (
            [examples] if isinstance(examples, int) else list(examples))
        table = self.to_frame()
        lines = [(i, table[table.example == i].iloc[k:k + width]) for i in chosen
                 for k in range(0, max(1, int((table.example == i).sum())), width)]
        fig = Figure(figsize=(0.9 * width + 1.5, 0.42 * len(lines) + 1.2))
        ax = fig.subplots()
        cmap = {"prior": "Greys", "prompt": "Oranges", "image": "Blues", "generated": "Greens"}[source]
        scale = matplotlib.colormaps[cmap]
        for row, (i, part) in enumerate(lines):
            ax.text(-0.3, row, f"{i}", ha="right", va="center", fontsize=8, color="0.4")
            for col, (_, token) in enumerate(part.iterrows()):
                share = token[f"{source}_share"]
                face = scale(0.0 if np.isnan(share) else float(share))
                ax.text(col, row, token["token"].replace("\u2581", " ").replace("\u0120", " ").strip() or "·",
                        ha="center", va="center", fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.2", facecolor=face, edgecolor="none"),
                        color="white" if not np.isnan(share) and share > 0.6 else "black")
        ax.set_xlim(-1, width)
        ax.set_ylim(len(lines) - 0.5, -0.5)
        ax.axis("off")
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=scale), ax=ax,
                     fraction=0.03, label=f"{source} share of the token's credit")
        ax.set_title(f"{source} share per generated token", fontsize=9)
        self.suptitle(fig, chosen, f"explain_generation ({self.ablation} ablation, exact Shapley over image, "
                                   "prompt, earlier words)")
        return fig


def explain_generation(
    model, batch, *, continuation: Any = None, max_new_tokens: int = 16, ablation: str = "mask",
    batch_size: int = 16, noise_step: int = 500, seed: int = 0,
) -> GenerationSplit:
    """Split every token of each example's continuation among prior, prompt, image and the
    earlier generated words (exact Shapley values; see the module docstring).

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        batch: from ``model.prepare``; every example needs image and prompt tokens.
        continuation: the text to explain, one string (or list of token ids) per example; None
            generates it greedily (``max_new_tokens``), with the KV cache, as ``model.generate``.
        max_new_tokens: when generating.
        ablation: how the image is removed (``"mask"``, ``"mean"`` or ``"noise"``, as in
            :func:`~lvlm_probe.attribution.source_split`); the prompt and the earlier words are
            always hidden from attention.
        batch_size: rows per forward pass. A pass holds whole coalitions of the batch (each is
            ``len(batch)`` rows), as many as fit: ``ceil(8 / max(1, batch_size // len(batch)))``
            passes, more rows than ``batch_size`` per pass only when the batch is larger.
        noise_step, seed: for ``ablation="noise"``.

    Returns:
        A :class:`GenerationSplit`.

    Raises:
        InputError: for a bad continuation, ablation or batch size, an example without image or
            prompt tokens, or a family whose earlier words cannot be removed per reader (layers
            that mix tokens without an attention mask).

    Example:
        >>> split = lp.attribution.explain_generation(model, batch, max_new_tokens=12)
        >>> split.to_frame()[["token", "prior", "prompt", "image", "generated", "full"]]
        >>> split.plot(0, source="image")
    """
    if ablation not in ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}; available: {ABLATIONS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (rows per forward pass), got {batch_size!r}")
    mixing = model.family.unmasked_mixing_layers(model.config)
    if mixing:
        raise InputError(f"{model.family.name} mixes tokens without an attention mask in layers {mixing}: "
                         "hiding the earlier words from one reader but not from another has no such "
                         "form there (a recurrence reads every earlier position), so the generated "
                         "player cannot be removed per token")
    generated_logprobs = None
    if continuation is None:
        out = model.generation(batch, max_new_tokens)
        ids, generated_logprobs = out.token_ids, out.logprobs
    else:
        ids = continuation_ids(model, batch, continuation)
    if not all(ids):
        empty = [i for i, row in enumerate(ids) if not row]
        raise InputError(f"examples {empty} generated no token to explain")
    masked = ablation == "mask"
    image = group_mask(batch, "image") if model.family.image_mode != "cross_attention" else None
    prompt = group_mask(batch, "prompt")
    start, n_max = batch.input_ids.shape[1], max(len(row) for row in ids)
    inputs = model.continued(batch, ids)
    hidden = _hidden_keys(image if masked else None, prompt, [len(row) for row in ids], start, n_max)
    # the position before each token reads it; unembed only those positions
    window = slice(start - 1, start - 1 + n_max)
    per_pass = max(1, batch_size // len(batch))
    tokens = torch.zeros(len(batch), n_max, dtype=torch.long)  # each reader's token (0 past the end)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = torch.tensor(row)
    scores, passes = [], 0
    for first in range(0, len(COALITIONS), per_pass):
        chosen = COALITIONS[first:first + per_pass]
        rows, edits = removed_inputs(model, batch, inputs, [c[0] for c in chosen], [c[1] for c in chosen],
                                     ablation, noise_step, seed)
        mask = torch.cat([hidden[c] for c in chosen]).to(model.device)
        with torch.no_grad(), attention.hiding_positions(model, mask), editing(model, edits):
            logits = model.run(rows, unembed=window).logits.float()  # [rows, n_max, vocab]
        passes += 1
        # keep only each token's log-probability: the pass's logits at a real vocabulary are large
        wanted = tokens.repeat(len(chosen), 1).to(logits.device)[..., None]
        scores.append((logits.gather(-1, wanted)[..., 0] - logits.logsumexp(-1)).cpu())
    values = torch.cat(scores).reshape(len(COALITIONS), len(batch), n_max)
    for i, row in enumerate(ids):
        values[:, i, len(row):] = float("nan")
    shapley = _shapley(values)
    tokens = [[model.tokenizer.decode([t]) for t in row] for row in ids]
    return GenerationSplit(
        continuations=[model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids],
        tokens=tokens, token_ids=ids, prior=values[-1], full=values[0], values=values,
        generation_logprobs=generated_logprobs, ablation=ablation, passes=passes,
        method="explain_generation", layouts=list(batch.layouts), **shapley)


def _hidden_keys(image: Tensor | None, prompt: Tensor, lengths: list[int], start: int,
                 n_max: int) -> dict[tuple[bool, bool, bool], Tensor]:
    """Per coalition, ``[batch, seq, seq]`` keys hidden from each query (True: hidden): the image's
    and the prompt's from every query where absent, the generated tokens' from every query but
    their own where the generated player is absent. ``image`` None: the image is not removed by
    hiding (cross-attention, or replaced pixels)."""
    n, length = prompt.shape[0], start + n_max
    pad = torch.zeros(n, n_max, dtype=torch.bool)
    prompt = torch.cat([prompt, pad], dim=1)
    image = torch.cat([image, pad], dim=1) if image is not None else torch.zeros_like(prompt)
    generated = torch.zeros(n, length, dtype=torch.bool)
    for i, count in enumerate(lengths):
        generated[i, start:start + count] = True
    others = generated[:, None, :] & ~torch.eye(length, dtype=torch.bool)[None]  # [batch, query, key]
    out = {}
    for with_image, with_prompt, with_generated in COALITIONS:
        keys = (image & (not with_image)) | (prompt & (not with_prompt))  # [batch, key], every query
        mask = keys[:, None, :].expand(n, length, length)
        out[(with_image, with_prompt, with_generated)] = mask if with_generated else mask | others
    return out


def _shapley(values: Tensor) -> dict[str, Tensor]:
    """Exact Shapley values of the three players from ``v`` of every coalition (``[8, ...]`` in
    :data:`COALITIONS` order): each player's marginal contribution to every coalition without it,
    weighted ``|S|! (n - |S| - 1)! / n!``."""
    v = {c: values[k] for k, c in enumerate(COALITIONS)}
    n = len(PLAYERS)
    out = {}
    for p, name in enumerate(PLAYERS):
        total = torch.zeros_like(values[0])
        for c in COALITIONS:
            if c[p]:
                continue
            size = sum(c)
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            joined = tuple(True if q == p else c[q] for q in range(n))
            total = total + weight * (v[joined] - v[c])
        out[name] = total
    return out
