"""Interoperability with TransformerLens and nnsight over a loaded model's own weights.

Example:
    >>> bridge = lp.interop.transformer_bridge(model)          # TransformerLens TransformerBridge
    >>> logits, cache = bridge.run_with_cache(**lp.interop.bridge_inputs(batch))
    >>> nn_model = lp.interop.nnsight(model)                   # nnsight.NNsight
    >>> with nn_model.trace(**batch.inputs) as tracer:
    ...     values = lp.interop.nnsight_save(tracer, model, ["blocks.*.attn.hook_z"])
    >>> values["blocks.0.attn.hook_z"]                         # [batch, pos, head, d_head]
    >>> remote = lp.load("llava-hf/llava-1.5-7b-hf", backend="nnsight", remote=True)   # RemoteLVLM on NDIF
"""
from .bridge import bridge_families, bridge_inputs, bridge_names, transformer_bridge, twin
from .guard import PackageInstallError, installer_command, no_installs
from .remote import RemoteLVLM, RemoteRequest
from .tracing import NNsightPath, NNsightValues, nnsight, nnsight_paths, nnsight_save

__all__ = [
    "transformer_bridge", "bridge_families", "bridge_inputs", "bridge_names", "twin",
    "nnsight", "nnsight_paths", "nnsight_save", "NNsightPath", "NNsightValues",
    "no_installs", "installer_command", "PackageInstallError", "RemoteLVLM", "RemoteRequest",
]
