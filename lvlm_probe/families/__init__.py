"""Model-family adapters. Each module in this package defines one :class:`Family` subclass, which
registers itself by being defined; this package imports every module, so adding a family is adding
a file."""
from __future__ import annotations

import importlib
import pkgutil

from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..errors import UnsupportedModelError
from .base import Family, registry
from .generic import Generic, GenericAdapterWarning, unsupported_reason

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "generic"):
        importlib.import_module(f"{__name__}.{_module.name}")


def names() -> list[str]:
    """Names of the supported families, e.g. ``["blip2", "gemma3", "idefics3", "llava", ...]``."""
    return sorted(registry())


def get(name: str) -> Family:
    """The adapter registered under ``name``.

    Raises:
        UnsupportedModelError: naming the supported families.
    """
    try:
        return registry()[name]()
    except KeyError:
        raise UnsupportedModelError(
            f"unknown family {name!r}; supported families: {', '.join(names())}"
        ) from None


def for_config(config) -> Family:
    """The adapter for a Hugging Face config, matched on its architecture class (or model type).

    A class of transformers' image-text-to-text mapping that no adapter handles gets the generic
    adapter (:class:`~lvlm_probe.families.generic.Generic`), unless it cannot fit the structure
    lvlm_probe reads (encoder-decoder models, images as discrete codebook tokens).

    Raises:
        UnsupportedModelError: naming why the model is not supported and the supported families.
    """
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    received = ", ".join(archs) or f"model_type={model_type!r}"
    # a family's class with an encoder-decoder language model (BLIP-2 / InstructBLIP with Flan-T5)
    # is refused too: the adapters read decoder-only language models
    reason = unsupported_reason(config)
    if reason is not None:
        raise UnsupportedModelError(f"lvlm_probe cannot read {received}: {reason}")
    for cls in registry().values():
        if any(a in cls.hf_classes for a in archs):
            return cls()
    for cls in registry().values():
        if model_type in cls.model_types:
            return cls()
    image_text = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or any(a in image_text for a in archs):
        return Generic(config)
    supported = sorted(c for cls in registry().values() for c in cls.hf_classes)
    raise UnsupportedModelError(
        f"no lvlm_probe family supports {received}, and it is not an image-text-to-text class of "
        f"transformers (which the generic adapter reads); supported classes: {', '.join(supported)} "
        f"(families: {', '.join(names())})"
    )


def for_model(hf, family: Family | None = None) -> Family:
    """The adapter for a loaded model: :func:`for_config`'s, with the generic adapter's module
    paths discovered from ``hf`` (it warns what it discovered and assumed).

    Raises:
        UnsupportedModelError: as :func:`for_config`, or naming what the generic adapter could not
            find in the model.
    """
    family = family or for_config(hf.config)
    if isinstance(family, Generic) and not family.discovered:
        family.discover(hf)
    return family


def hf_class_name(config, family: Family) -> str:
    """The transformers class to load a checkpoint of ``config`` with."""
    archs = list(getattr(config, "architectures", None) or [])
    known = [a for a in archs if a in family.hf_classes]
    if known:
        return known[0]
    if family.hf_classes:
        return family.hf_classes[0]
    if archs:
        return archs[0]
    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[config.model_type]


__all__ = ["Family", "Generic", "GenericAdapterWarning", "names", "get", "for_config", "for_model",
           "hf_class_name"]
