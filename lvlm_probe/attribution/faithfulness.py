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

import numpy as np
import pandas as pd
import torch

from .image_map import ImageMap, _Score, features, image_map
from .targets import Answer, target_ids


def deletion_insertion(model, batch, maps: ImageMap, target: Answer | list[Answer],
                       foil: Answer | list[Answer] | None = None, *, random_orders: int = 3,
                       seed: int = 0) -> pd.DataFrame:
    """Deletion and insertion curves of each example's first-image map, with random-order references.

    Args:
        model, batch: as given to :func:`image_map`.
        maps: its result.
        target, foil: the answers the map explains.
        random_orders: random cell orders averaged for the reference curves.
        seed: for the random orders.

    Returns:
        DataFrame with one row per (example, step): ``fraction`` of cells removed (deletion) or
        present (insertion), ``deletion``, ``insertion``, ``random_deletion``, ``random_insertion``
        scores. The prompt words always stay.

    Example:
        >>> curves = deletion_insertion(model, batch, maps, target="red")
        >>> curves.groupby("example")[["deletion", "random_deletion"]].mean()   # areas under the curves
    """
    _, foils, ids = target_ids(model, batch, target, foil)
    rng = np.random.default_rng(seed)
    rows = []
    for i, layout in enumerate(batch.layouts):
        feats = features(layout)
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
    return pd.DataFrame(rows)


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


def randomization_check(model, batch, target: Answer | list[Answer], foil: Answer | list[Answer] | None = None,
                        *, method: str = "ig", seed: int = 0, **kwargs) -> pd.DataFrame:
    """Rank correlation between each example's map on the model and on a copy whose language
    model's layers are re-initialised (the vision tower and projector keep their weights).

    Returns:
        DataFrame with ``example`` and ``spearman`` (of the first image's cells); near zero when
        the map depends on the model, near one when it does not.
    """
    trained = image_map(model, batch, target, foil, method=method, seed=seed, **kwargs)
    randomized = copy.copy(model)
    randomized.hf = copy.deepcopy(model.hf)
    torch.manual_seed(seed)
    layers = randomized.hf.get_submodule(model.family.lm_layers)
    for module in layers.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.weight.std().item() or 0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    shuffled = image_map(randomized, batch, target, foil, method=method, seed=seed, **kwargs)
    rows = []
    for i in range(len(batch)):
        a = pd.Series(trained.grids[i][0].reshape(-1)).rank()
        b = pd.Series(shuffled.grids[i][0].reshape(-1)).rank()
        rows.append(dict(example=i, spearman=float(np.corrcoef(a, b)[0, 1])))
    return pd.DataFrame(rows)
