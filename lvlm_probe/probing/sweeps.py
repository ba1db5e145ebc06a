"""Probe sweeps: one linear probe per (hook, layer[, head]), all fitted in one batched optimisation.

:func:`sweep` answers "at which layer of which tower does this concept become linearly decodable",
with a control task (Hewitt & Liang 2019) so that a probe that merely memorises is not mistaken
for one that decodes: selectivity = accuracy - control accuracy. :func:`transfer` is the direct
test of cross-modal alignment: probes trained on one modality's activations (text descriptions of
scenes) are tested on the other's (the image tokens of the same scenes), layer by layer.

Both return tidy DataFrames, one row per probe, which :func:`lvlm_probe.viz.layer_curves` plots.

:func:`sweep` fits its hooks through a :class:`SweepExecutor` chosen with ``backend=``: by name
from :data:`sweep_executors` (``"local"``, registered here; ``"ray"``, registered by
:mod:`lvlm_probe.distributed`), or passed as an object.
"""
from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from torch import Tensor

from ..errors import InputError
from ..hooks.names import pattern_regex
from ..store.executor import Backend, Registry
from .batched import fit_many
from .controls import control_labels, type_overlap
from .splits import group_split
from .stats import bootstrap_ci, wilson_ci

COLUMNS = ["hook", "tower", "layer", "head", "target", "accuracy", "ci_low", "ci_high",
           "control_accuracy", "selectivity", "selectivity_ci_low", "selectivity_ci_high", "chance",
           "n_train", "n_test"]
# Below this many test examples a sweep warns: a 95% Wilson interval is then at least about
# +-0.15 wide around 75% accuracy, too wide to rank neighbouring layers.
SMALL_TEST = 30
HEAD_HOOKS = (".hook_z", ".hook_result", ".hook_q", ".hook_k", ".hook_v")
# the most training-feature bytes (float32, with their standardised copy) one batched fit holds;
# a sweep with more is fitted in chunks of probes (the results do not depend on the chunks)
FIT_BYTES = 2 << 30


# the order of the towers in a forward pass, for "earliest layer"
TOWERS = ("vision", "qformer", "projector", "lm")


def best_layers(results: pd.DataFrame) -> pd.DataFrame:
    """Per target, the per-layer probe (not per-head) with the highest accuracy; ties go to the
    higher selectivity, then to the earliest layer in the forward pass (vision tower, Q-Former,
    projector, language model), so equal numbers always give the same answer.

    Args:
        results: a table of :func:`sweep` rows (``COLUMNS``), several targets allowed.
    """
    layers = results[results["head"].isna()].assign(
        _tower=lambda t: t["tower"].map({name: k for k, name in enumerate(TOWERS)}).fillna(len(TOWERS)),
        _layer=lambda t: t["layer"].fillna(-1),
        _selectivity=lambda t: t["selectivity"].fillna(float("-inf")))
    ordered = layers.sort_values(["target", "accuracy", "_selectivity", "_tower", "_layer"],
                                 ascending=[True, False, False, True, True], kind="stable")
    return ordered.groupby("target", sort=False).head(1).drop(columns=["_tower", "_layer", "_selectivity"])


def tower_of(hook: str) -> tuple[str, int | None]:
    """(tower, layer) of a canonical hook name: ``vision.blocks.3...`` -> ("vision", 3)."""
    prefix = hook.split(".", 1)[0]
    tower = prefix if prefix in ("vision", "qformer", "projector") else "lm"
    match = re.search(r"blocks\.(\d+)\.", hook)
    if hook.startswith("vision.global_blocks."):  # Mllama's global encoder, after the local one
        tower = "vision_global"
    return tower, int(match.group(1)) if match else None


def _source(source: Any, target: str | Sequence | np.ndarray, groups: str | Sequence | None):
    """(get(hook) -> Tensor [N, ...], hook names, labels [N], groups [N] or None)."""
    if isinstance(source, Mapping):
        if isinstance(target, str):
            raise InputError("with a dict of arrays, target must be the label array itself, "
                             f"got the column name {target!r}")
        labels = np.asarray(target)
        group_values = None if groups is None or isinstance(groups, str) else np.asarray(groups)
        arrays = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v) for k, v in source.items()}
        return arrays.__getitem__, list(arrays), labels, group_values, None
    meta = getattr(source, "meta", None)
    if meta is None:
        raise InputError(f"source must be an ActivationStore or a dict {{hook: array}}, got {type(source).__name__}")
    if isinstance(target, str):
        if target not in meta.columns:
            raise InputError(f"target {target!r} is not a column of the store; it has {list(meta.columns)}")
        labels = meta[target].to_numpy()
    else:
        labels = np.asarray(target)
    if isinstance(groups, str):
        if groups not in meta.columns:
            raise InputError(f"groups {groups!r} is not a column of the store; it has {list(meta.columns)}")
        group_values = meta[groups].to_numpy()
    else:
        group_values = None if groups is None else np.asarray(groups)
    return source.__getitem__, list(source.hooks), labels, group_values, meta


# The default control-task type: the object type, which recurs across scenes (see controls.py).
OBJECT_TYPE = ("shape", "color", "size")


def _control_types(control_by: Any, meta: pd.DataFrame | None, n: int) -> Any:
    """The control task's type of each example: meta columns by name, or given values."""
    if isinstance(control_by, str):
        control_by = [control_by]
    if isinstance(control_by, (list, tuple)) and all(isinstance(c, str) for c in control_by):
        if meta is None:
            raise InputError(f"control_by={control_by!r} names columns, but the source is a dict of "
                             "arrays; pass the type of each example as an array")
        missing = [c for c in control_by if c not in meta.columns]
        if missing:
            raise InputError(f"control_by columns {missing} are not in the store; it has {list(meta.columns)}; "
                             "pass control_by= the columns (or values) whose combination is a type")
        return meta[list(control_by)].reset_index(drop=True)
    values = (control_by.reset_index(drop=True) if isinstance(control_by, pd.DataFrame)
              else np.asarray(control_by, dtype=object))
    if len(values) != n:
        raise InputError(f"control_by has {len(values)} entries, the source {n} examples")
    return values


def select_hooks(patterns: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """The available hooks matching names or ``*`` patterns, in the source's order."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen = []
    for pattern in patterns:
        regex = pattern_regex(pattern)
        hits = [h for h in available if regex.match(h)]
        if not hits:
            raise InputError(f"no hook matches {pattern!r}; the source holds {list(available)}")
        chosen += [h for h in hits if h not in chosen]
    return [h for h in available if h in chosen]


def encode_labels(labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    keep = pd.notna(labels)
    if keep.sum() < 2:
        raise InputError(f"{what}: fewer than 2 examples carry a label")
    classes, codes = np.unique(labels[keep].astype(str), return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"{what}: the labels take a single value {classes.tolist()}; a probe needs two or more")
    counts = np.bincount(codes, minlength=len(classes))
    if (counts < 2).any():
        rare = classes[counts < 2].tolist()
        raise InputError(f"{what}: class(es) {rare} have a single example; every class needs at least "
                         "two (one to train on, one to test), so drop or merge them")
    full = np.full(len(labels), -1)
    full[keep] = codes
    return full, classes


def _features(get, hook: str, heads: bool) -> tuple[Tensor, list[int | None]]:
    """[P, N, d] features of one hook: P = 1, or one per head for per-head hooks."""
    x = get(hook)
    if x.ndim == 2:
        return x[None], [None]
    if x.ndim == 3 and heads and hook.endswith(HEAD_HOOKS):
        return rearrange(x, "n h d -> h n d"), list(range(x.shape[1]))
    raise InputError(
        f"{hook}: probes need one vector per example, got shape {tuple(x.shape)}; extract with "
        "reduce='mean' or 'last' (per-head hooks [N, head, d] need heads=True)"
    )


def sweep(
    source: Any,
    target: str | Sequence | np.ndarray,
    hooks: str | Sequence[str] = "blocks.*.hook_resid_post",
    *,
    heads: bool = False,
    control: bool = True,
    control_by: Any = OBJECT_TYPE,
    control_design: str = "auto",
    groups: str | Sequence | None = "scene",
    test_size: float = 0.25,
    C: float = 1.0,
    seed: int = 0,
    n_boot: int = 1000,
    standardize: bool = True,
    device: str | torch.device | None = None,
    max_iter: int = 500,
    backend: str | SweepExecutor = "local",
    ray_address: str | None = None,
    ray_resources: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Fit one probe per (hook, layer[, head]) for one target and report held-out accuracy.

    All probes of the call are fitted together by :func:`~lvlm_probe.probing.fit_many`: one
    batched optimisation per feature width (the layers of a tower, the heads of a layer), with the
    control-task probes beside the target probes, chunked only by a memory bound (``FIT_BYTES``). The split is
    by group (a scene is never in both train and test). The control task (Hewitt & Liang 2019)
    gives each type (``control_by``, by default the object type ``shape, color, size``, which
    recurs across scenes) a random label, balanced within each of the type's attributes so that
    no single attribute predicts it; selectivity is accuracy minus control accuracy.

    Args:
        source: an :class:`~lvlm_probe.ActivationStore` (reduced: ``[N, d]`` or ``[N, head, d]``
            per hook) or a dict ``{hook: array [N, d]}``.
        target: a column of ``store.meta``, or the label array (a named ``pd.Series`` gives the
            table's ``target`` column and the warnings its name). Examples without a label are left out.
        hooks: names or ``*`` patterns among the source's hooks.
        heads: one probe per head for per-head hooks (``attn.hook_z``, ``hook_result``, ...).
        control: also fit the control task and report selectivity.
        control_by: the control task's type: meta column names, or ``[N]`` values (see
            :mod:`lvlm_probe.probing.controls` for how to choose it).
        control_design: how types get their labels: ``"auto"``, ``"factorial"`` or
            ``"independent"`` (see :func:`~lvlm_probe.probing.control_labels`).
        groups: the column (or array) that keeps related examples on one side of the split;
            None splits by example. A store without the column falls back to ``id``.
        test_size: fraction of groups held out.
        C: inverse L2 strength, as scikit-learn's.
        seed: for the split, the control labels and the bootstrap.
        n_boot: bootstrap resamples (by group) for the 95% interval of selectivity (0: none).
        standardize: standardise features per probe on the training set (layers differ in scale).
        device: where to fit (default: the activations' device).
        max_iter: optimiser iterations per probe.
        backend: ``"local"``, or ``"ray"`` to fit groups of hooks in parallel Ray tasks (same
            split, seeds and solver, so the same results; see :mod:`lvlm_probe.distributed`). A
            store is read by the workers from its folder; arrays are sent to them.
            Any name registered in :data:`sweep_executors`, or a :class:`SweepExecutor` object.
        ray_address: the Ray cluster (``"auto"``, ``"ray://head:10001"``); None uses the running
            session or starts a local one for this call.
        ray_resources: Ray resources per task, default ``{"num_cpus": 1}``.

    Returns:
        DataFrame with ``COLUMNS``, one row per probe; ``chance`` is the majority-class accuracy
        on the test set. ``ci_low, ci_high`` is the 95% Wilson score interval of accuracy
        (:func:`~lvlm_probe.probing.stats.wilson_ci`, with the test groups' design effect), which
        does not collapse at 100%; ``selectivity_ci_low, selectivity_ci_high`` a cluster bootstrap
        of selectivity (paired: probe and control on the same resamples), NaN without a control,
        with ``n_boot=0``, or where every resample gives the same value (then with a warning).

    Warns:
        UserWarning: once per call, when the test set has fewer than ``SMALL_TEST`` (30) examples,
            naming ``n_test``; when some selectivity intervals are degenerate.

    Raises:
        InputError: for an unknown target, hook pattern or column, unusable labels, or an
            unknown backend (the message lists the registered ones).
        MissingDependencyError: ``backend="ray"`` without Ray installed.

    Example:
        >>> results = lp.probing.sweep(store, target="color", hooks="blocks.*.hook_resid_post")
        >>> results[["layer", "accuracy", "selectivity"]]
    """
    executor = sweep_executors.resolve(backend)
    options = sweep_executors.check(executor, {"ray_address": ray_address, "ray_resources": ray_resources})
    if isinstance(groups, str) and getattr(source, "meta", None) is not None and groups not in source.meta:
        groups = "id"
    get, available, labels, group_values, meta = _source(source, target, groups)
    chosen = select_hooks(hooks, available)
    # a column name, or a label array's own name (a pandas Series has one); the table's target column
    named = isinstance(target, str) or isinstance(getattr(target, "name", None), str)
    name = target if isinstance(target, str) else (target.name if named else "target")
    codes, classes = encode_labels(labels, f"target {name!r}")
    keep = np.flatnonzero(codes >= 0)
    group_values = keep if group_values is None else np.asarray(group_values)[keep]
    train, test = group_split(group_values, test_size=test_size, seed=seed)
    test_groups = group_values[test]
    train, test = keep[train], keep[test]
    y = torch.as_tensor(codes)
    y_control = None
    if control:
        types = _control_types(control_by, meta, len(codes))
        types = types.iloc[keep] if isinstance(types, pd.DataFrame) else types[keep]
        controls = np.full(len(codes), -1)
        controls[keep] = np.asarray(control_labels(codes[keep], by=types, seed=seed, design=control_design))
        y_control = torch.as_tensor(controls)
        overlap = type_overlap(_types_full(types, keep, len(codes)), train, test)
        if overlap < 0.5:
            warnings.warn(f"only {overlap:.0%} of the control task's test types occur in training, "
                          "so control accuracy is near chance by construction; choose a control_by "
                          "that recurs across scenes", stacklevel=2)
    chance = float(np.bincount(codes[test], minlength=len(classes)).max() / len(test))
    if len(test) < SMALL_TEST:
        about = f"target {name!r}: " if named else ""
        warnings.warn(f"{about}only {len(test)} test examples (n_test < {SMALL_TEST}); "
                      "accuracies this close to a handful of images have wide intervals (see ci_low, "
                      "ci_high) and neighbouring layers cannot be ranked; label more images or raise "
                      "test_size", UserWarning, stacklevel=2)
    job = HookJob(y, y_control, train, test, test_groups, n_boot, seed, name, chance, heads,
                  dict(C=C, standardize=standardize, device=device, max_iter=max_iter))
    parts = executor.run(SweepPlan(job, chosen, get, source, options))
    table = _typed(pd.DataFrame([row for part in parts for row in part], columns=COLUMNS))
    if control and n_boot:
        _warn_degenerate(table, len(test), stacklevel=3)
    return table


def _warn_degenerate(table: pd.DataFrame, n_test: int, stacklevel: int) -> None:
    """One warning naming the probes whose selectivity bootstrap was degenerate (NaN bounds)."""
    flat = table[table["selectivity_ci_low"].isna()]
    if len(flat):
        names = [f"{h}" + ("" if pd.isna(k) else f"[head {k}]") for h, k in zip(flat["hook"], flat["head"])]
        warnings.warn(f"selectivity interval is degenerate (every bootstrap resample of the {n_test} "
                      f"test examples gives the same value) for {names[:5]}"
                      f"{' ...' if len(names) > 5 else ''}; their selectivity_ci_low/high are NaN",
                      UserWarning, stacklevel=stacklevel)


@dataclass(frozen=True)
class HookJob:
    """Everything a sweep fits per hook except the features: labels, split, seeds, settings.

    One hook's probes depend only on this and its features, which is what lets a
    :class:`SweepExecutor` fit hooks in separate processes with identical results.
    """

    y: Tensor
    y_control: Tensor | None
    train: np.ndarray
    test: np.ndarray
    test_groups: np.ndarray
    n_boot: int
    seed: int
    target: str
    chance: float
    heads: bool
    fit: dict[str, Any]

    def rows(self, get: Any, hook: str) -> list[dict[str, Any]]:
        """The result rows of one hook's probes (one per layer, or per head)."""
        return self.rows_many(get, [hook])[0]

    def rows_many(self, get: Any, hooks: list[str]) -> list[list[dict[str, Any]]]:
        """Each hook's result rows, every probe of the hooks fitted together.

        The probes of all hooks of one feature width (the layers of a tower, the heads of a layer)
        and, beside them, their control-task probes on the same feature matrices (shared, not
        copied) are one batched optimisation, cut into chunks only to keep a chunk's training
        features under ``FIT_BYTES``. The probes of :func:`~lvlm_probe.probing.fit_many` are
        independent, so each equals its own fit up to solver tolerance. Intervals of every probe
        come from one vectorised pass (the same bootstrap draws for all).
        """
        features = [_features(get, hook, self.heads) for hook in hooks]
        slots = [(k, p) for k, (x, _) in enumerate(features) for p in range(len(x))]
        tasks = [self.y] if self.y_control is None else [self.y, self.y_control]
        by_width: dict[int, list[tuple[int, int]]] = {}
        for k, p in slots:
            by_width.setdefault(features[k][0].shape[-1], []).append((k, p))
        right: dict[tuple[int, tuple[int, int]], Tensor] = {}  # (task, slot) -> [m] right answers
        for members in by_width.values():
            matrices = [features[k][0][p] for k, p in members]
            correct = _correct_many(matrices, tasks, self.train, self.test, **self.fit)
            for t in range(len(tasks)):
                for i, slot in enumerate(members):
                    right[t, slot] = correct[t * len(members) + i]
        correct = torch.stack([right[0, s] for s in slots])
        accuracy, low, high = (v.numpy() for v in wilson_ci(correct, groups=self.test_groups))
        none = np.full(len(slots), np.nan)
        ctrl, sel_low, sel_high = none, none, none
        if self.y_control is not None:
            control = torch.stack([right[1, s] for s in slots])
            ctrl = control.double().mean(1).numpy()
            if self.n_boot:
                sel_low, sel_high = _selectivity_ci(correct, control, self.n_boot, self.seed, self.test_groups)
        rows: list[list[dict[str, Any]]] = [[] for _ in hooks]
        for i, (k, p) in enumerate(slots):
            tower, layer = tower_of(hooks[k])
            rows[k].append(dict(hook=hooks[k], tower=tower, layer=layer, head=features[k][1][p],
                                target=self.target, accuracy=accuracy[i], ci_low=low[i], ci_high=high[i],
                                control_accuracy=ctrl[i], selectivity=accuracy[i] - ctrl[i],
                                selectivity_ci_low=sel_low[i], selectivity_ci_high=sel_high[i],
                                chance=self.chance, n_train=len(self.train), n_test=len(self.test)))
        return rows


@dataclass(frozen=True)
class SweepPlan:
    """What a :class:`SweepExecutor` fits: one :class:`HookJob` on each of ``hooks``.

    Attributes:
        job: labels, split, seeds and settings, the same for every hook.
        hooks: the hooks to fit, in the table's order.
        features: ``features(hook)`` is a hook's ``[N, ...]`` tensor in this process.
        source: the sweep's source as passed (an :class:`~lvlm_probe.ActivationStore`, whose
            ``root`` other processes can open, or a dict of arrays), for executors that read the
            features elsewhere.
        options: this executor's options, as given to the call.
    """

    job: HookJob
    hooks: list[str]
    features: Callable[[str], Tensor]
    source: Any
    options: dict[str, Any] = field(default_factory=dict)


class SweepExecutor(Backend, ABC):
    """Fits a sweep's hooks; subclass it to add a backend (and register it in :data:`sweep_executors`)."""

    @abstractmethod
    def run(self, plan: SweepPlan) -> list[list[dict[str, Any]]]:
        """Each hook's result rows (:meth:`HookJob.rows`), in ``plan.hooks`` order."""


class LocalSweepExecutor(SweepExecutor):
    """This process: every hook's probes in one batched fit per feature width
    (:meth:`HookJob.rows_many`)."""

    name = "local"

    def run(self, plan: SweepPlan) -> list[list[dict[str, Any]]]:
        return plan.job.rows_many(plan.features, plan.hooks)


sweep_executors: Registry[SweepExecutor] = Registry(SweepExecutor)
"""The sweep executors by name; ``"local"`` is registered here, ``"ray"`` by :mod:`lvlm_probe.distributed`."""
sweep_executors.register(LocalSweepExecutor())


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """Integer columns that may be missing (the projector's layer, a layer probe's head) as
    nullable integers, so a table reads back from Parquet with the same dtypes."""
    for column in ("layer", "head"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def _types_full(types: Any, keep: np.ndarray, n: int) -> np.ndarray:
    """Types of the kept examples at their original indices (type_overlap indexes by example)."""
    table = types if isinstance(types, pd.DataFrame) else pd.DataFrame(np.asarray(types, dtype=object).reshape(len(keep), -1))
    keys = table.astype(str).agg("|".join, axis=1).to_numpy()
    full = np.empty(n, dtype=object)
    full[keep] = keys
    return full


def _correct_many(matrices: list[Tensor], tasks: list[Tensor], train: np.ndarray, test: np.ndarray,
                  **fit) -> Tensor:
    """``[T * P, m]`` whether each probe, fitted on the ``train`` rows, is right on each ``test``
    row: one probe per (task, feature matrix), task-major; all in one :func:`fit_many` call."""
    train_t, test_t = torch.as_tensor(train), torch.as_tensor(test)
    fitted = [m[train_t] for m in matrices]
    tested = [m[test_t] for m in matrices]
    n, d = fitted[0].shape
    # one chunk's features in float32, and the standardised copy of them
    chunk = max(1, FIT_BYTES // (2 * 4 * n * d))
    probes = fit_many(fitted * len(tasks), torch.stack([y[train_t] for y in tasks for _ in matrices]),
                      chunk_size=chunk, **fit)
    return probes.correct(tested * len(tasks), torch.stack([y[test_t] for y in tasks for _ in matrices])).cpu()


def _selectivity_ci(correct: Tensor, control: Tensor, n_boot: int, seed: int,
                    groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[P]`` bounds of the paired cluster bootstrap of selectivity: the per-example difference
    of the probe's and the control's right answers, resampled by test group. Degenerate intervals
    are NaN; the caller warns once for the whole sweep."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, low, high = bootstrap_ci(correct.double() - control.double(), n_boot=n_boot, seed=seed,
                                    groups=groups)
    return low.numpy(), high.numpy()


def transfer(
    train_source: Any,
    test_source: Any,
    target: str,
    hooks: str | Sequence[str] = "blocks.*.hook_resid_post",
    *,
    both: bool = True,
    C: float = 1.0,
    center: bool = True,
    device: str | torch.device | None = None,
    max_iter: int = 500,
    n_boot: int = 1000,
    seed: int = 0,
    names: tuple[str, str] = ("text", "image"),
) -> pd.DataFrame:
    """Cross-modal transfer per layer: probes trained on one source, tested on the other.

    Typically ``train_source`` holds the activations of text-only descriptions of scenes (at the
    prompt's positions) and ``test_source`` the image-token activations of the same scenes. Where
    transfer accuracy rises above chance, the two modalities' representations of the concept share
    a linear code: they are aligned.

    Image and text activations sit in different regions of the residual stream (the modality gap:
    different means and norms) even where they encode a concept along the same directions. With
    ``center=True`` each source is standardised with its own statistics before the probe sees it,
    so transfer measures shared directions rather than a shared offset; ``center=False`` uses the
    training source's statistics for both.

    Args:
        train_source, test_source: stores, or ``(dict of arrays, labels)`` tuples, with common hooks.
        target: the label column both sources carry (e.g. ``"color"``).
        hooks: names or ``*`` patterns.
        both: also the reverse direction.
        center: standardise each source with its own mean and scale (see above).
        names: what to call the two sources in the ``direction`` column.
        n_boot, seed: not used (``ci_low, ci_high`` is the closed-form Wilson score interval);
            accepted so that existing calls keep working.

    Returns:
        DataFrame with ``hook, tower, layer, target, direction, accuracy, ci_low, ci_high,
        within_accuracy, chance, n_train, n_test``; ``within_accuracy`` is the probe's accuracy on
        its own training source, an upper reference; ``ci_low, ci_high`` the 95% Wilson score
        interval of ``accuracy``.

    Raises:
        InputError: when the sources share no hook or their labels share no value.

    Example:
        >>> texts = lp.extract(model, world.concepts(300, modality="text"), hooks, positions="prompt", out="t/")
        >>> images = lp.extract(model, world.concepts(300, modality="image"), hooks, positions="image", out="i/")
        >>> lp.probing.transfer(texts, images, target="color")
    """
    rows = []
    directions = [(train_source, test_source, f"{names[0]} -> {names[1]}")]
    if both:
        directions.append((test_source, train_source, f"{names[1]} -> {names[0]}"))
    for fit_on, test_on, direction in directions:
        get_a, hooks_a, labels_a, _, _ = _source_pair(fit_on, target)
        get_b, hooks_b, labels_b, _, _ = _source_pair(test_on, target)
        common = [h for h in select_hooks(hooks, hooks_a) if h in hooks_b]
        if not common:
            raise InputError(f"the two sources share no hook among {hooks!r}: {hooks_a} vs {hooks_b}")
        values = [v for v in np.concatenate([labels_a, labels_b]) if pd.notna(v)]
        index = {c: i for i, c in enumerate(sorted({str(v) for v in values}))}
        ya, yb = _codes(labels_a, index), _codes(labels_b, index)
        a_rows, b_rows = np.flatnonzero(ya >= 0), np.flatnonzero(yb >= 0)
        if not set(ya[a_rows]) & set(yb[b_rows]):
            raise InputError(f"the sources' {target!r} labels share no value")
        chance = float(np.bincount(yb[b_rows]).max() / len(b_rows))
        pairs = {}
        for hook in common:
            xa, xb = get_a(hook)[a_rows], get_b(hook)[b_rows]
            if xa.ndim != 2 or xb.ndim != 2:
                raise InputError(f"{hook}: transfer needs [N, d] per source, got {tuple(xa.shape)} "
                                 f"and {tuple(xb.shape)}")
            pairs[hook] = (_standardized(xa), _standardized(xb)) if center else (xa, xb)
        # the hooks of one width are fitted in one batched optimisation (independent probes)
        by_width: dict[int, list[str]] = {}
        for hook, (xa, _) in pairs.items():
            by_width.setdefault(xa.shape[-1], []).append(hook)
        found = {}
        for hooks_of_width in by_width.values():
            train_x = [pairs[h][0] for h in hooks_of_width]
            test_x = [pairs[h][1] for h in hooks_of_width]
            probes = fit_many(train_x, torch.as_tensor(ya[a_rows]), C=C, standardize=not center,
                              device=device, max_iter=max_iter)
            correct = probes.correct(test_x, torch.as_tensor(yb[b_rows]))
            within = probes.accuracy(train_x, torch.as_tensor(ya[a_rows]))
            accuracy, low, high = wilson_ci(correct)
            for p, hook in enumerate(hooks_of_width):
                found[hook] = (float(accuracy[p]), float(low[p]), float(high[p]), float(within[p]))
        for hook in common:
            accuracy, low, high, within = found[hook]
            tower, layer = tower_of(hook)
            rows.append(dict(hook=hook, tower=tower, layer=layer, target=target, direction=direction,
                             accuracy=accuracy, ci_low=low, ci_high=high, within_accuracy=within,
                             chance=chance, n_train=len(a_rows), n_test=len(b_rows)))
    return _typed(pd.DataFrame(rows))


def _standardized(x: Tensor) -> Tensor:
    x = x.double()
    return ((x - x.mean(0)) / x.std(0).clamp_min(1e-12)).float()


def _source_pair(source: Any, target: str):
    if isinstance(source, tuple) and len(source) == 2:
        arrays, labels = source
        return _source(arrays, labels, None)
    return _source(source, target, None)


def _codes(labels: np.ndarray, index: dict[str, int]) -> np.ndarray:
    return np.array([index[str(v)] if pd.notna(v) else -1 for v in labels])
