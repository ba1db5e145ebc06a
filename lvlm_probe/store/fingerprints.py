"""A fingerprint of everything that decides a model's activations on a dataset.

Parts (each a short hex digest, so a mismatch can say which part differs):

* ``model``: the HF class and the family adapter;
* ``config``: the model config (``to_dict``) without private and bookkeeping keys
  (``_name_or_path``, ``transformers_version``: where or with which library version a checkpoint
  was saved does not change its activations);
* ``weights``: dtype, and for every parameter its name, shape and the bytes of up to
  ``SAMPLES`` evenly spaced elements. Reading a few elements per tensor costs milliseconds even for
  a 70B model (no full pass over the weights, no reduction whose float rounding would depend on the
  device), and any retraining, fine-tune or change of seed changes the sampled values. It is a
  guard against opening a store with the wrong model, not a cryptographic proof of identical weights;
* ``processor``: processor class and configuration (image processor included), chat template,
  tokenizer class, vocabulary and special tokens, and the family's processor options.

``digest`` combines the parts.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

SAMPLES = 256
PARTS = ("model", "config", "weights", "processor")


def _digest(value: Any) -> str:
    if not isinstance(value, bytes):
        value = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(value).hexdigest()[:16]


def _public(value: Any) -> Any:
    """Drop private (``_``-prefixed) and bookkeeping keys, recursively."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()
                if not str(k).startswith("_") and k != "transformers_version"}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    return value


def _offloaded(hf: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The values of a parameter that accelerate offloaded to the CPU or disk (its module's hook
    keeps them in a weights map; disk entries are memory maps, so sampling reads a few pages)."""
    owner, _, leaf = name.rpartition(".")
    hook = getattr(hf.get_submodule(owner) if owner else hf, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    try:
        return None if weights is None else weights[leaf]
    except KeyError:
        return None


def _weights(hf: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, param in hf.named_parameters():
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        if param.device.type == "meta":
            # a device_map model fingerprints like the same model on one device
            param = _offloaded(hf, name)
        if param is None or param.numel() == 0:
            continue  # empty, or meta without values anywhere: only its name and shape count
        flat = param.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel()), device=flat.device)
        # float32 positions above 2**24 round: the last may land one past the end (a 32064 x 4096
        # embedding does), so clamp it; kept in float32 so existing stores keep their fingerprints
        index = index.round().long().clamp_(max=flat.numel() - 1)
        sample = flat[index].cpu().contiguous()
        # bytes through uint8, as numpy has no bfloat16
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _processor(model: Any) -> str:
    processor, tokenizer = model.processor, model.tokenizer
    try:
        config = processor.to_dict()
    except Exception:  # some processors cannot serialise themselves; the other parts still count
        config = {}
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return _digest({
        "class": type(processor).__name__,
        "config": _public(config),
        "template": template,
        "tokenizer": type(tokenizer).__name__,
        "vocab": _digest(json.dumps(vocab).encode()),
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "family_kwargs": model.family.processor_kwargs(),
    })


def fingerprint(model: Any) -> dict[str, str]:
    """The fingerprint of an :class:`~lvlm_probe.LVLM` and its processor.

    Args:
        model: the model.

    Returns:
        ``{"digest", "model", "config", "weights", "processor"}``, each a 16-digit hex string
        (``digest`` combines the others).

    Example:
        >>> fingerprint(lp.zoo.tiny("llava"))["digest"]
        '3f1c...'
    """
    parts = {
        "model": _digest([type(model.hf).__name__, model.family.name]),
        "config": _digest(_public(model.config.to_dict())),
        "weights": _weights(model.hf),
        "processor": _processor(model),
    }
    return {"digest": _digest(parts), **parts}


def differences(stored: dict[str, str], current: dict[str, str]) -> list[str]:
    """Names of the fingerprint parts that differ (``"model"``, ``"weights"``, ...)."""
    return [p for p in PARTS if stored.get(p) != current.get(p)]
