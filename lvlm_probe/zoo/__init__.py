"""Models that ship with or are built by lvlm_probe: tiny random-weight instances of every family
(for tests and quick experiments) and trained reference checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import LVLM, load as load_model
from .tiny import available as tiny_families, build_dir


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


__all__ = ["tiny", "tiny_families"]
