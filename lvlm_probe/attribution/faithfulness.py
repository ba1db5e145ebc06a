"""Faithfulness checks of image maps.

* :func:`deletion_insertion`: remove the image cells from the highest-scored down (deletion) or
  add them back to an image with every cell removed (insertion), scoring the target after each
  step; a faithful map makes deletion fall and insertion rise faster than a random order does.
  Cells are removed as everywhere in :mod:`lvlm_probe.attribution`: hidden from every query.
* :func:`randomization_check` (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): the map
  of a model whose language-model weights are re-initialised must differ from the trained
  model's; a map that survives the randomisation shows the input, not the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from .image_maps import ImageMap, _Score, features, image_map
from .results import AttributionTable, legacy_calls, moved_to_keywords, number, seeded
from .targets import Answer, target_ids


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)  # AttributionTable.__repr__ summarises it
class DeletionInsertion(AttributionTable):
    """Deletion and insertion curves (:func:`deletion_insertion`).

    Attributes:
        table: one row per (example, step): ``example``, ``step``, ``fraction``, ``deletion``,
            ``insertion``, ``random_deletion``, ``random_insertion``.
        map_method: the method of the map whose order was followed.
    """

    map_method: str = ""

    def _summary(self) -> list[str]:
        """Each curve's mean score over its steps and examples (the area under it, per step)."""
        parts = [f"map {self.map_method!r}"]
        if len(self.table):
            mean = self.table[["deletion", "random_deletion", "insertion", "random_insertion"]].mean()
            parts.append(f"mean score deletion {number(mean['deletion'])} (random {number(mean['random_deletion'])})"
                         f", insertion {number(mean['insertion'])} (random {number(mean['random_insertion'])})")
        return parts

    def figure(self) -> Figure:
        """Mean deletion and insertion curves over the examples, with the random-order references."""
        mean = self.table.groupby("fraction")[["deletion", "insertion", "random_deletion",
                                               "random_insertion"]].mean()
        fig = Figure(figsize=(5.6, 3.6))
        ax = fig.subplots()
        for column, color, style in (("deletion", "tab:blue", "-"), ("random_deletion", "tab:blue", ":"),
                                     ("insertion", "tab:orange", "-"), ("random_insertion", "tab:orange", ":")):
            ax.plot(mean.index, mean[column].to_numpy(), color=color, ls=style, label=column.replace("_", " "))
        ax.set_xlabel("fraction of image cells removed (deletion) or present (insertion)")
        ax.set_ylabel("log-odds" if self.foils else "log-probability")
        ax.legend(fontsize=7)
        self.suptitle(fig, None, f"deletion / insertion in the order of the {self.map_method} map")
        fig.tight_layout()
        return fig


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)  # AttributionTable.__repr__ summarises it
class RandomizationCheck(AttributionTable):
    """The model-randomisation check (:func:`randomization_check`).

    Attributes:
        table: ``example`` and ``spearman`` (rank correlation of the first image's cells).
        map_method: the image map's method.
    """

    map_method: str = ""

    def _summary(self) -> list[str]:
        """The rank correlations' mean and range (near zero: the map depends on the model)."""
        parts = [f"map {self.map_method!r}"]
        if len(self.table):
            rho = self.table["spearman"]
            parts.append(f"mean Spearman {number(rho.mean())} (min {number(rho.min())}, max {number(rho.max())})")
        return parts

    def figure(self) -> Figure:
        """The rank correlation per example (near zero: the map depends on the model)."""
        fig = Figure(figsize=(max(4.0, 0.4 * len(self.table) + 2), 3.4))
        ax = fig.subplots()
        ax.bar(self.table["example"].to_numpy(), self.table["spearman"].to_numpy(), color="tab:purple")
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("example")
        ax.set_ylabel("Spearman: trained vs randomised LM")
        self.suptitle(fig, None, f"randomisation check of the {self.map_method} map")
        fig.tight_layout()
        return fig


def _legacy_deletion(args: tuple, kwargs: dict):
    """``deletion_insertion(model, batch, maps, target, foil, ...)``: the map came third."""
    if len(args) < 3 or not isinstance(args[2], ImageMap):
        return None
    kwargs = dict(kwargs)
    if "maps" in kwargs:
        raise TypeError("deletion_insertion() got multiple values for argument 'maps'")
    kwargs["maps"] = args[2]
    rest = args[3:]
    if len(rest) > 1:
        if "foil" in kwargs:
            raise TypeError("deletion_insertion() got multiple values for argument 'foil'")
        kwargs["foil"] = rest[1]
    return (*args[:2], *rest[:1], *rest[2:]), kwargs, "passing the map third (or the foil positionally)"


@legacy_calls(_legacy_deletion, "deletion_insertion(model, batch, target, foil=..., maps=...)")
def deletion_insertion(model, batch, target: Answer | list[Answer], *, foil: Answer | list[Answer] | None = None,
                       maps: ImageMap | None = None, random_orders: int = 3, seed: int = 0) -> DeletionInsertion:
    """Deletion and insertion curves of each example's first-image map, with random-order references.

    Args:
        model, batch: as given to :func:`image_map`.
        target, foil: the answers the map explains.
        maps: the map whose order is followed (:func:`image_map`'s result for this target and
            foil); default: computed here with :func:`image_map`'s default method.
        random_orders: random cell orders averaged for the reference curves.
        seed: for the random orders (a NumPy generator of its own).

    Returns:
        A :class:`DeletionInsertion`; ``to_frame()`` has one row per (example, step): ``fraction``
        of cells removed (deletion) or present (insertion), ``deletion``, ``insertion``,
        ``random_deletion``, ``random_insertion`` scores. The prompt words always stay.

    Raises:
        InputError: for bad targets, or a map of another number of examples.

    Example:
        >>> curves = deletion_insertion(model, batch, target="red", maps=maps)
        >>> curves.to_frame().groupby("example")[["deletion", "random_deletion"]].mean()   # areas
    """
    targets, foils, ids = target_ids(model, batch, target, foil)
    if maps is None:
        maps = image_map(model, batch, target, foil=foil)
    if not isinstance(maps, ImageMap) or len(maps.grids) != len(batch):
        got = f"an ImageMap of {len(maps.grids)} examples" if isinstance(maps, ImageMap) else type(maps).__name__
        raise InputError(f"maps must be the ImageMap of this batch's {len(batch)} examples, got {got}")
    rng = np.random.default_rng(seed)
    rows = []
    for i, layout in enumerate(batch.layouts):
        feats = features(layout, maps.grid)  # the cells of the grid the map scored
        score = _Score(model, batch, i, ids[i], bool(foils), feats)
        first = [k for k, (img, _, _) in enumerate(feats.cells) if img == feats.cells[0][0]]
        values = maps.grids[i][0].reshape(-1)
        ranked = [first[k] for k in np.argsort(-values, kind="stable")]
        orders = [ranked] + [list(rng.permutation(first)) for _ in range(random_orders)]
        curves = [_curves(score, order, len(feats.positions)) for order in orders]
        deletion, insertion = curves[0]
        random_deletion = np.mean([c[0] for c in curves[1:]], axis=0) if random_orders else np.nan
        random_insertion = np.mean([c[1] for c in curves[1:]], axis=0) if random_orders else np.nan
        for step in range(len(first) + 1):
            rows.append(dict(example=i, step=step, fraction=step / len(first), deletion=deletion[step],
                             insertion=insertion[step],
                             random_deletion=random_deletion[step] if random_orders else np.nan,
                             random_insertion=random_insertion[step] if random_orders else np.nan))
    return DeletionInsertion(table=pd.DataFrame(rows), method="deletion_insertion", map_method=maps.method,
                             targets=targets, foils=foils, target_ids=ids[:, 0],
                             foil_ids=ids[:, 1] if foils else None, layouts=list(batch.layouts))


def _curves(score: _Score, order: list[int], n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores after removing (deletion) or adding (insertion) the cells of ``order`` one by one,
    all steps in one batched pass each."""
    steps = len(order) + 1
    delete = torch.ones(steps, n_features)
    insert = torch.ones(steps, n_features)
    insert[:, order] = 0
    for k in range(1, steps):
        delete[k:, order[k - 1]] = 0
        insert[k:, order[k - 1]] = 1
    return score.removed(delete).numpy(), score.removed(insert).numpy()


@legacy_calls(moved_to_keywords(3, ["foil"]), "randomization_check(model, batch, target, foil=..., method=...)")
def randomization_check(model, batch, target: Answer | list[Answer], *, foil: Answer | list[Answer] | None = None,
                        method: str = "ig", seed: int = 0, **kwargs) -> RandomizationCheck:
    """Rank correlation between each example's map on the model and on a copy whose language
    model's layers are re-initialised (the vision tower and projector keep their weights).

    Args:
        model, batch, target, foil: as for :func:`image_map`.
        method: the image map's method.
        seed: for the re-initialisation and the map's sampling (torch's global random state is
            left as it was).
        **kwargs: passed to :func:`image_map` (e.g. ``n_steps``).

    Returns:
        A :class:`RandomizationCheck`; ``to_frame()`` has ``example`` and ``spearman`` (of the
        first image's cells): near zero when the map depends on the model, near one when it does
        not.

    Example:
        >>> lp.attribution.randomization_check(model, batch, target="red").to_frame()
    """
    trained = image_map(model, batch, target, foil=foil, method=method, seed=seed, **kwargs)
    randomized = copy.copy(model)
    randomized.hf = copy.deepcopy(model.hf)
    layers = randomized.hf.get_submodule(model.family.lm_layers)
    with seeded(seed, randomized):
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.weight.std().item() or 0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
    shuffled = image_map(randomized, batch, target, foil=foil, method=method, seed=seed, **kwargs)
    rows = []
    for i in range(len(batch)):
        a = pd.Series(trained.grids[i][0].reshape(-1)).rank()
        b = pd.Series(shuffled.grids[i][0].reshape(-1)).rank()
        rows.append(dict(example=i, spearman=float(np.corrcoef(a, b)[0, 1])))
    return RandomizationCheck(table=pd.DataFrame(rows), method="randomization_check",
                              map_method=method,
                              targets=trained.targets, foils=trained.foils, target_ids=trained.target_ids,
                              foil_ids=trained.foil_ids, layouts=trained.layouts)
