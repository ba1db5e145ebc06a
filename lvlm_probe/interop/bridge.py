"""A TransformerLens ``TransformerBridge`` over a loaded :class:`~lvlm_probe.LVLM`'s weights.

The bridge is built from the model already in memory: nothing is read from the hub or from disk.
TransformerLens builds a bridge by replacing the HF model's submodules with its own wrappers in
place, switching attention to eager, and normalising the tokenizer (padding side, special tokens).
Done on ``model.hf`` that would move every module path the family adapter declares and change how
``model.prepare`` pads. So the bridge wraps a *twin* of ``model.hf``: new module objects that hold
the very same parameter and buffer tensors (no copy, no extra memory), with their own config, and a
copy of the tokenizer. ``model.hf`` keeps its modules, hooks and attention implementation.

Because the weights are shared, an in-place weight edit through either object shows in both;
TransformerLens's weight processing (``bridge.enable_compatibility_mode()``,
``bridge.process_weights()``) folds and centres weights in place, so build the bridge with
``share_weights=False`` before calling those.

The LM hook names are TransformerLens's own, and ``model.capture`` and ``bridge.run_with_cache``
agree name for name on ``hook_embed``, ``blocks.{l}.hook_resid_pre|mid|post``,
``blocks.{l}.hook_attn_out|mlp_out`` (the writes into the residual stream, also with Gemma 3's
sandwich norms), ``blocks.{l}.attn.hook_q|k|v|z|pattern|result``, ``ln_final.hook_normalized|out``
and, on the unmasked entries, ``hook_attn_scores``. The other towers have other names on the
bridge; :func:`bridge_names` gives, for each of ours, the bridge name holding the same quantity:

- ``vision.blocks.{l}.hook_resid_post`` and ``projector.hook_out`` are the bridge's
  ``vision_encoder.encoder_layers.{l}.hook_out`` (Qwen2.5-VL: ``vision_encoder.blocks.{l}``) and
  ``vision_projector.hook_out``.

The bridge caches ``hook_result`` only after ``bridge.set_use_attn_result(True)``, which some
adapters (Qwen2.5-VL) refuse; its Qwen2.5-VL ``hook_attn_scores`` holds the softmaxed pattern.
Positions where the attention mask is 0 (left padding) are not comparable: eager and SDPA
attention fill fully masked query rows differently.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..families import registry
from ..hooks.names import expand, hook_points
from .guard import PackageInstallError, no_installs


def _tl_architectures() -> set[str]:
    """HF class names TransformerLens's bridge has an architecture adapter for."""
    from transformer_lens.factories.architecture_adapter_factory import (
        SUPPORTED_ARCHITECTURES,
        ArchitectureAdapterFactory,
    )

    # adapters registered at run time (register_adapter, entry points) live on the factory
    return set(SUPPORTED_ARCHITECTURES) | set(getattr(ArchitectureAdapterFactory, "_adapters", {}))


def bridge_families() -> list[str]:
    """The families whose HF class TransformerLens's ``TransformerBridge`` supports.

    Returns:
        Sorted family names, e.g. ``["gemma3", "idefics3", "llava", ...]``.

    Example:
        >>> "llava" in lp.interop.bridge_families()
        True
    """
    supported = _tl_architectures()
    return sorted(name for name, fam in registry().items() if set(fam.hf_classes) & supported)


def twin(hf: torch.nn.Module, *, share_weights: bool = True) -> torch.nn.Module:
    """A structural copy of a module tree whose parameters and buffers are the original tensors.

    Modules, configs and other attributes are copied; every parameter and buffer is the same
    object as in ``hf`` (deep-copying with them pre-filled in the memo), so the twin costs no
    weight memory and always computes with the current weights.

    Args:
        hf: the model to copy.
        share_weights: False copies the parameters and buffers too (a full, independent copy).

    Returns:
        The twin, in the same training mode, without lvlm_probe's capture hooks.

    Example:
        >>> t = twin(model.hf)
        >>> all(a is b for a, b in zip(t.parameters(), model.hf.parameters()))
        True
    """
    shared = {id(t): t for t in (*hf.parameters(), *hf.buffers())} if share_weights else {}
    # Hook callables are shared, not copied: a hook bound to an object (lvlm_probe's own capture,
    # inside a `model.capture` block) would otherwise drag that object into the copy.
    for module in hf.modules():
        for hooks in _hook_dicts(module):
            shared.update({id(fn): fn for fn in hooks.values()})
    copied = copy.deepcopy(hf, memo=shared)
    # lvlm_probe's capture hooks would record the twin's runs into the user's cache; others stay
    for module in copied.modules():
        for hooks in _hook_dicts(module):
            for key in [k for k, fn in hooks.items()
                        if getattr(fn, "__module__", "").startswith("lvlm_probe.")]:
                del hooks[key]
    return copied


def _hook_dicts(module: torch.nn.Module) -> list[dict[int, Any]]:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [getattr(module, name) for name in names if getattr(module, name, None)]


def transformer_bridge(model: Any, *, share_weights: bool = True) -> Any:
    """A TransformerLens ``TransformerBridge`` over the model's own weights.

    Args:
        model: an :class:`~lvlm_probe.LVLM` of a family in :func:`bridge_families`.
        share_weights: wrap a twin of ``model.hf`` sharing its parameter tensors (the default;
            see the module docstring); False wraps a full copy, for TransformerLens weight
            processing that edits weights in place.

    Returns:
        A ``transformer_lens.model_bridge.TransformerBridge``; ``bridge.processor`` is the model's
        processor, and ``bridge.original_model`` the wrapped twin (or copy).

    Raises:
        UnsupportedModelError: the family has no TransformerLens adapter, or TransformerLens
            could not build a bridge for this checkpoint.
        PackageInstallError: TransformerLens tried to install a package (never run).

    Example:
        >>> bridge = lp.interop.transformer_bridge(model)
        >>> logits, cache = bridge.run_with_cache(**lp.interop.bridge_inputs(batch),
        ...                                       names_filter=lambda n: n.endswith("hook_resid_post"))
    """
    hf_class = type(model.hf).__name__
    if hf_class not in _tl_architectures():
        raise UnsupportedModelError(
            f"TransformerLens has no TransformerBridge adapter for the {model.family.name!r} family "
            f"({hf_class}); bridge families: {bridge_families()}"
        )
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.utilities.attn_implementation import force_eager_attention

    # build_bridge_from_module takes the loaded module as it is: unlike boot_transformers it never
    # loads a config, tokenizer or processor by name (so never reaches the loader that installs
    # torchvision), and the guard refuses any installer that something else might start.
    with no_installs():
        hf = twin(model.hf, share_weights=share_weights)
        # Eager attention makes hook_pattern / hook_attn_scores fire, as boot_transformers does.
        force_eager_attention(hf)
        name = getattr(model.hf.config, "_name_or_path", "") or model.family.name
        try:
            bridge = build_bridge_from_module(
                hf, hf_class, hf_config=hf.config, tokenizer=copy.deepcopy(model.tokenizer),
                dtype=model.dtype, device=model.device, model_name=str(name),
            )
        except PackageInstallError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as err:
            raise UnsupportedModelError(
                f"TransformerLens could not build a bridge for this {model.family.name} model "
                f"({hf_class}): {err}"
            ) from err
    bridge.processor = model.processor
    return bridge


def bridge_inputs(batch: Any) -> dict[str, Any]:
    """Keyword arguments for ``bridge(...)`` / ``bridge.run_with_cache(...)`` from a Batch.

    The token ids become the bridge's ``input``; everything else the processor made
    (``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...) is passed through unchanged,
    so the bridge's HF model receives exactly what ``model.forward(batch)`` gives ``model.hf``.

    Args:
        batch: a :class:`~lvlm_probe.Batch` from ``model.prepare``.

    Returns:
        ``{"input": input_ids, **other processor outputs}``.

    Example:
        >>> logits = bridge(**lp.interop.bridge_inputs(batch))
    """
    inputs = dict(batch.inputs)
    return {"input": inputs.pop("input_ids"), **inputs}


# Our name -> the bridge names holding the same quantity, in order of preference.
_LIKE_FOR_LIKE: list[tuple[re.Pattern[str], tuple[str, ...]]] = [
    (re.compile(r"^vision\.blocks\.(\d+)\.hook_resid_post$"),
     ("vision_encoder.encoder_layers.{0}.hook_out", "vision_encoder.blocks.{0}.hook_out")),
    (re.compile(r"^projector\.hook_out$"), ("vision_projector.hook_out",)),
    # a layer that mixes tokens without attention (linear attention): its mixer's output
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), ("blocks.{0}.hook_attn_out", "blocks.{0}.linear_attn.hook_out")),
]


def bridge_names(model: Any, bridge: Any, names: str | list[str]) -> dict[str, str | None]:
    """For each of our names, the bridge hook that holds the same quantity.

    The same name in the language model; see the module docstring for the other towers.

    Args:
        model: the :class:`~lvlm_probe.LVLM` the bridge was built from.
        bridge: its :func:`transformer_bridge`.
        names: our names or ``*`` patterns.

    Returns:
        ``{our name: bridge name}``, None where the bridge has no such hook (e.g. Mllama's
        cross-attention names, or the Q-Former's).

    Raises:
        HookNameError: a name the model does not offer.

    Example:
        >>> lp.interop.bridge_names(model, bridge, "projector.hook_out")
        {'projector.hook_out': 'vision_projector.hook_out'}
    """
    available = set(bridge.hook_dict)
    result: dict[str, str | None] = {}
    for name in expand(names, list(hook_points(model))):
        candidates: tuple[str, ...] = (name,)
        for regex, templates in _LIKE_FOR_LIKE:
            if match := regex.match(name):
                candidates = tuple(t.format(*match.groups()) for t in templates)
                break
        result[name] = next((c for c in candidates if c in available), None)
    return result
