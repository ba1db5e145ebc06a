"""InstructBLIP (``InstructBlipForConditionalGeneration``): BLIP vision tower, instruction-aware
Q-Former, Vicuna (Llama) or Flan-T5 language model; this adapter covers the decoder-only (Vicuna)
checkpoints.

As in BLIP-2 the image does not enter the sequence as patches: ``num_query_tokens`` learned queries
cross-attend to the vision tower's states in the Q-Former, and their projected outputs replace that
many ``<image>`` placeholders, which ``InstructBlipProcessor`` prepends to the text (before BOS and
before any left padding). Unlike BLIP-2, the Q-Former also reads the instruction: the processor
tokenizes the same text with the Q-Former's own BERT tokenizer (``qformer_input_ids``), and the
queries self-attend to those tokens. So the queries depend on the prompt: hiding the prompt's
positions from the language model does not remove the prompt from the query outputs.

Layout: the placeholders form one non-spatial grid ``"queries"`` of shape ``[1, num_query_tokens]``;
``attended`` is the vision tower's patch grid ``{"patches": (p, p)}`` the Q-Former reads (it also
reads the class state in front of the patches, which is not in the grid).
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family


class InstructBlip(Family):
    name = "instructblip"
    hf_classes = ("InstructBlipForConditionalGeneration",)
    model_types = ("instructblip",)
    image_mode = "queries"
    layout_kind = "queries"
    multi_image = False  # one image per text: the queries of exactly one image are prepended
    requires_image = True  # forward() takes pixel_values and qformer_input_ids as required arguments

    # The top-level model has no `.model`: the causal LM sits at `language_model`.
    lm_layers = "language_model.model.layers"
    lm_embed = "language_model.model.embed_tokens"
    lm_norm = "language_model.model.norm"
    lm_head = "language_model.lm_head"
    vision_layers = "vision_model.encoder.layers"
    qformer_layers: ClassVar[str] = "qformer.encoder.layer"
    projector = ("qformer", "language_projection")

    def n_qformer_layers(self, config) -> int:
        """Number of layers at ``qformer_layers`` (their states: the queries, then the instruction's
        Q-Former tokens)."""
        return int(config.qformer_config.num_hidden_layers)

    def format_prompt(self, processor, prompt: str, n_images: int) -> str:
        """The instruction as it is: InstructBLIP has no chat template (its model card passes the
        question alone); the processor adds the query placeholders and BOS."""
        return prompt

    def image_token_id(self, config, processor) -> int:
        """The ``<image>`` placeholder the model replaces (``config.image_token_index``).

        Raises:
            LayoutError: for a config without one (checkpoints converted before transformers 4.45
                prepend the queries to the embeddings instead, which this adapter does not model).
        """
        value = getattr(config, "image_token_index", None)
        if value is None:
            raise LayoutError(
                "this InstructBLIP config has no image_token_index; expected a checkpoint whose "
                "processor adds <image> query placeholders (transformers >= 4.45 conversion)"
            )
        return int(value)

    def n_query_tokens(self, config) -> int:
        return int(config.num_query_tokens)

    def hide_prompt(self, inputs: dict[str, Any], keep: Tensor) -> dict[str, Any]:
        """The inputs with the Q-Former's text hidden from the queries in the rows where ``keep`` is
        False: ``qformer_attention_mask`` zeroed there, so the queries read only each other and the
        image (as BLIP-2's do). The instruction is the Q-Former's whole text (no template around
        it), so its ``[CLS]``/``[SEP]`` go with it."""
        out = dict(inputs)
        mask = inputs["qformer_attention_mask"]
        out["qformer_attention_mask"] = mask * keep.to(mask.device, mask.dtype)[:, None]
        return out

    def model_inputs(self, inputs: Any) -> Any:
        """The processor's output with ``position_ids`` counted over the unpadded tokens.

        The processor pads each text before prepending the queries, so in a padded row the left
        padding lies between the queries and BOS; Llama numbers positions 0, 1, 2, ... regardless of
        the mask, which would shift the text's rotary positions by the padding. These are the ids
        ``generate`` derives from the mask (``cumsum - 1``, 0 at padding), so a padded row runs as
        the same example alone."""
        out = copy.copy(inputs)
        mask = inputs["attention_mask"]
        out["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return out

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """The query placeholders of the example's one image as a ``[1, num_query_tokens]`` grid.

        Raises:
            LayoutError: if the sequence does not hold exactly ``num_query_tokens`` consecutive
                placeholders per image (the model does not check: too few silently drop queries).
        """
        n_query = self.n_query_tokens(config)
        expected = n_query * len(image_ids)
        if placeholders.numel() != expected:
            raise LayoutError(
                f"{self.name} example {example}: expected {expected} <image> query placeholders "
                f"({len(image_ids)} image(s) x num_query_tokens={n_query}), but the sequence holds "
                f"{placeholders.numel()}"
            )
        runs = list(placeholders.split(n_query)) if image_ids else []
        for run in runs:
            if not bool((run.diff() == 1).all()):
                raise LayoutError(f"{self.name} example {example}: the query placeholders are not consecutive")
        return [
            ImageLayout(index=k, grids=(grid_from_run(run, 1, n_query, name="queries", spatial=False),))
            for k, run in enumerate(runs)
        ]

    def attended_grid(self, config) -> dict[str, tuple[int, int]]:
        """The vision tower's patch grid, which the Q-Former's queries cross-attend to."""
        vision = self.vision_config(config)
        side = vision.image_size // vision.patch_size
        return {"patches": (side, side)}
