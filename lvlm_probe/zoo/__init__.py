"""Models that ship with or are built by lvlm_probe: tiny random-weight instances of every family
(for tests and quick experiments) and trained reference checkpoints (``shapes-llava``)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from ..model import LVLM
from ..model import load as load_model
from .tiny_builders import available as tiny_families
from .tiny_builders import build_dir
from .tiny_builders import generic as tiny_generic

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
        family: one of ``lp.families.names()``, or a model type of :func:`tiny_generic` (read by
            the generic adapter).
        seed: seed of the random weights.

    Example:
        >>> model = lp.zoo.tiny("qwen2_vl")
    """
    path: Path = build_dir(family, seed)
    return load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation)


TINY_PREFIX = "tiny:"


def from_name(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LVLM:
    """The model a name on the command line or in a sweep definition stands for.

    The rule, in order: ``tiny:<family>`` is :func:`tiny` of that family; a shipped checkpoint's
    name (:func:`checkpoints`, e.g. ``"shapes-llava"``) is :func:`load` of it, even where a folder
    of that name exists; anything else is a local folder in HF format or a hub id, read by
    :func:`lvlm_probe.model.load` (the transformers backend of :func:`lvlm_probe.load`).

    Args:
        name: ``"tiny:llava"``, ``"shapes-llava"``, ``"llava-hf/llava-1.5-7b-hf"``, ``"path/to/dir"``.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available, else CPU.
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a torch dtype.

    Returns:
        An :class:`~lvlm_probe.LVLM` in eval mode.

    Raises:
        UnsupportedModelError: ``tiny:`` with a family that has no tiny model, or a checkpoint of
            an unsupported class.
        ModelLoadError: a name that is none of the above (the message lists the shipped
            checkpoints and the ``tiny:`` families).

    Example:
        >>> model = lp.zoo.from_name("tiny:qwen2_vl", device="cpu")
        >>> model = lp.zoo.from_name("shapes-llava")
    """
    if name.startswith(TINY_PREFIX):
        return tiny(name.removeprefix(TINY_PREFIX), device=device, dtype=dtype)
    if name in checkpoints():
        return load(name, device=device, dtype=dtype)
    try:
        return load_model(name, device=device, dtype=dtype)
    except ModelLoadError as err:
        raise ModelLoadError(
            f"cannot load a model named {name!r}: expected a shipped checkpoint "
            f"({', '.join(checkpoints()) or 'none shipped'}), {TINY_PREFIX}<family> "
            f"(one of {', '.join(TINY_PREFIX + f for f in tiny_families())}), a local folder in "
            f"Hugging Face format or a hub id ({err})"
        ) from err


__all__ = ["tiny", "tiny_families", "tiny_generic", "load", "from_name", "checkpoints", "checkpoint_dir"]
