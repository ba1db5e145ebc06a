"""Gemma 4 (``Gemma4ForConditionalGeneration``): a vision encoder at native aspect ratio with 2D
positions, a normalised linear embedder (``embed_vision``), and a Gemma 4 LM.

The chat template writes one ``<|image|>`` per image; the processor expands it into
``<|image> <|image|> x n <image|>`` where ``n`` varies per image. The image processor resizes each
image, keeping its aspect ratio, to ``H x W`` pixels with both sides multiples of
``pooling_kernel_size * patch_size``, patchifies it row-major and records each patch's ``(x, y)``
in ``image_position_ids`` (padding patches are ``(-1, -1)``). The vision tower average-pools each
``k x k`` block of patches (``k = pooling_kernel_size``) into one soft token, ordered by
``x // k + (W / patch / k) * (y // k)``: row-major over a ``(H / patch / k) x (W / patch / k)``
grid. The processor drops its per-image token counts from the output, so the grid is read from
``image_position_ids``. BOI and EOI are template.

The language model has Gemma's sandwich norms, and after its MLP each layer adds a third write:
the per-layer embedding (PLE) branch, a gated projection of a per-token input that is itself a
function of the token embeddings (the image features at image positions). Each layer's output is
then multiplied by a learned ``layer_scalar``. The writes therefore do not add up linearly into the
residual stream. Unlike earlier Gemma generations, its RMSNorm scales by ``weight`` itself, not by
``1 + weight``.

Attention differs per layer in the real checkpoints. Full-attention layers have wider heads
(``global_head_dim``, 512 against 256) and, where ``attention_k_eq_v``, their own key/value head
count (``num_global_key_value_heads``) and no ``v_proj``: the key projection's output is also the
values (normed by ``v_norm``, not by ``k_norm``), so ``hook_v`` there is ``v_norm``'s input. The
last ``num_kv_shared_layers`` layers have no ``k_proj``/``v_proj`` and attend with the keys and
values of the last earlier layer of their attention type, so they offer no ``hook_k``/``hook_v``.
The config is then heterogeneous (``per_layer_config``): read head widths and counts per layer with
``model.d_head_of(layer)`` / ``model.n_kv_heads_of(layer)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run
from .base import Family, split_counts


class Gemma4(Family):
    name = "gemma4"
    hf_classes = ("Gemma4ForConditionalGeneration",)
    model_types = ("gemma4",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    # sandwich norms: the attention output is normalised (post_attention_layernorm) before it is
    # added, so the residual stream between attention and MLP enters pre_feedforward_layernorm
    lm_resid_mid = "pre_feedforward_layernorm"
    lm_attn_write = "post_attention_layernorm"
    lm_mlp_write = "post_feedforward_layernorm"
    lm_v_norm = "v_norm"
    lm_extra_write = "post_per_layer_input_norm"
    lm_layer_scale = "layer_scalar"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = ("model.embed_vision",)
    nonlinear_writes = (
        "its sandwich norms make each write nonlinear in the heads, and each layer adds a "
        "per-layer-embedding write after its MLP and rescales its output by a learned layer scalar"
    )

    # Gemma4Processor accepts text-only prompts and several images per prompt; it nests a flat
    # image list as one prompt's images, so it needs one list per prompt.
    requires_image = False
    multi_image = True
    nested_images = True

    def image_token_id(self, config, processor) -> int:
        """The soft image token ``<|image|>`` (``config.image_token_id``)."""
        return int(config.image_token_id)

    def final_norm_weight_offset(self, norm: torch.nn.Module) -> float:
        """Gemma 4's RMSNorm multiplies by ``weight`` (initialised to ones), not ``1 + weight``."""
        return 0.0

    def final_logit_softcap(self, config) -> float | None:
        cap = self.text_config(config).final_logit_softcapping
        return float(cap) if cap is not None else None

    def image_injection_layers(self, config) -> list[int]:
        """Every layer but the last where the LM has per-layer embeddings: each layer's
        per-layer-embedding write reads a per-token input projected from the token embeddings,
        which at image positions are the image features, so a residual stream patched before such
        a layer does not carry the image. The last layer's write comes after its attention and
        changes only the image positions' own final states, which no later position reads.

        The last layer too where layers share keys and values (``num_kv_shared_layers``): a
        KV-shared layer attends with keys and values an earlier layer computed from its own
        residual stream, which a stream patched at a later layer does not reach."""
        text = self.text_config(config)
        n = text.num_hidden_layers
        layers = list(range(n - 1)) if text.hidden_size_per_layer_input else []
        if getattr(text, "num_kv_shared_layers", 0):
            layers = list(range(n))
        return layers

    def kv_shared_layers(self, config) -> dict[int, int]:
        """``{layer: source}`` for the layers that attend with an earlier layer's keys and values
        (the last ``num_kv_shared_layers``): the source is the last layer of the same attention
        type before them, whose ``hook_k`` / ``hook_v`` hold what they attend with."""
        text = self.text_config(config)
        n, shared = text.num_hidden_layers, getattr(text, "num_kv_shared_layers", 0)
        first, types = n - shared, text.layer_types
        return {layer: max(i for i in range(first) if types[i] == types[layer]) for layer in range(first, n)}

    @staticmethod
    def pooled_grid(position_ids: Tensor, k: int) -> tuple[int, int]:
        """``(rows, cols)`` of one image's soft-token grid from its patches' ``(x, y)`` positions
        (padding rows are ``(-1, -1)``) and the pooling kernel ``k``."""
        real = position_ids[(position_ids >= 0).all(dim=-1)]
        if real.numel() == 0:
            raise LayoutError("an image has no patches in image_position_ids")
        cols, rows = (int(v) + 1 for v in real.max(dim=0).values)
        if rows % k or cols % k or real.shape[0] != rows * cols:
            raise LayoutError(
                f"an image's {real.shape[0]} patches form a {rows} x {cols} grid that does not pool "
                f"into {k} x {k} blocks"
            )
        return rows // k, cols // k

    def image_layouts(self, inputs, example, image_ids, placeholders, config, processor, *, sizes=()):
        """One ``(rows, cols)`` grid per image, from its patch positions in ``image_position_ids``.

        Raises:
            LayoutError: no ``image_position_ids`` for the images, or placeholders that do not form
                one contiguous run of ``rows * cols`` soft tokens per image.
        """
        if not image_ids:
            return super().image_layouts(inputs, example, image_ids, placeholders, config,
                                         processor, sizes=sizes)
        position_ids = inputs.get("image_position_ids")
        if position_ids is None or max(image_ids) >= len(position_ids):
            raise LayoutError(
                f"example {example} needs rows {image_ids} of image_position_ids, which the "
                f"processor output does not hold (keys: {sorted(inputs.keys())})"
            )
        k = int(self.vision_config(config).pooling_kernel_size)
        shapes = [self.pooled_grid(position_ids[i], k) for i in image_ids]
        runs = split_counts(placeholders, [rows * cols for rows, cols in shapes])
        layouts = []
        for n, (run, (rows, cols)) in enumerate(zip(runs, shapes)):
            # One image's soft tokens are one run between its BOI and EOI; a gap would mean the
            # tokens are not this image's grid.
            if int(run[-1] - run[0]) + 1 != run.numel():
                raise LayoutError(
                    f"image {n} of example {example}: its {run.numel()} soft tokens are not "
                    f"contiguous (positions {int(run[0])}..{int(run[-1])})"
                )
            layouts.append(ImageLayout(index=n, grids=(grid_from_run(run, rows, cols),)))
        return layouts
