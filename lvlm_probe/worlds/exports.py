"""Writing question sets to disk in POPE's format, and reading them back.

Layout of an export folder::

    images/scene-00000.png   one PNG per distinct scene, at the scene's image_size
    questions.jsonl          one line per question: {"question_id", "image", "text", "label", ...}
    scenes.jsonl             one line per scene: {"scene_id", "image", "image_size", "background", "objects"}

``question_id``, ``image``, ``text`` and ``label`` are POPE's keys (``label`` is the gold answer);
the extra keys of a question line hold its id, scene and labels, so a load gives back equal questions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InputError
from .questions import Question
from .scene import Scene

QUESTIONS_FILE, SCENES_FILE, IMAGES_DIR = "questions.jsonl", "scenes.jsonl", "images"
_OWN_KEYS = ("id", "prompt", "answer", "scene", "about")  # stored under POPE's or dedicated keys


def _write_lines(path: Path, rows: list[dict]) -> None:
    # write then rename, so an interrupted export never leaves a half-written file under the real name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


def export(folder: str | os.PathLike, questions: Iterable[Question]) -> Path:
    """Write questions, their images and their scene graphs to ``folder``.

    Args:
        folder: output directory, created if needed; existing files of the same names are replaced.
        questions: :class:`Question` objects (e.g. from ``world.questions``).

    Returns:
        The path of ``questions.jsonl``.

    Raises:
        InputError: if an item is not a Question.
    """
    folder = Path(folder)
    (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    scene_ids: dict[Scene, int] = {}
    scene_rows, question_rows = [], []
    for k, q in enumerate(questions):
        if not isinstance(q, Question):
            raise InputError(
                f"questions[{k}] must be a lvlm_probe.worlds.Question, got {type(q).__name__}"
            )
        if q.scene not in scene_ids:
            sid = scene_ids[q.scene] = len(scene_ids)
            image = f"{IMAGES_DIR}/scene-{sid:05d}.png"
            q.scene.render().save(folder / image)
            scene_rows.append({"scene_id": sid, "image": image, **q.scene.to_dict()})
        sid = scene_ids[q.scene]
        extra = {
            f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name not in _OWN_KEYS
        }
        question_rows.append(
            {
                "question_id": k + 1,
                "image": scene_rows[sid]["image"],
                "text": q.prompt,
                "label": q.answer,
                "id": q.id,
                "scene_id": sid,
                "about": list(q.about),
                **extra,
            }
        )
    _write_lines(folder / SCENES_FILE, scene_rows)
    _write_lines(folder / QUESTIONS_FILE, question_rows)
    return folder / QUESTIONS_FILE


def _read_lines(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, row) of every non-blank line."""
    if not path.is_file():
        raise InputError(f"{path} does not exist; expected a folder written by ShapesWorld.export")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path} line {number}: invalid JSON ({err.msg}); expected one "
                                     "JSON object per line as ShapesWorld.export writes") from err
    return rows


@contextlib.contextmanager
def _line(path: Path, number: int) -> Iterator[None]:
    """Report a malformed row read inside the block by file and line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        what = (f"no {err} (a missing field, or a scene_id with no scene)" if isinstance(err, KeyError)
                else f"{type(err).__name__}: {err}")
        raise InputError(f"{path} line {number}: {what}; expected a line as ShapesWorld.export "
                         "writes it") from err


def load_export(folder: str | os.PathLike) -> list[Question]:
    """Read a folder written by :func:`export` back into questions.

    Args:
        folder: the export folder.

    Returns:
        The questions, equal to the exported ones (same ids, prompts, answers, scene graphs, labels).

    Raises:
        InputError: if the folder lacks ``questions.jsonl`` or ``scenes.jsonl``, or a line of either
            is malformed (the message names the file and line).
    """
    folder = Path(folder)
    scenes = {}
    for number, row in _read_lines(folder / SCENES_FILE):
        with _line(folder / SCENES_FILE, number):
            scenes[row["scene_id"]] = Scene.from_dict(row)
    names = {f.name for f in dataclasses.fields(Question)} - set(_OWN_KEYS)
    out = []
    for number, row in _read_lines(folder / QUESTIONS_FILE):
        with _line(folder / QUESTIONS_FILE, number):
            out.append(
                Question(
                    id=row["id"],
                    prompt=row["text"],
                    answer=row["label"],
                    scene=scenes[row["scene_id"]],
                    about=tuple(row["about"]),
                    **{k: v for k, v in row.items() if k in names},
                )
            )
    return out
