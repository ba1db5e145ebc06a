"""Attention patterns and scores, read from inside the attention computation.

Hugging Face attention modules return the post-softmax pattern only under eager attention, and
never return the pre-softmax scores. While a capture asks for ``hook_pattern`` or
``hook_attn_scores``, the language model's attention runs through :data:`IMPLEMENTATION`, an
attention implementation registered with transformers' ``AttentionInterface`` (and, for its masks,
``AttentionMaskInterface``, as eager). It calls the family's own ``eager_attention_forward``, so the
outputs are exactly those of eager attention, and hands the pattern (and, when asked, the scores)
to the capture's listeners. The model's configured implementation (e.g. ``sdpa``) is restored when
the last capture that needed eager attention exits, also when the block raises. The same
implementation hides chosen key positions from every query (:func:`hiding`), which is how
attribution removes the image or the prompt without moving any position. Layers that mix tokens
without an attention mask (the adapter's ``unmasked_mixing_layers``: linear attention, short
convolutions) have no keys to mask: :func:`removing` runs their mixer on the visible positions
alone, and :func:`hiding_positions` does both for a whole language model.

Registering the implementation adds one namespaced key to transformers' registries; it changes
nothing for models that do not select it.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from einops import einsum, repeat
from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from ..errors import LVLMProbeError

IMPLEMENTATION = "lvlm_probe_eager"

# listener(pattern, scores) for each attention module a capture watches; ``scores`` is a
# zero-argument function, so the extra matmul runs only for captures that ask for scores
Listener = Callable[[Tensor, Callable[[], Tensor]], None]
_LISTENERS: weakref.WeakKeyDictionary[nn.Module, list[Listener]] = weakref.WeakKeyDictionary()
# attention module -> [batch, key] positions hidden from every query (see hiding)
_HIDDEN: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()
# token mixer of an unmasked mixing layer -> [batch, pos] positions cut out of its input (see removing)
_REMOVED: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()
# id(config) -> [config, its implementation before the switch, number of active switches]
_SWITCHED: dict[int, list[Any]] = {}


def attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    *args: Any, **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The family's eager attention, with its pattern and scores handed to listening captures."""
    family_module = sys.modules[type(module).__module__]
    attention_mask = _hide(module, query, key, attention_mask)
    output, pattern = family_module.eager_attention_forward(module, query, key, value, attention_mask,
                                                            *args, **kwargs)
    listeners = _LISTENERS.get(module)
    if listeners:
        scaling = kwargs.get("scaling", args[0] if args else None)
        def compute_scores() -> Tensor:
            return attention_scores(query, key, attention_mask, scaling, kwargs.get("softcap"))
        for listener in listeners:
            listener(pattern, compute_scores)
    return output, pattern


def attention_scores(
    query: Float[Tensor, "batch head q d"],
    key: Float[Tensor, "batch kv_head k d"],
    attention_mask: Float[Tensor, "batch 1 q k"] | None,
    scaling: float | None,
    softcap: float | None = None,
) -> Float[Tensor, "batch head q k"]:
    """Pre-softmax scores as every family's eager attention forms them: ``q . k * scaling``,
    Gemma's soft cap, plus the additive mask (large negative at masked keys). Key heads are
    repeated for grouped-query attention, as ``repeat_kv`` does."""
    groups = query.shape[1] // key.shape[1]
    key = repeat(key, "b kv k d -> b (kv g) k d", g=groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = einsum(query, key, "b h q d, b h k d -> b h q k") * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    return scores


AttentionInterface.register(IMPLEMENTATION, attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def eager(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the given attention modules under :data:`IMPLEMENTATION` for the duration of the block
    (their configs switch back when the last block using them exits)."""
    configs = {id(m.config): m.config for m in modules}
    try:
        for key, config in configs.items():
            entry = _SWITCHED.setdefault(key, [config, config._attn_implementation, 0])
            entry[2] += 1
            config._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for key in configs:
            entry = _SWITCHED.get(key)
            if entry is None:
                continue
            entry[2] -= 1
            if entry[2] == 0:
                entry[0]._attn_implementation = entry[1]
                del _SWITCHED[key]


@contextlib.contextmanager
def listening(watch: Iterable[tuple[nn.Module, Listener]]) -> Iterator[None]:
    """Run the given attention modules under :data:`IMPLEMENTATION` and call each listener with
    its module's pattern and scores, for the duration of the block.

    Args:
        watch: ``(attention module, listener)`` pairs; a module may appear more than once.
    """
    watch = list(watch)
    try:
        for module, listener in watch:
            _LISTENERS.setdefault(module, []).append(listener)
        with eager(m for m, _ in watch):
            yield
    finally:
        for module, listener in watch:
            listeners = _LISTENERS.get(module, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                _LISTENERS.pop(module, None)


@contextlib.contextmanager
def hiding(modules: Iterable[nn.Module], hidden: Bool[Tensor, "batch *query key"]) -> Iterator[None]:
    """Hide some key positions from every query in the given attention modules.

    The hidden keys get the mask's large negative score on top of the family's own mask (causal,
    bidirectional image blocks, sliding windows, padding), so no query attends to them, while
    every position keeps its place (rotary positions do not move). A query whose every key is
    hidden attends uniformly, as a fully padded query row does; nothing reads such rows when the
    hidden keys are the positions before the scored one.

    Args:
        modules: attention modules (the language model's).
        hidden: ``[batch, key]`` booleans, True to hide, over the running sequence; or
            ``[batch, query, key]`` to hide keys from some queries only (attention knockout).
    """
    with hiding_each({module: hidden for module in modules}):
        yield


@contextlib.contextmanager
def hiding_each(masks: dict[nn.Module, Tensor]) -> Iterator[None]:
    """:func:`hiding` with a mask of its own for each module (e.g. knockout in a window of layers)."""
    registered = []
    try:
        for module, hidden in masks.items():
            if module in _HIDDEN:
                raise LVLMProbeError("key hiding is already active on this model; blocks cannot nest")
            _HIDDEN[module] = hidden
            registered.append(module)
        with eager(masks):
            yield
    finally:
        for module in registered:
            _HIDDEN.pop(module, None)


def _hide(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    hidden = _HIDDEN.get(module)
    if hidden is None:
        return attention_mask
    n_keys = key.shape[-2]
    if hidden.shape[-1] != n_keys:
        raise LVLMProbeError(
            f"hidden keys cover {hidden.shape[-1]} positions but the attention runs over {n_keys}; "
            "key hiding applies to a full forward pass, not to generation steps"
        )
    if hidden.ndim == 3 and hidden.shape[1] != query.shape[-2]:
        raise LVLMProbeError(f"hidden keys cover {hidden.shape[1]} queries but the attention runs "
                             f"{query.shape[-2]}; knockout applies to a full forward pass")
    low = torch.finfo(query.dtype).min
    extra = torch.zeros(hidden.shape, dtype=query.dtype, device=query.device).masked_fill(
        hidden.to(query.device), low)
    extra = extra[:, None, None, :] if hidden.ndim == 2 else extra[:, None]
    if attention_mask is None:
        return extra.expand(query.shape[0], 1, query.shape[-2], n_keys)
    if not bool(hidden.any()):
        return attention_mask  # nothing hidden in this module: the family's mask, untouched
    # adding two large negatives would overflow to -inf (and NaN rows); clamp at the minimum
    return (attention_mask[..., :n_keys] + extra).clamp(min=low)


@contextlib.contextmanager
def hiding_positions(model: Any, hidden: Bool[Tensor, "batch key"]) -> Iterator[None]:
    """Hide positions from the whole language model of an :class:`~lvlm_probe.LVLM`: their keys
    are masked at every self-attention layer (:func:`hiding`) and they are cut out of the input of
    every unmasked mixing layer's token mixer (:func:`removing`). Every other position then reads
    nothing from them, in any layer.

    Args:
        model: an ``LVLM`` (its family's ``self_attention_layers`` and ``unmasked_mixing_layers``).
        hidden: ``[batch, key]`` booleans, True to hide, over the running sequence.
    """
    family, config = model.family, model.config
    attention = [model.module(f"{family.lm_layers}.{layer}.{family.lm_attn}")
                 for layer in family.self_attention_layers(config)]
    mixers = [model.module(f"{family.lm_layers}.{layer}.{family.lm_mixer}")
              for layer in family.unmasked_mixing_layers(config)]
    with hiding(attention, hidden), removing(mixers, hidden):
        yield


@contextlib.contextmanager
def removing(mixers: Iterable[nn.Module], hidden: Bool[Tensor, "batch pos"]) -> Iterator[None]:
    """Cut positions out of the token mixers of layers that mix without an attention mask.

    A linear-attention recurrence or a causal convolution reads every earlier position through
    its state or its window, and no mask reaches it (a padding mask zeroes inputs, which still
    decay the state and fill the window). So for each row with hidden positions, the mixer runs
    again on that row's visible (and unpadded) positions alone, as one sequence, and its outputs
    there replace the full run's; the hidden positions keep the full run's outputs, which nothing
    visible reads. The visible positions then get exactly the outputs of a sequence without the
    hidden ones. This needs a mixer that is causal and reads no position index, called as
    ``mixer(hidden_states)`` (what ``unmasked_mixing_layers`` declares).

    Args:
        mixers: the token-mixing modules (``lm_mixer`` of the unmasked mixing layers).
        hidden: ``[batch, pos]`` booleans, True to cut out.

    Raises:
        LVLMProbeError: for a ``[batch, query, key]`` mask (hiding keys from some queries only has
            no such form), a mixer that removal is already active on, or a run over another length.
    """
    mixers = list(mixers)
    if mixers and hidden.ndim != 2:
        raise LVLMProbeError(
            f"hiding keys from some queries only ({hidden.ndim}-d mask) cannot be done in layers that "
            "mix tokens without an attention mask (a recurrence or convolution has no per-query keys)")
    handles = []
    try:
        for mixer in mixers:
            if mixer in _REMOVED:
                raise LVLMProbeError("position removal is already active on this model; blocks cannot nest")
            _REMOVED[mixer] = hidden
            handles.append(mixer.register_forward_hook(_remove, with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for mixer in mixers:
            _REMOVED.pop(mixer, None)


def _remove(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook of :func:`removing`: the mixer's outputs, recomputed on the visible positions."""
    hidden = _REMOVED[module]
    states = args[0] if args else kwargs["hidden_states"]
    if tuple(hidden.shape) != tuple(states.shape[:2]):
        raise LVLMProbeError(
            f"hidden positions cover {tuple(hidden.shape)} (batch, pos) but the mixer runs over "
            f"{tuple(states.shape[:2])}; removal applies to a full forward pass, not to generation steps")
    keep = ~hidden.to(states.device)
    padding = kwargs.get("attention_mask")
    if torch.is_tensor(padding) and tuple(padding.shape) == tuple(keep.shape):
        keep = keep & padding.to(keep.device).bool()  # a 2-d mask is the padding: cut it out too
    out = output[0] if isinstance(output, tuple) else output
    out = out.clone()
    for row in hidden.any(-1).nonzero().flatten().tolist():
        visible = keep[row].nonzero().flatten()
        if visible.numel():
            # forward, not __call__: other hooks (captures, edits) see only the layer's own call
            again = module.forward(states[row:row + 1, visible])
            out[row, visible] = (again[0] if isinstance(again, tuple) else again)[0].to(out.dtype)
    return (out, *output[1:]) if isinstance(output, tuple) else out


def active() -> tuple[int, int]:
    """(modules with listeners, configs switched to eager): both 0 when no capture is open."""
    return len(_LISTENERS), len(_SWITCHED)
