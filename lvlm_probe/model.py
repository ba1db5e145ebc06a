"""The :class:`LVLM` wrapper and :func:`load`.

An ``LVLM`` holds a Hugging Face vision-language model, its processor and its family adapter. It
prepares inputs (with a :class:`~lvlm_probe.layout.TokenLayout` per example), runs the HF model
unchanged, and answers the questions a probe asks of it (next-token log-probabilities of answers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from jaxtyping import Float
from torch import Tensor

from . import families, hooks
from .devices import resolve_device, resolve_dtype
from .errors import InputError, LayoutError, LVLMProbeError, ModelLoadError, UnsupportedModelError
from .families.base import Family
from .hooks.selectors import check as check_selector
from .hooks.selectors import gather, resolve_batch
from .inputs import Batch, normalize
from .layout import GROUPS, TokenLayout, locate_prompt


def _unembedding_only(window: slice):
    """A forward pre-hook of the unembedding: only the positions in ``window`` of ``[batch, seq,
    d]`` hidden states go in."""
    def pre_hook(module, args):
        hidden = args[0]
        return (hidden[:, window], *args[1:]) if hidden.dim() == 3 else None
    return pre_hook


@dataclasses.dataclass(frozen=True, repr=False)
class Generation:
    """What :meth:`LVLM.generate` produced for a batch.

    Attributes:
        texts: each example's new text (special tokens removed, stripped).
        token_ids: each example's new token ids, up to and including its end-of-sequence token.
        logprobs: per example ``[n_tokens]``, each token's log-probability when it was generated.
        cache: the activations (``None`` without ``capture``): ``cache[name]`` is
            ``[batch, kept, ...]``, the prompt positions the selector kept, then one position per
            generation step after the prompt (``cache.positions()`` gives their sequence positions,
            ``-1`` at padding); an example that stopped early has pad tokens' states after its end.
            Values outside the token sequence (vision tower, projector) are those of the prompt pass.
    """

    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[Tensor]
    cache: hooks.ActivationCache | None = None

    def __repr__(self) -> str:
        lengths = [len(ids) for ids in self.token_ids]
        captured = f", {len(self.cache.names())} hooks captured" if self.cache is not None else ""
        return f"Generation({len(self.texts)} examples, {min(lengths, default=0)}-{max(lengths, default=0)} tokens{captured})"


def _eos_ids(hf) -> set[int]:
    """The token ids that end generation for this checkpoint."""
    eos = getattr(hf.generation_config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _generated_cache(recorder: hooks.Capture, batch: Batch, selector: Any) -> hooks.ActivationCache:
    """The per-call values a generation recorded, as one sequence per hook: the prompt pass at
    the selected positions, then each later step's one position."""
    length = batch.input_ids.shape[1]
    # "all" keeps the prompt pass whole (padding included), as a capture of a forward pass does
    kept = (torch.arange(length).expand(len(batch), -1) if selector == "all"
            else resolve_batch(selector, batch.layouts).to(torch.long))  # [batch, n] (-1: padding)
    cache = hooks.ActivationCache(selector, "none")
    steps = 0  # the calls after the prompt pass: one per generated token but the last
    for point in recorder.points:
        if point.name not in recorder.cache:
            continue
        calls = recorder.cache.calls(point.name)
        if point.space != "lm":
            cache._calls[point.name] = [calls[0]]
            continue
        first = calls[0]
        if first.shape[1] < length:  # a layer that ran the prompt's last positions only (Gemma 4)
            first = torch.cat([first.new_zeros((len(first), length - first.shape[1], *first.shape[2:])), first], 1)
        prompt = first if selector == "all" else gather(first, kept.to(first.device), length=length)
        cache._calls[point.name] = [torch.cat([prompt, *calls[1:]], dim=1)]
        steps = len(calls) - 1
    generated = length + torch.arange(steps).expand(len(batch), -1)
    cache._kept.append(torch.cat([kept.cpu(), generated], dim=1))
    return cache


class LVLM:
    """A Hugging Face vision-language model with its processor and family adapter.

    Args:
        hf: the HF model (e.g. ``LlavaForConditionalGeneration``).
        processor: its processor.
        family: the adapter; found from ``hf.config`` when omitted.

    Attributes:
        hf, processor, family, tokenizer, config.
    """

    def __init__(self, hf: transformers.PreTrainedModel, processor: Any, family: Family | None = None):
        self.hf = hf
        # how load() built this model, so Ray workers can build the same one (None: built in memory)
        self.source: LoadSpec | None = None
        self.processor = processor
        self.family = families.for_model(hf, family)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Left padding keeps every example's last token at position -1, where answers are read.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # --- shape facts ---------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def text_config(self):
        return self.family.text_config(self.config)

    @property
    def n_layers(self) -> int:
        """Number of language-model layers."""
        return int(self.text_config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        """Attention heads per language-model layer."""
        return int(self.text_config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per language-model layer, where every layer has the same number.

        Raises:
            LVLMProbeError: for a language model whose layers differ (Gemma 4's full-attention
                layers), naming :meth:`n_kv_heads_of`.
        """
        return self._same_in_every_layer("n_kv_heads", self.n_kv_heads_of)

    def n_kv_heads_of(self, layer: int) -> int:
        """Key/value heads of language-model layer ``layer`` (what its ``hook_k`` / ``hook_v`` hold)."""
        return int(getattr(self._layer_config(layer), "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        """Width of the language model's residual stream."""
        return int(self.text_config.hidden_size)

    @property
    def d_head(self) -> int:
        """Width of each attention head, where every language-model layer has the same.

        Raises:
            LVLMProbeError: for a language model whose layers differ (Gemma 4's full-attention
                layers have wider heads than its sliding ones), naming :meth:`d_head_of`.
        """
        return self._same_in_every_layer("d_head", self.d_head_of)

    def d_head_of(self, layer: int) -> int:
        """Width of each attention head of language-model layer ``layer`` (the last axis of its
        ``hook_q`` / ``hook_k`` / ``hook_v`` / ``hook_z``)."""
        return int(getattr(self._layer_config(layer), "head_dim", None) or self.d_model // self.n_heads)

    def _layer_config(self, layer: int):
        """The text config as layer ``layer`` sees it: a heterogeneous config (``per_layer_config``,
        transformers 5) overrides some attributes per layer and refuses to read them globally."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise InputError(f"layer must be an index in [0, {self.n_layers}), got {layer!r}")
        config = self.text_config
        if not getattr(config, "is_heterogeneous", False):
            return config
        return config.per_layer_config[layer]

    def _same_in_every_layer(self, name: str, of) -> int:
        values = [of(layer) for layer in range(self.n_layers)]
        if len(set(values)) > 1:
            raise LVLMProbeError(
                f"{name} differs across this model's LM layers ({values}); read it per layer with "
                f"model.{name}_of(layer)"
            )
        return values[0]

    @property
    def d_vocab(self) -> int:
        return int(self.hf.get_output_embeddings().weight.shape[0])

    @property
    def vision_layers(self) -> int:
        """Number of vision-tower layers."""
        return int(self.family.n_vision_layers(self.config))

    @property
    def device(self) -> torch.device:
        """Where inputs go: the parameters' device, or with a ``device_map`` the device of the
        first module in the map (offloaded parts run on the first accelerator, else the CPU)."""
        placement = getattr(self.hf, "hf_device_map", None)
        if placement:
            return input_device(placement)
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.config, self.processor)

    def module(self, path: str) -> torch.nn.Module:
        """The submodule at a dotted path of the HF model, e.g. ``family.lm_layers``."""
        return self.hf.get_submodule(path)

    # --- inputs --------------------------------------------------------------------------------
    def prepare(self, images: Any = None, prompts: str | list[str] = "") -> Batch:
        """Process images and prompts into model inputs with a token layout per example.

        Args:
            images: for a list of prompts, one entry per prompt (an image, a list of images, or
                None); for one prompt string, one image (or a list of one). Images are PIL images,
                numpy arrays ``[H, W, 3|4]`` or tensors ``[3, H, W]``; transparency is composited
                on white. Several images with one prompt string are refused: write one example
                with two images ``images=[[a, b]], prompts=["q"]``, two examples
                ``images=[a, b], prompts=["q", "q"]``.
            prompts: a prompt or a list of prompts; each is placed in the checkpoint's chat
                template after its images, ending with the assistant's turn.

        Returns:
            A :class:`Batch`; ``batch.inputs`` is exactly what the HF model receives.

        Raises:
            InputError: mismatched counts, one prompt string with several images, a missing image
                where the family needs one, or more images than the family takes.
            ImageTypeError: an image of an unsupported type.

        Warns:
            UserWarning: an empty or blank prompt; an image with transparency (composited on
                white); an image smaller than the vision tower's patch (the processor upsamples
                it, so the model sees an interpolated blur), naming its size and the patch's.

        Example:
            >>> batch = model.prepare(images=[img], prompts=["Is there a red heart?"])
            >>> batch.layouts[0].positions("image")
        """
        images, prompts = normalize(images, prompts)
        self._check_image_sizes(images)
        fam = self.family
        for i, imgs in enumerate(images):
            if fam.requires_image and not imgs:
                raise InputError(
                    f"prompt {i} ({prompts[i]!r}) has no image, but {fam.name} needs one image per prompt"
                )
            if not fam.multi_image and len(imgs) > 1:
                raise InputError(
                    f"prompt {i} has {len(imgs)} images, but {fam.name} takes at most one per prompt"
                )
        if any(images) and not all(images) and fam.nested_images:
            raise InputError(
                f"{fam.name} cannot batch prompts with and without images; got image counts "
                f"{[len(x) for x in images]}"
            )
        texts = [fam.format_prompt(self.processor, p, len(imgs)) for p, imgs in zip(prompts, images)]
        kwargs = dict(text=texts, return_tensors="pt", padding=True, **fam.processor_kwargs())
        bos = self.tokenizer.bos_token
        if bos and all(t.startswith(bos) for t in texts):
            # The chat template already wrote BOS (Gemma 3, Llama 3): don't let the tokenizer add
            # a second one, as apply_chat_template(tokenize=True) would not.
            kwargs["add_special_tokens"] = False
        proc_images = fam.processor_images(images)
        if proc_images is not None:
            kwargs["images"] = proc_images
        try:
            inputs = self.processor(**kwargs)
        except (ValueError, TypeError) as err:
            raise InputError(
                f"the {type(self.processor).__name__} rejected the batch "
                f"(image counts {[len(x) for x in images]}): {err}"
            ) from err
        layouts = [self._layout(inputs, i, images, prompts[i]) for i in range(len(prompts))]
        inputs = inputs.to(self.device)
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(self.dtype)
        inputs = fam.model_inputs(inputs)  # what the model needs beyond the processor's output
        return Batch(inputs=inputs, layouts=layouts, prompts=prompts, texts=texts, images=images)

    def _patch_size(self) -> int | None:
        """The vision tower's patch side in pixels (``vision_config.patch_size``), or None where
        the config does not state one as a number."""
        size = getattr(getattr(self.config, "vision_config", None), "patch_size", None)
        if isinstance(size, (list, tuple)) and size and all(isinstance(v, int) for v in size):
            size = max(size)
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None

    def _check_image_sizes(self, images: list[list]) -> None:
        """Warn once for images narrower or lower than one patch: the processor resizes them up,
        so the model sees interpolated pixels, never more detail than the image has."""
        patch = self._patch_size()
        if patch is None:  # a tower without a stated patch size: nothing to compare with
            return
        small = [f"images[{i}][{j}] ({img.width}x{img.height} px)" for i, imgs in enumerate(images)
                 for j, img in enumerate(imgs) if img.width < patch or img.height < patch]
        if small:
            warnings.warn(f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''} "
                          f"{'is' if len(small) == 1 else 'are'} smaller than the vision tower's "
                          f"{patch}x{patch} px patch: the processor upsamples it, so the model sees "
                          "an interpolated blur, not more detail; use images of at least one patch "
                          "per side", UserWarning, stacklevel=3)

    def _layout(self, inputs, i: int, images: list[list], prompt: str) -> TokenLayout:
        ids = inputs["input_ids"][i]
        mask = inputs.get("attention_mask")
        valid = mask[i].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        placeholders = ((ids == self.image_token_id) & valid).nonzero().flatten()
        offset = sum(len(x) for x in images[:i])  # this example's first image in the flat list
        image_ids = list(range(offset, offset + len(images[i])))
        sizes = tuple((img.height, img.width) for img in images[i])
        image_layouts = self.family.image_layouts(
            inputs, i, image_ids, placeholders, self.config, self.processor, sizes=sizes
        )
        attended = self.family.attended_grid(self.config) if images[i] else {}
        image_layouts = tuple(
            dataclasses.replace(lay, index=k, size=sizes[k], attended=lay.attended or attended)
            for k, lay in enumerate(image_layouts)
        )
        covered = torch.cat([lay.positions for lay in image_layouts]) if image_layouts else placeholders[:0]
        if not torch.equal(covered.sort().values, placeholders):
            raise LVLMProbeError(
                f"internal: the {self.family.name} layout covers {covered.numel()} positions but "
                f"the sequence holds {placeholders.numel()} image placeholders"
            )
        first = int(valid.nonzero()[0])
        start = int(placeholders[-1]) + 1 if placeholders.numel() else first
        try:
            prompt_pos, spans = locate_prompt(self.tokenizer, ids.tolist(), start, prompt)
        except LayoutError:
            if start == first:
                raise
            # templates that put the question before the image
            prompt_pos, spans = locate_prompt(self.tokenizer, ids.tolist(), first, prompt)
        prompt_pos = torch.tensor(prompt_pos, dtype=torch.long)
        group_of = torch.full(ids.shape, 2, dtype=torch.long)  # template unless claimed below
        group_of[~valid] = 3
        group_of[placeholders] = 0
        group_of[prompt_pos] = 1
        groups = {g: (group_of == k).nonzero().flatten() for k, g in enumerate(GROUPS)}
        return TokenLayout(
            length=int(ids.numel()),
            groups=groups,
            images=image_layouts,
            image_mode=self.family.image_mode,
            tokens=tuple(self.tokenizer.convert_ids_to_tokens(ids.tolist())),
            prompt=prompt,
            prompt_spans=torch.tensor(spans, dtype=torch.long).reshape(-1, 2),
        )

    # --- running -------------------------------------------------------------------------------
    def forward(self, batch: Batch, *, grad: bool = False, **kwargs: Any):
        """Run the HF model on ``batch.inputs`` and return its output unchanged.

        Args:
            grad: keep the autograd graph (for gradient attribution); off by default.
            **kwargs: passed to the HF model (e.g. ``output_hidden_states=True``).
        """
        with torch.set_grad_enabled(grad), hooks.running(batch):
            return self.run(batch.inputs, **kwargs)

    def run(self, inputs: dict, *, last_position: bool = False, unembed: slice | None = None, **kwargs: Any):
        """Call the HF model on model inputs (``batch.inputs`` or rows built from them) and return
        its output, without building a KV cache.

        A single pass never reads the cache HF builds by default, which at 7B widths costs as much
        memory as the activations a capture keeps (``docs/scaling.md``); ``use_cache=True`` in
        ``kwargs`` asks for it anyway.

        Args:
            inputs: keyword arguments of the HF forward.
            last_position: unembed the last position only (logits ``[batch, 1, vocab]``), for
                callers that score the next token or read only hooks: the full logits are the
                largest tensor of a pass at real vocabularies. Every hook still sees every
                position (HF's ``logits_to_keep`` is not used: Gemma 4 skips its last layers at
                the other positions with it). Inputs with ``labels`` (a loss over every position)
                are unembedded in full.
            unembed: unembed only these positions (logits ``[batch, len(window), vocab]``), e.g.
                the readers of a teacher-forced continuation; ``last_position=True`` is
                ``slice(-1, None)``. Same rules as ``last_position``.
            **kwargs: passed to the HF model.
        """
        kwargs.setdefault("use_cache", False)
        window = slice(-1, None) if last_position else unembed
        head = self.hf.get_output_embeddings() if window is not None and "labels" not in inputs else None
        if head is None:
            return self.hf(**inputs, **kwargs)
        handle = head.register_forward_pre_hook(_unembedding_only(window))
        try:
            return self.hf(**inputs, **kwargs)
        finally:
            handle.remove()

    def generate(self, batch: Batch, max_new_tokens: int = 16, *, capture: str | list[str] | None = None,
                 positions: Any = "last", **kwargs: Any) -> list[str] | Generation:
        """Greedy generation (with the KV cache, as HF runs it).

        Args:
            batch: from :meth:`prepare`.
            max_new_tokens: the most tokens each example gets.
            capture: hook names or ``*`` patterns whose activations to keep at every step (see
                :meth:`capture`); then a :class:`Generation` is returned instead of the texts.
            positions: with ``capture``, the prompt positions to keep (a selector of
                :meth:`capture`; the prompt runs in one pass); every position generation feeds
                through the model after the prompt (each generated token but the last) is kept
                after them. ``"last"``: one state per generated token, the one that produced it.
            **kwargs: passed to the HF ``generate`` (e.g. ``do_sample=True``).

        Returns:
            The new text of each example (special tokens removed); with ``capture``, a
            :class:`Generation` holding the texts, token ids, the log-probability of each token
            when it was generated, and the activations.

        Raises:
            InputError: for attention patterns or scores in ``capture`` (their key axis grows
                with every step: capture them on the teacher-forced text, :meth:`continued`).

        Example:
            >>> out = model.generate(batch, 12, capture="blocks.*.hook_resid_post")
            >>> out.cache.stack("blocks.*.hook_resid_post")  # [layer, batch, 12, d_model]
        """
        if capture is not None:
            return self.generation(batch, max_new_tokens, capture=capture, positions=positions, **kwargs)
        kwargs.setdefault("do_sample", False)
        with torch.no_grad(), hooks.running(batch):
            out = self.hf.generate(**batch.inputs, max_new_tokens=max_new_tokens, **kwargs)
        new = out[:, batch.input_ids.shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def generation(self, batch: Batch, max_new_tokens: int = 16, *, capture: str | list[str] | None = None,
                   positions: Any = "last", **kwargs: Any) -> Generation:
        """:meth:`generate` (same arguments), returning a :class:`Generation` whether or not it
        captures: the texts, token ids and each token's log-probability (HF keeps every step's
        logits ``[batch, vocab]`` for them while it generates).

        Raises:
            InputError: for ``max_new_tokens`` that is not a positive int, or attention patterns or
                scores in ``capture``.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        kwargs.setdefault("do_sample", False)
        recorder = hooks.Capture(self, capture, positions="all") if capture is not None else None
        if recorder is not None:
            check_selector(positions, "none")
            patterns = [p.name for p in recorder.points if p.kind == "attention"]
            if patterns:
                raise InputError(f"{patterns[:3]} cannot be captured during generation: their key axis "
                                 "grows with every step; capture them on the teacher-forced text "
                                 "(model.continued) instead")
        if recorder is not None and positions != "last" and "logits_to_keep" in inspect.signature(self.hf.forward).parameters:
            # generate unembeds the prompt's last position only, and a language model may then skip
            # the other positions in its last layers (Gemma 4): ask for them all
            kwargs.setdefault("logits_to_keep", 0)
        with torch.no_grad(), hooks.running(batch), recorder or contextlib.nullcontext():
            out = self.hf.generate(**batch.inputs, max_new_tokens=max_new_tokens, output_logits=True,
                                   return_dict_in_generate=True, **kwargs)
        start = batch.input_ids.shape[1]
        new = out.sequences[:, start:]
        # each step's chosen token's log-probability (not every step's whole distribution)
        logprobs = torch.stack([step.float().gather(-1, new[:, k, None])[:, 0] - step.float().logsumexp(-1)
                                for k, step in enumerate(out.logits)], dim=1).cpu()
        new = new.cpu()
        stop = _eos_ids(self.hf)
        ids, scores = [], []
        for row, tokens in enumerate(new.tolist()):
            n = next((k + 1 for k, t in enumerate(tokens) if t in stop), len(tokens))
            ids.append(tokens[:n])
            scores.append(logprobs[row, :n])
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        cache = _generated_cache(recorder, batch, positions) if recorder is not None else None
        return Generation(texts=texts, token_ids=ids, logprobs=scores, cache=cache)

    def continued(self, batch: Batch, continuations: list[list[int]]) -> dict[str, Any]:
        """``batch.inputs`` with each example's continuation appended after its last token: the
        inputs of a teacher-forced pass over generated (or given) text.

        The continuations are right-padded to the longest (attention mask 0 there; nothing before a
        pad reads it). Every other per-position input is extended the way the checkpoint's
        ``generate`` extends it (the family's ``continued_input``), so position ``p`` of the result
        computes what generation computed there.

        Args:
            batch: from :meth:`prepare`.
            continuations: one list of token ids per example (may be empty).

        Raises:
            InputError: for a number of continuations other than the batch's, or an entry that is
                not a list of token ids in the vocabulary.
        """
        if not isinstance(continuations, (list, tuple)) or len(continuations) != len(batch):
            got = len(continuations) if isinstance(continuations, (list, tuple)) else type(continuations).__name__
            raise InputError(f"expected one list of token ids per example ({len(batch)}), got {got}")
        for i, ids in enumerate(continuations):
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.d_vocab for t in ids):
                raise InputError(f"continuation {i} must be a list of token ids in [0, {self.d_vocab}), "
                                 f"got {ids!r}")
        added = max((len(ids) for ids in continuations), default=0)
        inputs = dict(batch.inputs)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = torch.full((len(batch), added), self.tokenizer.pad_token_id, dtype=ids.dtype)
        extra_mask = torch.zeros((len(batch), added), dtype=mask.dtype)
        for i, tokens in enumerate(continuations):
            extra[i, :len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
            extra_mask[i, :len(tokens)] = 1
        # the processor's training labels (PaliGemma) would ask HF for a loss over the old sequence
        inputs.pop("labels", None)
        length = ids.shape[1]
        for key, value in list(inputs.items()):
            if key in ("input_ids", "attention_mask") or not torch.is_tensor(value):
                continue
            per_position = value.shape[-1] == length if key == "position_ids" else (
                value.dim() >= 2 and tuple(value.shape[:2]) == tuple(ids.shape))
            if per_position:
                inputs[key] = self.family.continued_input(key, value, added)
        inputs["input_ids"] = torch.cat([ids, extra.to(ids.device)], dim=1)
        inputs["attention_mask"] = torch.cat([mask, extra_mask.to(mask.device)], dim=1)
        return self.family.model_inputs(inputs)

    def answer_token_ids(self, batch: Batch, answers: list[str | int] | list[list[str | int]], *,
                         first_token: bool | None = None) -> Tensor:
        """Token id of each answer after each example's text: ``[batch, n_answers]``.

        Each answer is turned into its id by :meth:`answer_token` (an int is a token id; a string is
        tokenized as it would continue the text the model sees). ``answers`` is one list for the
        whole batch or one list per example.

        Args:
            batch: from :meth:`prepare`.
            answers: the answers, one list for the batch or one per example.
            first_token: True scores a string of several tokens by its first token; False raises
                for one. Not given: its first token, with a ``DeprecationWarning`` (the default
                becomes False in the next release).

        Raises:
            InputError: for no answers, answers for another number of examples, an answer that is
                not a non-empty string or a token id in the vocabulary, or (``first_token=False``)
                an answer of several tokens.

        Example:
            >>> model.answer_token_ids(batch, ["yes", "no"])            # one token each
            >>> model.answer_token_ids(batch, said, first_token=True)  # generated words: first token
        """
        if not answers:
            raise InputError("answers is empty; expected e.g. ['yes', 'no']")
        per_example = answers if isinstance(answers[0], (list, tuple)) else [answers] * len(batch)
        if len(per_example) != len(batch):
            raise InputError(f"got answers for {len(per_example)} examples, the batch has {len(batch)}")
        rows = [[self.answer_token(batch, i, a, first_token=first_token is not False) for a in row]
                for i, row in enumerate(per_example)]
        if first_token is None:
            several = sorted({a for i, row in enumerate(per_example) for a in row if isinstance(a, str)
                              and len(self.continuation_tokens(batch, i, a)) > 1})
            if several:
                warnings.warn(f"answer_token_ids: {several} are several tokens each; their first token "
                              "is scored. Pass first_token=True to keep this, or first_token=False to "
                              "raise InputError instead (the default in the next release)",
                              DeprecationWarning, stacklevel=2)
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def continuation_tokens(self, batch: Batch, i: int, answer: str) -> list[int]:
        """The token ids ``answer`` adds after the text example ``i`` ends with, tokenized as a
        continuation of that text (with a leading space when the text does not end in whitespace).

        Example:
            >>> model.continuation_tokens(batch, 0, "yes")   # one id for most tokenizers
        """
        text = self._context_text(batch, i)
        joined = text + (answer if text[-1:].isspace() or answer[:1].isspace() else " " + answer)
        base = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(joined, add_special_tokens=False)["input_ids"]
        k = 0
        while k < min(len(base), len(full)) and base[k] == full[k]:
            k += 1
        return [int(t) for t in full[k:]]

    def _context_text(self, batch: Batch, i: int, n_tokens: int = 8) -> str:
        """The text of the last tokens the model actually sees (after the processor's own
        additions, e.g. PaliGemma's trailing newline), for tokenizing an answer after it."""
        layout = batch.layouts[i]
        valid = layout.positions("all")
        tail = batch.input_ids[i, valid[-n_tokens:]].tolist()
        return self.tokenizer.decode(tail, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def answer_token(self, batch: Batch, i: int, answer: str | int, *, first_token: bool = False,
                     what: str = "answer") -> int:
        """The token id that scores ``answer`` after example ``i``'s text: the one rule by which
        lvlm_probe turns an answer into a token (targets and foils of attribution methods, answers
        of :meth:`answer_token_ids`).

        An int is a token id. A string is tokenized as it continues the text the model sees
        (:meth:`continuation_tokens`) and must add exactly one token, unless ``first_token`` asks
        explicitly for the first of several.

        Args:
            batch, i: the batch and the example whose text the answer continues.
            answer: a non-empty string or a token id.
            first_token: score an answer of several tokens by its first token instead of raising.
            what: the answer's role, for error messages (``"target"``, ``"foil"``, ...).

        Raises:
            InputError: for an answer that is neither, a token id outside the vocabulary, a string
                that adds no token, or one that adds several without ``first_token=True``.
        """
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < self.d_vocab:
                raise InputError(f"example {i}: {what} token id {answer} is outside the vocabulary "
                                 f"[0, {self.d_vocab})")
            return answer
        if not isinstance(answer, str) or not answer.strip():
            raise InputError(f"example {i}: {what} must be a non-empty string or a token id, got {answer!r}")
        tokens = self.continuation_tokens(batch, i, answer)
        if not tokens:
            raise InputError(f"example {i}: {what} {answer!r} adds no token to the prompt text")
        if len(tokens) > 1 and not first_token:
            pieces = self.tokenizer.convert_ids_to_tokens(tokens)
            words = answer.split()
            # suggest the first word only where it is one token itself, so the hint always works
            single = len(words) > 1 and len(self.continuation_tokens(batch, i, words[0])) == 1
            hint = f"score its first word, {words[0]!r}, " if single else ""
            raise InputError(f"example {i}: {what} {answer!r} is {len(tokens)} tokens {pieces} after the "
                             f"prompt; one token is required ({hint}pass a token id, e.g. {tokens[0]} for "
                             f"{pieces[0]!r}, or ask explicitly for its first token where offered: "
                             "first_token=True)")
        return tokens[0]

    def answer_logprobs(
        self, batch: Batch, answers: list[str | int] | list[list[str | int]], *, first_token: bool | None = None
    ) -> Float[Tensor, "batch n_answers"]:
        """Next-token log-probabilities of each answer's token at the last position.

        Args:
            batch: from :meth:`prepare`.
            answers: as in :meth:`answer_token_ids`.
            first_token: as in :meth:`answer_token_ids` (score an answer of several tokens by its
                first token, or raise for one).

        Returns:
            ``[batch, n_answers]`` log-probabilities (float32).
        """
        ids = self.answer_token_ids(batch, answers, first_token=first_token)
        logits = self.forward(batch, last_position=True).logits[:, -1].float()
        return torch.log_softmax(logits, dim=-1).gather(1, ids)

    # --- capture ------------------------------------------------------------------------------
    def capture(self, names: str | list[str], positions: Any = "all", reduce: str = "none") -> hooks.Capture:
        """A context manager that captures activations by hook name (see :mod:`lvlm_probe.hooks`).

        Args:
            names: names or ``*`` patterns, e.g. ``["blocks.*.hook_resid_post", "blocks.3.attn.hook_z"]``.
            positions: ``"all"``, ``"image"``, ``"prompt"``, ``"template"``, ``"last"``, a prompt word,
                or a callable ``layout -> LongTensor``.
            reduce: ``"none"`` (padded ``[batch, pos, ...]``), ``"mean"`` or ``"last"`` (``[batch, ...]``).

        Returns:
            A context manager whose ``__enter__`` gives the :class:`~lvlm_probe.hooks.ActivationCache`.

        Raises:
            HookNameError: for a name this model does not offer (see :meth:`hook_names`).
            InputError: for a bad selector or reduction.

        Example:
            >>> with model.capture("blocks.*.hook_resid_post", positions="image") as cache:
            ...     model.forward(batch)
            >>> cache.stack("blocks.*.hook_resid_post")   # [layer, batch, pos, d_model]
        """
        return hooks.Capture(self, names, positions=positions, reduce=reduce)

    def hook_names(self) -> list[str]:
        """Every hook name this model offers, in the order a forward pass runs them."""
        return list(hooks.hook_points(self))

    # --- persistence and display ---------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Save the model (safetensors) and processor in Hugging Face format; ``lp.load`` reads it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(path)
        self.processor.save_pretrained(path)
        return path

    def summary(self) -> str:
        n_params = sum(p.numel() for p in self.hf.parameters())
        return (
            f"{type(self.hf).__name__} (family {self.family.name}): {n_params / 1e6:.2f}M parameters, "
            f"{self.vision_layers} vision layers, {self.n_layers} LM layers x {self.n_heads} heads, "
            f"d_model={self.d_model}, vocab={self.d_vocab}, {self.dtype} on {self.device}"
        )

    def __repr__(self) -> str:
        return f"LVLM({self.summary()})"


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """The arguments :func:`load` was called with, to build the same model in another process.

    Attributes:
        name_or_path: the hub id or local folder.
        dtype: the dtype name (``"float32"``, ``"bfloat16"``, ...).
        attn_implementation, trust_remote_code: as passed to :func:`load`.
        hf_kwargs: the other ``from_pretrained`` keywords (``device_map``, ``max_memory``, ...).
    """

    name_or_path: str
    dtype: str
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    hf_kwargs: tuple[tuple[str, Any], ...] = ()

    def replace(self, **overrides: Any) -> LoadSpec:
        """The same spec with some :func:`load` keywords replaced (``None`` removes a
        ``from_pretrained`` keyword), e.g. ``spec.replace(device_map="auto", max_memory=None)``."""
        fields = {k: overrides.pop(k) for k in ("dtype", "attn_implementation", "trust_remote_code")
                  if k in overrides}
        if isinstance(fields.get("dtype"), torch.dtype):
            fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
        kwargs = {**dict(self.hf_kwargs), **overrides}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return dataclasses.replace(self, **fields, hf_kwargs=tuple(sorted(kwargs.items())))

    def load(self, device: str | torch.device | None = None) -> LVLM:
        """Load the model again (on ``device`` unless the spec holds a ``device_map``)."""
        return load(self.name_or_path, device=device, dtype=self.dtype,
                    attn_implementation=self.attn_implementation,
                    trust_remote_code=self.trust_remote_code, **dict(self.hf_kwargs))


def input_device(placement: dict[str, Any]) -> torch.device:
    """The device a ``device_map``-placed model takes its inputs on.

    accelerate runs CPU- and disk-offloaded modules on the first accelerator of the map (or the
    CPU when there is none), so that is also where the first module's inputs must be.
    """
    accelerators = [v for v in placement.values() if not (isinstance(v, str) and v in ("cpu", "disk", "meta"))]
    first = next(iter(placement.values()))
    if isinstance(first, str) and first in ("cpu", "disk", "meta"):
        first = accelerators[0] if accelerators else "cpu"
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def load(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    **hf_kwargs: Any,
) -> LVLM:
    """Load a supported vision-language model and its processor, to run here with transformers.

    :func:`lvlm_probe.load` is the public entry point: it documents these arguments, takes the same
    ones and also ``backend="nnsight"`` (models run through nnsight, e.g. on NDIF), and calls this
    function for the default backend.

    Returns:
        An :class:`LVLM` in eval mode.

    Raises:
        UnsupportedModelError: the checkpoint's class has no adapter (names the supported ones).
        ModelLoadError: the checkpoint cannot be read.
        InputError: ``max_memory`` without ``device_map``.
    """
    if max_memory is not None and device_map is None:
        raise InputError(f"max_memory={max_memory!r} needs a device_map (e.g. device_map='auto')")
    torch_dtype = resolve_dtype(dtype)
    if device_map is not None:
        hf_kwargs["device_map"] = device_map
    if max_memory is not None:
        hf_kwargs["max_memory"] = max_memory
    torch_device = resolve_device(device)
    source = str(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read a model config from {source!r}: {err}") from err
    family = families.for_config(config)
    cls_name = families.hf_class_name(config, family)
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} has no class {cls_name}; upgrade transformers"
        )
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(hf_kwargs)
    try:
        hf = cls.from_pretrained(source, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"cannot load {cls_name} from {source!r}: {err}") from err
    except ValueError as err:
        if "device_map" not in hf_kwargs:
            raise
        raise InputError(f"cannot place {cls_name} with device_map={device_map!r}: {err}") from err
    if "device_map" not in hf_kwargs:
        hf.to(torch_device)
    hf.eval()
    model = LVLM(hf, processor, family)
    model.source = LoadSpec(source, str(torch_dtype).removeprefix("torch."), attn_implementation,
                            trust_remote_code, tuple(sorted(hf_kwargs.items())))
    return model
