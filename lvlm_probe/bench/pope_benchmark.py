"""POPE (Li et al. 2023): object-existence questions scored with the official answer parser.

POPE asks "Is there a {object} in the image?" about present objects (label ``yes``) and absent
ones sampled three ways (``random``, ``popular``, ``adversarial``), and reads each free-text answer
with a fixed rule from its ``evaluate.py``: keep the text before the first full stop, remove commas,
split on spaces; the answer is ``no`` if a word is exactly ``No``, ``not`` or ``no``, else ``yes``.
"Yes. There is no cat." is therefore ``yes`` (only the first sentence counts) and "There is not a
dog." is ``no``. Metrics treat ``yes`` as the positive class.

Question files are POPE's JSONL: one JSON object per line with ``question_id``, ``image`` (a file
name under an image folder), ``text`` (the question) and ``label`` (``yes``/``no``), which
``ShapesWorld.export`` also writes. :func:`read_questions` keeps every valid line and reports each
malformed one with its line number, what was wrong and what was expected.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from ..attribution.results import count, number, summary_repr
from ..errors import InputError
from .answers import first_word

MODES = ("random", "popular", "adversarial")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
REQUIRED = ("question_id", "image", "text", "label")


def pope_answer(text: str) -> str:
    """The official POPE parser: ``"no"`` if the first sentence holds the word No/not/no, else ``"yes"``.

    Ported line by line from POPE's ``evaluate.py``: the text is cut at its first ``.``, commas are
    removed, it is split on single spaces and the words are compared case-sensitively (so ``"NO"``
    and ``"Not"`` count as yes, as in the official script).

    Args:
        text: a model's free-text answer.

    Returns:
        ``"yes"`` or ``"no"``.

    Example:
        >>> pope_answer("Yes. There is no cat."), pope_answer("There is not a dog.")
        ('yes', 'no')
    """
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def first_word_answer(text: str) -> str:
    """A stricter parser: ``"yes"`` only when the answer's first word is yes (any case)."""
    return "yes" if first_word(text) == "yes" else "no"


PARSERS: dict[str, Callable[[str], str]] = {"pope": pope_answer, "first_word": first_word_answer}


def _parser(parser: str | Callable[[str], str]) -> Callable[[str], str]:
    if callable(parser):
        return parser
    if parser not in PARSERS:
        raise InputError(f"unknown parser {parser!r}; expected one of {tuple(PARSERS)} or a callable")
    return PARSERS[parser]


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan  # undefined (no positives predicted, ...): NaN, not 0


def pope_metrics(labels: Sequence[str], answers: Sequence[str],
                 parser: str | Callable[[str], str] = "pope") -> dict[str, float]:
    """POPE's metrics from gold labels and free-text answers.

    Args:
        labels: gold ``"yes"``/``"no"`` per question.
        answers: the model's free-text answers, parsed with ``parser``.
        parser: ``"pope"`` (official, default), ``"first_word"``, or a callable text -> yes/no.

    Returns:
        ``accuracy, precision, recall, f1, yes_ratio`` (yes is the positive class; a ratio whose
        denominator is zero is NaN) and the counts ``n, tp, fp, tn, fn``.

    Raises:
        InputError: for lists of different lengths, an empty list, a label other than yes/no, or
            a parser that returns something else.

    Example:
        >>> pope_metrics(["yes", "no"], ["Yes, there is.", "There is not a dog."])["accuracy"]
        1.0
    """
    parse = _parser(parser)
    if len(labels) != len(answers):
        raise InputError(f"got {len(labels)} labels and {len(answers)} answers; expected one answer per label")
    if not len(labels):
        raise InputError("labels is empty; expected at least one question")
    bad = [(i, v) for i, v in enumerate(labels) if v not in ("yes", "no")]
    if bad:
        raise InputError(f"labels[{bad[0][0]}] is {bad[0][1]!r}; expected 'yes' or 'no'")
    pred = [parse(a) for a in answers]
    odd = [(i, p) for i, p in enumerate(pred) if p not in ("yes", "no")]
    if odd:
        raise InputError(f"the parser turned answers[{odd[0][0]}] {answers[odd[0][0]]!r} into {odd[0][1]!r}; "
                         "a parser must return 'yes' or 'no'")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, labels))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)
          if not math.isnan(precision + recall) and precision + recall > 0 else math.nan)
    n = len(labels)
    return dict(accuracy=(tp + tn) / n, precision=precision, recall=recall, f1=f1,
                yes_ratio=(tp + fp) / n, n=n, tp=tp, fp=fp, tn=tn, fn=fn)


def metrics_table(answers: pd.DataFrame, by: Sequence[str] = ("pope",),
                  parser: str | Callable[[str], str] = "pope") -> pd.DataFrame:
    """POPE metrics per group of an answers table (columns ``gold``, ``output`` and ``by``), plus
    an ``all`` row over every question; one row per group."""
    rows = []
    by = list(by)
    groups = list(answers.groupby(by, dropna=False, sort=True)) if by else []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **pope_metrics(list(part["gold"]), list(part["output"]), parser)})
    if len(groups) != 1:
        rows.append({**{c: "all" for c in by}, **pope_metrics(list(answers["gold"]), list(answers["output"]), parser)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class LineProblem:
    """A malformed line of a question file.

    Attributes:
        line: 1-based line number.
        problem: what was wrong, naming the value found.
        expected: what a valid line holds there.
    """

    line: int
    problem: str
    expected: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}; expected {self.expected}"


@dataclass(frozen=True)
class PopeQuestion:
    """One valid line of a POPE question file."""

    question_id: Any
    image_path: Path
    prompt: str
    answer: str
    pope: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return str(self.question_id)

    @property
    def image(self) -> Image.Image:
        with Image.open(self.image_path) as image:
            return image.convert("RGB")

    def labels(self) -> dict[str, Any]:
        return {"level": "object", "kind": "exist", "pope": self.pope, "line": self.line}


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
class QuestionFile:
    """The valid questions of a file and the problems of its other lines."""

    path: Path
    questions: list[PopeQuestion]
    problems: list[LineProblem]

    def __repr__(self) -> str:
        modes = pd.Series([q.pope for q in self.questions], dtype=object).value_counts().sort_index()
        return summary_repr("QuestionFile", [repr(str(self.path)), count(len(self.questions), "question"),
                                             count(len(self.problems), "malformed line")],
                            [f"{mode} {n}" for mode, n in modes.items()])

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per valid question: ``id``, ``image``, ``prompt``, ``answer``, ``pope``,
        ``line`` (1-based, in the file)."""
        return pd.DataFrame([dict(id=q.id, image=str(q.image_path), prompt=q.prompt, answer=q.answer, pope=q.pope,
                                  line=q.line) for q in self.questions],
                            columns=["id", "image", "prompt", "answer", "pope", "line"])

    def report(self) -> str:
        """Every problem on its own line, or an empty string for a clean file."""
        return "\n".join(f"{self.path}: {p}" for p in self.problems)


def _mode_from_name(path: Path) -> str | None:
    hits = [m for m in MODES if m in path.stem.lower()]
    return hits[0] if len(hits) == 1 else None


def _check_line(row: Any, number: int, images: Path, default_mode: str) -> PopeQuestion | LineProblem:
    """One line as a question, or the first thing wrong with it."""
    if not isinstance(row, dict):
        return LineProblem(number, f"a JSON {type(row).__name__} instead of an object", "one JSON object per line")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        return LineProblem(number, f"missing field(s) {missing} (the line has {sorted(row)})",
                           f"the fields {list(REQUIRED)}")
    label = row["label"]
    if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
        return LineProblem(number, f"label {label!r}", "label 'yes' or 'no'")
    if not isinstance(row["text"], str) or not row["text"].strip():
        return LineProblem(number, f"text {row['text']!r}", "the question as a non-empty string")
    if not isinstance(row["image"], str) or not row["image"]:
        return LineProblem(number, f"image {row['image']!r}", "an image file name (a string)")
    path = images / row["image"]
    if not path.is_file():
        return LineProblem(number, f"image {row['image']!r} does not exist (looked for {path})",
                           f"an image file under {images}")
    mode = row.get("pope") or default_mode
    extra = {k: v for k, v in row.items() if k not in (*REQUIRED, "pope")}
    return PopeQuestion(row["question_id"], path, row["text"], label.strip().lower(), str(mode), number, extra)


def read_questions(path: str | os.PathLike, images: str | os.PathLike | None = None,
                   mode: str | None = None) -> QuestionFile:
    """Read a POPE question file, keeping the valid lines and reporting the others.

    Args:
        path: a ``.jsonl``/``.json`` file in POPE's line format, or a folder holding
            ``questions.jsonl`` (a ShapesWorld export).
        images: the folder image names are relative to (default: the file's folder).
        mode: the sampling mode of every question (default: a line's ``pope`` field, else the mode
            named in the file name, e.g. ``coco_pope_adversarial.json``, else ``"unknown"``).

    Returns:
        A :class:`QuestionFile`: valid questions in file order, and one :class:`LineProblem` per
        malformed line (invalid JSON, missing fields, an image that does not exist, a label other
        than yes/no, a repeated question_id). Blank lines are skipped.

    Raises:
        InputError: if the file does not exist.

    Example:
        >>> qf = read_questions("coco_pope_random.json", images="val2014/")
        >>> print(qf.report())    # line 12: label 'maybe'; expected label 'yes' or 'no'
    """
    path = Path(path)
    if path.is_dir():
        path = path / "questions.jsonl"
    if not path.is_file():
        raise InputError(f"question file {path} does not exist; expected a POPE JSONL file or an "
                         "export folder holding questions.jsonl")
    images = Path(images) if images is not None else path.parent
    default_mode = mode or _mode_from_name(path) or "unknown"
    questions, problems, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(LineProblem(number, f"invalid JSON ({err.msg} at column {err.colno})",
                                            "one JSON object per line"))
                continue
            item = _check_line(row, number, images, default_mode)
            if isinstance(item, PopeQuestion) and mode is not None:
                item = PopeQuestion(item.question_id, item.image_path, item.prompt, item.answer, mode,
                                    number, item.extra)
            if isinstance(item, PopeQuestion) and item.id in seen:
                item = LineProblem(number, f"question_id {item.question_id!r} repeats line {seen[item.id]}",
                                   "a question_id used once")
            if isinstance(item, LineProblem):
                problems.append(item)
            else:
                seen[item.id] = number
                questions.append(item)
    return QuestionFile(path, questions, problems)


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
class PopeResult:
    """POPE on a model.

    Attributes:
        metrics: one row per sampling mode plus ``all``: ``pope`` and ``METRICS`` with counts.
        answers: one row per question: id, pope, prompt, gold, output (generated text), answer
            (parsed), correct.
        problems: the malformed lines of a question file (empty for in-memory questions).
    """

    metrics: pd.DataFrame
    answers: pd.DataFrame
    problems: list[LineProblem]

    def overall(self) -> dict[str, Any]:
        """The metrics over every question (the ``all`` row, or the only mode's row)."""
        rows = self.metrics[self.metrics["pope"] == "all"] if len(self.metrics) > 1 else self.metrics
        return rows.iloc[0].to_dict()

    def __repr__(self) -> str:
        head = [count(len(self.answers), "question")]
        if self.problems:
            head.append(count(len(self.problems), "malformed line"))
        overall = self.overall()
        scores = [f"accuracy {number(overall['accuracy'])}", f"f1 {number(overall['f1'])}",
                  f"yes ratio {number(overall['yes_ratio'])}"]
        modes = self.metrics[self.metrics["pope"] != "all"] if len(self.metrics) > 1 else self.metrics.iloc[:0]
        by_mode = ["accuracy by mode " + " ".join(f"{m} {number(a)}" for m, a in zip(modes["pope"], modes["accuracy"]))]
        return summary_repr("PopeResult", head, scores, by_mode if len(modes) else [])

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per question (a copy of :attr:`answers`): ``id``, the question's labels
        (``pope``, ...), ``prompt``, ``gold``, ``output``, ``answer``, ``correct``."""
        return self.answers.copy()


def pope(model, questions: Any, *, images: str | os.PathLike | None = None,
         parser: str | Callable[[str], str] = "pope", batch_size: int = 32, max_new_tokens: int = 8,
         progress: bool = True) -> PopeResult:
    """Ask POPE questions and score the answers per sampling mode.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        questions: object-level ShapesWorld questions, a POPE JSONL file or an export folder
            (read with :func:`read_questions`; malformed lines are left out and listed in
            ``problems``).
        images: image folder of a question file (default: the file's folder).
        parser: ``"pope"`` (official), ``"first_word"`` or a callable.
        batch_size, max_new_tokens: generation settings.
        progress: show a progress bar.

    Returns:
        A :class:`PopeResult`.

    Raises:
        InputError: if no valid question remains (the message lists the file's problems), or a
            question is not a yes/no existence question.

    Example:
        >>> result = lp.bench.pope(model, world.questions(300, level="object", pope="adversarial"))
        >>> result.metrics[["pope", "accuracy", "f1", "yes_ratio"]]
    """
    from .answers import ask

    parse = _parser(parser)
    problems: list[LineProblem] = []
    if isinstance(questions, (str, os.PathLike)):
        qf = read_questions(questions, images)
        problems = qf.problems
        if not qf.questions:
            raise InputError(f"{qf.path} has no valid question:\n{qf.report()}")
        questions = qf.questions
    questions = list(questions)
    bad = [q for q in questions if q.answer not in ("yes", "no")]
    if bad:
        raise InputError(f"question {bad[0].id!r} has gold answer {bad[0].answer!r}; POPE needs yes/no "
                         "questions (ShapesWorld: level='object')")
    table = ask(model, questions, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    table["pope"] = [q.pope or "unknown" for q in questions]
    table["answer"] = [parse(t) for t in table["output"]]
    table["correct"] = table["answer"] == table["gold"]
    return PopeResult(metrics_table(table, ("pope",), parse), table, problems)
