"""CHAIR (Rohrbach et al. 2018): how many objects a caption mentions that are not in the image.

Every mention of an object word in a caption is mapped through a synonym table to its object
category; a mention is hallucinated when its category is not among the image's true objects.

* ``CHAIR_i = hallucinated mentions / all object mentions`` (instance level; every mention counts,
  as in the reference implementation);
* ``CHAIR_s = captions with at least one hallucinated mention / all captions`` (sentence level).

Captions are lowercased and split into words; a multi-word synonym ("hot dog") is matched before
its single words, longest first. ShapesWorld's table (each shape, its plural and a few common
names) is built in; COCO's is read from the reference implementation's ``synonyms.txt`` with
:func:`load_synonyms`.
"""
from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..attribution.results import count, number, summary_repr
from ..errors import InputError
from ..worlds.vocab import SHAPES

_EXTRA_NAMES = {"circle": ("disc", "disk"), "diamond": ("rhombus",), "square": (), "cross": ()}


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _with_plurals(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        words = name.split()
        out += [name, " ".join([*words[:-1], _plural(words[-1])])]
    return list(dict.fromkeys(out))


def shapes_synonyms() -> dict[str, str]:
    """ShapesWorld's table: word or phrase -> shape (each shape, its plural, a few other names)."""
    table = {}
    for shape in SHAPES:
        for word in _with_plurals([shape, *_EXTRA_NAMES.get(shape, ())]):
            table[word] = shape
    return table


def load_synonyms(path: str | os.PathLike, plurals: bool = True) -> dict[str, str]:
    """Read a synonym file in the CHAIR reference format: one category per line, its synonyms
    after it, comma-separated (``person, girl, boy, man, woman``); the first name is the category.

    Args:
        path: the file (e.g. the reference implementation's ``synonyms.txt`` for COCO).
        plurals: also map each name's regular plural (the reference singularises words instead).

    Returns:
        word or phrase -> category.

    Raises:
        InputError: if the file does not exist, or a name is claimed by two categories (with the
            line numbers).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"synonym file {path} does not exist; expected lines 'category, synonym, ...'")
    table: dict[str, str] = {}
    where: dict[str, int] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        names = [" ".join(n.lower().split()) for n in line.split(",") if n.strip()]
        if not names:
            continue
        for name in _with_plurals(names) if plurals else names:
            if name in table and table[name] != names[0]:
                raise InputError(f"{path}: line {line_number} maps {name!r} to {names[0]!r}, but line "
                                 f"{where[name]} maps it to {table[name]!r}; expected each name once")
            table[name], where[name] = names[0], line_number
    return table


def _check_synonyms(synonyms: Any) -> None:
    """A synonym table given as a mapping must map words to categories, both strings.

    Raises:
        InputError: for anything else, with the offending entry (e.g. a table the other way round,
            category -> list of words, which is how the reference file reads).
    """
    expected = ("expected a mapping word or phrase -> category, both strings (e.g. {'hearts': 'heart'}); "
                "for a table of category -> synonyms, write it in the CHAIR reference format (one "
                "category per line, its synonyms after it, comma-separated) and pass its path or read "
                "it with lp.bench.load_synonyms")
    if not callable(getattr(synonyms, "items", None)):  # what the table is read through
        raise InputError(f"synonyms is a {type(synonyms).__name__}; {expected}")
    for word, category in synonyms.items():
        if not isinstance(word, str) or not isinstance(category, str):
            raise InputError(f"synonyms maps {word!r} ({type(word).__name__}) to a {type(category).__name__} "
                             f"({reprlib.repr(category)}); {expected}")


def _truth_set(truth: Any, synonyms: Mapping[str, str]) -> set[str]:
    """Categories of one image's truth: a ShapesWorld scene, or object names (mapped if synonyms)."""
    if hasattr(truth, "objects"):  # a ShapesWorld Scene
        return {o.shape for o in truth.objects}
    if isinstance(truth, str):
        raise InputError(f"a truth must be a collection of object names or a scene, got the string {truth!r}")
    return {synonyms.get(str(t).lower(), str(t).lower()) for t in truth}


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
class ChairResult:
    """CHAIR of a set of captions.

    Attributes:
        chair_i: hallucinated mentions / mentions (NaN without mentions).
        chair_s: captions with a hallucinated mention / captions.
        mentions: one row per mention: ``caption`` (index), ``word`` (as written), ``start`` (word
            index in the caption), ``object`` (category), ``hallucinated``, ``char_start`` and
            ``char_end`` (its characters in the caption); with token ids, ``token_start`` and
            ``token_end`` (its tokens, end exclusive).
        captions: one row per caption: ``caption``, ``text``, ``mentions``, ``hallucinated``,
            ``truth`` (sorted categories), ``missed`` (true categories never mentioned: recall).
    """

    chair_i: float
    chair_s: float
    mentions: pd.DataFrame
    captions: pd.DataFrame

    def __getitem__(self, key: str) -> Any:
        """``result["chair_i"]`` as well as ``result.chair_i``."""
        return getattr(self, key)

    def __repr__(self) -> str:
        numbers = self.summary()
        return summary_repr("ChairResult", [count(numbers["captions"], "caption"), count(numbers["mentions"], "mention"),
                                            f"{numbers['hallucinated']} hallucinated"],
                            [f"CHAIR_i {number(self.chair_i)}", f"CHAIR_s {number(self.chair_s)}",
                             f"recall {number(numbers['recall'])}"])

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per caption (a copy of :attr:`captions`): ``caption``, ``text``, ``mentions``,
        ``hallucinated``, ``truth``, ``missed``; the mentions themselves are :attr:`mentions`."""
        return self.captions.copy()

    def summary(self) -> dict[str, float]:
        """The two scores with counts and object recall (share of true objects mentioned)."""
        truths = sum(len(t) for t in self.captions["truth"])
        missed = sum(len(m) for m in self.captions["missed"])
        return {"chair_i": self.chair_i, "chair_s": self.chair_s, "captions": len(self.captions),
                "mentions": len(self.mentions), "hallucinated": int(self.mentions["hallucinated"].sum()),
                "recall": (truths - missed) / truths if truths else float("nan")}


def find_mentions(caption: str, synonyms: Mapping[str, str]) -> list[tuple[int, str, str, int, int]]:
    """``(word index, matched text, category, first character, end character)`` of every object
    mention, longest phrase first (the characters are the mention's span in ``caption``)."""
    spans = [(m.group(), m.start(), m.end()) for m in re.finditer(r"[a-z]+", caption.lower())]
    words = [w for w, _, _ in spans]
    longest = max((len(k.split()) for k in synonyms), default=1)
    out, i = [], 0
    while i < len(words):
        for size in range(min(longest, len(words) - i), 0, -1):
            phrase = " ".join(words[i:i + size])
            if phrase in synonyms:
                out.append((i, phrase, synonyms[phrase], spans[i][1], spans[i + size - 1][2]))
                i += size
                break
        else:
            i += 1
    return out


def token_spans(token_ids: Sequence[int], tokenizer: Any, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The tokens ``[first, end)`` covering each character span of the text the ids decode to
    (``tokenizer.decode(token_ids, skip_special_tokens=True)``, unstripped): a token covers the
    characters its decoded prefix adds."""
    ends = [len(tokenizer.decode(list(token_ids[:k + 1]), skip_special_tokens=True)) for k in range(len(token_ids))]
    starts = [0, *ends[:-1]]
    out = []
    for first, end in spans:
        covering = [k for k in range(len(token_ids)) if starts[k] < end and ends[k] > first]
        out.append((covering[0], covering[-1] + 1) if covering else (-1, -1))
    return out


def chair(captions: Sequence[str], truths: Sequence[Any], synonyms: Mapping[str, str] | str | os.PathLike | None = None,
          *, token_ids: Sequence[Sequence[int]] | None = None, tokenizer: Any = None) -> ChairResult:
    """CHAIR_i and CHAIR_s of captions against each image's true objects.

    Args:
        captions: one caption per image.
        truths: per image, its true objects: names (categories or synonyms of them) or a
            ShapesWorld scene.
        synonyms: word -> category mapping, or a path to a synonym file (:func:`load_synonyms`);
            default ShapesWorld's (:func:`shapes_synonyms`).
        token_ids, tokenizer: each caption's token ids (e.g. ``Generation.token_ids``) and the
            tokenizer that decodes them: every mention then carries its token span
            (``token_start``, ``token_end``), and each caption must be the text its ids decode to.

    Returns:
        A :class:`ChairResult`.

    Raises:
        InputError: for lists of different lengths, an empty list, a caption that is not a string,
            a synonym table that does not map strings to strings, token ids without a tokenizer, or
            a caption that is not the text of its token ids.

    Example:
        >>> r = lp.bench.chair(["A red heart and a blue star."], [["heart"]])
        >>> r["chair_i"], r["chair_s"]
        (0.5, 1.0)
    """
    if isinstance(synonyms, (str, os.PathLike)):
        synonyms = load_synonyms(synonyms)
    elif synonyms is not None:
        _check_synonyms(synonyms)
    # keys as captions are split: lowercase words separated by single spaces
    table = shapes_synonyms() if synonyms is None else {" ".join(k.lower().split()): v for k, v in synonyms.items()}
    if len(captions) != len(truths):
        raise InputError(f"got {len(captions)} captions and {len(truths)} truths; expected one truth per caption")
    if not len(captions):
        raise InputError("captions is empty; expected at least one caption")
    if token_ids is not None and (tokenizer is None or len(token_ids) != len(captions)):
        raise InputError(f"token_ids needs the tokenizer that decodes them and one list per caption; got "
                         f"{len(token_ids)} lists for {len(captions)} captions, tokenizer {type(tokenizer).__name__}")
    columns = ["caption", "word", "start", "object", "hallucinated", "char_start", "char_end"]
    columns += ["token_start", "token_end"] if token_ids is not None else []
    mention_rows, caption_rows = [], []
    for c, (text, truth) in enumerate(zip(captions, truths)):
        if not isinstance(text, str):
            raise InputError(f"captions[{c}] is {type(text).__name__}; expected a string")
        present = _truth_set(truth, table)
        if token_ids is not None:
            decoded = tokenizer.decode(list(token_ids[c]), skip_special_tokens=True)
            if decoded.strip() != text.strip():
                raise InputError(f"captions[{c}] {text!r} is not the text of its token ids ({decoded!r})")
            offset = len(decoded) - len(decoded.lstrip()) - (len(text) - len(text.lstrip()))
            found = find_mentions(text, table)
            spans = token_spans(token_ids[c], tokenizer, [(a + offset, b + offset) for *_, a, b in found])
        else:
            found = find_mentions(text, table)
            spans = [()] * len(found)
        for (start, word, obj, first, end), span in zip(found, spans):
            mention_rows.append(dict(zip(columns, (c, word, start, obj, obj not in present, first, end, *span))))
        wrong = sum(obj not in present for _, _, obj, _, _ in found)
        caption_rows.append(dict(caption=c, text=text, mentions=len(found), hallucinated=wrong,
                                 truth=sorted(present), missed=sorted(present - {o for _, _, o, _, _ in found})))
    mentions = pd.DataFrame(mention_rows, columns=columns)
    per_caption = pd.DataFrame(caption_rows)
    chair_i = float(mentions["hallucinated"].mean()) if len(mentions) else float("nan")
    chair_s = float((per_caption["hallucinated"] > 0).mean())
    return ChairResult(chair_i, chair_s, mentions, per_caption)
