""":func:`load`, exported as :func:`lvlm_probe.load`: a local Hugging Face model, or one run through
nnsight (on NDIF or locally) with ``backend="nnsight"``.

The backends sit above the model layer: :func:`lvlm_probe.model.load` loads local transformers
models only, and this module chooses between it and :func:`~lvlm_probe.interop.remote.load_nnsight`,
so the model layer never imports the nnsight backend built on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_dtype
from ..errors import InputError
from ..model import LVLM
from ..model import load as load_local
from .remote import load_nnsight

BACKENDS = ("transformers", "nnsight")


def load(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    backend: str = "transformers",
    remote: bool | str = False,
    **hf_kwargs: Any,
) -> LVLM:
    """Load a supported vision-language model and its processor.

    Args:
        name_or_path: a Hugging Face hub id or a local directory in HF format (works offline
            with ``HF_HUB_OFFLINE=1``).
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available, else CPU. Ignored with
            ``device_map``.
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a torch dtype.
        attn_implementation: ``"eager"``, ``"sdpa"``, ... passed to transformers.
        trust_remote_code: off unless asked; only safetensors weights are read.
        device_map: split the model over devices with accelerate: ``"auto"``, ``"balanced"``,
            ``"sequential"`` or a dict ``{module path: device}`` where a device is a GPU index,
            ``"cpu"`` or ``"disk"`` (then pass ``offload_folder=``). Capture, extraction and
            attribution gather values across the devices.
        max_memory: with ``device_map``, the memory each device may use, e.g.
            ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``.
        backend: ``"transformers"`` (default, the model runs here: :func:`lvlm_probe.model.load`)
            or ``"nnsight"`` (see ``remote``).
        remote: with ``backend="nnsight"``: True runs every forward pass on NDIF (the model is
            never downloaded; only its config and processor), ``"local"`` runs the same
            serialized request in this process (a dry run), a URL string names another NDIF host.
            Returns a :class:`~lvlm_probe.interop.RemoteLVLM`.
        **hf_kwargs: passed to ``from_pretrained`` (e.g. ``revision``, ``offload_folder``).

    Returns:
        An :class:`~lvlm_probe.LVLM` in eval mode (a :class:`~lvlm_probe.interop.RemoteLVLM` with
        ``backend="nnsight"``).

    Raises:
        UnsupportedModelError: the checkpoint's class has no adapter (names the supported ones).
        ModelLoadError: the checkpoint cannot be read.
        InputError: an unknown backend, ``remote`` without ``backend="nnsight"``, or
            ``max_memory`` without ``device_map``.

    Example:
        >>> model = lp.load("llava-hf/llava-1.5-7b-hf", device="cuda", dtype="bfloat16")
        >>> big = lp.load("Qwen/Qwen2-VL-72B-Instruct", dtype="bfloat16", device_map="auto",
        ...               max_memory={i: "70GiB" for i in range(4)})
        >>> remote = lp.load("llava-hf/llava-1.5-7b-hf", backend="nnsight", remote=True)
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if remote is not False and backend != "nnsight":
        raise InputError(f"remote={remote!r} needs backend='nnsight', got backend={backend!r}")
    if max_memory is not None and device_map is None:
        raise InputError(f"max_memory={max_memory!r} needs a device_map (e.g. device_map='auto')")
    if backend == "nnsight":
        return load_nnsight(str(name_or_path), dtype=resolve_dtype(dtype), remote=remote,
                            trust_remote_code=trust_remote_code, device=device,
                            attn_implementation=attn_implementation, **hf_kwargs)
    return load_local(name_or_path, device=device, dtype=dtype, attn_implementation=attn_implementation,
                      trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory,
                      **hf_kwargs)
