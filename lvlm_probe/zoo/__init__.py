"""Models that ship with or are built by lvlm_probe: tiny random-weight instances of every family
(for tests and quick experiments) and trained reference checkpoints (``shapes-llava``)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnsupportedModelError
from ..model import LVLM
from ..model import load as load_model
from .tiny import available as tiny_families
from .tiny import build_dir

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def checkpoints() -> list[str]:
    """Names of the trained checkpoints shipped in the package."""
    return sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "config.json").exists()) \
        if CHECKPOINTS.is_dir() else []


def checkpoint_dir(name: str) -> Path:
    """Folder of a shipped checkpoint (HF format, with ``recipe.json`` saying how it was made).

    Raises:
        UnsupportedModelError: for a name that is not shipped.
    """
    path = CHECKPOINTS / name
    if not (path / "config.json").exists():
        raise UnsupportedModelError(
            f"no shipped checkpoint {name!r}; available: {', '.join(checkpoints()) or 'none'}"
        )
    return path


def load(
    name: str = "shapes-llava",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LVLM:
    """A trained reference model shipped with the package; needs neither training nor network.

    Example:
        >>> model = lp.zoo.load("shapes-llava")
    """
    return load_model(checkpoint_dir(name), device=device, dtype=dtype,
                      attn_implementation=attn_implementation)


def tiny(
    family: str,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LVLM:
    """A tiny random-weight model of ``family``, built offline and loaded through :func:`lp.load`.

    Args:
        family: one of ``lp.families.names()``.
        seed: seed of the random weights.

    Example:
        >>> model = lp.zoo.tiny("qwen2_vl")
    """
    path: Path = build_dir(family, seed)
    return load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation)


__all__ = ["tiny", "tiny_families", "load", "checkpoints", "checkpoint_dir"]
