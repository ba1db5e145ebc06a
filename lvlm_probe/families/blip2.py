"""BLIP-2 (``Blip2ForConditionalGeneration``): BLIP vision tower, Q-Former, OPT language model.

The image does not enter the sequence as patches: ``num_query_tokens`` learned queries cross-attend
to the vision tower's states in the Q-Former, and their projected outputs replace that many
``<image>`` placeholders, which ``Blip2Processor`` prepends to the text (before BOS).

Layout: the placeholders form one non-spatial grid ``"queries"`` of shape ``[1, num_query_tokens]``;
``attended`` is the vision tower's patch grid ``{"patches": (p, p)}`` the Q-Former reads (it also
reads the class state in front of the patches, which is not in the grid).
"""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family


class Blip2(Family):
    name = "blip2"
    hf_classes = ("Blip2ForConditionalGeneration",)
    model_types = ("blip-2",)
    image_mode = "queries"
    layout_kind = "queries"
    multi_image = False  # one image per text: the queries of exactly one image are prepended
    requires_image = True  # forward() takes pixel_values as a required argument

    # The top-level model has no `.model`: the OPT causal LM sits at `language_model`.
    lm_layers = "language_model.model.decoder.layers"
    lm_embed = "language_model.model.decoder.embed_tokens"
    lm_norm = "language_model.model.decoder.final_layer_norm"
    lm_head = "language_model.lm_head"
    lm_attn = "self_attn"
    lm_attn_out = "self_attn.out_proj"
    # An OPT layer has no MLP submodule: fc1 -> activation -> fc2 are called inline by the layer.
    # fc2 is the MLP's output projection, so a hook on it sees the MLP's contribution to the
    # residual stream (before dropout, which is off in eval mode).
    lm_mlp = "fc2"
    lm_mlp_in: ClassVar[str] = "fc1"
    # with OPT's pre-norm layers (do_layer_norm_before, as in BLIP-2's OPT checkpoints) the
    # residual stream between attention and MLP enters final_layer_norm (flattened to [b * p, d])
    lm_resid_mid = "final_layer_norm"
    vision_layers = "vision_model.encoder.layers"
    qformer_layers: ClassVar[str] = "qformer.encoder.layer"
    projector = ("qformer", "language_projection")

    def n_qformer_layers(self, config) -> int:
        """Number of layers at ``qformer_layers``."""
        return int(config.qformer_config.num_hidden_layers)

    # BLIP-2 has no chat template. Its model card asks questions as "Question: ... Answer:" (OPT
    # variants); set "{prompt}" here for raw prompts (captioning prefixes).
    prompt_format: ClassVar[str] = "Question: {prompt} Answer:"

    def format_prompt(self, processor, prompt: str, n_images: int) -> str:
        """The prompt in the VQA format; the processor adds the query placeholders and BOS."""
        return self.prompt_format.format(prompt=prompt)

    def image_token_id(self, config, processor) -> int:
        """The ``<image>`` placeholder the model replaces (``config.image_token_index``).

        Raises:
            LayoutError: for a config without one (checkpoints converted before transformers 4.45
                prepend the queries to the embeddings instead, which this adapter does not model).
        """
        value = getattr(config, "image_token_index", None)
        if value is None:
            raise LayoutError(
                "this BLIP-2 config has no image_token_index; expected a checkpoint whose processor "
                "adds <image> query placeholders (transformers >= 4.45 conversion)"
            )
        return int(value)

    def n_query_tokens(self, config) -> int:
        return int(config.num_query_tokens)

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """The query placeholders of the example's one image as a ``[1, num_query_tokens]`` grid.

        Raises:
            LayoutError: if the sequence does not hold exactly ``num_query_tokens`` placeholders per
                image (the model does not check: too few silently drop queries).
        """
        n_query = self.n_query_tokens(config)
        expected = n_query * len(image_ids)
        if placeholders.numel() != expected:
            raise LayoutError(
                f"blip2 example {example}: expected {expected} <image> query placeholders "
                f"({len(image_ids)} image(s) x num_query_tokens={n_query}), but the sequence holds "
                f"{placeholders.numel()}"
            )
        if not image_ids:
            return []
        return [
            ImageLayout(index=k, grids=(grid_from_run(run, 1, n_query, name="queries", spatial=False),))
            for k, run in enumerate(placeholders.split(n_query))
        ]

    def attended_grid(self, config) -> dict[str, tuple[int, int]]:
        """The vision tower's patch grid, which the Q-Former's queries cross-attend to."""
        vision = self.vision_config(config)
        side = vision.image_size // vision.patch_size
        return {"patches": (side, side)}
