"""Tiny random-weight instances of every family, built offline from a config.

Each module here builds one family's model and processor with the real transformers classes (text
model 2 layers x 64, vision tower 2 layers x 32, a byte-level BPE tokenizer trained on the spot).
They are saved in Hugging Face format and read back through :func:`lvlm_probe.load`, the same path a
real checkpoint takes. A module registers itself by defining ``FAMILY`` and ``build(seed)``; one that also sets
``GENERIC = True`` builds a model type without a family adapter, read by the generic adapter.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import transformers

from ...errors import UnsupportedModelError

_BUILDERS: dict[str, ModuleType] = {}
for _module in pkgutil.iter_modules(__path__):
    _mod = importlib.import_module(f"{__name__}.{_module.name}")
    if hasattr(_mod, "FAMILY") and hasattr(_mod, "build"):
        _BUILDERS[_mod.FAMILY] = _mod


def available() -> list[str]:
    """Families that have a tiny builder."""
    return sorted(name for name, module in _BUILDERS.items() if not getattr(module, "GENERIC", False))


def generic() -> list[str]:
    """Model types without a family adapter that have a tiny builder (the generic adapter's)."""
    return sorted(name for name, module in _BUILDERS.items() if getattr(module, "GENERIC", False))


def cache_root() -> Path:
    """Where built tiny models are kept: ``$LVLM_PROBE_CACHE`` or ``~/.cache/lvlm_probe``."""
    return Path(os.environ.get("LVLM_PROBE_CACHE", Path.home() / ".cache" / "lvlm_probe"))


def _fingerprint() -> str:
    """Hash of every source file of this package (builders import shared sizes, the tokenizer and
    each other) and the transformers version: any change rebuilds, and builds take under a second."""
    h = hashlib.sha256(transformers.__version__.encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.read_bytes())
    return h.hexdigest()[:12]


def build_dir(family: str, seed: int = 0) -> Path:
    """Build (once, then cached) the tiny model of ``family`` and return its HF-format directory.

    The cache key includes the builders' sources and the transformers version, so a changed builder
    never serves a stale model. Writes go to a temporary folder renamed into place (atomic).

    Raises:
        UnsupportedModelError: for a family with no tiny builder.
    """
    if family not in _BUILDERS:
        raise UnsupportedModelError(
            f"no tiny model for family {family!r}; available: {', '.join(available())} "
            f"(and, through the generic adapter: {', '.join(generic())})"
        )
    module = _BUILDERS[family]
    target = cache_root() / "tiny" / f"{family}-seed{seed}-{_fingerprint()}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf, processor = module.build()
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
