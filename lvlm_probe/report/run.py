"""The misalignment report: one self-contained HTML document and the same numbers as JSON.

:func:`write_report` runs :func:`lvlm_probe.bench.misalignment` with its diagnosis, computes image
maps of a few wrong answers, and writes ``report.html`` (tables, figures embedded as PNG, captions
saying what each shows) and ``report.json``. Every stage is kept under ``out/stages``; a rerun
after an interruption reuses the finished stages and writes the same report.

The JSON's tables are the library's tables under the library's column names; the wrong answers
(``errors``) are the diagnosis's table with its source split named as
:func:`~lvlm_probe.attribution.source_split` names it (``prior``, ``prompt``, ``image``, ``full``)
and the question's text as ``question`` (:func:`lvlm_probe.viz.bench.source_columns`), the names
the HTML's figures and example captions use too.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..attribution.image_maps import METHODS
from ..bench.caption_causes import (
    CAPTION_CAUSES,
    MENTION_COLUMNS,
    CaptionExplanation,
    explain_captions,
)
from ..bench.chair_metric import chair
from ..bench.diagnosis import CAUSES
from ..bench.misalignment_benchmark import Misalignment, misalignment, records
from ..bench.stages import Stages
from ..bench.tables import scene_key
from ..errors import InputError
from ..fileio import atomic_write
from ..viz import bench as figures
from ..worlds.evaluation import EVAL_SEED
from . import html as markup

# The tables of the HTML document and of the JSON, under the same names.
TABLES = ("levels", "pope", "chair", "causes", "cause_kinds", "decodability")


@dataclass(frozen=True)
class Report:
    """Where a report was written, and the benchmark behind it."""

    html: Path
    json: Path
    result: Misalignment


def pick_examples(errors: pd.DataFrame, k: int) -> pd.DataFrame:
    """Up to ``k`` wrong answers with a source split, counterfactual colour errors first, causes
    taken in turn so each shows up."""
    usable = errors.dropna(subset=["full"])
    usable = usable.assign(_cf=~((usable["split"] == "counterfactual") & (usable["kind"] == "color")))
    usable = usable.sort_values(["_cf"], kind="stable")
    picked: list[int] = []
    queues = [list(usable.index[usable["cause"] == c]) for c in CAUSES]
    while len(picked) < k and any(queues):
        for queue in queues:
            if queue and len(picked) < k:
                picked.append(queue.pop(0))
    return usable.loc[picked].drop(columns="_cf")


def example_maps(model, questions: list, chosen: pd.DataFrame, method: str, progress: bool) -> pd.DataFrame:
    """Image maps of the chosen errors (score: the wrong answer against the gold one), as PNGs."""
    from ..attribution import image_map

    by_id = {q.id: q for q in questions}
    rows = []
    for _, e in tqdm(list(chosen.iterrows()), desc="image maps", disable=not progress):
        q = by_id[e["id"]]
        batch = model.prepare(images=[q.image], prompts=[q.prompt])
        result = image_map(model, batch, e["answer"], foil=e["gold"], method=method)
        rows.append(dict(id=e["id"], question=q.prompt, gold=e["gold"], answer=e["answer"], cause=e["cause"],
                         split=e["split"], png=figures.png_bytes(result.plot(0))))
    return pd.DataFrame(rows, columns=["id", "question", "gold", "answer", "cause", "split", "png"])


def _cause_colours() -> str:
    """How the figures colour the causes, for captions (e.g. ``red: prior override``)."""
    return ", ".join(f"{color.removeprefix('tab:')}: {cause}" for cause, color in figures.CAUSE_COLORS.items())


def _split_examples(errors: pd.DataFrame, k: int = 36) -> pd.DataFrame:
    """Up to ``k`` errors with a split: counterfactual-colour questions first, grouped by cause."""
    colour = (errors["split"] == "counterfactual") & errors["kind"].isin(["color", "color_yesno"])
    order = errors.assign(_first=~colour, _cause=errors["cause"].map(list(CAUSES).index))
    return order.sort_values(["_first", "_cause"], kind="stable").dropna(subset=["full"]).head(k)


def _marked(text: str, mentions: pd.DataFrame, notes: dict[int, str] | None = None) -> str:
    """A caption with its hallucinated object words highlighted (the mentions' word indices), or
    with the words at the indices of ``notes`` highlighted and each note written after its word."""
    notes = notes or {}
    marked = {int(r.start) + k for r in mentions.itertuples() if r.hallucinated for k in range(len(r.word.split()))}
    out, index = [], 0
    for piece in re.finditer(r"[A-Za-z]+|[^A-Za-z]+", text):
        word = piece.group()
        if word[0].isalpha():
            shown = markup.esc(word)
            if index in marked or index in notes:
                shown = f'<span class="mark">{shown}</span>'
            if index in notes:
                shown += f'<sub class="cause">{markup.esc(notes[index])}</sub>'
            out.append(shown)
            index += 1
        else:
            out.append(markup.esc(word))
    return "".join(out)


def caption_causes(model, result: Misalignment, batch_size: int, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The benchmark's captions explained (:func:`~lvlm_probe.bench.explain_captions`, no maps):
    the caption table and the mention table, each with the caption's ``split``."""
    scenes = {scene_key(q.scene): q.scene for q in result.questions}
    captions = result.captions[result.captions["caption"].str.strip() != ""].reset_index(drop=True)
    if not len(captions):
        return pd.DataFrame(columns=["caption", "split"]), pd.DataFrame(columns=[*MENTION_COLUMNS, "split"])
    explained = explain_captions(model, [scenes[k] for k in captions["scene"]], list(captions["caption"]),
                                 maps=None, batch_size=batch_size, progress=progress)
    split = captions["split"]
    return (explained.captions.assign(split=split[explained.captions["caption"]].values),
            explained.mentions.assign(split=split[explained.mentions["caption"]].values))


def _explained_captions(captions: pd.DataFrame, mentions: pd.DataFrame, k: int = 8) -> str:
    """Up to ``k`` captions with a hallucinated mention, each hallucinated word marked with its
    cause (and, for the caption's own words, the earlier word that carried it)."""
    wrong = mentions[mentions["hallucinated"]]
    rows = []
    for c in list(dict.fromkeys(wrong["caption"]))[:k]:
        row = captions[captions["caption"] == c].iloc[0]
        notes = {}
        for m in wrong[wrong["caption"] == c].itertuples():
            note = m.cause + (f" ({m.strongest_word})" if m.cause == "own words" and m.strongest_word else "")
            notes[int(m.start)] = note
        rows.append(f'<tr><td class="text">{markup.esc(row["split"])}</td>'
                    f'<td class="text">{_marked(row["text"], pd.DataFrame(), notes)}</td>'
                    f'<td class="text">{markup.esc(", ".join(row["truth"]))}</td></tr>')
    return ('<table id="explained_captions"><thead><tr><th>split</th><th>caption (hallucinated shapes marked with '
            f'their cause)</th><th>shapes present</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _caption_examples(captions: pd.DataFrame, per_split: int = 3) -> str:
    """A few captions per split with hallucinated shapes highlighted, beside the shapes present."""
    rows = []
    for split, part in captions.groupby("split", sort=True):
        part = part.head(per_split)
        scored = chair(list(part["caption"]), [list(t) for t in part["truth"]])
        for k, row in enumerate(part.itertuples()):
            text = _marked(row.caption, scored.mentions[scored.mentions["caption"] == k])
            rows.append(f'<tr><td class="text">{markup.esc(split)}</td><td class="text">{text}</td>'
                        f'<td class="text">{markup.esc(", ".join(row.truth))}</td></tr>')
    return ('<table id="captions"><thead><tr><th>split</th><th>caption (hallucinated shapes marked)</th>'
            f'<th>shapes present</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _source(settings: dict[str, Any]) -> str:
    if settings["seed"] is None:
        return f"from the export folder {markup.esc(settings['folder'])}"
    return (f"{settings['n']} per level and split, world seed {settings['seed']}, typical and "
            "counterfactual colours")


def _figure(fig, caption: str, alt: str) -> str:
    return markup.figure(figures.png_bytes(fig), caption, alt)


def _cause_table(mentions: pd.DataFrame) -> pd.DataFrame:
    """Per split (and all): mentions, hallucinated ones, the mean image share of each, and the
    causes of the hallucinated ones."""
    rows = []
    for split, part in [*mentions.groupby("split", sort=True), ("all", mentions)]:
        wrong = part[part["hallucinated"]]
        rows.append({"split": split, "mentions": len(part), "hallucinated": len(wrong),
                     "image_share_correct": part.loc[~part["hallucinated"], "image_share"].mean(),
                     "image_share_hallucinated": wrong["image_share"].mean(),
                     **{cause: int((wrong["cause"] == cause).sum()) for cause in CAPTION_CAUSES}})
    return pd.DataFrame(rows)


def _body(name: str, result: Misalignment, maps: pd.DataFrame, settings: dict[str, Any],
          explained: pd.DataFrame, mentions: pd.DataFrame) -> list[str]:
    d = result.diagnosis
    levels, errors = result.levels, figures.source_columns(d.errors)
    total, wrong = int(levels["n"].sum()), int(levels["errors"].sum())
    cf_colour = d.kinds[(d.kinds["split"] == "counterfactual") & (d.kinds["kind"].isin(["color", "color_yesno"]))]
    by_cause = cf_colour.groupby("cause")["n"].sum().reindex(list(CAUSES)).fillna(0).astype(int)
    body = [
        f"<h1>Misalignment report: {markup.esc(name)}</h1>",
        f"<p>{markup.esc(settings['summary'])}</p>",
        f"<p>{total} ShapesWorld questions ({_source(settings)}), {wrong} answered wrongly. "
        "On counterfactual scenes every asked-about object has an atypical colour, so a model that "
        "answers from the shape's typical colour errs there.</p>",
        "<h2>Accuracy per level</h2>",
        "<p>Per split and semantic level: accuracy, number and rate of errors, and their severity: "
        "the mean probability the model gave its wrong answer, and the share of errors given with "
        "probability above one half.</p>",
        markup.table(result.levels, "levels"),
        _figure(figures.level_bars(result.levels),
                "Accuracy (left) and the mean probability of the wrong answers (right) per level; "
                "one bar per split.", "accuracy and severity per level"),
        "<h2>POPE</h2>",
        "<p>Object-existence questions scored with POPE's official answer parser; absent objects "
        "sampled at random, among the most frequent shapes (popular) or as the absent partner of a "
        "present co-occurring shape (adversarial). A yes-ratio above 0.5 is a bias towards yes.</p>",
        markup.table(result.pope, "pope"),
        _figure(figures.pope_bars(result.pope),
                "POPE accuracy, F1 and yes-ratio per sampling mode; dotted line: 0.5.", "POPE metrics"),
        "<h2>CHAIR</h2>",
        "<p>Captions generated for the question scenes with the prompt 'Describe the image.'; "
        "CHAIR_i is the share of object mentions naming a shape that is not in the scene, CHAIR_s "
        "the share of captions with at least one; recall is the share of present shapes mentioned; "
        "typical_share is the share of hallucinated mentions written right after their shape's "
        "typical colour (a yellow object called a star): the colour prior naming the shape.</p>",
        markup.table(result.chair, "chair"),
        _caption_examples(result.captions),
        "<h3>Why the captions name what is not there</h3>",
        "<p>Every object mention's first token is explained teacher-forced "
        "(<code>lp.attribution.explain_generation</code>): its log-probability split exactly into the "
        "prior (template and the word just before it), the prompt, the image and the caption's earlier "
        "words. A hallucinated mention's cause is the source that pushed the word up most: "
        "<b>perception</b> (the image), <b>own words</b> (the earlier words; the word whose removal lowers "
        "the token most is named), else <b>prior</b>.</p>",
        markup.table(_cause_table(mentions), "caption_causes"),
        _figure(CaptionExplanation(explained, mentions, {}).plot(),
                "Mean credit of the mention's first token for correct and hallucinated mentions, and the "
                "causes of the hallucinated ones.", "caption credit and causes"),
        _explained_captions(explained, mentions),
        "<h2>Diagnosis of the errors</h2>",
        "<p>Each wrong answer gets one cause. <b>Prior override</b>: the source split of the wrong "
        "answer's log-odds against the gold one gives the prior and the prompt together a push "
        "towards the wrong answer and the image at most half of the credit. <b>Knows but doesn't "
        "say</b>: otherwise, a linear probe (fitted on other scenes) decodes the asked concept for "
        "this example at some layer. <b>Perception failure</b>: no probe decodes it.</p>",
        f"<p>On counterfactual-colour questions ({int(by_cause.sum())} errors): "
        + ", ".join(f"{c} {n}" for c, n in by_cause.items()) + ".</p>",
        markup.table(d.causes, "causes"),
        _figure(figures.cause_bars(d.causes), f"Errors per split and level, stacked by cause ({_cause_colours()}).",
                "error causes"),
        "<p>The same per question kind:</p>",
        markup.table(d.kinds, "cause_kinds"),
        "<p>How often the asked concept is decodable by a counting probe, for right and for wrong "
        "answers: where wrong answers are decodable almost as often as right ones, the model had "
        "the information and did not use it.</p>",
        markup.table(d.decodability, "decodability"),
        "<h2>Where the concepts become decodable</h2>",
        "<p>Held-out accuracy of linear probes per layer, fitted on questions about other scenes: "
        "at the question's last position (solid), on the image tokens covering the asked object "
        "(dashed) and on the tokens of a relation's two objects side by side (dash-dot); dotted: "
        "the majority-class rate. Layer 'embed' is the input embeddings, where image positions "
        "still hold the placeholder token (a chance-level baseline). A probe counts for the "
        "diagnosis where it beats chance by 0.1.</p>",
        _figure(figures.emergence_curves(d.probes),
                "Probe accuracy against layer per question kind (emergence curves).", "emergence curves"),
        "<h2>Where the wrong answers came from</h2>",
        "<p>Source split of the errors: the log-odds of the wrong answer against the gold one "
        "split exactly into the prior (template and weights alone), the prompt and the image "
        "(Shapley values, players removed by masking).</p>",
        _figure(figures.split_means(errors),
                "Mean prior, prompt and image credit of the wrong answers per cause and level: "
                "positive credit pushed towards the wrong answer.", "mean source split per cause"),
        _figure(figures.split_bars(_split_examples(errors)),
                "Prior (grey), prompt (orange) and image (blue) credit of single wrong answers, "
                "counterfactual-colour questions first, grouped by cause (label: answer/gold, coloured "
                f"by cause: {_cause_colours()}); black tick: the full log-odds.", "source split of single errors"),
        "<h2>Example heatmaps</h2>",
        f"<p>Image maps ({markup.esc(settings['map_method'])}) of the wrong answer's log-odds against the "
        "gold one: red cells and words pushed towards the wrong answer, blue towards the gold one.</p>",
    ]
    for row in maps.to_dict("records"):
        body.append(markup.figure(row["png"], f"{row['question']} Gold: {row['gold']}; answered: {row['answer']} "
                             f"({row['split']} scene; cause: {row['cause']}).", f"image map of {row['id']}"))
    return body


def write_report(model, out: str | os.PathLike, *, name: str = "model", world: Any = None, n: int = 60,
                 captions: int = 30, n_probe: int = 150, maps: int = 4, map_method: str = "ablation",
                 batch_size: int = 32, progress: bool = True) -> Report:
    """Run the misalignment benchmark and its diagnosis, and write ``report.html`` and ``report.json``.

    Args:
        model: an :class:`~lvlm_probe.LVLM` that answers ShapesWorld questions (e.g. shapes-llava).
        out: output folder; ``out/stages`` keeps each finished stage, so a rerun after an
            interruption resumes (delete it to start over).
        name: the model's name in the title.
        world: the ShapesWorld (default: seed 1000, images at 64 px) or an export folder.
        n: questions per level and split.
        captions: scenes captioned per split for CHAIR.
        n_probe: probe-training questions per kind and split.
        maps: wrong answers shown with an image map.
        map_method: the image map's method (see :func:`lvlm_probe.attribution.image_map`).
        batch_size: examples per forward pass.
        progress: show progress bars.

    Returns:
        A :class:`Report`.

    Raises:
        InputError: for a negative ``maps`` or an unknown ``map_method`` (and see
            :func:`~lvlm_probe.bench.misalignment`).

    Example:
        >>> lp.report.write_report(lp.zoo.load("shapes-llava"), "runs/report", name="shapes-llava")
    """
    from ..worlds import ShapesWorld

    if isinstance(maps, bool) or not isinstance(maps, int) or maps < 0:
        raise InputError(f"maps must be a non-negative int, got {maps!r}")
    if map_method not in METHODS:  # checked before the long stages, not after them
        raise InputError(f"unknown map_method {map_method!r}; available: {METHODS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = world if world is not None else ShapesWorld(seed=EVAL_SEED, image_size=64)
    result = misalignment(model, world, n=n, captions=captions, n_probe=n_probe, batch_size=batch_size,
                          cache=out / "stages", progress=progress)
    chosen = pick_examples(result.diagnosis.errors, maps)
    stages = Stages(out / "stages", {**result.settings, "maps": list(chosen["id"]), "map_method": map_method})
    (shown,) = stages.run("maps", ("maps",), lambda: (example_maps(model, result.questions, chosen, map_method, progress),))
    explained, mentions = stages.run("caption_causes", ("captions", "mentions"),
                                     lambda: caption_causes(model, result, batch_size, progress))
    seed = world.config.seed if isinstance(world, ShapesWorld) else None
    settings = dict(summary=model.summary(), n=n, seed=seed, captions=captions, n_probe=n_probe,
                    map_method=map_method, folder=None if seed is not None else str(world))
    summary = result.summary()
    document = {"model": name, "settings": settings, **{k: summary[k] for k in TABLES},
                "probes": summary["probes"], "errors": records(figures.source_columns(result.diagnosis.errors)),
                "examples": records(shown.drop(columns="png")), "caption_causes": records(_cause_table(mentions)),
                "caption_mentions": records(mentions)}
    html_path, json_path = out / "report.html", out / "report.json"
    atomic_write(json_path, json.dumps(document, indent=1, sort_keys=True).encode(), "report.json")
    page = markup.document(f"Misalignment report: {name}", _body(name, result, shown, settings, explained, mentions))
    atomic_write(html_path, page.encode("utf-8"), "report.html")
    return Report(html_path, json_path, result)
