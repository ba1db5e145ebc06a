"""Canonical hook names and where each one lives in a Hugging Face model.

Language-model names are TransformerLens's own, so a name that works on a TransformerBridge works
here. Each name maps to a :class:`HookPoint`: a module path (from the family adapter, which
declares paths as data), whether the value is the module's output or its input (forward pre-hook),
and an optional transform of that value:

==========================================  ====================================================
name                                        value
==========================================  ====================================================
``hook_embed``                              output of ``lm_embed`` (token embeddings, before image
                                            features replace the placeholder embeddings)
``blocks.{l}.hook_resid_pre``               hidden states entering LM layer ``l``
``blocks.{l}.attn.hook_q`` / ``hook_k`` /   outputs of the query / key / value projections, heads
``hook_v``                                  split: ``[b, p, head, d_head]`` (keys and values have
                                            ``n_kv_heads`` heads); before any q/k norm and rotary.
                                            Head counts and widths are the layer's own
                                            (``model.n_kv_heads_of(l)``, ``model.d_head_of(l)``)
``blocks.{l}.attn.hook_attn_scores``        pre-softmax scores ``[b, head, query, key]``: scaled
                                            dot products (soft-capped where the family does) plus
                                            the additive mask (a large negative at masked keys)
``blocks.{l}.attn.hook_pattern``            attention weights ``[b, head, query, key]``
``blocks.{l}.attn.hook_z``                  input of the attention out-projection, ``[b, p, h, d_head]``
``blocks.{l}.attn.hook_result``             each head's write through the out-projection, bias
                                            excluded, ``[b, p, h, d_model]``: summed over heads plus
                                            the out-projection's bias it equals ``hook_attn_out``
``blocks.{l}.hook_attn_out``                the attention's write into the residual stream: the
                                            attention module's output (Gemma 3: after its
                                            post-attention norm)
``blocks.{l}.hook_resid_mid``               residual stream between attention and MLP (input of
                                            the family's ``lm_resid_mid`` norm)
``blocks.{l}.hook_mlp_out``                 the MLP's write: output of the layer's MLP (BLIP-2/OPT:
                                            of ``fc2``; Gemma 3: after its post-feedforward norm)
``blocks.{l}.hook_resid_post``              LM layer ``l``'s output
``ln_final.hook_normalized``                the final norm's input normalised, before its learned
                                            scale (and bias): ``x / rms(x)`` for RMSNorm
``ln_final.hook_out``                       output of ``lm_norm`` (what the unembedding reads)
``vision.blocks.{l}.hook_resid_post``       vision-tower layer ``l``'s output
``vision.global_blocks.{l}.hook_resid_post``  Mllama's global vision encoder, layer ``l``
``projector.hook_out``                      output of the family's last projector module
``projector.injection.{k}.hook_out``        image features added to the residual stream after LM
                                            layer ``image_injection_layers[k]`` (Qwen3-VL DeepStack)
``qformer.blocks.{l}.hook_resid_post``      BLIP-2's Q-Former layer ``l`` (its query states)
==========================================  ====================================================

Mllama's cross-attention layers (``cross_attention_layers(config)``) have no self-attention: there
the attention names live under ``blocks.{l}.cross_attn.`` (``hook_q`` ... ``hook_result``, and
``.hook_attn_out``: the cross-attention module's output, before the layer's tanh gate), and
``blocks.{l}.attn.*`` and ``blocks.{l}.hook_attn_out`` are not offered. So
``blocks.*.hook_attn_out`` there expands to the self-attention layers only. Cross-attention keys
and values run over the vision states, not the token sequence, so they are captured whole.

Layers whose attention has no key or value projection of its own do not offer ``hook_k`` /
``hook_v``: Gemma 4's last ``num_kv_shared_layers`` layers reuse the keys and values an earlier
layer of the same attention type computed (they have no ``k_proj`` / ``v_proj``; that layer's
``hook_k`` / ``hook_v`` are what they attend with). A layer whose keys double as values
(Gemma 4's full-attention layers with ``attention_k_eq_v``: no ``v_proj``) offers ``hook_v`` as
the input of its value norm (``lm_v_norm``): the key projection's output, as the values see it.
Head widths and key/value head counts may differ per layer (Gemma 4's full-attention layers have
wider heads): ``model.d_head`` and ``model.n_kv_heads`` then raise, and
``model.d_head_of(layer)`` / ``model.n_kv_heads_of(layer)`` give each layer's.

Layers that mix tokens without an attention mask (``unmasked_mixing_layers(config)``: linear
attention, short convolutions) have no ``blocks.{l}.attn.*`` names; their ``blocks.{l}.hook_attn_out``
is the output of the family's ``lm_mixer`` module (its write into the residual stream).

The meanings are TransformerLens's: ``hook_attn_out`` and ``hook_mlp_out`` are what is added to
the residual stream, so ``resid_pre + attn_out = resid_mid`` and ``resid_mid + mlp_out =
resid_post`` in every family except Mllama's gated cross-attention layers. Sandwich-norm families
(Gemma 3) normalise the attention and MLP outputs before adding them; there the two names are the
outputs of those norms (``hook_result`` summed over heads is the attention output before it).

Patterns and scores need eager attention: they are read from inside the attention computation
(see :mod:`lvlm_probe.hooks.attention`), which runs eagerly only while they are captured.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import HookNameError

# How a hook point's value is read from its module.
#   output:    the module's output (its first element when the module returns a tuple)
#   input:     the module's first input, read by a forward pre-hook
#   attention: the attention module's pattern or scores, handed over by hooks.attention
# A "normalized" transform normalises a norm's input without the norm's learned affine part.
KINDS = ("output", "input", "attention")
# Where a value lives: LM values are [batch, pos, ...] over the token sequence (attention patterns
# and scores [batch, head, query, key]); the others are in their tower's own layout (e.g. Qwen2-VL
# packs every image's patches into one axis) and are captured whole.
SPACES = ("lm", "vision", "projector", "qformer")
# Transforms of a value: "heads" splits the last axis into `heads` heads; "result" projects each
# head of z through the out-projection; "pattern" and "scores" pick the attention value.
TRANSFORMS = (None, "heads", "result", "pattern", "scores", "normalized")


@dataclass(frozen=True)
class HookPoint:
    """One capturable value.

    Attributes:
        name: canonical name, e.g. ``"blocks.3.attn.hook_z"``.
        path: dotted module path from the top-level HF model.
        kind: ``"output"``, ``"input"`` or ``"attention"`` (see ``KINDS``).
        space: where the value lives (see ``SPACES``).
        layer: the layer index, or None for names outside the blocks.
        transform: see ``TRANSFORMS``.
        heads: for ``"heads"`` and ``"result"``, the number of heads the last axis holds.
        attn_out: for ``"result"``, the path of the out-projection whose weight splits heads.
    """

    name: str
    path: str
    kind: str
    space: str
    layer: int | None = None
    transform: str | None = None
    heads: int | None = None
    attn_out: str | None = None


def hook_points(model: Any) -> dict[str, HookPoint]:
    """Every hook point an :class:`~lvlm_probe.LVLM` offers, in the order a forward pass runs them.

    Args:
        model: an ``LVLM`` (uses ``model.family``, ``model.config``, ``model.n_layers``,
            ``model.n_heads``, ``model.n_kv_heads_of``, ``model.vision_layers``).

    Returns:
        ``{name: HookPoint}``.
    """
    fam, points = model.family, []
    if fam.vision_layers is not None:
        points += _tower(fam.vision_layers, model.vision_layers, "vision.blocks", "vision")
    if getattr(fam, "vision_global_layers", None):
        points += _tower(fam.vision_global_layers, fam.n_vision_global_layers(model.config),
                         "vision.global_blocks", "vision")
    if getattr(fam, "qformer_layers", None):
        points += _tower(fam.qformer_layers, fam.n_qformer_layers(model.config), "qformer.blocks",
                         "qformer")
    points.append(HookPoint("projector.hook_out", fam.projector[-1], "output", "projector"))
    for k, path in enumerate(fam.image_injection_modules(model.config)):
        points.append(HookPoint(f"projector.injection.{k}.hook_out", path, "output", "projector"))
    points.append(HookPoint("hook_embed", fam.lm_embed, "output", "lm"))
    cross = set(getattr(fam, "cross_attention_layers", lambda config: [])(model.config))
    unmasked = set(fam.unmasked_mixing_layers(model.config))
    for layer in range(model.n_layers):
        block, prefix = f"{fam.lm_layers}.{layer}", f"blocks.{layer}"
        points.append(HookPoint(f"{prefix}.hook_resid_pre", block, "input", "lm", layer))
        if layer in unmasked:
            # linear attention / a short convolution: no heads, queries or pattern, only its write
            points.append(HookPoint(f"{prefix}.hook_attn_out", f"{block}.{fam.lm_mixer}", "output", "lm", layer))
        elif layer in cross:
            points += _attention(model, layer, f"{block}.{fam.lm_cross_attn}", f"{block}.{fam.lm_cross_attn_out}",
                                 f"{prefix}.cross_attn", f"{prefix}.cross_attn.hook_attn_out", cross=True)
        else:
            points += _attention(model, layer, f"{block}.{fam.lm_attn}", f"{block}.{fam.lm_attn_out}",
                                 f"{prefix}.attn", f"{prefix}.hook_attn_out", cross=False,
                                 write=fam.lm_attn_write and f"{block}.{fam.lm_attn_write}")
        if fam.lm_resid_mid is not None:  # parallel attention and MLP have no residual between them
            points.append(HookPoint(f"{prefix}.hook_resid_mid", f"{block}.{fam.lm_resid_mid}", "input",
                                    "lm", layer))
        points += [
            HookPoint(f"{prefix}.hook_mlp_out", f"{block}.{fam.lm_mlp_write or fam.lm_mlp}", "output", "lm",
                      layer),
            HookPoint(f"{prefix}.hook_resid_post", block, "output", "lm", layer),
        ]
    points.append(HookPoint("ln_final.hook_normalized", fam.lm_norm, "input", "lm", transform="normalized"))
    points.append(HookPoint("ln_final.hook_out", fam.lm_norm, "output", "lm"))
    return {p.name: p for p in points}


def _tower(path: str, n_layers: int, prefix: str, space: str) -> list[HookPoint]:
    return [HookPoint(f"{prefix}.{layer}.hook_resid_post", f"{path}.{layer}", "output", space, layer)
            for layer in range(n_layers)]


def _attention(
    model: Any, layer: int, attn: str, out: str, prefix: str, out_name: str, cross: bool,
    write: str | None = None,
) -> list[HookPoint]:
    """The names of one attention module, in the order its forward computes them; ``write`` is the
    module whose output is the attention's write into the residual stream, if not ``attn``."""
    q, k, v = (f"{attn}.{name}" for name in model.family.lm_qkv)
    # cross-attention keys and values run over the vision states, not the token sequence
    kv_space = "vision" if cross else "lm"
    # a query projection that also emits an output gate per head (lm_q_gate) has no query-only
    # output to hook: hook_q is not offered there
    query = [] if model.family.lm_q_gate and not cross else [
        HookPoint(f"{prefix}.hook_q", q, "output", "lm", layer, "heads", model.n_heads)]
    return query + _keys_values(model, layer, attn, k, v, prefix, kv_space) + [
        HookPoint(f"{prefix}.hook_attn_scores", attn, "attention", "lm", layer, "scores"),
        HookPoint(f"{prefix}.hook_pattern", attn, "attention", "lm", layer, "pattern"),
        HookPoint(f"{prefix}.hook_z", out, "input", "lm", layer, "heads", model.n_heads),
        HookPoint(f"{prefix}.hook_result", out, "input", "lm", layer, "result", model.n_heads, out),
        HookPoint(out_name, write or attn, "output", "lm", layer),
    ]


def _keys_values(model: Any, layer: int, attn: str, k: str, v: str, prefix: str, kv_space: str) -> list[HookPoint]:
    """``hook_k`` and ``hook_v`` of one attention module, from the projections it actually has.

    A layer that reuses an earlier layer's keys and values (KV sharing) has no key or value
    projection: it offers neither name. A layer whose keys double as values has no value
    projection: ``hook_v`` is then the input of the value norm (``lm_v_norm``), the key
    projection's output as the values see it, already split into heads; writing it changes the
    values and leaves the keys alone.
    """
    has = {path: _submodule(model, path) is not None for path in (k, v)}
    heads = model.n_kv_heads_of(layer)
    points = []
    if has[k]:
        points.append(HookPoint(f"{prefix}.hook_k", k, "output", kv_space, layer, "heads", heads))
    if has[v]:
        points.append(HookPoint(f"{prefix}.hook_v", v, "output", kv_space, layer, "heads", heads))
    elif has[k] and model.family.lm_v_norm:
        points.append(HookPoint(f"{prefix}.hook_v", f"{attn}.{model.family.lm_v_norm}", "input", kv_space,
                                layer, heads=heads))
    return points


def _submodule(model: Any, path: str) -> Any:
    """The module at ``path``, or None where the model has none there (or holds None there)."""
    try:
        return model.hf.get_submodule(path)
    except AttributeError:
        return None


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A name pattern as a regex: ``*`` matches one layer index (digits only)."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def expand(names: str | list[str] | tuple[str, ...], offered: list[str]) -> list[str]:
    """Expand names and ``*`` patterns against the offered names.

    Args:
        names: a name or pattern, or a list of them.
        offered: the model's names (``model.hook_names()``), in forward order.

    Returns:
        The matching concrete names, deduplicated, in the order of ``offered``.

    Raises:
        HookNameError: for a name or pattern that matches nothing, with close matches.
        TypeError: if ``names`` is not a string or a list of strings.

    Example:
        >>> expand("blocks.*.hook_resid_post", model.hook_names())
        ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"hook names must be a string or a list of strings, got {names!r}")
    if not names:
        raise HookNameError(f"no hook names given; this model offers e.g. {examples(offered)}")
    wanted: set[str] = set()
    for name in names:
        regex = pattern_regex(name)
        hits = [o for o in offered if regex.match(o)]
        if not hits:
            raise HookNameError(unknown_message(name, offered))
        wanted.update(hits)
    return [o for o in offered if o in wanted]


def examples(offered: list[str]) -> list[str]:
    """A few representative names: one per distinct leaf, layer 0 written as ``*``."""
    seen: dict[str, None] = {}
    for name in offered:
        seen.setdefault(re.sub(r"\.\d+\.", ".*.", name), None)
    return list(seen)


def unknown_message(name: str, offered: list[str]) -> str:
    """The error message for a name that matches nothing, with close matches when there are."""
    generic = examples(offered)
    close = difflib.get_close_matches(name, generic + offered, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    return f"unknown hook {name!r}; {hint}this model offers {generic}"
