"""Run a sweep definition end to end: extraction (cached, resumable), probes, analyses, figures.

Output folder::

    <out>/sweep.json                 the definition this folder was made with
    <out>/acts/{lm,towers,text}/     activation stores (see lvlm_probe.store), resumable
    <out>/results/<target>.parquet   one part per target, written atomically when its probes end
    <out>/results.parquet            every probe's row (columns of probing.sweeps.COLUMNS)
    <out>/transfer.parquet, alignment.parquet, cka_vision_lm.parquet   when asked for
    <out>/figures/*.png              accuracy and selectivity through the towers, per-head
                                     heatmaps, transfer and alignment curves, the CKA map

With ``backend: ray`` (and optionally ``ray_address:``) in the definition, the extractions and the
probes run as Ray tasks inside one Ray session (see :mod:`lvlm_probe.distributed`); the folder's
contents are the same as a local run's, so a run may resume on the other backend. Any backend
registered both for extraction (:data:`lvlm_probe.store.executor.executors`) and for sweeps
(:data:`lvlm_probe.probing.sweeps.sweep_executors`) may be named.

A run killed at any moment and started again resumes: the stores continue after their last
complete shard, and targets whose part exists are not probed again.

A rerun into the same folder compares its inputs with the ones recorded in ``sweep.json``: the
definition, a digest of every example's labels and (for a folder of images) of every image file.
What decides the activations (model, data folder or world, extraction settings) must be the same,
or the run is refused naming what changed. Image files may change, be added or be removed: the
stores are cut back to the shards before the first changed file (in file-name order; see
:func:`lvlm_probe.store.rewind`) and the extraction resumes from there, so only that part is
extracted again (:attr:`SweepRun.changed_images` names the files). Anything else (probe settings,
targets, analyses, the labels themselves) may change: the stored activations are reused. Either
way every table and figure made from the old inputs or settings is recomputed, so a folder never
reports results of labels or images it no longer has.

Every table and figure records what it came from: ``results.parquet`` in its metadata
(``pd.read_parquet(...).attrs["provenance"]``), each PNG in its text chunks
(``PIL.Image.open(...).text``): the digests of the labels, of the image files and of the model
(:attr:`SweepRun.provenance`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import alignment, viz
from ..errors import InputError, StoreError
from ..fileio import write_json, write_parquet
from ..hooks.names import expand
from ..probing.sweeps import HEAD_HOOKS, encode_labels, select_hooks, sweep, tower_of, transfer
from ..store import extract, rewind
from ..viz import save_figure
from .sweep_config import FolderData, SweepConfig, check_backend, check_folder, load_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# image-vs-text alignment metrics a definition may ask for
METRICS = {
    "cka": lambda x, y: alignment.cka(x, y),
    "mutual_knn": lambda x, y: alignment.mutual_knn(x, y, k=10),
    "cosine": lambda x, y: alignment.cosine(x, y),
}


@dataclass(frozen=True)
class SweepRun:
    """What a run produced: tables and the paths of its figures.

    Attributes:
        provenance: the digests the tables and figures were computed from: ``labels`` (every
            example's labels), ``images`` (every image file of a folder; None for ShapesWorld data,
            whose images follow from the definition) and ``model`` (the store's model fingerprint).
        changed_images: the image files (at most 10 named) found changed, added or removed since
            the folder's last run, whose part of the activations this run extracted again.
    """

    out: Path
    results: pd.DataFrame
    transfer: pd.DataFrame | None
    alignment: pd.DataFrame | None
    cka: pd.DataFrame | None
    figures: dict[str, Path]
    provenance: dict[str, str | None] = dataclasses.field(default_factory=dict)
    changed_images: list[str] = dataclasses.field(default_factory=list)


def run_sweep(config: SweepConfig | str | Path, model: Any = None, progress: bool = True) -> SweepRun:
    """Run (or resume) a sweep definition.

    Args:
        config: a :class:`SweepConfig` or the path of a YAML definition.
        model: an already loaded :class:`~lvlm_probe.LVLM` for ``config.model`` (loaded if None).
        progress: show progress bars.

    Returns:
        A :class:`SweepRun`.

    Raises:
        StoreError: if ``out`` holds a different sweep.
        InputError: for a bad definition or data folder.
        MissingDependencyError: ``backend: ray`` without Ray installed.

    Example:
        >>> run = run_sweep("probes/shapes_objects.yaml")
        >>> run.results.query("target == 'color'")[["hook", "accuracy", "selectivity"]]
    """
    if not isinstance(config, SweepConfig):
        config = load_config(config)
    extraction, sweeping, options = check_backend(config.backend, config.ray_address)  # before any data is built
    # the backends' sessions held around every extraction and sweep of the run (with Ray: one Ray
    # session, which the inner context finds running)
    with extraction.session(options), sweeping.session(options):
        return _run(config, model, progress)


def _run(config: SweepConfig, model: Any, progress: bool) -> SweepRun:
    out = Path(config.out)
    images, texts = _datasets(config)
    labels = pd.DataFrame([_labels_of(row) for row in images])  # one row per example, no image opened
    _check_labels(config, labels)
    model = model if model is not None else _load(config)
    spec = config.extract
    for names in (spec.lm_hooks, spec.tower_hooks, spec.head_hooks):
        if names:
            expand(list(names), model.hook_names())  # unknown names fail before any extraction
    if spec.tower_hooks:
        _check_whole(model, images[0], list(spec.tower_hooks))
    provenance = _provenance(labels, images)
    acts = out / "acts"
    changed = _claim(out, config, provenance)
    common = dict(batch_size=spec.batch_size, dtype=spec.dtype, progress=progress, **_execution(config))
    lm = extract(model, images, list(spec.lm_hooks + spec.head_hooks), out=acts / "lm",
                 positions=spec.positions, reduce=spec.reduce, **common)
    towers = (extract(model, images, list(spec.tower_hooks), out=acts / "towers", positions="all",
                      reduce="none", **common) if spec.tower_hooks else None)
    text = (extract(model, texts, list(spec.lm_hooks), out=acts / "text", positions="prompt",
                    reduce=spec.reduce, **common) if config.has_text else None)

    # every store is read once here; probes, transfer and alignment share these tensors
    features = _tower_features(towers) | {h: lm[h] for h in lm.hooks}
    meta = _current_labels(lm.meta, labels)  # the store keeps the labels it was extracted with
    image_states = {h: features[h] for h in select_hooks(spec.lm_hooks, lm.hooks)}
    digests = _digests(provenance, lm.fingerprint["digest"])
    results = _probe(config, features, meta, out, progress, digests)
    figures = _figure_results(results, out, digests)
    transfer_table = alignment_table = cka_table = None
    if config.transfer:
        transfer_table = _cached(out / "transfer.parquet", lambda: pd.concat(
            [transfer(text, (image_states, meta[target].to_numpy()), target, hooks=list(spec.lm_hooks),
                      seed=config.probes.seed)
             for target in config.transfer], ignore_index=True))
        lines = transfer_table.assign(metric=transfer_table["target"] + ": " + transfer_table["direction"],
                                      value=transfer_table["accuracy"])
        figures["transfer"] = save_figure(
            viz.alignment_curves(lines, ylabel="transfer accuracy", chance=float(lines["chance"].max())),
            out / "figures" / "transfer.png", metadata=_png_text(digests))
    if config.alignment:
        alignment_table = _cached(out / "alignment.parquet", lambda: _alignment(config, image_states, meta, text))
        figures["alignment"] = save_figure(viz.alignment_curves(alignment_table), out / "figures" / "alignment.png",
                                           metadata=_png_text(digests))
    if towers is not None:
        cka_table = _cached(out / "cka_vision_lm.parquet", lambda: _cka_map(features))
        if cka_table is not None and len(cka_table):
            grid = cka_table.pivot(index="layer_a", columns="layer_b", values="value")
            figures["cka"] = save_figure(viz.layer_map(grid.to_numpy(), title="linear CKA, vision tower x LM"),
                                         out / "figures" / "cka_vision_lm.png", metadata=_png_text(digests))
    return SweepRun(out, results, transfer_table, alignment_table, cka_table, figures, digests, changed)


# --- setup ------------------------------------------------------------------------------------
# keys that say how a run executes: a run may resume on another backend
EXECUTION = ("backend", "ray_address")


def _execution(config: SweepConfig) -> dict[str, Any]:
    """The backend arguments of extract() and sweep()."""
    return {"backend": config.backend, "ray_address": config.ray_address}


# the parts of a definition that decide the activations; the rest (probes, analyses, the name, the
# labels file) only decides what is computed from them
EXTRACTION_KEYS = ("model", "data", "extract", "device", "dtype")
# what a run derives from the activations and the labels: recomputed when those inputs change
DERIVED = ("results", "results.parquet", "transfer.parquet", "alignment.parquet", "figures")


def _claim(out: Path, config: SweepConfig, provenance: dict[str, Any]) -> list[str]:
    """Record the definition and the inputs' digests in ``out``; returns the image files changed
    since the recorded run.

    A folder made with other activations (a different model, data, or extraction settings) is
    refused, naming what differs. A folder whose image files changed is cut back to the shards
    before the first changed file, so the extraction resumes there. A folder made with other probe
    settings, analyses or labels is taken over. In both cases its derived tables and figures are
    deleted and recomputed. Stores are rewound and derived files deleted before the new record is
    written, so a run killed in between does the same again.

    Raises:
        StoreError: the folder's activations came from other inputs.
    """
    mine = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    for key in EXECUTION:
        mine.pop(key, None)
    mine["provenance"] = provenance
    record = out / "sweep.json"
    if record.exists():
        theirs = json.loads(record.read_text())
        if theirs == mine:
            return []
        changed = [k for k in EXTRACTION_KEYS if _extraction_part(mine, k) != _extraction_part(theirs, k)]
        if changed:
            raise StoreError(f"{out} holds the activations of other inputs (definition keys {changed}); "
                             "choose another out, or delete the folder to extract again")
        # a folder recorded before digests were kept: its images cannot be compared, only refitted
        old = theirs["provenance"]["images"] if "provenance" in theirs else provenance["images"]
        first, images = _first_change(old, provenance["images"])
        if images:
            for store in sorted((out / "acts").glob("*")):
                rewind(store, first)
        for name in DERIVED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    else:
        images = []
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, mine, "the sweep definition")
    return images


def _extraction_part(definition: dict, key: str) -> Any:
    """A definition's value for ``key`` as far as it decides the activations (the labels file of a
    folder does not)."""
    value = definition.get(key)
    if key == "data" and isinstance(value, dict) and "folder" in value:
        return {**value, "folder": {k: v for k, v in value["folder"].items() if k != "labels"}}
    return value


def _first_change(old: dict | None, new: dict | None) -> tuple[int, list[str]]:
    """Where the image files first differ from the recorded ones, in the folder's (file-name)
    order, which is the stores' example order: the index of the first example whose activations
    are stale, and the names of the files added, removed or changed (at most 10 named)."""
    old, new = old or {}, new or {}
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    # example i is stale from the first position where the two orders name another file or bytes
    # (an added or removed file shifts every example after it)
    before, now = sorted(old, key=Path), sorted(new, key=Path)
    first = next((i for i, (a, b) in enumerate(zip(before, now)) if a != b or old[a] != new[b]),
                 min(len(before), len(now)))
    return first, changed[:10] + ([f"... {len(changed) - 10} more"] if len(changed) > 10 else [])


def _digests(provenance: dict[str, Any], model: str) -> dict[str, str | None]:
    """The digests a run's tables and figures record: labels, image files (one digest over every
    file's name and digest; None without image files) and the model's fingerprint."""
    images = provenance["images"]
    combined = (hashlib.sha256(json.dumps(images, sort_keys=True).encode()).hexdigest()[:16]
                if images else None)
    return {"labels": provenance["labels"], "images": combined, "model": model}


def _png_text(digests: dict[str, str | None]) -> dict[str, str]:
    """The digests as PNG text chunks (``lvlm_probe.<name>``)."""
    return {f"lvlm_probe.{k}": str(v) for k, v in digests.items()}


def _provenance(labels: pd.DataFrame, rows: list) -> dict[str, Any]:
    """Digests of what a run reads besides its definition: every example's labels, and the bytes of
    every image file (a folder's; ShapesWorld's images follow from the definition)."""
    digest = hashlib.sha256(labels.to_json(orient="records", default_handler=str).encode())
    images = {row.path.name: hashlib.sha256(row.path.read_bytes()).hexdigest()[:16]
              for row in rows if isinstance(row, _FolderRow)}
    return {"labels": digest.hexdigest()[:16], "images": images}


def _current_labels(meta: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """The store's example table with its label columns replaced by the dataset's current ones, in
    the store's row order (a store keeps the labels it was extracted with)."""
    current = labels.set_index("id")
    current = current.loc[meta["id"].to_numpy()].reset_index(drop=True)
    return meta.drop(columns=[c for c in current.columns if c in meta]).assign(**current)


def _check_whole(model: Any, row: Any, patterns: list[str]) -> None:
    """Tower hooks are stored whole, one row per example: check on the first example, before
    anything is extracted, that the model gives them that shape (NaViT-style towers pack the
    patches of every image of a batch into one sequence instead).

    Raises:
        InputError: naming the hook, its shape for one image, and the setting to change.
    """
    example = row.to_dict() if hasattr(row, "to_dict") else row
    batch = model.prepare(images=[example["image"]], prompts=[example["prompt"]])
    names = expand(patterns, model.hook_names())
    with torch.no_grad(), model.capture(names) as cache:
        model.forward(batch, last_position=True)  # values come from the hooks
    for name in names:
        shape = tuple(cache[name].shape)
        if shape[0] != 1:
            raise InputError(
                f"extract.tower_hooks: {name} has shape {shape} for one image; this model packs its "
                "images' patches into one sequence, so its tower states cannot be stored one row per "
                "example. Set extract.tower_hooks: [] (the language model's image positions still "
                "carry the image)")


def _load(config: SweepConfig):
    from ..zoo import from_name

    return from_name(config.model, device=config.device, dtype=config.dtype)


def _datasets(config: SweepConfig) -> tuple[list[dict], list[dict] | None]:
    data = config.data
    if isinstance(data, FolderData):
        spec = config.probes
        return _folder_rows(data, required=(*spec.targets, *spec.control_by)), None
    from ..worlds import ShapesWorld

    world = ShapesWorld(seed=data.seed, image_size=data.image_size)
    images = world.concepts(data.n, objects=data.objects, split=data.split, modality="image")
    texts = world.concepts(data.n, objects=data.objects, split=data.split, modality="text")
    return images, texts if config.has_text else None


def _folder_rows(data: FolderData, required: tuple[str, ...] = ()) -> list:
    """One row per image file of the folder, with its labels from the labels file.

    Every problem of the labels file is found before any model is loaded and reported at once,
    each with its file name and CSV line: rows naming files that are not in the folder, images
    without a row or with several, and blank cells in the columns the probes need (``required``).
    Labels are read as text, so a column never mixes types.

    Raises:
        InputError: naming every problem found.
    """
    check_folder(data)
    root = Path(data.path)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}")
    labels = pd.DataFrame({"file": [p.name for p in files]})
    if data.labels:
        table = pd.read_csv(data.labels, dtype=str, keep_default_na=False)
        if "file" not in table:
            raise InputError(f"{data.labels} needs a 'file' column; it has {list(table.columns)}")
        _check_label_rows(data.labels, table, [p.name for p in files], required)
        labels = labels.merge(table, on="file", how="left")
    return [_FolderRow(path, data.prompt, {k: v for k, v in label.items() if k != "file"})
            for path, (_, label) in zip(files, labels.iterrows())]


def _check_label_rows(source: str, table: pd.DataFrame, files: list[str], required: tuple[str, ...]) -> None:
    """Raise one InputError listing every mismatch between a labels file and its image folder."""
    line = table.index + 2  # the CSV's line: a header line, then one line per row
    problems = []
    present = set(files)
    for name, at in zip(table["file"], line):
        if name not in present:
            problems.append(f"line {at}: {name!r} is not an image in the folder")
    counts = table["file"].value_counts()
    for name in files:
        if name not in counts:
            problems.append(f"{name!r} has no row")
        elif counts[name] > 1:
            lines = ", ".join(str(at) for at in line[table["file"] == name])
            problems.append(f"{name!r} has {counts[name]} rows (lines {lines})")
    for column in (c for c in required if c in table):
        for name, at in zip(table["file"][table[column].str.strip() == ""], line[table[column].str.strip() == ""]):
            problems.append(f"line {at}: {name!r} has no {column!r}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        hint = ""
        if any("is not an image in the folder" in p for p in problems):
            hint = f" (the folder's images: {', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"
        raise InputError(f"{source} does not match its image folder{hint}:\n  " + "\n  ".join(shown))


@dataclass(frozen=True)
class _FolderRow:
    """One image file as a dataset row; the image is opened only when the row is read, so a large
    folder is never held in memory (the store reads one batch at a time)."""

    path: Path
    prompt: str
    labels: dict

    @property
    def id(self) -> str:
        return self.path.stem

    def to_dict(self) -> dict:
        image = Image.open(self.path)
        image.load()  # read now (the file may change); its mode stays: prepare composites transparency
        return {"id": self.id, "scene": self.id, "image": image, "prompt": self.prompt, **self.labels}


def _check_labels(config: SweepConfig, table: pd.DataFrame) -> None:
    """Targets and control columns exist, and every class has two examples, before extraction."""
    spec = config.probes
    for column in (*spec.targets, *spec.control_by):
        if column not in table:
            raise InputError(f"{column!r} is not a column of the dataset; it has {sorted(table.columns)}")
    for target in spec.targets:
        encode_labels(table[target].to_numpy(), f"target {target!r}")


def _labels_of(row: Any) -> dict:
    """A row's label columns without opening its image."""
    if isinstance(row, _FolderRow):
        return {"id": row.id, **row.labels}
    return {k: v for k, v in row.items() if k != "image"}


# --- probes -----------------------------------------------------------------------------------
def _tower_features(towers) -> dict[str, torch.Tensor]:
    """Vision-tower and projector states averaged over their tokens: ``[N, d]`` per hook."""
    if towers is None:
        return {}
    features = {}
    for hook in towers.hooks:
        states = towers[hook]
        features[hook] = states.float().mean(1) if states.ndim == 3 else states
    return features


def _probe(config: SweepConfig, features: dict, meta: pd.DataFrame, out: Path, progress: bool,
           digests: dict[str, str | None]) -> pd.DataFrame:
    spec = config.probes
    per_layer = {h: x for h, x in features.items() if not h.endswith(HEAD_HOOKS)}
    per_head = {h: x for h, x in features.items() if h.endswith(HEAD_HOOKS)}
    types = meta[list(spec.control_by)] if spec.control_by else None
    groups = meta[spec.groups].to_numpy() if spec.groups in meta else meta["id"].to_numpy()
    parts = []
    for target in tqdm(spec.targets, desc="probes", disable=not progress):
        def run(target=target):
            kw = dict(control=types is not None, control_by=types, control_design=spec.control_design,
                      groups=groups, C=spec.C, test_size=spec.test_size, seed=spec.seed,
                      n_boot=spec.n_boot, **_execution(config))
            labels = meta[target]  # a named Series: sweep's warnings name the target
            tables = [sweep(per_layer, labels, hooks=list(per_layer), **kw)]
            if per_head:
                tables.append(sweep(per_head, labels, hooks=list(per_head), heads=True, **kw))
            return pd.concat(tables, ignore_index=True).assign(target=target)
        parts.append(_cached(out / "results" / f"{target}.parquet", run))
    results = pd.concat(parts, ignore_index=True)
    results.attrs["provenance"] = dict(digests)  # kept in the Parquet file's metadata
    write_parquet(out / "results.parquet", results, "the sweep's results")
    return results


def _alignment(config: SweepConfig, image_states: dict, meta: pd.DataFrame, text) -> pd.DataFrame:
    """Per LM hook: image-token states vs text states of the same scenes, paired by scene."""
    order = pd.Series(range(len(text)), index=text.meta["scene"].to_numpy())
    pairs = torch.tensor(order.loc[meta["scene"].to_numpy()].to_numpy())  # text row of each image row
    rows = []
    for name in [h for h in image_states if h in text.hooks]:
        x, y = image_states[name].float(), text[name].float()[pairs]
        tower, layer = tower_of(name)
        for metric in config.alignment:
            try:
                value = METRICS[metric](x, y)
            except InputError:  # e.g. the placeholder's embedding: the same for every image
                value = float("nan")
            rows.append(dict(hook=name, tower=tower, layer=layer, metric=metric, value=value))
    return pd.DataFrame(rows)


def _cka_map(features: dict) -> pd.DataFrame | None:
    vision = {tower_of(h)[1]: x for h, x in features.items() if tower_of(h)[0] == "vision"}
    lm = {tower_of(h)[1]: x for h, x in features.items()
          if tower_of(h)[0] == "lm" and h.endswith("hook_resid_post")}
    if not vision or not lm:
        return None
    return alignment.cka_map(vision, lm)


# --- files ------------------------------------------------------------------------------------
def _cached(path: Path, compute) -> pd.DataFrame:
    """Read a table written by an earlier run, or compute and write it atomically."""
    if path.exists():
        return pd.read_parquet(path)
    table = compute()
    if table is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(path, table, f"table {path.name}")
    return table


def _figure_results(results: pd.DataFrame, out: Path, digests: dict[str, str | None]) -> dict[str, Path]:
    figures = {}
    chance = results.groupby("target")["chance"].first()
    text = _png_text(digests)
    for target, part in results.groupby("target"):
        figures[f"{target}_layers"] = save_figure(viz.layer_curves(part, chance=float(chance[target])),
                                                  out / "figures" / f"{target}_layers.png", metadata=text)
        if part["head"].notna().any():
            figures[f"{target}_heads"] = save_figure(viz.head_heatmap(part, target=target),
                                                     out / "figures" / f"{target}_heads.png", metadata=text)
    return figures
