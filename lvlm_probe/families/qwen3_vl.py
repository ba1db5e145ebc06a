"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): a ViT at native resolution (learned position
embeddings resampled to each image's grid, plus 2D rotary positions), a patch merger that fuses each
2x2 block of patches into one token, a Qwen3 LM (q/k norms) with interleaved multimodal rotary
positions, and DeepStack.

Token layout: Qwen2-VL's. Each image is resized so its sides are multiples of patch * merge pixels;
``image_grid_thw[i] = (t, h, w)`` in patches, and the image's single run of ``<|image_pad|>`` tokens
holds ``t * h * w / merge**2`` tokens, row-major over the merged ``(h / merge) x (w / merge)`` grid
(the processor's patch order, the merger's fusing of ``merge**2`` consecutive patches and the LM's
M-RoPE positions all agree, as in Qwen2-VL).

DeepStack: the vision layers listed in ``vision_config.deepstack_visual_indexes`` each feed their own
merger (``model.visual.deepstack_merger_list[k]``), and ``Qwen3VLTextModel`` adds merger ``k``'s
output to the hidden states *at the image positions* right after LM layer ``k``. So:

* ``blocks.{k}.hook_resid_post`` is layer ``k``'s output before the DeepStack addition (what
  ``output_hidden_states`` reports), and ``blocks.{k+1}.hook_resid_pre`` is after it: for
  ``k < len(deepstack_visual_indexes)`` the two differ at the image positions by the DeepStack
  features. They are equal at every text position, so direct logit attribution at the answer
  position is unaffected.
* The DeepStack features are written only into the image positions' own residual streams; other
  positions read them only through attention. Hiding the image positions from attention at every
  self-attention layer (what ``source_split`` does) therefore removes them as well: no
  :meth:`hide_images` / :meth:`image_write_hooks` override is needed.
* Patching a layer's whole residual stream at or before the last DeepStack layer does not restore
  a clean run: the DeepStack addition after it carries the corrupted image again.
  :meth:`image_injection_layers` names those layers.
* ``projector.hook_out`` is the main merger's output (the features that replace the placeholder
  embeddings); ``projector.injection.{k}.hook_out`` is DeepStack merger ``k``'s output, the
  features added after LM layer ``k`` (:meth:`image_injection_modules`).
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VL


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    hf_classes = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)
    lm_layers = "model.language_model.layers"
    lm_embed = "model.language_model.embed_tokens"
    lm_norm = "model.language_model.norm"
    # The vision config's ``depth`` is aliased as ``num_hidden_layers``: the base count works.
    vision_layers = "model.visual.blocks"
    projector = ("model.visual.merger",)
    # image_layouts: Qwen2-VL's (image_grid_thw, spatial_merge_size, one contiguous run per image).

    def image_injection_layers(self, config) -> list[int]:
        """Indices in ``lm_layers`` after whose output DeepStack adds visual features at the image
        positions: one per entry of ``vision_config.deepstack_visual_indexes``, from layer 0."""
        n = len(self.vision_config(config).deepstack_visual_indexes or ())
        return list(range(min(n, self.text_config(config).num_hidden_layers)))

    def image_injection_modules(self, config) -> list[str]:
        """The DeepStack mergers, one per injection layer."""
        return [f"model.visual.deepstack_merger_list.{k}"
                for k in range(len(self.image_injection_layers(config)))]
