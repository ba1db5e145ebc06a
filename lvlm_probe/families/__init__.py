"""Model-family adapters. Each module in this package defines one :class:`Family` subclass, which
registers itself by being defined; this package imports every module, so adding a family is adding
a file."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import UnsupportedModelError
from .base import Family, registry

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
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

    Raises:
        UnsupportedModelError: if no adapter handles the config's class.
    """
    archs = list(getattr(config, "architectures", None) or [])
    for cls in registry().values():
        if any(a in cls.hf_classes for a in archs):
            return cls()
    model_type = getattr(config, "model_type", None)
    for cls in registry().values():
        if model_type in cls.model_types:
            return cls()
    supported = sorted(c for cls in registry().values() for c in cls.hf_classes)
    received = ", ".join(archs) or f"model_type={model_type!r}"
    raise UnsupportedModelError(
        f"no lvlm_probe family supports {received}; supported classes: {', '.join(supported)} "
        f"(families: {', '.join(names())})"
    )


__all__ = ["Family", "names", "get", "for_config"]
