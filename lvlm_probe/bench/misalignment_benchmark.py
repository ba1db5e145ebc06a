"""The misalignment benchmark: object, attribute and relation questions, POPE, CHAIR, and a diagnosis.

:func:`misalignment` asks a model ShapesWorld questions at the three semantic levels on scenes
with typical and with counterfactual colours (or the questions of an export folder) and reports,
per split and level, accuracy, how often it errs and how confident its wrong answers were; POPE's
metrics on the object-level questions; CHAIR on captions it generates for the same scenes; and,
with ``diagnose=True``, the cause of every error (:mod:`lvlm_probe.bench.diagnosis`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..attribution.results import count, number, summary_repr
from ..errors import InputError
from ..worlds.evaluation import CAPTION_PROMPT
from .answers import batches, first_word
from .chair_metric import chair
from .diagnosis import default_probe_world
from .diagnosis import diagnose as run_diagnosis
from .pope_benchmark import metrics_table
from .stages import Stages
from .tables import records, scene_key


def answer_questions(model, questions: Sequence[Any], *, batch_size: int = 32, max_new_tokens: int = 3,
                     progress: bool = True, desc: str = "answering") -> pd.DataFrame:
    """Ask questions greedily and measure how confident each answer was.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        questions: ShapesWorld questions.
        batch_size, max_new_tokens: generation settings.
        progress: show a progress bar.

    Returns:
        One row per question: ``id``, its labels, ``scene`` (see :func:`scene_key`), ``prompt``,
        ``gold``, ``output`` (generated text), ``answer`` (its first word), ``correct``,
        ``p_answer`` (probability of the answer's first token at the answer position: the
        model's confidence in what it said; NaN for an empty answer) and ``p_gold``.

    Raises:
        InputError: for an empty question list or a non-positive batch size.
    """
    rows = []
    for chunk, batch in batches(model, questions, batch_size, desc=desc, progress=progress):
        outputs = model.generate(batch, max_new_tokens=max_new_tokens)
        said = [first_word(o) for o in outputs]
        # a generated word is scored by its first token: the one the model chose at the answer position
        ids = model.answer_token_ids(batch, [[s or q.answer, q.answer] for s, q in zip(said, chunk)], first_token=True)
        with torch.no_grad():
            probs = model.forward(batch, last_position=True).logits[:, -1].float().softmax(-1)
        p = probs.gather(1, ids).cpu().numpy()
        for k, (q, out, s) in enumerate(zip(chunk, outputs, said)):
            labels = q.labels()
            labels["about"] = [int(a) for a in labels.get("about", [])]
            rows.append(dict(id=q.id, **labels, scene=scene_key(q.scene), prompt=q.prompt, gold=q.answer,
                             output=out, answer=s, correct=s == q.answer,
                             p_answer=float(p[k, 0]) if s else np.nan, p_gold=float(p[k, 1])))
    return pd.DataFrame(rows)


def level_table(answers: pd.DataFrame, by: Sequence[str] = ("split", "level")) -> pd.DataFrame:
    """Per group: ``n``, ``accuracy``, ``errors``, ``error_rate`` and the severity of the errors:
    ``severity`` (mean probability of the wrong answers the model gave) and ``confident_errors``
    (share of errors given with probability above 0.5)."""
    rows = []
    for key, part in answers.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        wrong = part[~part["correct"]]
        rows.append({**dict(zip(by, key)), "n": len(part), "accuracy": float(part["correct"].mean()),
                     "errors": len(wrong), "error_rate": len(wrong) / len(part),
                     "severity": float(wrong["p_answer"].mean()) if len(wrong) else np.nan,
                     "confident_errors": float((wrong["p_answer"] > 0.5).mean()) if len(wrong) else np.nan})
    return pd.DataFrame(rows)


def caption_scenes(model, scenes: Sequence[Any], splits: Sequence[str], *, batch_size: int = 32,
                   max_new_tokens: int = 48, progress: bool = True) -> pd.DataFrame:
    """Captions generated for scenes with :data:`CAPTION_PROMPT`: ``split``, ``scene``, ``caption``,
    ``truth`` (the shapes present)."""
    rows = []
    for start in tqdm(range(0, len(scenes), batch_size), desc="captioning", disable=not progress):
        chunk = scenes[start:start + batch_size]
        batch = model.prepare(images=[s.render() for s in chunk], prompts=[CAPTION_PROMPT] * len(chunk))
        for scene, split, text in zip(chunk, splits[start:start + batch_size],
                                      model.generate(batch, max_new_tokens=max_new_tokens)):
            rows.append(dict(split=split, scene=scene_key(scene), caption=text,
                             truth=sorted({o.shape for o in scene.objects})))
    return pd.DataFrame(rows)


def chair_table(captions: pd.DataFrame, typical: dict[str, str] | None = None) -> pd.DataFrame:
    """CHAIR per split (and ``all``): chair_i, chair_s, counts and object recall.

    With ``typical`` (shape -> its typical colour), also ``typical_share``: the share of
    hallucinated mentions written right after their shape's typical colour ("a yellow star" for a
    yellow object that is no star): the colour prior naming the shape.
    """
    rows = []
    groups = [*captions.groupby("split", sort=True), ("all", captions)]
    for split, part in groups:
        result = chair(list(part["caption"]), [list(t) for t in part["truth"]])
        row = {"split": split, **result.summary()}
        if typical is not None:
            words = [re.findall(r"[a-z]+", text.lower()) for text in part["caption"]]  # as chair() splits
            named = [m.start > 0 and typical.get(m.object) == words[m.caption][m.start - 1]
                     for m in result.mentions.itertuples() if m.hallucinated]
            row["typical_share"] = float(np.mean(named)) if named else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
class Misalignment:
    """The benchmark's tables (all tidy DataFrames).

    Attributes:
        answers: one row per question (see :func:`answer_questions`).
        levels: per split and level: accuracy, error frequency, severity.
        pope: POPE's metrics per split and sampling mode (object-level questions).
        captions: generated captions with the shapes present.
        chair: CHAIR per split.
        diagnosis: the :class:`~lvlm_probe.bench.diagnosis.Diagnosis`, or None.
        questions: the questions asked, in the order of ``answers``.
        settings: what the results depend on (see :func:`run_settings`).
    """

    answers: pd.DataFrame
    levels: pd.DataFrame
    pope: pd.DataFrame
    captions: pd.DataFrame
    chair: pd.DataFrame
    diagnosis: Any = None
    questions: list | None = None
    settings: dict | None = None

    def __repr__(self) -> str:
        answers = self.answers
        head = [count(len(answers), "question")]
        if len(answers):
            head.append(f"accuracy {number(answers['correct'].mean())}")
        groups = [_accuracy_by(answers, column) for column in ("level", "split") if column in answers]
        captions = [count(len(self.captions), "caption")]
        overall = self.chair[self.chair["split"] == "all"] if len(self.chair) else self.chair
        if len(overall):
            captions.append(f"CHAIR_i {number(overall['chair_i'].iloc[0])}")
        diagnosis = [f"diagnosis of {count(len(self.diagnosis.errors), 'error')}"] if self.diagnosis is not None \
            else ["not diagnosed"]
        return summary_repr("Misalignment", head, *[[g] for g in groups if g], captions, diagnosis)

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per question (a copy of :attr:`answers`, see :func:`answer_questions`); the
        per-level, POPE and CHAIR tables are :attr:`levels`, :attr:`pope` and :attr:`chair`."""
        return self.answers.copy()

    def summary(self) -> dict[str, Any]:
        """The numbers of every table as JSON-ready records (what the report's JSON holds)."""
        out = {"levels": records(self.levels), "pope": records(self.pope), "chair": records(self.chair)}
        if self.diagnosis is not None:
            out.update(self.diagnosis.summary())
        return out


def _accuracy_by(answers: pd.DataFrame, column: str) -> str:
    """``'accuracy by level: attribute 0.6 object 0.9'`` (empty without answers)."""
    if not len(answers):
        return ""
    means = answers.groupby(column, sort=True)["correct"].mean()
    return f"accuracy by {column}: " + " ".join(f"{key} {number(value)}" for key, value in means.items())


def run_settings(model, world_or_folder: Any, **counts: Any) -> dict[str, Any]:
    """What a run's results depend on: the model's fingerprint, the world's configuration (or the
    export folder and a digest of its question file) and the counts."""
    from ..store.fingerprints import fingerprint

    if isinstance(world_or_folder, (str, os.PathLike)):
        path = Path(world_or_folder) / "questions.jsonl"
        source = {"folder": str(Path(world_or_folder).resolve()),
                  "questions": hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None}
    else:
        source = {"world": dataclasses.asdict(world_or_folder.config)}
    return {"model": fingerprint(model)["digest"], **source, **counts}


def _questions(world_or_folder: Any, n: int) -> tuple[list, Any]:
    """(questions, the world they came from or None)."""
    from ..worlds import ShapesWorld
    from ..worlds.evaluation import question_set

    if isinstance(world_or_folder, ShapesWorld):
        return question_set(world_or_folder, n), world_or_folder
    if isinstance(world_or_folder, (str, os.PathLike)):
        folder = Path(world_or_folder)
        if not (folder / "scenes.jsonl").is_file():
            raise InputError(f"{folder} is not a ShapesWorld export (no scenes.jsonl); expected a folder "
                             "written by ShapesWorld.export, or pass a ShapesWorld (a bare POPE file goes "
                             "to lp.bench.pope)")
        return ShapesWorld.load_export(folder), None
    raise InputError(f"world_or_folder must be a ShapesWorld or an export folder, got {type(world_or_folder).__name__}")


def misalignment(model, world_or_folder: Any, *, n: int = 60, captions: int = 30, diagnose: bool = True,
                 probe_world: Any = None, n_probe: int = 150, batch_size: int = 32,
                 cache: str | os.PathLike | None = None, progress: bool = True) -> Misalignment:
    """Behaviour at the object, attribute and relation levels, with POPE, CHAIR and a diagnosis.

    Args:
        model: an :class:`~lvlm_probe.LVLM` that answers ShapesWorld questions (e.g. shapes-llava).
        world_or_folder: a ShapesWorld (``n`` questions per level and split, typical and
            counterfactual; object questions evenly over POPE's modes) or an export folder.
        n: questions per level and split (world only).
        captions: scenes captioned per split for CHAIR (the first distinct scenes of the questions).
        diagnose: also diagnose every error (probes, source split).
        probe_world: the world the diagnosis probes are trained on (default: the question world's
            seed + 1, or seed 1001 for a folder; scenes shared with the questions are dropped).
        n_probe: probe-training questions per question kind and split.
        batch_size: examples per forward pass.
        cache: a folder for resumable stages (see :mod:`lvlm_probe.bench.stages`): a rerun with the
            same model and arguments reuses the finished stages (others are computed again).
        progress: show progress bars.

    Returns:
        A :class:`Misalignment`.

    Raises:
        InputError: for a bad world or folder, or a non-positive count.

    Example:
        >>> result = lp.bench.misalignment(lp.zoo.load("shapes-llava"), lp.worlds.ShapesWorld(seed=1000))
        >>> result.levels; result.diagnosis.causes
    """
    for name, value in (("n", n), ("n_probe", n_probe), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if isinstance(captions, bool) or not isinstance(captions, int) or captions < 0:
        raise InputError(f"captions must be a non-negative int, got {captions!r}")

    questions, world = _questions(world_or_folder, n)
    probe_world = probe_world or (default_probe_world(world, questions) if diagnose else None)
    settings = run_settings(model, world_or_folder, n=n, captions=captions, diagnose=diagnose, n_probe=n_probe,
                            probe_world=dataclasses.asdict(probe_world.config) if probe_world else None)
    stages = Stages(cache, settings)
    (answers,) = stages.run("answers", ("answers",), lambda: (answer_questions(
        model, questions, batch_size=batch_size, progress=progress),))
    objects = answers[answers["level"] == "object"]
    pope_table = (metrics_table(objects, ("split", "pope")) if len(objects)
                  else pd.DataFrame(columns=["split", "pope"]))
    scenes, scene_splits, seen = [], [], set()
    for split in sorted({q.split for q in questions}):
        picked = 0
        for q in questions:
            key = scene_key(q.scene)
            if q.split == split and key not in seen and picked < captions:
                seen.add(key)
                scenes.append(q.scene)
                scene_splits.append(split)
                picked += 1
    caption_rows, chair_rows = pd.DataFrame(columns=["split", "scene", "caption", "truth"]), pd.DataFrame()
    if scenes:
        (caption_rows,) = stages.run("captions", ("captions",), lambda: (caption_scenes(
            model, scenes, scene_splits, batch_size=batch_size, progress=progress),))
        typical = {q.shape: q.typical_color for q in questions if q.shape and q.typical_color}
        chair_rows = chair_table(caption_rows, typical)
    diagnosis = None
    if diagnose:
        diagnosis = run_diagnosis(model, questions, answers, probe_world, n_probe=n_probe,
                                  batch_size=batch_size, stages=stages, progress=progress)
    return Misalignment(answers, level_table(answers), pope_table, caption_rows, chair_rows, diagnosis, questions,
                        settings)
