"""Sweep definitions: the YAML files of ``probes/``, read and validated into :class:`SweepConfig`.

A definition names the model, the data, what to extract and what to probe; see
``probes/shapes_objects.yaml`` for every key with a comment. Unknown keys are errors (a typo must
not silently fall back to a default).

``model`` takes every name a model has elsewhere (:func:`lvlm_probe.zoo.from_name`):
``tiny:<family>``, a shipped checkpoint (``shapes-llava``), a local folder or a hub id.

Paths: the inputs a definition names (``data.folder.path``, ``data.folder.labels``) are read
relative to the definition's own folder, so a definition kept next to its images works from any
working directory; :func:`load_config` turns them into absolute paths, and a missing one is named
with its resolved path and this rule (:func:`check_folder`). ``out`` is an output location like
every ``--out`` of the command line: relative to the working directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..probing.controls import DESIGNS
from ..probing.sweeps import SweepExecutor, sweep_executors
from ..store.executor import Executor, executors


@dataclass(frozen=True)
class WorldData:
    """ShapesWorld concept scenes (``world.concepts``), as images and as text descriptions."""

    seed: int = 0
    image_size: int = 64
    n: int = 400
    objects: int = 1
    split: str = "counterfactual"


@dataclass(frozen=True)
class FolderData:
    """A user's images: every image file in ``path`` (sorted), one prompt for all, and optional
    labels from a CSV with a ``file`` column (file names relative to ``path``). In a definition,
    relative ``path`` and ``labels`` are read from the definition's folder."""

    path: str
    prompt: str = "Describe the image."
    labels: str | None = None


@dataclass(frozen=True)
class ExtractSpec:
    lm_hooks: tuple[str, ...] = ("hook_embed", "blocks.*.hook_resid_post")
    # vision-tower and projector names are captured whole and averaged over their tokens
    tower_hooks: tuple[str, ...] = ("vision.blocks.*.hook_resid_post", "projector.hook_out")
    head_hooks: tuple[str, ...] = ()
    positions: str = "image"
    reduce: str = "mean"
    batch_size: int = 16
    dtype: str | None = None


@dataclass(frozen=True)
class ProbeSpec:
    targets: tuple[str, ...] = ("color",)
    control_by: tuple[str, ...] = ("shape", "color", "size")
    control_design: str = "auto"
    groups: str = "scene"
    C: float = 1.0
    test_size: float = 0.25
    seed: int = 0
    n_boot: int = 1000


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: model, data, extraction, probes, and the optional cross-modal analyses."""

    name: str
    model: str
    out: str
    data: WorldData | FolderData
    extract: ExtractSpec = field(default_factory=ExtractSpec)
    probes: ProbeSpec = field(default_factory=ProbeSpec)
    transfer: tuple[str, ...] = ()  # targets for text -> image transfer (ShapesWorld data only)
    alignment: tuple[str, ...] = ()  # metrics between image and text states: cka, mutual_knn, cosine
    device: str | None = None
    dtype: str | None = None
    # how the run executes, not what it computes: "local" or "ray" (extraction and probes), any
    # name registered for both extraction and sweeps
    backend: str = "local"
    ray_address: str | None = None

    @property
    def has_text(self) -> bool:
        return bool(self.transfer or self.alignment)


def _build(cls: type, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{where} must be a mapping, got {type(raw).__name__}: {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise InputError(f"{where}: {err}") from err


def check_backend(backend: Any, ray_address: str | None) -> tuple[Executor, SweepExecutor, dict[str, Any]]:
    """The executors a definition's ``backend`` names for its extractions and its sweeps, with the
    options checked, and the options given (``ray_address`` when set).

    Raises:
        InputError: a backend that is not registered for both, or an option it does not take.
        MissingDependencyError: the backend's dependencies (Ray) are not installed.
    """
    options = {"ray_address": ray_address}
    extraction = executors.resolve(backend)
    executors.check(extraction, options)
    sweeping = sweep_executors.resolve(backend)
    return extraction, sweeping, sweep_executors.check(sweeping, options)


RELATIVE_RULE = "relative paths in a sweep definition are read from the definition's folder"


def _from_definition(value: str | None, definition: Path) -> str | None:
    """An input path of a definition, absolute: a relative one is joined to the definition's
    folder (not the working directory). ``~`` is the user's home, as in a shell."""
    if value is None:
        return None
    expanded = os.path.expanduser(str(value))
    return os.path.abspath(os.path.join(definition.parent, expanded))


def check_folder(data: FolderData) -> None:
    """Raise an InputError naming a folder or labels file of ``data`` that does not exist, with
    its resolved path and the rule that resolved it; so a sweep fails on a wrong path before any
    model is loaded.

    Raises:
        InputError: ``data.path`` is not a folder, or ``data.labels`` is not a file.
    """
    if not Path(data.path).is_dir():
        raise InputError(f"data.folder.path {data.path!r} is not a folder ({RELATIVE_RULE}); "
                         "expected the folder that holds the images")
    if data.labels is not None and not Path(data.labels).is_file():
        raise InputError(f"data.folder.labels {data.labels!r} is not a file ({RELATIVE_RULE}); "
                         "expected a CSV with a 'file' column")


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep definition.

    ``data.folder.path`` and ``data.folder.labels`` are read relative to the definition's folder
    and returned absolute (a definition stored next to its images runs from any directory);
    ``out`` stays relative to the working directory, as every ``--out`` of the command line.
    ``model`` is any name :func:`lvlm_probe.zoo.from_name` takes, ``tiny:<family>`` included.
    Whether the folder exists is checked when the sweep runs (:func:`check_folder`), so a
    template with placeholder paths still reads.

    Raises:
        InputError: for a missing file, invalid YAML, unknown or missing keys, a ``model`` that
            is not a non-empty string.

    Example:
        >>> config = load_config("probes/shapes_objects.yaml")
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no sweep definition at {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    for key in ("model", "data"):
        if key not in raw:
            raise InputError(f"{path}: missing required key {key!r}")
    data = raw.pop("data")
    if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in ("world", "folder"):
        raise InputError(f"{path}: data must hold exactly one of 'world' or 'folder', got {data!r}")
    kind, spec = next(iter(data.items()))
    data_obj = _build(WorldData if kind == "world" else FolderData, spec, f"{path}: data.{kind}")
    if isinstance(data_obj, FolderData):
        if not isinstance(data_obj.path, str) or not data_obj.path.strip():
            raise InputError(f"{path}: data.folder.path must be a folder's path, got {data_obj.path!r}")
        data_obj = replace(data_obj, path=_from_definition(data_obj.path, path),
                           labels=_from_definition(data_obj.labels, path))
    if not isinstance(raw["model"], str) or not raw["model"].strip():
        raise InputError(f"{path}: model must be a name such as 'tiny:<family>', a shipped checkpoint, a folder "
                         f"or a hub id; got {raw['model']!r}")
    raw.setdefault("name", path.stem)
    raw.setdefault("out", f"runs/{raw['name']}")
    extract = _build(ExtractSpec, raw.pop("extract", None), f"{path}: extract")
    probes = _build(ProbeSpec, raw.pop("probes", None), f"{path}: probes")
    config = _build(SweepConfig, {**raw, "data": None, "extract": None, "probes": None}, str(path))
    config = SweepConfig(**{**{f.name: getattr(config, f.name) for f in fields(SweepConfig)},
                            "data": data_obj, "extract": extract, "probes": probes})
    try:
        check_backend(config.backend, config.ray_address)
    except InputError as err:
        raise InputError(f"{path}: {err}") from err
    if probes.control_design not in DESIGNS:
        raise InputError(f"{path}: unknown probes.control_design {probes.control_design!r}; "
                         f"expected one of {DESIGNS}")
    unknown = sorted(set(config.alignment) - {"cka", "mutual_knn", "cosine"})
    if unknown:
        raise InputError(f"{path}: unknown alignment metric(s) {unknown}; expected cka, mutual_knn, cosine")
    if config.has_text and not isinstance(config.data, WorldData):
        raise InputError(f"{path}: transfer and alignment need text descriptions of the scenes, "
                         "which only data.world provides")
    return config
