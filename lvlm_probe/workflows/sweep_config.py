"""Sweep definitions: the YAML files of ``probes/``, read and validated into :class:`SweepConfig`.

A definition names the model, the data, what to extract and what to probe; see
``probes/shapes_objects.yaml`` for every key with a comment. Unknown keys are errors (a typo must
not silently fall back to a default).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
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
    labels from a CSV with a ``file`` column (file names relative to ``path``)."""

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


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep definition.

    Relative ``out`` and ``data.path`` are resolved against the current directory, as a user
    running ``lvlm-probe sweep probes/x.yaml`` from the project expects.

    Raises:
        InputError: for a missing file, invalid YAML, unknown or missing keys.

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
