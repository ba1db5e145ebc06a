"""An ipywidgets explorer of one example: attention, logit lens and per-token attribution, linked.

:func:`explore` runs the model once (:func:`lvlm_probe.circuits.snapshot.snapshot`) and then only
slices what it cached: moving the layer slider, choosing a head or a query position, or switching
the image panel between attention and the logit lens redraws the figure without running the model.

Panels:

* the image with, per grid cell, the selected head's attention from the query position (or the
  layer's logit-lens top token at each image position, shaded by its probability);
* the text tokens coloured by their direct contribution, through the selected head at the query
  position, to the answer's logit (red pushes the answer, blue pushes against it);
* the answer's source split: prior, prompt, image and the full score.

The figure is rendered to PNG into an ``ipywidgets.Image``, so it updates in any Jupyter front end
and can be checked without a browser (``explorer.image.value``, :meth:`Explorer.shown`).

Example:
    >>> explorer = lp.widgets.explore(model, batch, target="red")
    >>> explorer                     # displays the controls and the figure
    >>> explorer.layer.value = 2     # programmatic control, as a slider move
"""
from __future__ import annotations

import io
import textwrap
from typing import Any

import ipywidgets
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .attribution.targets import Answer
from .circuits.snapshot import Snapshot, snapshot

MODES = ("attention", "logit lens")
ALL_HEADS = -1  # the head selector's value for "all heads"


class Explorer:
    """Controls and a figure over a :class:`~lvlm_probe.circuits.snapshot.Snapshot`.

    Attributes:
        snapshot: the cached values.
        layer, head, position, mode: the controls (``IntSlider``, ``Dropdown``, ``Dropdown``,
            ``ToggleButtons``); set their ``value`` to drive the view from code.
        image: the ``ipywidgets.Image`` holding the rendered PNG.
        widget: the whole view (``VBox``).
        figure: the last rendered Figure.
    """

    def __init__(self, snap: Snapshot):
        self.snapshot = snap
        last = max(i for i, g in enumerate(snap.groups) if g != "pad")
        self.layer = ipywidgets.IntSlider(value=snap.n_layers - 1, min=0, max=snap.n_layers - 1,
                                          description="layer", continuous_update=False)
        self.head = ipywidgets.Dropdown(
            options=[("all heads", ALL_HEADS)] + [(f"head {h}", h) for h in range(snap.n_heads)],
            value=ALL_HEADS, description="head")
        self.position = ipywidgets.Dropdown(
            options=[(f"{p}: {_clean(t)} ({g})", p) for p, (t, g) in enumerate(zip(snap.tokens, snap.groups))
                     if g != "pad"],
            value=last, description="query")
        self.mode = ipywidgets.ToggleButtons(options=MODES, value=MODES[0], description="image")
        self.image = ipywidgets.Image(format="png")
        self.widget = ipywidgets.VBox([ipywidgets.HBox([self.layer, self.head]),
                                       ipywidgets.HBox([self.position, self.mode]), self.image])
        self.figure: Figure | None = None
        for control in (self.layer, self.head, self.position, self.mode):
            control.observe(self._changed, names="value")
        self.render()

    # --- state ---------------------------------------------------------------------------------
    def shown(self) -> dict[str, Any]:
        """The values the current figure shows: ``cells`` (``[rows, cols]`` attention or lens
        probability per image cell), ``lens`` (top tokens per cell, logit-lens mode), ``tokens`` and
        ``scores`` (text tokens up to the query and their contributions), ``image_score`` (the image
        tokens' summed contribution), ``scale`` (the largest contribution of any token, image
        tokens included, which the colours are relative to), ``split`` (prior, prompt, image, full)."""
        snap, layer, query = self.snapshot, self.layer.value, self.position.value
        head = None if self.head.value == ALL_HEADS else self.head.value
        lens = None
        if self.mode.value == "attention":
            cells = snap.cells(snap.attention(layer, head, query))
        else:
            cells = snap.cells(snap.lens_probs[layer])
            lens = None if snap.grid is None else np.array(
                [_clean(snap.lens_tokens[layer][p]) for p in snap.grid.reshape(-1).tolist()]
            ).reshape(tuple(snap.grid.shape))
        contributions = snap.contributions(layer, head, query)
        keep = [p for p, g in enumerate(snap.groups) if g in ("prompt", "template") and p <= query]
        split = None
        if snap.split is not None:
            split = {k: float(getattr(snap.split, k)[0]) for k in ("prior", "prompt", "image", "full")}
        image = [p for p, g in enumerate(snap.groups) if g == "image"]
        seen = [p for p, g in enumerate(snap.groups) if g != "pad" and p <= query]
        return dict(cells=cells, lens=lens, tokens=[_clean(snap.tokens[p]) for p in keep],
                    scores=contributions[keep].numpy(), image_score=float(contributions[image].sum()),
                    scale=float(contributions[seen].abs().max()), split=split)

    # --- drawing -------------------------------------------------------------------------------
    def render(self) -> Figure:
        """Draw the figure for the current control values and put its PNG in :attr:`image`."""
        fig = self.draw()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        self.figure = fig
        self.image.value = buffer.getvalue()
        return fig

    def draw(self) -> Figure:
        """The figure for the current control values (not rendered)."""
        snap, view = self.snapshot, self.shown()
        layer, query = self.layer.value, self.position.value
        head = "all heads" if self.head.value == ALL_HEADS else f"head {self.head.value}"
        fig = Figure(figsize=(10.5, 3.4), layout="constrained")
        left, middle, right = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 1.6, 0.8]})
        self._draw_image(left, view, f"L{layer} {head}, query {query} {_clean(snap.tokens[query])!r}")
        if snap.writes is not None:
            vs = f" vs {snap.foil!r}" if snap.foil else ""
            what = (f"direct effect on {snap.target!r}{vs} via L{layer} {head}; "
                    f"image tokens {view['image_score']:+.3g}")
            method = "attention, per-token direct logit attribution, source split"
        else:  # families whose writes are not linear in the heads
            what = f"attention from the query, L{layer} {head}"
            method = f"attention (no direct logit attribution: {snap.no_writes}), source split"
        _draw_tokens(middle, view["tokens"], view["scores"], view["scale"], what)
        _draw_split(right, view["split"], snap.target)
        answer = f"target {snap.target.strip()!r}" + (f" vs foil {snap.foil.strip()!r}" if snap.foil else "")
        fig.suptitle(textwrap.fill(f"{method} | Q: {snap.prompt!r} | {answer}", width=140), fontsize=8)
        return fig

    def _draw_image(self, ax, view: dict[str, Any], title: str) -> None:
        snap, cells = self.snapshot, view["cells"]
        ax.set_xticks([])
        ax.set_yticks([])
        if cells is None:
            ax.text(0.5, 0.5, "no image grid", ha="center", va="center", transform=ax.transAxes)
            return
        rows, cols = cells.shape
        extent = (0, snap.image.size[0], snap.image.size[1], 0) if snap.image is not None else None
        if snap.image is not None:
            ax.imshow(snap.image)
        if self.mode.value == "attention":
            ax.imshow(cells, cmap="magma", alpha=0.6, extent=extent, interpolation="nearest",
                      vmin=0.0, vmax=max(float(cells.max()), 1e-6))
            ax.set_title(f"attention: {title}", fontsize=8)
            return
        ax.imshow(cells, cmap="Blues", alpha=0.55, extent=extent, interpolation="nearest", vmin=0.0, vmax=1.0)
        width, height = (snap.image.size if snap.image is not None else (cols, rows))
        for (r, c), word in np.ndenumerate(view["lens"]):
            ax.text((c + 0.5) * width / cols - (0.5 if extent is None else 0),
                    (r + 0.5) * height / rows - (0.5 if extent is None else 0),
                    word[:6], ha="center", va="center", fontsize=7)
        ax.set_title(f"logit lens, layer {self.layer.value}: top token per cell", fontsize=8)

    def _changed(self, change: dict[str, Any]) -> None:
        self.render()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def __repr__(self) -> str:
        return (f"Explorer(layer={self.layer.value}, head={self.head.value}, query={self.position.value}, "
                f"mode={self.mode.value!r})")


def explore(model, batch, example: int = 0, target: Answer | None = None, foil: Answer | None = None
            ) -> Explorer:
    """An interactive view of one example: layer slider, head selector, query-position picker.

    The model runs once here; the controls only slice the cached values.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        batch: from ``model.prepare``.
        example: which example of the batch.
        target: the answer attributed (a one-token string or id); default the model's top token.
        foil: an alternative answer, to attribute the logit difference; default none.

    Returns:
        An :class:`Explorer`; display it in a notebook (it is its last expression, or
        ``display(explorer)``).

    Raises:
        InputError: for a batch that is not a Batch, an example out of range, or a bad target
            (:class:`~lvlm_probe.errors.InputError`).

    Example:
        >>> explorer = lp.widgets.explore(model, batch, example=0)
        >>> explorer.head.value = 2
    """
    return Explorer(snapshot(model, batch, example, target, foil))


def _clean(token: str) -> str:
    """A token as text: byte-level BPE's space and newline markers as characters."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n")


def _draw_tokens(ax, tokens: list[str], scores: np.ndarray, scale: float, title: str) -> None:
    ax.set_axis_off()
    # relative to the largest token of the whole sequence, so text tokens that a head ignores stay
    # white even when every text score is rounding noise
    limit = max(scale, 1e-6)
    x, y = 0.0, 0.92
    for token, score in zip(tokens, scores):
        color = colormaps["RdBu_r"](0.5 + 0.45 * float(score) / limit)
        ax.text(x, y, token.strip() or "\u2423", fontsize=8, transform=ax.transAxes,
                bbox=dict(facecolor=color, edgecolor="none", pad=1.2))
        x += 0.03 + 0.018 * max(len(token.strip()), 1)
        if x > 0.9:
            x, y = 0.0, y - 0.13
    ax.set_title(f"{title}\n(colour scale ±{limit:.3g}: the largest token)", fontsize=8)


def _draw_split(ax, split: dict[str, float] | None, target: str) -> None:
    if split is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no source split", ha="center", va="center", transform=ax.transAxes)
        return
    names = list(split)
    ax.bar(names, [split[n] for n in names], color=["0.6", "tab:orange", "tab:blue", "black"])
    for i, name in enumerate(names):
        ax.text(i, split[name], f"{split[name]:.2f}", ha="center", va="bottom" if split[name] >= 0 else "top",
                fontsize=7)
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"source split of {target!r}", fontsize=8)

