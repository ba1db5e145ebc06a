"""Credit for an answer among the prompt, the image and the model's parametric knowledge.

The score ``s`` of a target token is its log-odds against a foil (``log p(target) - log p(foil)``)
or, without a foil, its log-probability, at the last position. The two players are the image and
the prompt; the template (BOS, role markers) always stays. ``v(S)`` is the score with only the
players in ``S`` present, a removed player's tokens hidden from every query at every layer of the
language model (positions kept, so rotary positions do not move: the image masking of
Bias-Driven Hallucination Sampling). Then

* ``prior = v({})``: what the model says from the template and its weights alone;
* ``image``, ``prompt``: the two players' exact Shapley values,
  ``image = (v(I) - v({}) + v(I, P) - v(P)) / 2`` and likewise for the prompt;
* ``full = v(I, P)``, and ``prior + prompt + image = full`` exactly.

All four coalitions of a batch run as one batched forward pass. Families whose image enters
through cross-attention (``image_mode == "cross_attention"``, e.g. Mllama) have no image positions
to hide: the image is removed the way their adapter declares (``hide_images`` and
``image_write_hooks``; Mllama: the rows' cross-attention mask and cross-attention outputs zeroed,
which equals the model's own forward pass without the image). Instead of removing the image, ``ablation="mean"`` or ``"noise"``
replace its pixels with the batch's mean pixels or with Visual Contrastive Decoding's diffusion
noise (Leng et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from ..hooks import attention
from ..hooks.patching import editing
from .groups import group_mask, repeat_inputs
from .results import AttributionResult, legacy_calls, moved_to_keywords, number
from .targets import Answer, target_ids

COALITIONS = ("full", "image", "prompt", "empty")  # players present: both, image, prompt, none
ABLATIONS = ("mask", "mean", "noise")


def diffusion_noise(pixels: Tensor, step: int, generator: torch.Generator) -> Tensor:
    """Visual Contrastive Decoding's forward-diffusion noise (Leng et al. 2024, ``vcd_add_noise.py``):
    ``sqrt(a_t) x + sqrt(1 - a_t) eps`` with their 1000-step sigmoid beta schedule."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, dim=0)[step]
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device, pixels.dtype)
    return alpha_bar.sqrt().to(pixels.dtype) * pixels + (1 - alpha_bar).sqrt().to(pixels.dtype) * noise


@dataclass(frozen=True, repr=False)  # AttributionResult.__repr__ prints a summary
class SourceSplit(AttributionResult):
    """The split of a batch's target scores; every tensor is ``[batch]`` (float32, on the CPU).

    Attributes:
        prior, prompt, image, full: see the module docstring; ``prior + prompt + image == full``.
        values: ``v(S)`` of every coalition in ``COALITIONS``.
        ablation: how removed players were removed.
        targets, foils: the scored tokens per example, decoded (foils None for log-probabilities);
            with their ids and the layouts, see
            :class:`~lvlm_probe.attribution.results.AttributionResult`.
    """

    prior: Float[Tensor, " batch"]
    prompt: Float[Tensor, " batch"]
    image: Float[Tensor, " batch"]
    full: Float[Tensor, " batch"]
    values: dict[str, Tensor]
    ablation: str

    def shares(self) -> pd.DataFrame:
        """One row per example: the four values, and each source's share of the total absolute
        credit (``|prior| + |prompt| + |image|``)."""
        table = pd.DataFrame({"example": range(len(self.full)), "target": self.targets,
                              "foil": self.foils if self.foils else None,
                              "prior": self.prior.numpy(), "prompt": self.prompt.numpy(),
                              "image": self.image.numpy(), "full": self.full.numpy()})
        total = table[["prior", "prompt", "image"]].abs().sum(axis=1).where(lambda t: t > 0)
        for source in ("prior", "prompt", "image"):
            table[f"{source}_share"] = table[source].abs() / total
        return table

    def _summary(self) -> list[str]:
        """The ablation, the mean of each value over the examples and the mean share of each
        source (examples without credit have no share and are left out of its mean)."""
        table = self.shares()
        unit = "log-odds" if self.foils else "log-probability"
        values = " ".join(f"{source} {number(table[source].mean())}" for source in ("prior", "prompt", "image", "full"))
        shares = " ".join(f"{source} {table[f'{source}_share'].mean():.2f}" for source in ("prior", "prompt", "image"))
        return [f"ablation {self.ablation!r}", f"mean {unit} {values}", f"mean shares {shares}"]

    def to_frame(self) -> pd.DataFrame:
        """One row per (example, source): ``example``, ``target``, ``foil``, ``source`` (prior,
        prompt, image, full), ``value`` and ``share`` (of the total absolute credit; NaN for full)."""
        table = self.shares()
        long = table.melt(id_vars=["example", "target", "foil"], value_vars=["prior", "prompt", "image", "full"],
                          var_name="source", value_name="value")
        shares = table.melt(id_vars=["example"], value_vars=["prior_share", "prompt_share", "image_share"],
                            var_name="source", value_name="share")
        shares["source"] = shares["source"].str.removesuffix("_share")
        long = long.merge(shares, on=["example", "source"], how="left")
        return long.sort_values(["example", "source"], key=_source_order, kind="stable", ignore_index=True)

    def plot(self, labels: list[str] | None = None, first: int | None = None) -> Figure:
        """Stacked bars per example (positive credit up, negative down) with the full score marked;
        only the ``first`` examples when given (labels beyond them are ignored)."""
        table = self.shares() if first is None else self.shares().head(first)
        labels = labels[: len(table)] if labels else None
        fig = Figure(figsize=(max(4.0, 0.45 * len(table) + 2), 3.6))
        ax = fig.subplots()
        x = range(len(table))
        up = [0.0] * len(table)
        down = [0.0] * len(table)
        for source, color in (("prior", "0.6"), ("prompt", "tab:orange"), ("image", "tab:blue")):
            values = table[source].tolist()
            bottoms = [u if v >= 0 else d for v, u, d in zip(values, up, down)]
            ax.bar(x, values, bottom=bottoms, color=color, label=source, width=0.7)
            up = [u + max(v, 0.0) for v, u in zip(values, up)]
            down = [d + min(v, 0.0) for v, d in zip(values, down)]
        ax.scatter(x, table["full"], color="black", marker="_", s=200, zorder=3, label="full")
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xticks(list(x), labels or [str(i) for i in x], fontsize=7, rotation=90 if labels else 0)
        ax.set_ylabel("log-odds" if self.foils else "log-probability")
        ax.legend(fontsize=7)
        if self.targets is not None:
            self.suptitle(fig, range(len(table)), f"source split ({self.ablation} ablation, exact Shapley): "
                                                  "prior + prompt + image = full")
        fig.tight_layout()
        return fig


def _source_order(column: pd.Series) -> Any:
    order = {"prior": 0, "prompt": 1, "image": 2, "full": 3}
    return column.map(order) if column.name == "source" else column


@legacy_calls(moved_to_keywords(3, ["foil"]), "source_split(model, batch, target, foil=..., ...)")
def source_split(
    model, batch, target: Answer | list[Answer], *, foil: Answer | list[Answer] | None = None,
    ablation: str = "mask", noise_step: int = 500, seed: int = 0,
) -> SourceSplit:
    """Split each example's target score among prior, prompt and image (exact Shapley values).

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        batch: from ``model.prepare``; every example needs image and prompt tokens.
        target: the answer to score, one for the batch or one per example: a string that adds
            exactly one token after the text the model sees, or a token id.
        foil: the alternative answer for log-odds (one or per example), or None for log-probs.
        ablation: how the image is removed: ``"mask"`` (its tokens hidden from attention),
            ``"mean"`` (the pixels replaced by the batch's mean pixels) or ``"noise"`` (VCD's
            diffusion noise at ``noise_step`` of 1000, drawn from ``seed``). The prompt is always
            hidden from attention.
        noise_step, seed: for ``"noise"``.

    Returns:
        A :class:`SourceSplit`.

    Raises:
        InputError: for an unknown ablation, a target or foil that is several tokens, a foil equal
            to the target, or an example without image or prompt tokens.

    Example:
        >>> split = lp.attribution.source_split(model, batch, target="yes", foil="no")
        >>> split.shares()[["prior", "prompt", "image", "full"]]
    """
    if ablation not in ABLATIONS:
        raise InputError(f"unknown ablation {ablation!r}; available: {ABLATIONS}")
    targets, foils, ids = target_ids(model, batch, target, foil)
    masked = ablation == "mask"
    hidden = _coalitions(model, batch, hide_image=masked)
    inputs, edits = removed_inputs(model, batch, batch.inputs, [c in ("full", "image") for c in COALITIONS],
                                   [c in ("full", "prompt") for c in COALITIONS], ablation, noise_step, seed)
    with torch.no_grad(), attention.hiding_positions(model, hidden.to(model.device)), editing(model, edits):
        logits = model.run(inputs, last_position=True).logits[:, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    n = len(batch)
    rows = torch.arange(len(COALITIONS) * n)
    ids = ids.cpu().repeat(len(COALITIONS), 1)
    score = logprobs[rows, ids[:, 0]] - (logprobs[rows, ids[:, 1]] if foils else 0.0)
    values = dict(zip(COALITIONS, score.reshape(len(COALITIONS), n)))
    v_full, v_image, v_prompt, v_empty = (values[c] for c in COALITIONS)
    image = 0.5 * ((v_image - v_empty) + (v_full - v_prompt))
    prompt = 0.5 * ((v_prompt - v_empty) + (v_full - v_image))
    return SourceSplit(prior=v_empty, prompt=prompt, image=image, full=v_full, values=values,
                       targets=targets, foils=foils, ablation=ablation, method="source_split",
                       target_ids=ids[:n, 0], foil_ids=ids[:n, 1] if foils else None,
                       layouts=list(batch.layouts))


def removed_inputs(
    model, batch, inputs: dict[str, Any], image_present: list[bool], prompt_present: list[bool],
    ablation: str, noise_step: int = 500, seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``inputs`` (the batch's, or built from them) run once per coalition, with what hiding
    positions from attention cannot remove removed where a coalition lacks it.

    The prompt: where something outside the language model's attention reads it (an
    instruction-aware image encoder), the adapter removes it there (``hide_prompt``). The image,
    with ``ablation="mask"``: where hiding its positions cannot remove it (cross-attention), the
    adapter removes it (``hide_images``) and its write hooks are zeroed; otherwise the coalitions
    without it see the batch's mean pixels or VCD's diffusion noise instead.

    Args:
        inputs: model inputs of the batch's examples, in the batch's order.
        image_present, prompt_present: per coalition, whether it holds the player.
        ablation, noise_step, seed: as in :func:`source_split`.

    Returns:
        The inputs of ``len(image_present) * len(batch)`` rows (coalition-major) and the value
        edits to apply while they run.
    """
    n = len(batch)
    repeated = repeat_inputs(inputs, len(image_present), model.family.packed_inputs)
    with_prompt = torch.tensor(prompt_present).repeat_interleave(n)
    repeated = model.family.hide_prompt(repeated, with_prompt)
    present = torch.tensor(image_present).repeat_interleave(n)
    if ablation == "mask":
        repeated = model.family.hide_images(repeated, present)
        return repeated, {name: _zeroing_rows(~present) for name in model.family.image_write_hooks(model.config)}
    pixels = batch.inputs["pixel_values"]
    axis = model.family.packed_inputs.get("pixel_values", 0)
    if ablation == "mean" and axis:
        raise InputError(f"ablation='mean' needs one image per row of pixel_values; {model.family.name} "
                         "packs the batch's images into one row")
    if ablation == "mean":
        replaced = _mean_image(pixels, batch.inputs.get("image_grid_thw"))
    else:
        replaced = diffusion_noise(pixels, noise_step, torch.Generator().manual_seed(seed))
    repeated["pixel_values"] = torch.cat([pixels if kept else replaced for kept in image_present], dim=axis)
    return repeated, {}


def _zeroing_rows(rows: Tensor):
    """An edit that zeroes a value ``[batch, ...]`` at the given rows (bool ``[batch]``)."""
    def edit(value: Tensor) -> Tensor:
        keep = (~rows).to(value.device, value.dtype).reshape((-1,) + (1,) * (value.dim() - 1))
        return value * keep
    return edit


def _mean_image(pixels: Tensor, grid_thw: Tensor | None) -> Tensor:
    """The batch's mean image in place of every image. Qwen2-VL packs all images' patches along
    one axis (``image_grid_thw`` gives each image's count): the mean is then over images, patch by
    patch, which needs images of one size."""
    if grid_thw is None:
        return pixels.float().mean(0, keepdim=True).to(pixels.dtype).expand_as(pixels)
    counts = grid_thw.prod(-1)
    if not bool((counts == counts[0]).all()):
        raise InputError(f"ablation='mean' needs images of one size here; their patch counts are "
                         f"{counts.tolist()}")
    per_image = pixels.reshape(len(counts), int(counts[0]), -1)
    return per_image.float().mean(0, keepdim=True).to(pixels.dtype).expand_as(per_image).reshape(pixels.shape)


def _coalitions(model, batch, hide_image: bool = True) -> Tensor:
    """Hidden keys ``[4 * batch, seq]`` in ``COALITIONS`` order: the prompt's tokens where the
    coalition lacks the prompt, the image's where it lacks the image (only the prompt's when
    ``hide_image`` is False: the image is then replaced, not removed). Images that are not in the
    token sequence (``image_mode == "cross_attention"``) have no keys to hide: the caller removes
    them with ``family.hide_images``."""
    prompt = group_mask(batch, "prompt")  # both players must be there
    if model.family.image_mode == "cross_attention":
        missing = [i for i, layout in enumerate(batch.layouts) if not layout.images]
        if missing:
            raise InputError(f"example {missing[0]} has no image; source_split needs both players")
        image = torch.zeros_like(prompt)
    else:
        image = group_mask(batch, "image")
    none = torch.zeros_like(image)
    image_keys = image if hide_image else none
    return torch.cat([none, prompt, image_keys, image_keys | prompt])
