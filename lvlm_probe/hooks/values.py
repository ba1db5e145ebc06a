"""From a module's raw input or output to a hook point's value, in lvlm_probe's layout.

Shared by :mod:`lvlm_probe.hooks.capture` (which selects positions between the two steps, so the
per-head products run on the kept positions only) and the nnsight interop, so both give the same
values by construction.
"""
from __future__ import annotations

from typing import Any

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import LVLMProbeError
from .names import HookPoint


def module_value(output: Any) -> Any:
    """The value a hook on a module's output records: the output itself, the first element of a
    tuple (hidden states before attention weights or caches), or a list of per-image tensors
    (a projector that returns one tensor per image or view, MiniCPM-V's) joined along its first
    axis in order."""
    if isinstance(output, list) and output and all(torch.is_tensor(v) for v in output):
        return torch.cat(output)
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def as_sequence(point: HookPoint, value: Tensor, seq_shape: tuple[int, int] | None) -> Tensor:
    """Undo the reshapes some families make inside a layer.

    Args:
        point: the hook point.
        value: the raw tensor (already the first element of a tuple output).
        seq_shape: ``(batch, pos)`` of the language model's layer input, when known.

    Returns:
        OPT's (BLIP-2) flattened ``[b * p, d]`` MLP values as ``[b, p, d]``; Mllama's per-tile
        cross-attention keys/values ``[(b tiles), p, e]`` as ``[b, tiles * p, e]``, merged as the
        attention merges them; anything else unchanged.
    """
    if seq_shape is None:
        return value
    batch, pos = seq_shape
    if point.space == "lm" and value.ndim == 2 and value.shape[0] == batch * pos:
        return rearrange(value, "(b p) d -> b p d", b=batch)
    if point.space == "vision" and point.transform == "heads" and value.shape[0] != batch:
        return rearrange(value, "(b t) p e -> b (t p) e", b=batch)
    return value


def finish(model: Any, point: HookPoint, value: Tensor) -> Tensor:
    """Apply a hook point's transform (see ``names.TRANSFORMS``) to its sequence-shaped value.

    ``heads``: ``[b, p, (h d)]`` -> ``[b, p, h, d]``; ``result``: each head's write through the
    out-projection ``[b, p, h, d_model]``; ``normalized``: the final norm's input normalised without
    its learned scale and bias (TransformerLens's ``ln_final.hook_normalized``).
    """
    if point.transform in ("heads", "result"):
        return split_heads(model, point, value)
    if point.transform == "normalized":
        norm = model.hf.get_submodule(point.path)
        return normalized(norm, value, centred=model.family.final_norm_centres(norm))
    return value


def split_heads(model: Any, point: HookPoint, x: Float[Tensor, "batch pos h_d"]) -> Tensor:
    if x.shape[-1] % point.heads:
        raise LVLMProbeError(
            f"internal: {point.name} has width {x.shape[-1]}, not a multiple of its {point.heads} heads"
        )
    x = rearrange(x, "b p (h d) -> b p h d", h=point.heads)
    if point.transform == "heads":
        return x
    w = rearrange(module_weight(model.hf.get_submodule(point.attn_out), x.device),
                  "m (h d) -> h d m", h=point.heads)
    return einsum(x, w, "b p h d, h d m -> b p h m")


def module_weight(module: nn.Module, device: torch.device) -> Tensor:
    """A module's ``weight`` on ``device``, also when accelerate offloaded it.

    With a ``device_map`` that offloads part of a model to the CPU or disk, the module's own
    parameter is an empty ``meta`` tensor outside its forward pass; accelerate's hook holds the
    values, and ``align_module_device`` loads them for the duration of the block.
    """
    weight = module.weight
    if weight.device.type == "meta" and hasattr(module, "_hf_hook"):
        from accelerate.utils import align_module_device

        with align_module_device(module, device):
            return module.weight.detach().to(device).clone()
    return weight.detach().to(device)


def normalized(norm: nn.Module, x: Float[Tensor, "... d"], centred: bool | None = None) -> Float[Tensor, "... d"]:
    """The norm's normalisation step without its learned affine part.

    LayerNorm: ``(x - mean) / sqrt(var + eps)``; RMSNorm (Llama, Qwen, Gemma): ``x / sqrt(mean(x^2)
    + eps)``, computed in float32 as the HF norms do and returned in ``x``'s dtype. ``centred``
    (the adapter's ``final_norm_centres``) says which; by default, whether ``norm`` is a LayerNorm.
    """
    xf = x.float()
    if centred is None:
        centred = isinstance(norm, nn.LayerNorm)
    if centred:  # LayerNorm, and norms that centre without a bias (the adapter says which)
        xf = xf - xf.mean(-1, keepdim=True)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise LVLMProbeError(f"internal: {type(norm).__name__} has no eps attribute to normalise with")
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
