"""The generic adapter: any image-text-to-text model of transformers that follows the common
structure (a decoder-only language model whose layers self-attend, a vision tower, a projector and
an image placeholder token whose embeddings are replaced by image features), without an adapter
written for its family.

What a family adapter knows from reading the family's code, this adapter discovers from the loaded
model, or assumes:

* Module paths are found in the module tree: the language model's layers are the ``ModuleList``
  with ``text_config.num_hidden_layers`` entries outside the vision tower; the embeddings and the
  unembedding are ``get_input_embeddings()`` / ``get_output_embeddings()``; the final norm is the
  layers' sibling; the vision layers are the ``ModuleList`` with the vision config's depth inside a
  module named like a vision tower; the projector is the child named like one.
* Image positions are the runs of the placeholder token. A run whose length matches the grid the
  processor reports (``image_grid_thw`` with the vision config's ``spatial_merge_size``) or is a
  perfect square becomes a row-major spatial grid; any other run is a non-spatial row of tokens
  (``spatial=False``), so image maps, which need a spatial grid, refuse it. A square run of learned
  queries (a resampler's outputs) is indistinguishable from a patch grid here: the warning says so.
* Capabilities take the defaults (residual writes that add up linearly, no cross-attention, no
  features added outside attention), except that layers which normalise their own writes (sandwich
  norms) are declared non-linear, and a final soft cap or logit scale is read from the text
  config's ``final_logit_softcapping`` / ``logit_scale``.

:func:`lvlm_probe.load` warns with what was discovered and assumed. Models that do not fit raise
:class:`~lvlm_probe.errors.UnsupportedModelError` naming why: encoder-decoder models, models whose
images become discrete codebook tokens, and language models with layers that do not self-attend.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LayoutError, UnsupportedModelError
from ..layout import ImageGrid, ImageLayout, grid_from_run
from .base import Family

# Names transformers gives the parts of a VLM (lower case, matched against a module's own name).
_VISION_PARTS = ("vision_tower", "visual", "vision_model", "image_tower", "vision_encoder", "vision")
_PROJECTOR_PARTS = ("multi_modal_projector", "mm_projector", "connector", "projector", "merger",
                    "visual_projection", "vision_projection", "aligner")
_ATTENTION = ("self_attn", "attention", "attn", "self_attention")
_ATTENTION_OUT = ("o_proj", "out_proj", "dense", "wo", "proj")
_MLP = ("mlp", "feed_forward", "ffn")
_RESID_MID = ("post_attention_layernorm", "ffn_norm", "pre_feedforward_layernorm", "ln_2", "norm2")
_FINAL_NORM = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
# Norms applied to a layer's own attention or MLP output before it joins the residual stream.
_WRITE_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_self_attn_layernorm")
# Config attributes of models whose images are quantised into codebook tokens of the vocabulary.
_CODEBOOK_CONFIGS = ("vq_config", "vqmodel_config", "vq_model_config")


def unsupported_reason(config) -> str | None:
    """Why a model cannot be read as tokens of a decoder-only language model, or None."""
    if getattr(config, "is_encoder_decoder", False) or getattr(
            config, "use_decoder_only_language_model", True) is False:
        return ("it is an encoder-decoder model (or its language model is, e.g. Flan-T5): its answer is decoded from an encoder's states by "
                "cross-attention, so there is no single token sequence holding image, prompt and "
                "answer positions for lvlm_probe's layouts, hiding and residual-stream analyses")
    codebook = next((a for a in _CODEBOOK_CONFIGS if getattr(config, a, None) is not None), None)
    if codebook is not None and getattr(config, "vision_config", None) is None:
        return (f"its images become discrete tokens ({codebook}: an image quantiser maps them to "
                "codebook ids in the vocabulary), not continuous features replacing placeholder "
                "tokens, so there is no vision tower or projector to hook and no image placeholder "
                "run to lay out")
    return None


class Generic(Family):
    """Adapter for a model without a family adapter, configured from the loaded model.

    Not registered under a name (``lp.families.names()`` lists the first-class families): it is what
    :func:`lvlm_probe.families.for_config` falls back on for an image-text-to-text class that has no
    adapter, and :meth:`discover` fills in its module paths once the model exists.
    """

    hf_classes: tuple[str, ...] = ()

    def __init__(self, config) -> None:
        self.name = "generic"
        self.model_type = getattr(config, "model_type", None)
        self.architecture = (getattr(config, "architectures", None) or [None])[0]
        self.text_config_attr = "text_config" if hasattr(config, "text_config") else ""
        self.discovered: dict[str, Any] = {}

    def text_config(self, config) -> Any:
        return getattr(config, self.text_config_attr) if self.text_config_attr else config

    def n_vision_layers(self, config) -> int:
        vision = self.vision_config(config)
        return int(getattr(vision, "num_hidden_layers", None) or vision.depth)

    # --- discovery -----------------------------------------------------------------------------
    def discover(self, hf: nn.Module) -> Generic:
        """Find the module paths in ``hf`` and warn with what was found and assumed.

        Raises:
            UnsupportedModelError: naming the part of the common structure the model lacks.
        """
        config = hf.config
        where = f"{type(hf).__name__} (model_type {self.model_type!r})"
        names = {module: name for name, module in hf.named_modules()}
        text = self.text_config(config)
        n_layers = int(text.num_hidden_layers)
        vision = getattr(config, "vision_config", None)
        if vision is None:
            raise UnsupportedModelError(f"{where} has no vision_config: the generic adapter needs a "
                                        "vision tower whose features replace image placeholder tokens")
        n_vision = int(getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", 0) or 0)
        lists = [(name, m) for name, m in hf.named_modules() if isinstance(m, nn.ModuleList)]
        in_vision = [(name, m) for name, m in lists if _is_vision(name)]
        outside = [(name, m) for name, m in lists if not _is_vision(name) and len(m) == n_layers]
        # a decoder's layers hold an attention module; nested lists (experts) do not
        outside = [(name, m) for name, m in outside if _child(m[0], _ATTENTION + ("linear_attn", "mixer"))]
        if not outside:
            raise UnsupportedModelError(
                f"{where}: found no list of {n_layers} decoder layers (text_config.num_hidden_layers) "
                "outside the vision tower; the generic adapter needs a decoder-only language model")
        self.lm_layers, layers = min(outside, key=lambda item: item[0].count("."))
        without = [i for i, layer in enumerate(layers) if _child(layer, _ATTENTION) is None]
        if without:
            raise UnsupportedModelError(
                f"{where}: language-model layers {without} have no self-attention module (linear "
                "attention, state-space or convolution layers mix tokens without an attention mask), "
                "so the generic adapter could not hide image or prompt positions from them; this "
                "model needs a family adapter")
        first = layers[0]
        self.lm_attn = _child(first, _ATTENTION)
        attention = first.get_submodule(self.lm_attn)
        out = _child(attention, _ATTENTION_OUT)
        if out is None:
            raise UnsupportedModelError(f"{where}: found no output projection in {self.lm_layers}.0."
                                        f"{self.lm_attn} (looked for {', '.join(_ATTENTION_OUT)})")
        self.lm_attn_out = f"{self.lm_attn}.{out}"
        qkv = tuple(_child(attention, (n,)) for n in ("q_proj", "k_proj", "v_proj"))
        self.lm_qkv = qkv if all(qkv) else Family.lm_qkv
        mlp = _child(first, _MLP)
        if mlp is None:
            raise UnsupportedModelError(f"{where}: found no MLP in {self.lm_layers}.0 (looked for "
                                        f"{', '.join(_MLP)})")
        self.lm_mlp = mlp
        # None for layers whose attention and MLP read one normalised input in parallel
        self.lm_resid_mid = _child(first, _RESID_MID)
        parent = self.lm_layers.rpartition(".")[0]
        norm = _child(hf.get_submodule(parent), _FINAL_NORM) if parent else None
        if norm is None:
            raise UnsupportedModelError(f"{where}: found no final norm beside {self.lm_layers}")
        self.lm_norm = f"{parent}.{norm}"
        self.lm_embed = names[hf.get_input_embeddings()]
        head = hf.get_output_embeddings()
        if head is None:
            raise UnsupportedModelError(f"{where} has no output embeddings (lm_head)")
        self.lm_head = names[head]
        towers = [(name, m) for name, m in in_vision if len(m) == n_vision]
        self.vision_layers = min(towers, key=lambda item: item[0].count("."))[0] if towers else None
        self.projector = tuple(
            name for name, _ in hf.named_modules()
            if name.rpartition(".")[2] in _PROJECTOR_PARTS and not _is_vision(name.rpartition(".")[0])
            and not any(name.startswith(p + ".") for p in _projector_parents(hf))
        )
        if not self.projector:
            raise UnsupportedModelError(
                f"{where}: found no projector outside the vision tower (looked for modules named "
                f"{', '.join(_PROJECTOR_PARTS)}); the generic adapter needs one to hook where image "
                "features enter the language model")
        sandwich = [n for n in _WRITE_NORMS if _child(first, (n,))]
        if sandwich:
            self.nonlinear_writes = (f"its layers normalise their own writes ({', '.join(sandwich)}) "
                                     "before adding them to the residual stream")
        self.discovered = {
            "lm_layers": self.lm_layers, "lm_attn_out": self.lm_attn_out, "lm_mlp": self.lm_mlp,
            "lm_norm": self.lm_norm, "lm_embed": self.lm_embed, "lm_head": self.lm_head,
            "vision_layers": self.vision_layers, "projector": self.projector,
        }
        found = ", ".join(f"{k}={v!r}" for k, v in self.discovered.items())
        warnings.warn(
            f"{where} has no lvlm_probe family adapter; using the generic adapter. Discovered: "
            f"{found}. Assumed: image positions are the runs of placeholder token "
            f"{self.image_token_id(config, None)}; a run matching the processor's image_grid_thw or "
            "of square length is read as a row-major patch grid (a square number of learned queries "
            "would be misread as one), other runs as non-spatial tokens; no separators, tiles or "
            "thumbnails; residual writes "
            + ("do not add up linearly (sandwich norms); " if sandwich else "add up linearly; ")
            + "no final logit soft cap, cross-attention or image features added outside attention. "
            "A family adapter (docs/architecture.md, 'Adding a family') lifts these assumptions.",
            GenericAdapterWarning, stacklevel=3,
        )
        return self

    def final_logit_softcap(self, config) -> float | None:
        cap = getattr(self.text_config(config), "final_logit_softcapping", None)
        return float(cap) if cap is not None else None

    def final_logit_scale(self, config) -> float | None:
        scale = getattr(self.text_config(config), "logit_scale", None)
        return float(scale) if scale is not None else None

    def image_token_id(self, config, processor) -> int:
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        if processor is None or getattr(processor, "image_token_id", None) is None:
            raise UnsupportedModelError(
                f"{self.architecture}: neither its config (image_token_id, image_token_index) nor its "
                "processor names an image placeholder token")
        return int(processor.image_token_id)

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """The example's placeholder runs, as many per image, each a grid when its shape is known.

        Raises:
            LayoutError: when the runs cannot be shared equally among the example's images.
        """
        n = len(image_ids)
        if n == 0:
            if placeholders.numel():
                raise LayoutError(f"{placeholders.numel()} image placeholder tokens but no image")
            return []
        runs = placeholder_runs(placeholders)
        if len(runs) == 1 and n > 1 and placeholders.numel() % n == 0:
            runs = list(placeholders.split(placeholders.numel() // n))  # images back to back
        if len(runs) % n:
            raise LayoutError(f"{len(runs)} runs of image placeholders (lengths "
                              f"{[r.numel() for r in runs]}) do not split among {n} images")
        per_image = len(runs) // n
        reported = inputs.get("image_grid_thw")
        merge = int(getattr(self.vision_config(config), "spatial_merge_size", 1) or 1)
        layouts = []
        for k, image in enumerate(image_ids):
            own = runs[k * per_image:(k + 1) * per_image]
            shape = None
            if reported is not None and per_image == 1:
                t, h, w = (int(v) for v in reported[image])
                shape = (t * h // merge, w // merge)
            grids = tuple(_grid(run, shape, name="patches" if per_image == 1 else f"run{j}")
                          for j, run in enumerate(own))
            layouts.append(ImageLayout(index=k, grids=grids))
        return layouts


class GenericAdapterWarning(UserWarning):
    """The generic adapter is in use: what it discovered and what it assumed."""


def placeholder_runs(positions: Tensor) -> list[Tensor]:
    """Split sorted positions into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = (positions.diff() != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def _grid(run: Tensor, shape: tuple[int, int] | None, name: str) -> ImageGrid:
    """A spatial grid when the run has the reported shape or a square length, else a row of
    non-spatial tokens."""
    if shape is not None and shape[0] * shape[1] == run.numel():
        return grid_from_run(run, *shape, name=name)
    side = math.isqrt(run.numel())
    if side * side == run.numel():
        return grid_from_run(run, side, side, name=name)
    return grid_from_run(run, 1, run.numel(), name=name, spatial=False)


def _is_vision(path: str) -> bool:
    return any(part in _VISION_PARTS for part in path.split("."))


def _child(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` that is a direct child of ``module``."""
    children = dict(module.named_children())
    return next((c for c in candidates if c in children), None)


def _projector_parents(hf: nn.Module) -> list[str]:
    """Projector paths that contain other projector-named modules (keep the outermost only)."""
    found = [n for n, _ in hf.named_modules() if n.rpartition(".")[2] in _PROJECTOR_PARTS]
    return [n for n in found if any(o.startswith(n + ".") for o in found)]
