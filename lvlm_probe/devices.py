"""Where and in which precision tensors live: the one resolver of ``device`` and ``dtype`` arguments.

Every public function that takes ``device=`` or ``dtype=`` resolves it here, so each accepts the
same spellings (``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``, ``torch.bfloat16``) and says the
same thing about a value it cannot use.
"""
from __future__ import annotations

from collections.abc import Collection

import torch

from .errors import InputError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, *, allowed: Collection[torch.dtype] | None = None,
                  default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a name or a dtype.

    Args:
        dtype: ``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"``, ``torch.bfloat16``, ...; None
            means ``default``.
        allowed: the dtypes the caller can compute in (all of ``DTYPES`` when None).
        default: the dtype that None stands for.

    Raises:
        InputError: naming the value received and the accepted names.
    """
    if dtype is None:
        return default
    resolved = dtype if isinstance(dtype, torch.dtype) else None
    if isinstance(dtype, str):
        resolved = DTYPES.get(dtype.removeprefix("torch."))
    names = sorted(name for name, value in DTYPES.items() if allowed is None or value in allowed)
    if resolved is None:
        raise InputError(f"unknown dtype {dtype!r}; expected a torch.dtype or one of {names}")
    if allowed is not None and resolved not in allowed:
        raise InputError(f"dtype {dtype!r} is not supported here; expected one of {names}")
    return resolved


def resolve_device(device: str | torch.device | None, *, default: str | torch.device | None = None
                   ) -> torch.device:
    """A torch device from a name or a device.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``; None means ``default``.
        default: the device that None stands for; when None too, CUDA where it is available, else
            the CPU.

    Raises:
        InputError: naming the value received.
    """
    if device is None:
        device = default if default is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1'") from err
    if resolved.type == "cuda":
        # fail here with the value received, not deep inside torch ("Found no NVIDIA driver")
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} needs CUDA, which this machine does not have (torch "
                             "finds no GPU); use device 'cpu', or leave the device unset to pick one")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    return resolved
