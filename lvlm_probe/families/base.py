"""The :class:`Family` adapter: what lvlm_probe needs to know about one VLM architecture.

An adapter is data first: the module paths of the language model's layers, the vision tower's
layers and the projector, written as dotted paths from the top-level Hugging Face model (as
TransformerLens's ``supported_architectures`` declare them). The few behaviours that differ between
families (how a prompt is templated, how placeholder tokens form image grids) are small methods, and
so is everything an analysis needs to know about a family (its *capabilities*: a final-logit soft
cap, the final norm's scale, whether the residual writes add up linearly, which layers
cross-attend or mix tokens without an attention mask, how images are removed from the language
model's view). Code outside ``families/`` asks the adapter these questions and never branches on a
family's name.

Subclasses register themselves: defining ``class Llava(Family)`` with a ``name`` is the only
registration there is (see ``lvlm_probe.families``).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import LayoutError
from ..layout import ImageLayout, grid_from_run

_REGISTRY: dict[str, type[Family]] = {}


class Family:
    """Base adapter. Class attributes are module paths (dotted, from the top-level HF model)."""

    name: ClassVar[str]
    hf_classes: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values, for checkpoints without `architectures`

    # language model
    lm_layers: ClassVar[str] = "model.language_model.layers"
    lm_embed: ClassVar[str] = "model.language_model.embed_tokens"
    lm_norm: ClassVar[str] = "model.language_model.norm"
    lm_head: ClassVar[str] = "lm_head"
    lm_attn: ClassVar[str] = "self_attn"  # relative to a layer
    lm_attn_out: ClassVar[str] = "self_attn.o_proj"
    lm_mlp: ClassVar[str] = "mlp"
    # relative to a layer: the norm whose input is the residual stream between attention and MLP;
    # None where attention and MLP read the same normalised input in parallel (Cohere's layers),
    # so that no residual stream lies between them (no ``hook_resid_mid`` is offered)
    lm_resid_mid: ClassVar[str | None] = "post_attention_layernorm"
    lm_qkv: ClassVar[tuple[str, str, str]] = ("q_proj", "k_proj", "v_proj")  # relative to lm_attn
    # the query projection emits each head's query and an output gate side by side, and the
    # attention output is multiplied by sigmoid(gate) before the out-projection (Qwen3.5's gated
    # attention): hook_q is not offered, hook_z is the out-projection's input (after the gate)
    lm_q_gate: ClassVar[bool] = False
    # relative to lm_attn: a norm applied to each value head after the value projection, whose
    # output is what the attention mixes (Gemma 4); hook_v stays the projection's output
    lm_v_norm: ClassVar[str | None] = None
    # relative to a layer: modules whose outputs are the attention's and the MLP's writes into the
    # residual stream, when these are not lm_attn / lm_mlp themselves (sandwich norms)
    lm_attn_write: ClassVar[str | None] = None
    lm_mlp_write: ClassVar[str | None] = None
    # relative to a layer: a module whose output is a further write into the residual stream after
    # the MLP's (Gemma 4's per-layer embeddings), and a layer attribute that multiplies the layer's
    # output (Gemma 4's layer_scalar)
    lm_extra_write: ClassVar[str | None] = None
    lm_layer_scale: ClassVar[str | None] = None
    # relative to a layer: the token mixer of the layers in unmasked_mixing_layers (linear
    # attention, a short convolution), in place of lm_attn there
    lm_mixer: ClassVar[str | None] = None
    # vision tower and projector
    vision_layers: ClassVar[str | None] = "model.vision_tower.encoder.layers"
    projector: ClassVar[tuple[str, ...]] = ("model.multi_modal_projector",)
    # config attributes
    text_config_attr: ClassVar[str] = "text_config"
    vision_config_attr: ClassVar[str] = "vision_config"

    image_mode: ClassVar[str] = "tokens"
    #: How an image's tokens are arranged, for the families table: ``grid`` (one patch grid per
    #: image), ``tiles`` (tiles or crops and a global view), ``queries`` (learned queries, not
    #: patches) or ``cross-attention`` (outside the sequence).
    layout_kind: ClassVar[str] = "grid"
    #: Some positions of the language model's self-attention attend to later ones (Gemma 3's and
    #: Molmo2's image tokens, PaliGemma's prefix); everything else is causal.
    bidirectional_attention: ClassVar[bool] = False
    multi_image: ClassVar[bool] = True  # several images in one prompt
    requires_image: ClassVar[bool] = False  # every prompt needs at least one image
    nested_images: ClassVar[bool] = False  # the processor takes one list of images per prompt
    #: Processor outputs that hold the whole batch in one row (a leading axis of 1), by the axis
    #: along which the examples' parts follow each other (NaViT-packed pixels): running the batch
    #: several times over in one pass concatenates them along that axis, not along the first.
    packed_inputs: ClassVar[dict[str, int]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise RuntimeError(f"family {cls.name!r} is defined twice")
            _REGISTRY[cls.name] = cls

    # --- configuration -------------------------------------------------------------------------
    def text_config(self, config) -> Any:
        return getattr(config, self.text_config_attr)

    def vision_config(self, config) -> Any:
        return getattr(config, self.vision_config_attr)

    def n_vision_layers(self, config) -> int:
        return self.vision_config(config).num_hidden_layers

    def image_token_id(self, config, processor) -> int:
        """Id of the placeholder token whose embeddings are replaced by image features."""
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        return int(processor.image_token_id)

    # --- prompts -------------------------------------------------------------------------------
    def format_prompt(self, processor, prompt: str, n_images: int) -> str:
        """The text passed to the processor: the user's prompt in the checkpoint's chat template with
        the images first, ending with the generation prompt (the assistant's turn)."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def processor_images(self, images: list[list[Any]]) -> Any:
        """The images argument for the processor, from one list of images per prompt."""
        if self.nested_images:
            # A nested list of empty lists makes image processors fail; no image means None.
            return images if any(images) else None
        flat = [img for per_prompt in images for img in per_prompt]
        return flat or None

    def processor_kwargs(self) -> dict[str, Any]:
        return {}

    # --- layout --------------------------------------------------------------------------------
    def image_layouts(
        self, inputs, example: int, image_ids: list[int], placeholders: Tensor, config, processor,
        *, sizes: tuple[tuple[int, int], ...] = (),
    ) -> list[ImageLayout]:
        """Split one example's placeholder positions into its images and their grids.

        Args:
            inputs: the processor's output for the whole batch.
            example: index of the example in the batch.
            image_ids: indices, in the batch's flat image list, of this example's images.
            placeholders: sorted sequence positions of this example's placeholder tokens.
            sizes: ``(height, width)`` of this example's images, in order, as the user gave them
                (for processors that do not report what a layout depends on).

        The default fits families with one fixed square grid per image.
        """
        return [
            ImageLayout(index=k, grids=(square_grid(chunk),))
            for k, chunk in enumerate(split_evenly(placeholders, len(image_ids)))
        ]

    def attended_grid(self, config) -> dict[str, tuple[int, int]]:
        """For images outside the sequence: the grid of states the language model attends to."""
        return {}

    # --- capabilities --------------------------------------------------------------------------
    #: Why the attention and MLP writes do not add up linearly into the residual stream that the
    #: final norm reads (so direct logit attribution and path patching cannot split the logit
    #: among them), or None where they do.
    nonlinear_writes: ClassVar[str | None] = None

    def final_norm_weight_offset(self, norm: torch.nn.Module) -> float:
        """The final norm multiplies by ``offset + weight``: 1 for Gemma's RMSNorm (of every
        Gemma generation, whichever family's checkpoint holds it, e.g. a LLaVA with a Gemma
        language model), else 0."""
        return 1.0 if "Gemma" in type(norm).__name__ else 0.0

    def final_norm_centres(self, norm: torch.nn.Module) -> bool:
        """Whether the final norm subtracts the mean before dividing by the deviation (LayerNorm,
        also Cohere's bias-free LayerNorm) rather than only dividing by the RMS (RMSNorm)."""
        return isinstance(norm, torch.nn.LayerNorm)

    def final_logit_scale(self, config) -> float | None:
        """The factor the model's forward multiplies the unembedded logits by (Cohere's
        ``logit_scale``), before any soft cap, or None."""
        return None

    def final_logit_softcap(self, config) -> float | None:
        """The cap ``c`` of a final soft cap ``c * tanh(logits / c)`` that the model's forward
        applies to the logits, or None."""
        return None

    def cross_attention_layers(self, config) -> list[int]:
        """Indices in ``lm_layers`` of layers that cross-attend to the image instead of
        self-attending (none by default)."""
        return []

    def image_injection_layers(self, config) -> list[int]:
        """Indices in ``lm_layers`` of layers after whose output image features are added to the
        residual stream at the image positions, outside attention (Qwen3-VL's DeepStack); none by
        default. A residual stream patched at or before such a layer does not carry the image."""
        return []

    def image_injection_modules(self, config) -> list[str]:
        """Module paths whose outputs are the image features added after each layer of
        :meth:`image_injection_layers`, in the same order (Qwen3-VL's DeepStack mergers); hooked as
        ``projector.injection.{k}.hook_out``. Empty where no module outputs exactly them."""
        return []

    def kv_shared_layers(self, config) -> dict[int, int]:
        """``{layer: source}`` for layers that attend with an earlier layer's keys and values and
        have no key/value projections of their own (Gemma 4's KV sharing): their ``hook_k`` /
        ``hook_v`` are the source layer's. Empty by default."""
        return {}

    def unmasked_mixing_layers(self, config) -> list[int]:
        """Indices in ``lm_layers`` of layers that mix tokens without an attention mask: linear
        attention (a recurrence over the sequence) or a causal short convolution, in module
        ``lm_mixer``; none by default.

        Masking keys cannot hide a position from such a layer. lvlm_probe hides positions there by
        running the mixer on the visible positions alone (see
        :func:`lvlm_probe.hooks.attention.hiding_positions`), which assumes what these mixers are:
        causal, reading no position index, called as ``mixer(hidden_states)``. Hiding keys from
        some queries only (attention knockout) has no such form and raises."""
        return []

    def self_attention_layers(self, config) -> list[int]:
        """Indices in ``lm_layers`` of the layers that self-attend over the token sequence (not the
        cross-attention layers, nor the unmasked mixing layers)."""
        other = set(self.cross_attention_layers(config)) | set(self.unmasked_mixing_layers(config))
        return [layer for layer in range(self.text_config(config).num_hidden_layers) if layer not in other]

    def hide_images(self, inputs: dict[str, Any], keep: Tensor) -> dict[str, Any]:
        """The model inputs with the images of the rows where ``keep`` is False removed from the
        language model's view, where hiding the image positions from attention cannot do it.

        Families whose images sit in the token sequence (``image_mode`` ``"tokens"`` or
        ``"queries"``) are hidden by masking those positions at every self-attention layer; their
        inputs come back unchanged. Cross-attention families override this, and declare in
        :meth:`image_write_hooks` what the inputs alone cannot remove.

        Args:
            inputs: the processor's output for a batch (not modified).
            keep: ``[batch]`` bool, whether each row keeps its images.
        """
        return inputs

    def hide_prompt(self, inputs: dict[str, Any], keep: Tensor) -> dict[str, Any]:
        """The model inputs with the prompt of the rows where ``keep`` is False removed from
        whatever reads it outside the language model's self-attention.

        The prompt's positions are hidden by masking them at every self-attention layer; most
        families read the prompt nowhere else and return the inputs unchanged. A family whose image
        encoder also reads the instruction (InstructBLIP's Q-Former, through its own copy of the
        text) removes it there, or the image features would still carry the prompt.

        Args:
            inputs: the model inputs for a batch (not modified).
            keep: ``[batch]`` bool, whether each row keeps its prompt.
        """
        return inputs

    def model_inputs(self, inputs: Any) -> Any:
        """The processor's output completed with what the HF model must also receive to run the
        batch as the checkpoint is meant to run (applied by ``LVLM.prepare``, so ``batch.inputs``
        is exactly what the model receives); the processor's output unchanged by default.

        InstructBLIP adds position ids counted over the unpadded tokens: its processor puts the left
        padding between the image queries and the text, and its language model numbers positions
        0, 1, 2, ... whatever the attention mask says, so a padded row would otherwise differ from
        the same example run alone.

        Args:
            inputs: the processor's output for a batch (not modified; a copy is returned when
                anything is added).
        """
        return inputs

    def continued_input(self, key: str, value: Tensor, added: int) -> Tensor:
        """A per-position model input ``[batch, seq, ...]`` (``[..., batch, seq]`` for position ids)
        extended by ``added`` positions of text continuing the sequence, as the checkpoint's
        ``generate`` extends it step by step (``GenerationMixin._update_model_kwargs_for_generation``):
        position ids count on, multimodal token types are 0 (text), every other input repeats its
        last position (token types, Mllama's cross-attention mask). ``input_ids`` and
        ``attention_mask`` are the caller's. PaliGemma marks the continuation as suffix (type 1).

        Args:
            key: the input's name (e.g. ``"token_type_ids"``).
            value: its tensor over the original sequence.
            added: how many positions to add.
        """
        if key == "position_ids":
            steps = torch.arange(1, added + 1, dtype=value.dtype, device=value.device)
            return torch.cat([value, value[..., -1:] + steps], dim=-1)
        if key == "mm_token_type_ids":
            return torch.cat([value, value.new_zeros((*value.shape[:1], added, *value.shape[2:]))], dim=1)
        last = value[:, -1:]
        return torch.cat([value, last.expand(-1, added, *last.shape[2:])], dim=1)

    def image_write_hooks(self, config) -> list[str]:
        """Hook names whose values carry the images into the residual stream where the images are
        not token positions (cross-attention outputs, before any gate). Zeroing them for a row,
        together with :meth:`hide_images`, removes its images at every layer. Empty for families
        whose images are token positions."""
        return []


def split_evenly(positions: Tensor, n: int) -> list[Tensor]:
    """Split placeholder positions equally among ``n`` images (families with a fixed count)."""
    if n == 0:
        if positions.numel():
            raise LayoutError(f"{positions.numel()} image placeholder tokens but no image")
        return []
    if positions.numel() % n:
        raise LayoutError(f"{positions.numel()} image placeholder tokens do not split among {n} images")
    return list(positions.split(positions.numel() // n))


def split_counts(positions: Tensor, counts: list[int]) -> list[Tensor]:
    """Split placeholder positions into runs of the given lengths, checking they add up."""
    if sum(counts) != positions.numel():
        raise LayoutError(
            f"the images need {counts} placeholder tokens ({sum(counts)} in all) but the sequence "
            f"holds {positions.numel()}"
        )
    return list(positions.split(counts))


def square_grid(positions: Tensor, name: str = "patches") -> Any:
    side = math.isqrt(positions.numel())
    if side * side != positions.numel():
        raise LayoutError(f"{positions.numel()} image tokens do not form a square grid")
    return grid_from_run(positions, side, side, name=name)


def registry() -> dict[str, type[Family]]:
    return _REGISTRY


def as_long(values) -> Tensor:
    return torch.as_tensor(values, dtype=torch.long)
