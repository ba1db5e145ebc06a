"""Llama 3.2 Vision (``MllamaForConditionalGeneration``): tiled vision tower, Llama LM with gated
cross-attention layers.

Images never enter the token sequence as patches. Each image is one ``<|image|>`` marker token; the
vision tower turns the image into tiles (up to ``max_num_tiles``, arranged by the image's aspect
ratio) of ``1 + p*p`` states each (a class state, then a ``p x p`` patch grid), and the layers listed
in ``text_config.cross_attention_layers`` attend to those states. The processor's
``cross_attention_mask`` lets every token from an image's marker onwards attend to that image. A
token that may attend to no tile at all (before the first marker) does not attend to none:
transformers then unmasks the whole row, so its cross-attention reads every tile, and only the
layer's MLP write is zeroed for it (``full_text_row_masked_out_mask``); the gated attention write
still adds image information to it.

Layout: each image is its marker (separator ``"marker"``, no grid in the sequence) and ``attended``
``{"tiles": (rows, cols), "patches": (p, p)}``: the tile arrangement read from ``aspect_ratio_ids``
and each tile's patch grid (the class state before each tile's patches is not in the grid).
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout
from .base import Family


class Mllama(Family):
    name = "mllama"
    hf_classes = ("MllamaForConditionalGeneration",)
    model_types = ("mllama",)
    image_mode = "cross_attention"
    layout_kind = "cross-attention"
    nonlinear_writes = "its cross-attention layers are gated"
    nested_images = True  # MllamaProcessor takes one list of images per prompt
    # multi_image stays True: the processor and model take any number of images per prompt (one
    # marker each; the cross-attention mask has an image axis); the checkpoints were trained with one.

    # Language model. `lm_layers` mixes both kinds of layer: self-attention layers hold `self_attn`
    # (lm_attn, lm_attn_out), the layers in `cross_attention_layers(config)` hold `cross_attn`
    # instead. Both kinds have `mlp`.
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    lm_cross_attn: ClassVar[str] = "cross_attn"  # relative to a cross-attention layer
    lm_cross_attn_out: ClassVar[str] = "cross_attn.o_proj"
    # Vision: the local encoder (counted by n_vision_layers), then a gated global encoder that runs
    # over all tiles of an image together.
    vision_layers = "model.vision_model.transformer.layers"
    vision_global_layers: ClassVar[str] = "model.vision_model.global_transformer.layers"
    projector = ("model.multi_modal_projector",)

    def cross_attention_layers(self, config) -> list[int]:
        """Indices in ``lm_layers`` of the cross-attention layers (the others self-attend)."""
        return [int(i) for i in self.text_config(config).cross_attention_layers]

    def hide_images(self, inputs: dict[str, Any], keep: Tensor) -> dict[str, Any]:
        """Zero the cross-attention mask of the rows without images.

        This removes only the MLP write of the cross-attention layers for those rows
        (``full_text_row_masked_out_mask``). Their gated attention write stays: transformers turns
        a mask row without any visible tile into one that attends to every tile. Removing the image
        also needs the output of each cross-attention module zeroed on those rows
        (:meth:`image_write_hooks`); the layers are then the identity there, as in a forward pass
        without pixels.
        """
        mask = inputs["cross_attention_mask"]
        shape = (-1,) + (1,) * (mask.dim() - 1)
        return {**inputs, "cross_attention_mask": mask * keep.to(mask.device, mask.dtype).reshape(shape)}

    def image_write_hooks(self, config) -> list[str]:
        """The cross-attention modules' outputs (before the layer's tanh gate): zeroed for a row
        with its cross-attention mask, the row's cross-attention layers add nothing, exactly as
        transformers' forward without ``pixel_values`` skips them."""
        return [f"blocks.{layer}.cross_attn.hook_attn_out" for layer in self.cross_attention_layers(config)]

    def n_vision_global_layers(self, config) -> int:
        """Number of layers at ``vision_global_layers``."""
        return int(self.vision_config(config).num_global_layers)

    def image_token_id(self, config, processor) -> int:
        """The ``<|image|>`` marker. The processor's id is the one that matters: it places the
        cross-attention mask from it, while the model never reads ``config.image_token_index``."""
        value = getattr(processor, "image_token_id", None)
        if value is None:
            value = config.image_token_index
        return int(value)

    def processor_kwargs(self) -> dict[str, Any]:
        # The chat template already starts with <|begin_of_text|> and the Llama 3 tokenizer adds
        # another one; the model card passes add_special_tokens=False for this reason.
        return {"add_special_tokens": False}

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """One marker per image, with the tile and patch grids its cross-attention reads.

        Raises:
            LayoutError: if the number of ``<|image|>`` markers differs from the number of images
                (the model does not check it; a missing marker silently drops an image).
        """
        if placeholders.numel() != len(image_ids):
            raise LayoutError(
                f"mllama example {example}: expected one <|image|> marker per image "
                f"({len(image_ids)} images), but the sequence holds {placeholders.numel()} markers "
                f"at positions {placeholders.tolist()}"
            )
        layouts = []
        for k in range(len(image_ids)):
            layouts.append(ImageLayout(
                index=k, grids=(), separators={"marker": placeholders[k:k + 1]},
                attended=self.tile_grid(inputs, example, k, config),
            ))
        return layouts

    def tile_grid(self, inputs, example: int, image: int, config) -> dict[str, tuple[int, int]]:
        """``{"tiles": (rows, cols), "patches": (p, p)}`` of one image, from ``aspect_ratio_ids``.

        Raises:
            LayoutError: if the image's aspect-ratio id is 0 (padding) or outside
                ``vision_config.supported_aspect_ratios``.
        """
        vision = self.vision_config(config)
        ratios = vision.supported_aspect_ratios
        ids = inputs["aspect_ratio_ids"]
        if image >= ids.shape[1]:
            raise LayoutError(
                f"mllama example {example}: image {image} has no aspect_ratio_ids entry "
                f"(the processor returned {ids.shape[1]} per example)"
            )
        ratio_id = int(ids[example, image])  # 1-based; 0 marks a padding image
        if not 1 <= ratio_id <= len(ratios):
            raise LayoutError(
                f"mllama example {example}, image {image}: aspect_ratio_id {ratio_id} is not in "
                f"1..{len(ratios)} (vision_config.supported_aspect_ratios)"
            )
        # The image processor indexes its (tiles high, tiles wide) pairs with the same ids.
        rows, cols = ratios[ratio_id - 1]
        side = vision.image_size // vision.patch_size
        return {"tiles": (int(rows), int(cols)), "patches": (side, side)}
