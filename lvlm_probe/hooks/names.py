"""Canonical hook names and where each one lives in a Hugging Face model.

Language-model names are TransformerLens's own, so a name that works on a TransformerBridge works
here. Each name maps to a :class:`HookPoint`: a module path (from the family adapter, which
declares paths as data), whether the value is the module's output or its input (forward pre-hook),
and an optional transform of that value:

=====================================  =========================================================
name                                   value
=====================================  =========================================================
``hook_embed``                         output of ``lm_embed`` (token embeddings, before image
                                       features replace the placeholder embeddings)
``blocks.{l}.hook_resid_pre``          hidden states entering LM layer ``l``
``blocks.{l}.hook_resid_post``         LM layer ``l``'s output
``blocks.{l}.hook_attn_out``           output of the layer's attention module
``blocks.{l}.hook_mlp_out``            output of the layer's MLP (BLIP-2/OPT: of ``fc2``)
``blocks.{l}.attn.hook_z``             input of the attention out-projection, ``[b, p, h, d_head]``
``blocks.{l}.attn.hook_result``        each head's write through the out-projection, bias
                                       excluded, ``[b, p, h, d_model]``: summed over heads plus
                                       the out-projection's bias it equals ``hook_attn_out``
``ln_final.hook_normalized``           output of ``lm_norm``
``vision.blocks.{l}.hook_resid_post``  vision-tower layer ``l``'s output
``projector.hook_out``                 output of the family's last projector module
=====================================  =========================================================

Mllama's cross-attention layers (``cross_attention_layers(config)``) have no self-attention: there
the attention names are ``blocks.{l}.cross_attn.hook_z``, ``.hook_result`` and ``.hook_attn_out``
(the cross-attention module's output, before the layer's tanh gate), and ``blocks.{l}.attn.*`` and
``blocks.{l}.hook_attn_out`` are not offered. So ``blocks.*.hook_attn_out`` there expands to the
self-attention layers only.

Sandwich-norm families (Gemma 3) normalise the attention and MLP outputs before adding them to the
residual stream; ``hook_attn_out`` / ``hook_mlp_out`` are the module outputs, before that norm.

Attention patterns and scores need eager attention, which this module does not switch to; they are
captured by a separate mechanism, not by these hook points.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import HookNameError

# How a hook point's value is read from its module.
#   output: the module's output (its first element when the module returns a tuple)
#   input:  the module's first input, read by a forward pre-hook
KINDS = ("output", "input")
# Where a value lives: LM values are [batch, pos, ...] over the token sequence; vision and projector
# values are in the tower's own layout (e.g. Qwen2-VL packs every image's patches into one axis).
SPACES = ("lm", "vision", "projector")


@dataclass(frozen=True)
class HookPoint:
    """One capturable value.

    Attributes:
        name: canonical name, e.g. ``"blocks.3.attn.hook_z"``.
        path: dotted module path from the top-level HF model.
        kind: ``"output"`` or ``"input"`` (see ``KINDS``).
        space: ``"lm"``, ``"vision"`` or ``"projector"`` (see ``SPACES``).
        layer: the layer index, or None for names outside the blocks.
        transform: None, ``"z"`` (split heads) or ``"result"`` (per-head out-projection).
        attn_out: for ``z``/``result``, the path of the out-projection whose weight splits heads.
    """

    name: str
    path: str
    kind: str
    space: str
    layer: int | None = None
    transform: str | None = None
    attn_out: str | None = None


def hook_points(model: Any) -> dict[str, HookPoint]:
    """Every hook point an :class:`~lvlm_probe.LVLM` offers, in the order a forward pass runs them.

    Args:
        model: an ``LVLM`` (uses ``model.family``, ``model.config``, ``model.n_layers``,
            ``model.vision_layers``).

    Returns:
        ``{name: HookPoint}``.
    """
    fam, points = model.family, []
    if fam.vision_layers is not None:
        for layer in range(model.vision_layers):
            points.append(HookPoint(f"vision.blocks.{layer}.hook_resid_post",
                                    f"{fam.vision_layers}.{layer}", "output", "vision", layer))
    points.append(HookPoint("projector.hook_out", fam.projector[-1], "output", "projector"))
    points.append(HookPoint("hook_embed", fam.lm_embed, "output", "lm"))
    cross = set(getattr(fam, "cross_attention_layers", lambda config: [])(model.config))
    for layer in range(model.n_layers):
        block, prefix = f"{fam.lm_layers}.{layer}", f"blocks.{layer}"
        if layer in cross:
            attn, attn_out, attn_prefix = fam.lm_cross_attn, fam.lm_cross_attn_out, "cross_attn"
            attn_out_name = f"{prefix}.cross_attn.hook_attn_out"
        else:
            attn, attn_out, attn_prefix = fam.lm_attn, fam.lm_attn_out, "attn"
            attn_out_name = f"{prefix}.hook_attn_out"
        out_path = f"{block}.{attn_out}"
        points += [
            HookPoint(f"{prefix}.hook_resid_pre", block, "input", "lm", layer),
            HookPoint(f"{prefix}.{attn_prefix}.hook_z", out_path, "input", "lm", layer, "z", out_path),
            HookPoint(f"{prefix}.{attn_prefix}.hook_result", out_path, "input", "lm", layer, "result",
                      out_path),
            HookPoint(attn_out_name, f"{block}.{attn}", "output", "lm", layer),
            HookPoint(f"{prefix}.hook_mlp_out", f"{block}.{fam.lm_mlp}", "output", "lm", layer),
            HookPoint(f"{prefix}.hook_resid_post", block, "output", "lm", layer),
        ]
    points.append(HookPoint("ln_final.hook_normalized", fam.lm_norm, "output", "lm"))
    return {p.name: p for p in points}


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
