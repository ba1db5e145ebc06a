"""Patch- and word-level maps of a target's score, with captum's algorithms.

Features are the cells of each image's heatmap grid (``ImageLayout.grid``) and the words of the
prompt (all their sub-tokens together); the template and any other image tokens (tiles beside the
base grid, row separators) always stay. The score is the one of :func:`source_split` (log-odds of
target against foil, else log-probability, at the last position). Methods:

* ``"ablation"``: captum's ``FeatureAblation``: each feature removed alone, hidden from every query
  at every layer as in :func:`source_split`;
* ``"shapley"``: captum's ``ShapleyValueSampling`` over the same removals; the values of one example
  add up to ``score(all) - score(none)`` exactly (every sampled permutation telescopes);
* ``"ig"``: captum's ``IntegratedGradients`` along a path that moves each feature's tokens in the
  language model's input embeddings (after image features are merged) from a baseline, the mean
  over the example's image cells (for a cell) or prompt words (for a word), to their value;
  ``.delta`` is captum's completeness error. This is not pixel-space IG from a black image: the
  vision tower and projector are not on the path.
* ``"kernelshap"``: captum's ``KernelShap`` over the same removals (a weighted linear fit to
  sampled coalitions; ``n_samples`` coalitions);
* ``"attention"``: the attention from the last position to each feature's tokens, averaged over
  heads and layers (no gradient, one forward pass);
* ``"rollout"``: attention rollout (Abnar & Zuidema 2020): per layer the head-averaged pattern
  mixed half and half with the identity (the residual connection), rows renormalised, multiplied
  through the layers; the last position's row, summed over each feature's tokens.

Scores map back onto each image's grid (``.scores`` for the first image, ``.grids`` for all).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from captum.attr import FeatureAblation, IntegratedGradients, KernelShap, ShapleyValueSampling
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from ..hooks import attention
from .groups import repeat_inputs
from .results import AttributionResult, legacy_calls, moved_to_keywords, seeded
from .targets import Answer, target_ids

METHODS = ("ablation", "shapley", "kernelshap", "ig", "attention", "rollout")
# What each method's scores are, for figure titles.
DESCRIPTIONS = {
    "ablation": "feature ablation (each cell or word hidden from attention alone)",
    "shapley": "Shapley value sampling (cells and words hidden from attention)",
    "kernelshap": "KernelSHAP (cells and words hidden from attention)",
    "ig": "integrated gradients on the LM's input embeddings from a group-mean baseline (each cell or "
          "word moves from the mean of the example's cells or words; not pixel IG)",
    "attention": "attention from the last position, mean over heads and layers (no target)",
    "rollout": "attention rollout from the last position (no target)",
}


@dataclass(frozen=True)
class Features:
    """The features of one example: which sequence positions each one covers."""

    positions: list[Tensor]
    names: list[str]
    cells: list[tuple[int, int, int]]  # (image, row, col) of each image feature, in order
    grids: list[tuple[int, int]]
    n_image: int


@dataclass(frozen=True)
class ImageMap(AttributionResult):
    """Maps of a batch.

    Attributes:
        scores: ``[batch, rows, cols]`` of each example's first image (NaN where an example's grid
            is smaller than the batch's largest).
        grids: per example, one ``[rows, cols]`` array per image.
        words: per example, ``(word, score)`` of each prompt word.
        delta: IG's completeness error per example (else None).
        images: the examples' first images, for :meth:`plot`.
        method: the method used (one of ``METHODS``); targets, foils, their ids and the layouts:
            see :class:`~lvlm_probe.attribution.results.AttributionResult`.
    """

    scores: Tensor
    grids: list[list[np.ndarray]]
    words: list[list[tuple[str, float]]]
    delta: Tensor | None = None
    images: list = field(default_factory=list, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row per (example, feature): ``example``, ``target``, ``foil``, ``method``, ``kind``
        (``"cell"`` or ``"word"``), ``image``, ``row``, ``col`` (cells), ``word`` (words) and
        ``value``."""
        answers = self.answers()
        rows = []
        for i, per_image in enumerate(self.grids):
            for k, grid in enumerate(per_image):
                for (r, c), value in np.ndenumerate(grid):
                    rows.append(dict(example=i, kind="cell", image=k, row=r, col=c, word=None, value=float(value)))
            for word, value in self.words[i]:
                rows.append(dict(example=i, kind="word", image=None, row=None, col=None, word=word,
                                 value=float(value)))
        table = pd.DataFrame(rows, columns=["example", "kind", "image", "row", "col", "word", "value"])
        table = table.merge(answers[["example", "target", "foil"]], on="example", how="left")
        table.insert(3, "method", self.method)
        return table[["example", "target", "foil", "method", "kind", "image", "row", "col", "word", "value"]]

    def plot(self, example: int = 0) -> Figure:
        """The first image with the map overlaid, and the prompt words coloured by their scores."""
        grid = self.grids[example][0]
        fig = Figure(figsize=(7.0, 3.6))
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        limit = float(np.nanmax(np.abs(grid))) or 1.0
        if self.images and self.images[example] is not None:
            image = self.images[example]
            left.imshow(image)
            extent = (0, image.size[0], image.size[1], 0)
            shown = left.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.55, extent=extent,
                                interpolation="nearest")
        else:
            shown = left.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
        left.set_xticks([])
        left.set_yticks([])
        left.set_title(f"{self.method}: image cells", fontsize=8)
        fig.colorbar(shown, ax=left, fraction=0.046)
        words = self.words[example]
        wlimit = max([abs(s) for _, s in words] + [1e-12])
        right.set_axis_off()
        x, y = 0.0, 0.9
        for word, score in words:
            color = colormaps["RdBu_r"](0.5 + 0.4 * score / wlimit)  # the map's colours, kept readable
            right.text(x, y, word, fontsize=9, bbox=dict(facecolor=color, edgecolor="none", pad=1.5),
                       transform=right.transAxes)
            x += 0.03 + 0.022 * len(word)
            if x > 0.85:
                x, y = 0.0, y - 0.12
        right.set_title("prompt words", fontsize=8)
        self.suptitle(fig, example, f"image map: {DESCRIPTIONS.get(self.method, self.method)}", fontsize=7)
        fig.tight_layout()
        return fig


def features(layout) -> Features:
    """One feature per cell of every image's heatmap grid, then one per prompt word."""
    positions, names, cells, grids = [], [], [], []
    for img in layout.images:
        grid = img.grid
        if grid is None:
            grids.append((0, 0))
            continue
        rows, cols = grid.shape
        grids.append((rows, cols))
        for r in range(rows):
            for c in range(cols):
                positions.append(grid.positions[r, c].reshape(1))
                names.append(f"image{img.index}[{r},{c}]")
                cells.append((img.index, r, c))
    n_image = len(positions)
    prompt = layout.groups["prompt"]
    for match in re.finditer(r"\w+", layout.prompt):
        start, end = match.span()
        keep = (layout.prompt_spans[:, 0] < end) & (layout.prompt_spans[:, 1] > start)
        if bool(keep.any()):
            positions.append(prompt[keep])
            names.append(match.group())
    return Features(positions, names, cells, grids, n_image)


@legacy_calls(moved_to_keywords(3, ["foil"]), "image_map(model, batch, target, foil=..., method=...)")
def image_map(
    model, batch, target: Answer | list[Answer], *, foil: Answer | list[Answer] | None = None,
    method: str = "ig", n_steps: int = 256, n_samples: int = 25, seed: int = 0,
) -> ImageMap:
    """Score every image cell and prompt word of each example for the target (see module docstring).

    The features are the cells of each image's grid and the prompt's words. The score is the
    target's log-odds against the foil (else its log-probability) at the last position.

    ``method="ig"`` (the default) is integrated gradients in the language model's input-embedding
    space, not in pixel space: along the path, the embeddings of each feature's tokens move from a
    group-mean baseline (the mean over the example's image cells, for a cell; over its prompt
    words, for a word) to their actual value, and the gradient is taken with respect to those
    gates. It is not pixel IG from a black image (the vision tower and projector are not on the
    path), and its zero is "this cell looks like the average cell", not "no image".

    Args:
        model: an :class:`~lvlm_probe.LVLM` whose images enter the token sequence.
        batch: from ``model.prepare``.
        target: the answer scored, one or one per example (as in :func:`source_split`).
        foil: an alternative answer for log-odds, or None for the target's log-probability.
        method: one of ``METHODS``: ``"ig"`` (above), ``"ablation"``, ``"shapley"``,
            ``"kernelshap"`` (features hidden from attention), ``"attention"``, ``"rollout"``
            (attention weights: the target is validated but does not change the map).
        n_steps: IG's integration steps (trapezoid rule). The score can change steeply along the
            path (attention saturating); 256 keep the completeness error under 1% on shapes-llava.
        n_samples: Shapley sampling's permutations; KernelShap's coalitions (at least twice the
            feature count).
        seed: for the sampled methods (their draws never touch torch's global random state).

    Returns:
        An :class:`ImageMap`.

    Raises:
        InputError: for an unknown method, a family whose images are not in the sequence, an
            example without grid cells, or bad targets.

    Example:
        >>> maps = lp.attribution.image_map(model, batch, target="red", method="ablation")
        >>> maps.scores[0]   # [rows, cols]
        >>> maps.plot(0)
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {METHODS}")
    if model.family.image_mode != "tokens":
        raise InputError(f"image_map needs image tokens in the sequence; {model.family.name}'s images "
                         f"enter by {model.family.image_mode}")
    _check_separable(batch)
    targets, foils, ids = target_ids(model, batch, target, foil)
    grids, words, deltas = [], [], []
    for i, layout in enumerate(batch.layouts):
        feats = features(layout)
        if feats.n_image == 0:
            reason = ("its images have no spatial grid (their tokens are not laid out as image "
                      "regions, e.g. a generic adapter's non-square run)" if layout.images
                      else "it has no image")
            raise InputError(f"image maps need a spatial grid of image tokens; example {i}: {reason} "
                             f"(layout: {layout.summary()})")
        score = _Score(model, batch, i, ids[i], bool(foils), feats)
        values, delta = _attribute(score, method, len(feats.positions), n_steps, n_samples, seed)
        per_image = [np.full(g, np.nan) for g in feats.grids]
        for (img, r, c), v in zip(feats.cells, values[: feats.n_image]):
            per_image[img][r, c] = v
        grids.append(per_image)
        words.append(list(zip(feats.names[feats.n_image:], values[feats.n_image:].tolist())))
        deltas.append(delta)
    rows = max(g[0].shape[0] for g in grids)
    cols = max(g[0].shape[1] for g in grids)
    scores = torch.full((len(batch), rows, cols), float("nan"))
    for i, g in enumerate(grids):
        scores[i, : g[0].shape[0], : g[0].shape[1]] = torch.as_tensor(g[0])
    firsts = [imgs[0] if imgs else None for imgs in batch.images]
    return ImageMap(scores, grids, words, torch.tensor(deltas) if method == "ig" else None, firsts,
                    method=method, targets=targets, foils=foils, target_ids=ids[:, 0],
                    foil_ids=ids[:, 1] if foils else None, layouts=list(batch.layouts))


def _check_separable(batch) -> None:
    """Examples are scored one at a time; inputs packed across examples cannot be split."""
    n = len(batch)
    packed = [k for k, v in batch.inputs.items() if torch.is_tensor(v) and v.shape[0] != n]
    if n > 1 and packed:
        raise InputError(f"this family packs {packed} across the examples of a batch; call image_map "
                         "with one example per batch")


class _Score:
    """The target's score for feature gates ``[m, F]`` (1 = present), in one batched pass."""

    def __init__(self, model, batch, index: int, ids: Tensor, with_foil: bool, feats: Features):
        self.model, self.ids, self.with_foil, self.feats = model, ids, with_foil, feats
        self.batch, self.index = batch, index
        # the example alone (a one-example batch as it is: its inputs may be packed, see _check_separable)
        self.example = batch.inputs if len(batch) == 1 else {
            k: v[index:index + 1] if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
        length = self.batch.input_ids.shape[1]
        self.member = torch.zeros(len(feats.positions), length)  # feature x position
        for f, pos in enumerate(feats.positions):
            self.member[f, pos] = 1.0

    def inputs(self, m: int) -> dict:
        """The example's inputs, ``m`` times."""
        return repeat_inputs(self.example, m, self.model.family.packed_inputs)

    def score(self, logits: Tensor) -> Tensor:
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        value = logprobs[:, self.ids[0]]
        return value - logprobs[:, self.ids[1]] if self.with_foil else value

    def removed(self, gates: Tensor) -> Tensor:
        """Remove (hide) the tokens of features whose gate is 0."""
        hidden = ((1.0 - gates.float().cpu()) @ self.member) > 0.5
        with torch.no_grad(), attention.hiding_positions(self.model, hidden.to(self.model.device)):
            return self.score(self.model.hf(**self.inputs(len(gates))).logits).cpu()

    def scaled(self, gates: Tensor) -> Tensor:
        """Move each feature's tokens in the language model's input from a baseline (the mean of its
        group: image cells or prompt words) to their value by its gate (differentiable)."""
        member = self.member.to(gates.device)
        gate = 1.0 - member.sum(0) + gates @ member  # [m, L]: 1 outside the features
        image = member[: self.feats.n_image].sum(0) > 0
        words = member[self.feats.n_image:].sum(0) > 0
        layer0 = self.model.module(f"{self.model.family.lm_layers}.0")

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            base = hidden.clone()
            for group in (image, words):
                if bool(group.any()):
                    base[:, group] = hidden[:, group].mean(1, keepdim=True)
            moved = base + gate[..., None].to(hidden.dtype) * (hidden - base)
            if args:
                return (moved, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": moved}

        handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return self.score(self.model.hf(**self.inputs(len(gates))).logits)
        finally:
            handle.remove()

    def patterns(self) -> Tensor:
        """``[layer, query, key]`` head-averaged attention of the example, self-attention layers."""
        names = [f"blocks.{layer}.attn.hook_pattern"
                 for layer in self.model.family.self_attention_layers(self.model.config)]
        with self.model.capture(names) as cache, torch.no_grad():
            self.model.hf(**self.inputs(1))
        return torch.stack([cache[n][0].float().mean(0) for n in names]).cpu()

    def attention_to(self) -> np.ndarray:
        pattern = self.patterns()[:, -1].mean(0)  # the last position's row, mean over layers
        return (self.member @ pattern).numpy()

    def rollout(self) -> np.ndarray:
        patterns = self.patterns()
        eye = torch.eye(patterns.shape[-1])
        flow = eye
        for layer in patterns:
            mixed = 0.5 * layer + 0.5 * eye
            flow = (mixed / mixed.sum(-1, keepdim=True)) @ flow
        return (self.member @ flow[-1]).numpy()


def _attribute(score: _Score, method: str, n_features: int, n_steps: int, n_samples: int, seed: int):
    ones = torch.ones(1, n_features)
    if method == "attention":
        return score.attention_to(), None
    if method == "rollout":
        return score.rollout(), None
    if method == "ig":
        ig = IntegratedGradients(score.scaled)
        with torch.enable_grad():
            values, delta = ig.attribute(ones.to(score.model.device), baselines=0.0 * ones.to(score.model.device),
                                         n_steps=n_steps, method="riemann_trapezoid",
                                         return_convergence_delta=True, internal_batch_size=64)
        return values[0].detach().cpu().numpy(), float(delta[0])
    mask = torch.arange(n_features)[None]
    if method == "ablation":
        values = FeatureAblation(score.removed).attribute(ones, baselines=0.0, feature_mask=mask,
                                                          perturbations_per_eval=n_features)
    elif method == "shapley":
        with seeded(seed, score.model):  # captum samples from torch's global generator
            values = ShapleyValueSampling(score.removed).attribute(ones, baselines=0.0, feature_mask=mask,
                                                                   n_samples=n_samples,
                                                                   perturbations_per_eval=n_features)
    else:
        with seeded(seed, score.model):
            values = KernelShap(score.removed).attribute(ones, baselines=0.0, feature_mask=mask,
                                                         n_samples=max(n_samples, 2 * n_features),
                                                         perturbations_per_eval=n_features)
    return values[0].numpy(), None
