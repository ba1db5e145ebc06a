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
among the diagnosed questions is dropped), one per question kind, location and layer (the input
embeddings, then every language-model layer's residual stream): at the last position of the
question (every kind), on the image tokens covering the asked object (colour and size questions),
and on those of the two objects of a relation question side by side. A probe counts only where it
beats chance by ``min_gain`` on held-out scenes of the probe set; an example is decodable where a
counting probe predicts its concept (:func:`concept`). An error without a source split (an empty
answer, or one of several tokens) cannot be a prior override.
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
from ..attribution.results import count, summary_repr
from ..errors import InputError
from ..probing import fit_many, group_split
from .stages import Stages
from .tables import records, scene_key

CAUSES = ("prior override", "knows but doesn't say", "perception failure")
HOOKS = ("hook_embed", "blocks.*.hook_resid_post")
OBJECT_KINDS = ("color", "size", "color_yesno")  # one asked object whose image tokens are probed
PAIR_KINDS = ("relation_yesno", "where")  # two asked objects, probed side by side
LOCATIONS = ("last", "object", "pair")


def concept(q, location: str = "last") -> str | None:
    """The label a probe at ``location`` must decode for a question.

    At the last position: the gold answer, except the object's true colour for a colour yes/no
    question (whose answer also depends on the colour named). On the asked object's tokens: its
    colour or size. On a relation's two objects: the relation that holds between them (None when
    two hold, e.g. above and left: no single label).
    """
    if location == "pair":
        return q.scene.relation(q.about[0], q.about[1]) if len(q.about) == 2 else None
    if location == "object":
        return q.size if q.kind == "size" else q.color
    return q.color if q.kind == "color_yesno" else q.answer


def _applies(kind: str, location: str) -> bool:
    return location == "last" or (location == "object" and kind in OBJECT_KINDS) or (
        location == "pair" and kind in PAIR_KINDS)


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


def _object_cells(layout, q, k: int = 0) -> torch.Tensor | None:
    """Sequence positions of the grid cells overlapping the ``k``-th asked object's bounding box."""
    grid = layout.images[0].grid if layout.images else None
    if grid is None or len(q.about) <= k:
        return None
    rows, cols = grid.shape
    side = q.scene.image_size
    x0, y0, x1, y1 = q.scene.objects[q.about[k]].bbox
    r0, c0 = int(y0 * rows // side), int(x0 * cols // side)
    r1 = max(int(math.ceil(y1 * rows / side)) - 1, r0)
    c1 = max(int(math.ceil(x1 * cols / side)) - 1, c0)
    return grid.positions[max(r0, 0):min(r1, rows - 1) + 1, max(c0, 0):min(c1, cols - 1) + 1].reshape(-1)


def _selector(cells: dict[int, torch.Tensor]):
    """A position selector that picks, for each layout of the running batch, its given cells
    (the last position where an example has none; those rows are discarded afterwards)."""
    def select(layout) -> torch.Tensor:
        return cells.get(id(layout), layout.positions("all")[-1:])
    return select


def _stack(cache) -> torch.Tensor:
    """``[layer, batch, d]``: the input embeddings, then every layer's residual stream."""
    return torch.cat([cache["hook_embed"][None], cache.stack(HOOKS[1])]).float().cpu()


def features(model, questions: Sequence[Any], *, batch_size: int = 32, progress: bool = True,
             desc: str = "probe features") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Residual-stream features of each question at every layer, per location.

    Each location is reduced inside the hooks (one forward pass per batch, four captures), so
    memory stays at ``[layer, batch, d]`` per location whatever the sequence length.

    Returns:
        ``{location: [layer, N, d']}`` and the layer names (``"embed"``, then ``"0"``, ``"1"``, ...).
        ``last``: the question's last position; ``object``: the mean over the image tokens
        covering the asked object (colour and size questions); ``pair``: those means of the two
        objects of a relation question side by side (``d' = 2 d``). NaN where a location does not
        apply.
    """
    parts: dict[str, list[torch.Tensor]] = {loc: [] for loc in LOCATIONS}
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, disable=not progress):
        chunk = questions[start:start + batch_size]
        batch = model.prepare(images=[q.image for q in chunk], prompts=[q.prompt for q in chunk])
        cells: list[dict[int, torch.Tensor]] = [{}, {}]  # first and second asked object, per layout
        for q, layout in zip(chunk, batch.layouts):
            wanted = 1 if q.kind in OBJECT_KINDS else 2 if q.kind in PAIR_KINDS else 0
            found = [_object_cells(layout, q, k) for k in range(wanted)]
            if wanted and all(c is not None and len(c) for c in found):
                for k, c in enumerate(found):
                    cells[k][id(layout)] = c
        hooks = list(HOOKS)
        with model.capture(hooks, positions="last", reduce="last") as last, \
                model.capture(hooks, positions=_selector(cells[0]), reduce="mean") as first, \
                model.capture(hooks, positions=_selector(cells[1]), reduce="mean") as second:
            model.forward(batch, last_position=True)  # values come from the hooks
        a, b = _stack(first), _stack(second)
        has = [torch.tensor([id(layout) in c for layout in batch.layouts]) for c in cells]
        one = has[0] & ~has[1]  # single-object questions; pairs have both
        parts["last"].append(_stack(last))
        parts["object"].append(torch.where(one[None, :, None], a, torch.full_like(a, float("nan"))))
        both = torch.cat([a, b], -1)
        parts["pair"].append(torch.where(has[1][None, :, None], both, torch.full_like(both, float("nan"))))
    layers = ["embed", *(str(k) for k in range(parts["last"][0].shape[0] - 1))]
    return {loc: torch.cat(v, 1) for loc, v in parts.items()}, layers


def _usable(x: torch.Tensor, labels: list) -> np.ndarray:
    """Indices with a label and finite features (a location that does not apply is NaN)."""
    finite = torch.isfinite(x).all(-1).all(0).cpu().numpy() if x.shape[1] else np.zeros(0, bool)
    return np.array([i for i, (v, ok) in enumerate(zip(labels, finite)) if v is not None and ok], dtype=int)


def fit_probes(train_x: dict[str, torch.Tensor], train_q: Sequence[Any], test_x: dict[str, torch.Tensor],
               test_q: Sequence[Any], layers: list[str], min_gain: float = 0.1,
               seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit the probes of every kind and location, and decode the diagnosed questions with them.

    Args:
        train_x, test_x: ``{location: [layer, N, d]}`` features (see :func:`features`) of the
            probe-training and of the diagnosed questions.
        train_q, test_q: the questions.
        layers: layer names.
        min_gain: accuracy above chance a probe needs to count.
        seed: of the held-out split (by scene) of the probe-training questions.

    Returns:
        ``probes``: kind, location, layer, accuracy (held-out scenes of the probe set), chance
        (majority share there), counts (accuracy >= chance + min_gain), n_train, n_test;
        ``decoded``: per diagnosed question, ``id``, ``concept`` (of the last position),
        ``decodable`` and ``decoded_at`` (the first counting probe that decodes it,
        ``"location@layer"``, or None).
    """
    probe_rows = []
    hits: dict[str, list[str]] = {q.id: [] for q in test_q}
    for kind in sorted({q.kind for q in test_q}):
        tr_kind = [i for i, q in enumerate(train_q) if q.kind == kind]
        te_kind = [i for i, q in enumerate(test_q) if q.kind == kind]
        for location in (loc for loc in LOCATIONS if _applies(kind, loc)):
            x_tr, x_te = train_x[location][:, tr_kind], test_x[location][:, te_kind]
            labels = [concept(train_q[i], location) for i in tr_kind]
            keep = _usable(x_tr, labels)
            classes = sorted({labels[i] for i in keep})
            scenes = np.array([scene_key(train_q[tr_kind[i]].scene) for i in keep])
            if len(keep) < 8 or len(classes) < 2 or len(set(scenes)) < 2:
                continue  # too little to fit and check a probe
            codes = np.array([classes.index(labels[i]) for i in keep])
            fit_idx, val_idx = group_split(scenes, test_size=0.25, seed=seed)
            x = x_tr[:, keep]
            probes = fit_many(x[:, fit_idx], torch.as_tensor(codes[fit_idx]), standardize=True, max_iter=300)
            accuracy = probes.accuracy(x[:, val_idx], torch.as_tensor(codes[val_idx])).cpu().numpy()
            chance = float(np.bincount(codes[val_idx], minlength=len(classes)).max() / len(val_idx))
            targets = [concept(test_q[i], location) for i in te_kind]
            scored = _usable(x_te, targets)
            predicted = probes.predict(x_te[:, scored]).cpu().numpy() if len(scored) else None  # [L, m]
            for layer, name in enumerate(layers):
                counts = bool(accuracy[layer] >= chance + min_gain)
                probe_rows.append(dict(kind=kind, location=location, layer=name, accuracy=float(accuracy[layer]),
                                       chance=chance, counts=counts, n_train=len(fit_idx), n_test=len(val_idx)))
                if counts and predicted is not None:
                    for j, i in enumerate(scored):
                        if classes[predicted[layer, j]] == targets[i]:
                            hits[test_q[te_kind[i]].id].append(f"{location}@{name}")
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
        ok = [k for k, ((_, said), q) in enumerate(zip(chunk, qs)) if _scorable(model, batch, k, said, q.answer)]
        split = None
        if ok:
            if len(ok) < len(chunk):
                batch = model.prepare(images=[qs[k].image for k in ok], prompts=[qs[k].prompt for k in ok])
            split = source_split(model, batch, [chunk[k][1] for k in ok], foil=[qs[k].answer for k in ok]).shares()
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


def _scorable(model, batch, k: int, said: str, gold: str) -> bool:
    """Whether the wrong answer and the gold one are single, different tokens after example k's
    text (what a source split of their log-odds needs)."""
    if not said:
        return False
    a, b = model.continuation_tokens(batch, k, said), model.continuation_tokens(batch, k, gold)
    return len(a) == 1 and len(b) == 1 and a != b


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


def decodability_table(decoded: pd.DataFrame, answers: pd.DataFrame,
                       by: Sequence[str] = ("split", "level")) -> pd.DataFrame:
    """Per group: how often the asked concept is decodable when the answer is right and when it
    is wrong (``n_right``, ``decodable_right``, ``n_wrong``, ``decodable_wrong``)."""
    joined = decoded[["id", "decodable"]].merge(answers[["id", *by, "correct"]], on="id")
    rows = []
    for key, part in joined.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        right, wrong = part[part["correct"]], part[~part["correct"]]
        rows.append({**dict(zip(by, key)), "n_right": len(right),
                     "decodable_right": float(right["decodable"].mean()) if len(right) else np.nan,
                     "n_wrong": len(wrong),
                     "decodable_wrong": float(wrong["decodable"].mean()) if len(wrong) else np.nan})
    return pd.DataFrame(rows)


@dataclass(frozen=True, repr=False)  # __repr__ below prints a summary
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
        decodability: per split and level, how often the concept is decodable for right and for
            wrong answers (:func:`decodability_table`).
    """

    errors: pd.DataFrame
    causes: pd.DataFrame
    kinds: pd.DataFrame
    probes: pd.DataFrame
    decoded: pd.DataFrame
    decodability: pd.DataFrame

    def __repr__(self) -> str:
        causes = self.errors["cause"].value_counts() if len(self.errors) else pd.Series(dtype=int)
        counting = self.probes[self.probes["counts"]] if len(self.probes) else self.probes
        return summary_repr(
            "Diagnosis", [count(len(self.errors), "error"), f"{int(self.errors['decodable'].sum())} decodable"],
            ["causes " + ", ".join(f"{cause} {int(causes.get(cause, 0))}" for cause in CAUSES)],
            [count(len(self.probes), "probe"), f"{len(counting)} above chance"])

    def __str__(self) -> str:
        return repr(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per diagnosed error (a copy of :attr:`errors`): the question (``id``,
        ``level``, ``kind``, ``split``, ``prompt``, ``gold``), ``answer``, ``p_answer``, the
        source split, ``decodable``, ``decoded_at`` and ``cause``."""
        return self.errors.copy()

    def summary(self) -> dict[str, Any]:
        """The tables as JSON-ready records."""
        return {"causes": records(self.causes), "cause_kinds": records(self.kinds),
                "decodability": records(self.decodability), "probes": records(self.probes)}


def diagnose(model, questions: Sequence[Any], answers: pd.DataFrame, probe_world: Any, *, n_probe: int = 150,
             min_gain: float = 0.1, max_image_share: float = 0.5, batch_size: int = 32,
             stages: Stages | None = None, progress: bool = True) -> Diagnosis:
    """Diagnose every wrong answer in ``answers`` (see the module docstring).

    Args:
        model: the :class:`~lvlm_probe.LVLM` that gave the answers.
        questions: the questions, in the order of ``answers``.
        answers: from :func:`~lvlm_probe.bench.misalignment_benchmark.answer_questions`.
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
        train_x, layers = features(model, train_q, batch_size=batch_size, progress=progress, desc="probe set")
        test_x, _ = features(model, questions, batch_size=batch_size, progress=progress, desc="diagnosed set")
        return fit_probes(train_x, train_q, test_x, questions, layers, min_gain=min_gain)

    probes, decoded = stages.run("probes", ("probes", "decoded"), probe_stage)
    (splits,) = stages.run("splits", ("splits",), lambda: (split_errors(
        model, questions, answers, batch_size=batch_size, progress=progress),))
    wrong = answers.loc[~answers["correct"], ["id", "level", "kind", "split", "prompt", "gold", "answer", "p_answer"]]
    errors = wrong.merge(decoded[["id", "concept", "decodable", "decoded_at"]], on="id", how="left")
    errors = errors.merge(splits, on="id", how="left")
    errors["decodable"] = errors["decodable"].fillna(False).astype(bool)
    errors["cause"] = assign_causes(errors, max_image_share)
    return Diagnosis(errors, cause_table(errors), cause_table(errors, ("split", "level", "kind")), probes, decoded,
                     decodability_table(decoded, answers))
