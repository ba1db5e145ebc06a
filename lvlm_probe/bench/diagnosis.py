"""Why a model got a question wrong: behaviour joined with probes and the source split.

Every wrong answer gets one cause:

* ``prior override``: the answer came from the language side. The source split
  (:func:`~lvlm_probe.attribution.source_split`) of the wrong answer's log-odds against the gold
  answer gives the prior and the prompt together a positive push towards the wrong answer, and the
  image at most ``max_image_share`` (default one half) of the absolute credit, so the language
  side dominates;
* ``knows but doesn't say``: otherwise, when the concept the question is about (the asked object's
  colour or size, the presence of the shape, the relation) is linearly decodable for that example
  by a probe at some layer: the information was there, the answer did not use it;
* ``perception failure``: otherwise: no probe at any layer decodes the concept for that example.

The split is checked first because it says where the wrong answer came from; decodability says what
was available. Both are kept as columns, so other partitions can be read off the table.

Probes are fitted on questions about other scenes (``probe_world``; any scene that also occurs
among the diagnosed questions is dropped), one per question kind, location and layer: at the last
position of the question (every kind), and on the image tokens covering the asked object (colour
and size questions). A probe counts only where it beats chance by ``min_gain`` on held-out scenes
of the probe set; an example is decodable where a counting probe predicts its concept.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..attribution import source_split
from ..errors import InputError
from ..probing import fit_many, group_split
from .misalignment import records, scene_key
from .stages import Stages

CAUSES = ("prior override", "knows but doesn't say", "perception failure")
HOOKS = ("hook_embed", "blocks.*.hook_resid_post")
OBJECT_KINDS = ("color", "size", "color_yesno")  # one asked object whose image tokens are probed
LOCATIONS = ("last", "object")


def concept(q) -> str:
    """The label a probe must decode for a question: the object's true colour for a colour yes/no
    question (the answer also depends on the colour named), else the gold answer."""
    return q.color if q.kind == "color_yesno" else q.answer


def default_probe_world(world: Any, questions: Sequence[Any]):
    """The world probes are fitted on: the question world's seed + 1 (1001 for a folder)."""
    from ..worlds import ShapesWorld

    if world is not None:
        c = world.config
        return ShapesWorld(seed=c.seed + 1, image_size=c.image_size, shapes=c.shapes, colors=c.colors,
                           sizes=c.sizes, max_objects=c.max_objects, p_typical_color=c.p_typical_color,
                           p_cooccur=c.p_cooccur, typical_colors=c.typical, cooccurring=c.pairs,
                           background=c.background)
    return ShapesWorld(seed=1001, image_size=questions[0].scene.image_size)


def probe_questions(world, kinds: Sequence[str], splits: Sequence[str], n: int, avoid: set[str]) -> list:
    """``n`` questions per kind and split from ``world``, without the scenes in ``avoid``."""
    from ..worlds.vocab import KINDS

    level_of = {k: level for level, ks in KINDS.items() for k in ks}
    out = []
    for split in splits:
        for kind in kinds:
            if kind == "exist":  # POPE's three ways of choosing absent objects, evenly
                for mode in ("random", "popular", "adversarial"):
                    out += world.questions(max(n // 3, 2), level="object", split=split, pope=mode)
            else:
                out += world.questions(n, level=level_of[kind], split=split, kind=kind)
    return [q for q in out if scene_key(q.scene) not in avoid]


def _object_cells(layout, q) -> torch.Tensor | None:
    """Sequence positions of the grid cells overlapping the asked object's bounding box."""
    grid = layout.images[0].grid if layout.images else None
    if grid is None or not q.about:
        return None
    rows, cols = grid.shape
    side = q.scene.image_size
    x0, y0, x1, y1 = q.scene.objects[q.about[0]].bbox
    r0, r1 = int(y0 * rows // side), max(int(math.ceil(y1 * rows / side)) - 1, int(y0 * rows // side))
    c0, c1 = int(x0 * cols // side), max(int(math.ceil(x1 * cols / side)) - 1, int(x0 * cols // side))
    return grid.positions[max(r0, 0):min(r1, rows - 1) + 1, max(c0, 0):min(c1, cols - 1) + 1].reshape(-1)


def features(model, questions: Sequence[Any], *, batch_size: int = 32, progress: bool = True,
             desc: str = "probe features") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Residual-stream features of each question at every layer.

    Returns:
        ``last [layer, N, d]`` (the question's last position), ``object [layer, N, d]`` (mean over
        the image tokens covering the asked object; NaN for other kinds) and the layer names
        (``"embed"``, then ``"0"``, ``"1"``, ...).
    """
    lasts, objects = [], []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, disable=not progress):
        chunk = questions[start:start + batch_size]
        batch = model.prepare(images=[q.image for q in chunk], prompts=[q.prompt for q in chunk])
        with model.capture(list(HOOKS), positions="all", reduce="none") as cache:
            model.forward(batch)
        states = torch.cat([cache["hook_embed"][None], cache.stack(HOOKS[1])]).float()  # [L, b, seq, d]
        obj = torch.full((states.shape[0], len(chunk), states.shape[-1]), float("nan"))
        for i, (q, layout) in enumerate(zip(chunk, batch.layouts)):
            cells = _object_cells(layout, q) if q.kind in OBJECT_KINDS else None
            if cells is not None and len(cells):
                obj[:, i] = states[:, i, cells.to(states.device)].mean(1).cpu()
        last = torch.stack([layout.positions("all")[-1] for layout in batch.layouts]).to(states.device)
        lasts.append(states[:, torch.arange(len(chunk), device=states.device), last].cpu())
        objects.append(obj)
    layers = ["embed", *(str(k) for k in range(lasts[0].shape[0] - 1))]
    return torch.cat(lasts, 1), torch.cat(objects, 1), layers


def fit_probes(train_x: dict[str, torch.Tensor], train_q: Sequence[Any], test_x: dict[str, torch.Tensor],
               test_q: Sequence[Any], layers: list[str], min_gain: float = 0.1,
               seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit the probes of every kind and location, and decode the diagnosed questions with them.

    Returns:
        ``probes``: kind, location, layer, accuracy (held-out scenes of the probe set), chance
        (majority share there), counts (accuracy >= chance + min_gain), n_train, n_test;
        ``decoded``: per diagnosed question, ``id``, ``concept``, ``decodable`` and ``decoded_at``
        (the first counting probe that decodes it, ``"location@layer"``, or None).
    """
    probe_rows = []
    hits = {q.id: [] for q in test_q}
    for kind in sorted({q.kind for q in test_q}):
        tr = np.array([i for i, q in enumerate(train_q) if q.kind == kind])
        te = np.array([i for i, q in enumerate(test_q) if q.kind == kind])
        if len(tr) < 8:
            continue
        labels = np.array([concept(train_q[i]) for i in tr])
        classes = sorted(set(labels))
        if len(classes) < 2:
            continue
        codes = np.array([classes.index(v) for v in labels])
        scenes = np.array([scene_key(train_q[i].scene) for i in tr])
        fit_idx, val_idx = group_split(scenes, test_size=0.25, seed=seed)
        target = [concept(test_q[i]) for i in te]
        for location in LOCATIONS:
            x = train_x[location][:, tr]
            if location == "object" and kind not in OBJECT_KINDS:
                continue
            probes = fit_many(x[:, fit_idx], torch.as_tensor(codes[fit_idx]), standardize=True, max_iter=300)
            accuracy = probes.accuracy(x[:, val_idx], torch.as_tensor(codes[val_idx])).cpu().numpy()
            chance = float(np.bincount(codes[val_idx], minlength=len(classes)).max() / len(val_idx))
            predicted = probes.predict(test_x[location][:, te]).cpu().numpy()  # [L, m] codes
            for layer, name in enumerate(layers):
                counts = bool(accuracy[layer] >= chance + min_gain)
                probe_rows.append(dict(kind=kind, location=location, layer=name, accuracy=float(accuracy[layer]),
                                       chance=chance, counts=counts, n_train=len(fit_idx), n_test=len(val_idx)))
                if not counts:
                    continue
                for j, i in enumerate(te):
                    if classes[predicted[layer, j]] == target[j]:
                        hits[test_q[i].id].append(f"{location}@{name}")
    decoded = pd.DataFrame([dict(id=q.id, concept=concept(q), decodable=bool(hits[q.id]),
                                 decoded_at=hits[q.id][0] if hits[q.id] else None) for q in test_q])
    return pd.DataFrame(probe_rows), decoded


def split_errors(model, questions: Sequence[Any], answers: pd.DataFrame, *, batch_size: int = 32,
                 progress: bool = True) -> pd.DataFrame:
    """Source split of every wrong answer's log-odds against the gold answer.

    Returns:
        One row per error: ``id``, ``prior``, ``prompt_credit``, ``image``, ``full`` and the
        ``*_share`` columns; NaN where the wrong answer is empty or not one token.
    """
    by_id = {q.id: q for q in questions}
    wrong = answers[~answers["correct"]]
    rows = []
    items = list(zip(wrong["id"], wrong["answer"]))
    for start in tqdm(range(0, len(items), batch_size), desc="source split", disable=not progress):
        chunk = items[start:start + batch_size]
        qs = [by_id[i] for i, _ in chunk]
        batch = model.prepare(images=[q.image for q in qs], prompts=[q.prompt for q in qs])
        ok = [k for k, ((_, said), q) in enumerate(zip(chunk, qs))
              if said and len(model.continuation_tokens(batch, k, said)) == 1
              and len(model.continuation_tokens(batch, k, q.answer)) == 1]
        split = None
        if ok:
            sub = model.prepare(images=[qs[k].image for k in ok], prompts=[qs[k].prompt for k in ok])
            try:
                split = source_split(model, sub, [chunk[k][1] for k in ok], [qs[k].answer for k in ok]).shares()
            except InputError:  # e.g. an answer whose token equals the gold one's: no split
                split = None
        for k, (qid, _) in enumerate(chunk):
            row = dict(id=qid, prior=np.nan, prompt_credit=np.nan, image=np.nan, full=np.nan,
                       prior_share=np.nan, prompt_share=np.nan, image_share=np.nan)
            if split is not None and k in ok:
                s = split.iloc[ok.index(k)]
                row.update(prior=s["prior"], prompt_credit=s["prompt"], image=s["image"], full=s["full"],
                           prior_share=s["prior_share"], prompt_share=s["prompt_share"],
                           image_share=s["image_share"])
            rows.append(row)
    return pd.DataFrame(rows, columns=["id", "prior", "prompt_credit", "image", "full", "prior_share",
                                       "prompt_share", "image_share"])


def assign_causes(errors: pd.DataFrame, max_image_share: float = 0.5) -> pd.Series:
    """The cause of each error (see the module docstring) from its split and decodability."""
    language = errors["prior"] + errors["prompt_credit"]
    prior = (language > 0) & (errors["image_share"] <= max_image_share)
    return pd.Series(np.where(prior, CAUSES[0], np.where(errors["decodable"], CAUSES[1], CAUSES[2])),
                     index=errors.index, name="cause")


def cause_table(errors: pd.DataFrame, by: Sequence[str] = ("split", "level")) -> pd.DataFrame:
    """Errors per group and cause: ``n`` and ``share`` of the group's errors (every cause listed)."""
    rows = []
    for key, part in errors.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for cause in CAUSES:
            count = int((part["cause"] == cause).sum())
            rows.append({**dict(zip(by, key)), "cause": cause, "n": count, "share": count / len(part)})
    return pd.DataFrame(rows, columns=[*by, "cause", "n", "share"])


@dataclass(frozen=True)
class Diagnosis:
    """The diagnosis of a benchmark run.

    Attributes:
        errors: one row per wrong answer: the question, the answer and its probability, the split
            (``prior``, ``prompt_credit``, ``image``, ``full``, shares), ``decodable``,
            ``decoded_at`` and ``cause``.
        causes: per split and level, errors per cause (:func:`cause_table`).
        kinds: the same per split, level and question kind.
        probes: every probe's held-out accuracy per kind, location and layer (emergence curves).
        decoded: every diagnosed question (right or wrong) with ``decodable``.
    """

    errors: pd.DataFrame
    causes: pd.DataFrame
    kinds: pd.DataFrame
    probes: pd.DataFrame
    decoded: pd.DataFrame

    def summary(self) -> dict[str, Any]:
        return {"causes": records(self.causes), "cause_kinds": records(self.kinds), "probes": records(self.probes)}


def diagnose(model, questions: Sequence[Any], answers: pd.DataFrame, probe_world: Any, *, n_probe: int = 150,
             min_gain: float = 0.1, max_image_share: float = 0.5, batch_size: int = 32,
             stages: Stages | None = None, progress: bool = True) -> Diagnosis:
    """Diagnose every wrong answer in ``answers`` (see the module docstring).

    Args:
        model: the :class:`~lvlm_probe.LVLM` that gave the answers.
        questions: the questions, in the order of ``answers``.
        answers: from :func:`~lvlm_probe.bench.misalignment.answer_questions`.
        probe_world: the ShapesWorld probes are fitted on.
        n_probe: probe-training questions per kind and split.
        min_gain: accuracy above chance (held-out scenes) a probe needs to count.
        max_image_share: the image's largest share of the credit in a prior override.
        batch_size: examples per forward pass.
        stages: resumable stages (none kept by default).
        progress: show progress bars.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        InputError: if ``answers`` does not match ``questions``.
    """
    if list(answers["id"]) != [q.id for q in questions]:
        raise InputError("answers must hold one row per question, in the questions' order (ids differ)")
    stages = stages or Stages(None)
    avoid = {scene_key(q.scene) for q in questions}

    def probe_stage():
        kinds = sorted({q.kind for q in questions})
        splits = sorted({q.split for q in questions} - {"train"}) or ["typical"]
        train_q = probe_questions(probe_world, kinds, splits, n_probe, avoid)
        tl, to, layers = features(model, train_q, batch_size=batch_size, progress=progress, desc="probe set")
        dl, do, _ = features(model, questions, batch_size=batch_size, progress=progress, desc="diagnosed set")
        return fit_probes({"last": tl, "object": to}, train_q, {"last": dl, "object": do}, questions, layers,
                          min_gain=min_gain)

    probes, decoded = stages.run("probes", ("probes", "decoded"), probe_stage)
    (splits,) = stages.run("splits", ("splits",), lambda: (split_errors(
        model, questions, answers, batch_size=batch_size, progress=progress),))
    wrong = answers.loc[~answers["correct"], ["id", "level", "kind", "split", "prompt", "gold", "answer", "p_answer"]]
    errors = wrong.merge(decoded[["id", "concept", "decodable", "decoded_at"]], on="id", how="left")
    errors = errors.merge(splits, on="id", how="left")
    errors["decodable"] = errors["decodable"].fillna(False).astype(bool)
    errors["cause"] = assign_causes(errors, max_image_share)
    return Diagnosis(errors, cause_table(errors), cause_table(errors, ("split", "level", "kind")), probes, decoded)
