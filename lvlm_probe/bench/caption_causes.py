"""Why a caption names an object: each mention's sources, image map and, when hallucinated, cause.

:func:`explain_captions` captions images (or takes given captions), finds every object mention with
CHAIR (its token span included), and explains the mention's first token teacher-forced with
:func:`~lvlm_probe.attribution.explain_generation`: the token's log-probability split into the prior
(template and the word just before it), the prompt, the image and the caption's earlier words.
Each hallucinated mention gets one cause, the source that pushed the word up most:

* ``perception``: the image's credit is positive and the largest: the model saw something it
  reads as that object;
* ``own words``: the earlier words' credit is positive and at least the prompt's: what the caption
  had already said made the word likely (a co-occurring partner, say); the word named as the cause
  is ``strongest_word``: the earlier word whose removal lowers the token's score most (each word
  hidden from every query in its own row of one batched pass; found for every hallucinated
  mention, whatever its cause);
* ``prior``: neither pushed it up more than the prompt: the template, the prompt and the word just
  before (a shape's typical colour, for one) already made it likely.

Each mention also gets an image map of its first token (``maps=``, any method of
:func:`~lvlm_probe.attribution.image_map`), kept in :attr:`CaptionExplanation.maps`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..attribution.generation import explain_generation, teacher_forced
from ..attribution.groups import repeat_inputs
from ..attribution.image_maps import METHODS, image_map
from ..attribution.results import count, number, summary_repr
from ..errors import InputError
from ..hooks import attention
from ..worlds.evaluation import CAPTION_PROMPT
from .chair_metric import chair, token_spans

CAPTION_CAUSES = ("perception", "own words", "prior")
MENTION_COLUMNS = ["caption", "mention", "word", "start", "object", "hallucinated", "token_start", "token_end", "token",
                   "prior", "prompt", "image", "generated", "full", "image_share", "generated_share", "cause",
                   "strongest_word", "strongest_word_drop"]


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
class CaptionExplanation:
    """Captions with every object mention explained.

    Attributes:
        captions: one row per caption: ``caption``, ``text``, ``truth``, ``mentions``,
            ``hallucinated``.
        mentions: one row per mention (:data:`MENTION_COLUMNS`): its CHAIR fields (``start`` is the
            word index in the caption, ``token_start`` / ``token_end`` its tokens), the scored token
            (the mention's first), the four sources and the full score (log-probability), the image's
            and earlier words' shares of the credit (``|prior| + |prompt| + |image| + |generated|``),
            and for hallucinated mentions the ``cause`` (:data:`CAPTION_CAUSES`) and the earlier word
            whose hiding lowers the score most, with how much (``strongest_word``,
            ``strongest_word_drop``; the cause's word when the cause is ``own words``).
        maps: ``(caption, mention) -> ImageMap`` of the mention's first token (empty with
            ``maps=None``).
    """

    captions: pd.DataFrame
    mentions: pd.DataFrame
    maps: dict[tuple[int, int], Any]

    def to_frame(self) -> pd.DataFrame:
        """The mention table (a copy)."""
        return self.mentions.copy()

    def summary(self) -> dict[str, float]:
        """Counts, mean image share of hallucinated and of correct mentions, and the causes."""
        m = self.mentions
        wrong, right = m[m["hallucinated"]], m[~m["hallucinated"]]
        out = {"captions": len(self.captions), "mentions": len(m), "hallucinated": len(wrong),
               "image_share_hallucinated": float(wrong["image_share"].mean()) if len(wrong) else np.nan,
               "image_share_correct": float(right["image_share"].mean()) if len(right) else np.nan}
        out.update({cause: int((wrong["cause"] == cause).sum()) for cause in CAPTION_CAUSES})
        return out

    def __repr__(self) -> str:
        s = self.summary()
        return summary_repr("CaptionExplanation", [count(s["captions"], "caption"), count(s["mentions"], "mention"),
                                                   f"{s['hallucinated']} hallucinated"],
                            [f"image share hallucinated {number(s['image_share_hallucinated'])} vs correct "
                             f"{number(s['image_share_correct'])}"],
                            ["causes " + " ".join(f"{c} {s[c]}" for c in CAPTION_CAUSES)])

    def __str__(self) -> str:
        return repr(self)

    def plot(self) -> Figure:
        """Each source's mean credit for correct and for hallucinated mentions, and the causes."""
        fig = Figure(figsize=(8.5, 3.4))
        left, right = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[2, 1]))
        sources = ["prompt", "image", "generated"]
        for k, (label, part) in enumerate((("correct", self.mentions[~self.mentions["hallucinated"]]),
                                           ("hallucinated", self.mentions[self.mentions["hallucinated"]]))):
            means = [part[s].mean() if len(part) else np.nan for s in sources]
            left.bar(np.arange(len(sources)) + 0.4 * k, means, width=0.4, label=f"{label} ({len(part)})",
                     color=("tab:blue", "tab:red")[k])
        left.axhline(0, color="0.3", lw=0.8)
        left.set_xticks(np.arange(len(sources)) + 0.2, ["prompt", "image", "earlier words"])
        left.set_ylabel("mean credit (log-probability)")
        left.set_title("credit of the mention's first token", fontsize=9)
        left.legend(fontsize=7)
        counts = [int((self.mentions["cause"] == c).sum()) for c in CAPTION_CAUSES]
        right.bar(range(len(CAPTION_CAUSES)), counts, color=["tab:blue", "tab:green", "0.5"])
        right.set_xticks(range(len(CAPTION_CAUSES)), CAPTION_CAUSES, fontsize=8)
        right.set_title("causes of hallucinated mentions", fontsize=9)
        fig.tight_layout()
        return fig


def explain_captions(
    model, images: Sequence[Any], captions: Sequence[str] | None = None, *, truths: Sequence[Any] | None = None,
    prompt: str = CAPTION_PROMPT, max_new_tokens: int = 48, synonyms: Mapping[str, str] | None = None,
    maps: str | None = "ablation", batch_size: int = 16, progress: bool = True,
) -> CaptionExplanation:
    """Caption images (or take their captions) and explain every object mention.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        images: ShapesWorld scenes (rendered; their shapes are the truth) or images.
        captions: one caption per image, or None to generate them greedily.
        truths: with images, each image's true objects (names); taken from scenes otherwise.
        prompt: the captioning prompt.
        max_new_tokens: when generating.
        synonyms: CHAIR's word -> object table (default ShapesWorld's).
        maps: the image-map method of each mention's first token (one of ``METHODS``), or None.
        batch_size: examples per chunk; each chunk's split runs 8 coalitions of it, in passes of
            ``batch_size`` rows.
        progress: show a progress bar.

    Returns:
        A :class:`CaptionExplanation`.

    Raises:
        InputError: for no images, captions or truths of another count, images without truths, an
            unknown map method, or a caption that is not a string.
    """
    if not len(images):
        raise InputError("images is empty; expected ShapesWorld scenes or images")
    if captions is not None and len(captions) != len(images):
        raise InputError(f"got {len(captions)} captions for {len(images)} images; expected one each")
    if captions is not None:
        bad = [(k, c) for k, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise InputError(f"captions[{bad[0][0]}] is {type(bad[0][1]).__name__}; expected a string")
    scenes = all(hasattr(x, "objects") and hasattr(x, "render") for x in images)
    if truths is None and not scenes:
        raise InputError("truths are needed for images that are not ShapesWorld scenes: one list of object "
                         "names per image")
    if truths is not None and len(truths) != len(images):
        raise InputError(f"got {len(truths)} truths for {len(images)} images; expected one each")
    if maps is not None and maps not in METHODS:
        raise InputError(f"maps must be one of {METHODS} or None, got {maps!r}")
    truths = list(truths) if truths is not None else list(images)
    pictures = [x.render() for x in images] if scenes else list(images)
    rows, caption_rows, kept_maps = [], [], {}
    chunks = range(0, len(pictures), batch_size)
    for first in tqdm(chunks, desc="explaining captions", disable=not progress):
        chunk = list(range(first, min(first + batch_size, len(pictures))))
        batch = model.prepare(images=[pictures[k] for k in chunk], prompts=[prompt] * len(chunk))
        given = None if captions is None else [captions[k] for k in chunk]
        split = explain_generation(model, batch, continuation=given, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
        texts = [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in split.token_ids]
        found = chair(texts, [truths[k] for k in chunk], synonyms, token_ids=split.token_ids,
                      tokenizer=model.tokenizer)
        table = split.to_frame().set_index(["example", "index"])
        for j, k in enumerate(chunk):
            mine = found.mentions[found.mentions["caption"] == j]
            caption_rows.append(dict(caption=k, text=texts[j], truth=found.captions.loc[j, "truth"],
                                     mentions=len(mine), hallucinated=int(mine["hallucinated"].sum())))
            # the caption's own one-example batch, for its mentions' word ablations and maps
            one = model.prepare(images=[pictures[k]], prompts=[prompt]) if len(mine) else None
            for m, mention in enumerate(mine.itertuples()):
                if mention.token_start < 0:
                    continue
                scored = table.loc[(j, mention.token_start)]
                row = dict(caption=k, mention=m, word=mention.word, start=mention.start, object=mention.object,
                           hallucinated=bool(mention.hallucinated), token_start=mention.token_start,
                           token_end=mention.token_end, token=scored["token"],
                           **{s: float(scored[s]) for s in ("prior", "prompt", "image", "generated", "full")},
                           image_share=float(scored["image_share"]),
                           generated_share=float(scored["generated_share"]),
                           cause=None, strongest_word=None, strongest_word_drop=np.nan)
                if mention.hallucinated:
                    row["cause"] = cause_of(row)
                    row["strongest_word"], row["strongest_word_drop"] = _strongest_earlier_word(
                        model, one, split.token_ids[j], mention.token_start, batch_size)
                rows.append(row)
                if maps is not None:
                    kept_maps[(k, m)] = image_map(model, one, continuation=[split.token_ids[j]],
                                                  token=int(mention.token_start), method=maps,
                                                  batch_size=batch_size)
    return CaptionExplanation(pd.DataFrame(caption_rows), pd.DataFrame(rows, columns=MENTION_COLUMNS), kept_maps)


def cause_of(credit: Mapping[str, float]) -> str:
    """The cause of a hallucinated mention from its token's credits (see the module docstring)."""
    image, words, prompt = credit["image"], credit["generated"], credit["prompt"]
    if image > 0 and image >= max(words, prompt):
        return "perception"
    if words > 0 and words >= prompt:
        return "own words"
    return "prior"


def _strongest_earlier_word(model, one, ids: list[int], token: int, batch_size: int) -> tuple[str | None, float]:
    """The earlier word (before the token's reader) whose tokens, hidden from every query, lower
    the token's log-probability most, and by how much; one row per word, ``batch_size`` rows a pass.
    ``one`` is the caption's one-example batch (image and prompt)."""
    batch = teacher_forced(model, one, [ids[:token]])
    start = batch.input_ids.shape[1] - token  # the continuation's first position
    text = model.tokenizer.decode(ids[:max(token - 1, 0)], skip_special_tokens=True)
    words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    if not words:
        return None, float("nan")
    spans = token_spans(ids[:max(token - 1, 0)], model.tokenizer, [(a, b) for _, a, b in words])
    length = batch.input_ids.shape[1]
    hidden = torch.zeros(len(words) + 1, length, dtype=torch.bool)  # row 0: nothing hidden
    for w, (first, end) in enumerate(spans):
        if first >= 0:
            hidden[w + 1, start + first:start + end] = True
    scores = []
    for lo in range(0, len(hidden), batch_size):
        rows = hidden[lo:lo + batch_size]
        inputs = repeat_inputs(batch.inputs, len(rows), model.family.packed_inputs)
        with torch.no_grad(), attention.hiding_positions(model, rows.to(model.device)):
            logits = model.run(inputs, last_position=True).logits[:, -1].float()
        scores.append(torch.log_softmax(logits, dim=-1)[:, ids[token]].cpu())
    score = torch.cat(scores)
    drops = score[0] - score[1:]
    best = int(drops.argmax())
    return words[best][0].strip(".,;:!?").lower(), float(drops[best])
