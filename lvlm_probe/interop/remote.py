"""Models run through nnsight, on NDIF or locally: ``lp.load(..., backend="nnsight", remote=...)``.

A :class:`RemoteLVLM` is an :class:`~lvlm_probe.LVLM` whose forward pass is an nnsight trace. With
``remote=True`` the weights never reach this machine: nnsight builds the model on the ``meta``
device from its config, and each forward pass is serialized and executed on NDIF (National Deep
Inference Fabric), which returns only the values the capture asked for. Inputs, token layouts
and hook names are computed here from the processor and config, so everything that only needs
them (``prepare``, ``hook_names``, position selectors) works as for a local model::

    model = lp.load("llava-hf/llava-1.5-7b-hf", backend="nnsight", remote=True)
    batch = model.prepare(images=[img], prompts=["Is there a red heart?"])
    with model.capture("blocks.*.hook_resid_post", positions="image", reduce="mean") as cache:
        out = model.forward(batch)          # one NDIF job
    cache["blocks.10.hook_resid_post"]      # [batch, d_model], as with a local model
    out.logits                              # [batch, pos, vocab]

NDIF needs an API key (from https://login.ndif.us): set ``NDIF_API_KEY`` in the environment, or
call ``nnsight.CONFIG.set_default_api_key(key)`` once (saved in nnsight's user config).
``NDIF_HOST`` (or ``remote="https://host"``) selects another server. ``remote="local"`` runs the
same serialized request in this process against local weights (a dry run that needs no
service), and :meth:`RemoteLVLM.request` builds a request without sending it.

The values are whole module inputs and outputs read by nnsight; selectors, reductions and head
splits are applied here by the same code as :meth:`LVLM.capture`
(:class:`~lvlm_probe.hooks.Capture`), so the two give equal values. Attention patterns and scores
are computed inside the attention function, not passed between modules, and ``hook_result``
needs the out-projection weights: neither is available remotely.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers

from .. import families
from ..errors import InputError, LVLMProbeError, ModelLoadError
from ..hooks import Capture, running
from ..model import LVLM

TASK = "image-text-to-text"  # the nnsight/transformers task of every supported family


def load_nnsight(name_or_path: str, *, dtype: torch.dtype, remote: bool | str,
                 trust_remote_code: bool = False, device: str | torch.device | None = None,
                 attn_implementation: str | None = None, **hf_kwargs: Any) -> RemoteLVLM:
    """Build a :class:`RemoteLVLM`; called by :func:`lvlm_probe.load` with ``backend="nnsight"``.

    Args:
        name_or_path: the hub id NDIF serves (or a local folder for ``remote="local"``/False).
        dtype: the weights' dtype (NDIF runs its deployment's dtype).
        remote: True (NDIF), a host URL, ``"local"`` (serialized and run here) or False (an
            nnsight model with local weights, traced directly).
        trust_remote_code: as for :func:`lvlm_probe.load`.
        device: where local weights go (``remote="local"`` or False).
        attn_implementation: sent with each request; NDIF applies it to its model.
        **hf_kwargs: passed to nnsight's model (``revision``, ...).

    Raises:
        UnsupportedModelError: a checkpoint no family adapter supports.
        ModelLoadError: the config or processor cannot be read.
    """
    from nnsight.modeling.transformers import TransformersModel

    if remote is not True and remote not in (False, "local") and not (
            isinstance(remote, str) and remote.startswith(("http://", "https://"))):
        raise InputError(f"remote must be True, False, 'local' or an https:// host URL, got {remote!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        processor = transformers.AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the config and processor of {name_or_path!r}: {err}") from err
    family = families.for_config(config)
    local = remote in (False, "local")
    kwargs = dict(hf_kwargs, dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if local:
        kwargs["device_map"] = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # with remote=True only the meta skeleton is built: no weights are downloaded
    nn_model = TransformersModel(name_or_path, task=TASK, processor=processor, dispatch=local, **kwargs)
    return RemoteLVLM(nn_model, processor, family, remote=remote)


@dataclass(frozen=True)
class RemoteRequest:
    """A request as it would be sent to NDIF (see :meth:`RemoteLVLM.request`).

    Attributes:
        model_key: the deployment the server runs (nnsight class and ``repo_id``, revision, task).
        env: per-request settings the server applies (attention implementation, adapter).
        host: the server.
        has_api_key: whether an API key would be sent (the key itself is not kept).
        payload: the serialized trace (the intervention code and its inputs).
        compressed: whether ``payload`` is zstd-compressed.
        reads: the ``(module path, "input" | "output")`` pairs the trace saves.
    """

    model_key: str
    env: dict[str, Any]
    host: str
    has_api_key: bool
    payload: bytes
    compressed: bool
    reads: tuple[tuple[str, str], ...]


class RemoteLVLM(LVLM):
    """An :class:`~lvlm_probe.LVLM` whose forward passes run as nnsight traces (on NDIF with
    ``remote=True``). ``prepare``, ``hook_names``, ``capture`` and ``forward`` work as for a
    local model; ``generate`` and gradients do not (use nnsight's own API through :attr:`nn`).

    Attributes:
        nn: the nnsight ``TransformersModel``.
        remote: where traces run (see :func:`load_nnsight`).
    """

    def __init__(self, nn_model: Any, processor: Any, family: Any, remote: bool | str):
        super().__init__(nn_model._module, processor, family)
        self.nn, self.remote = nn_model, remote
        self._captures: list[RemoteCapture] = []

    @property
    def device(self) -> torch.device:
        """Inputs stay on the CPU for a meta (remote) model; else the weights' device."""
        first = next(self.hf.parameters()).device
        return torch.device("cpu") if first.type == "meta" else first

    def capture(self, names: str | list[str], positions: Any = "all", reduce: str = "none") -> RemoteCapture:
        """As :meth:`LVLM.capture`; the values arrive when :meth:`forward` returns.

        Raises:
            HookNameError, InputError: as :meth:`LVLM.capture`; also for attention patterns and
                scores, and for ``hook_result`` on a remote model (needs local weights).
        """
        return RemoteCapture(self, names, positions=positions, reduce=reduce)

    def forward(self, batch: Any, *, grad: bool = False, **kwargs: Any) -> Any:
        """Run one trace with the batch's inputs; fill the open captures; return the output.

        Raises:
            InputError: ``grad=True`` or HF keyword arguments (a trace runs a plain forward).
            LVLMProbeError: the remote job failed (with nnsight's reason).
        """
        if grad or kwargs:
            raise InputError(f"a RemoteLVLM runs a plain forward pass; got grad={grad}, "
                             f"keywords {sorted(kwargs)}; use model.nn.trace(...) for more")
        reads = self._reads()
        try:
            values, output = _trace(self.nn, dict(batch.inputs), reads, remote=self.remote)
        except Exception as err:  # nnsight raises RemoteError, httpx and server errors alike
            if isinstance(err, LVLMProbeError):
                raise
            where = "on NDIF" if self.remote is True else f"with remote={self.remote!r}"
            raise LVLMProbeError(f"the nnsight trace failed {where}: {type(err).__name__}: {err}") from err
        seq_shape = tuple(_first(values[reads[0]]).shape[:2])
        with running(batch):
            for capture in self._captures:
                capture.fill(values, seq_shape)
        return output

    def request(self, batch: Any, names: str | list[str]) -> RemoteRequest:
        """Build, without sending, the NDIF request that captures ``names`` on ``batch``.

        Example:
            >>> req = model.request(batch, "blocks.*.hook_resid_post")
            >>> req.model_key, len(req.payload)
        """
        from nnsight.intervention.backends.remote import RemoteBackend
        from nnsight.schema.request import RequestModel

        class Recorder(RemoteBackend):
            """Serializes the trace as RemoteBackend does before sending, and stops there."""

            def __call__(self, tracer: Any = None) -> None:
                self.payload = self._serialize(tracer)
                self.envelope = RequestModel(model_key=self.model_key, compress=self.compress, env=self.env)

        host = self.remote if isinstance(self.remote, str) and self.remote != "local" else None
        recorder = Recorder(self.nn.to_model_key(), host=host, env=self.nn._remoteable_get_env())
        with self.capture(names):  # validates the names as forward would
            reads = self._reads()
        _trace(self.nn, dict(batch.inputs), reads, backend=recorder)
        return RemoteRequest(recorder.envelope.model_key, dict(recorder.envelope.env), recorder.host,
                             bool(recorder.api_key), recorder.payload, recorder.envelope.compress, reads)

    def generate(self, batch: Any, max_new_tokens: int = 16, **kwargs: Any) -> list[str]:
        raise InputError("RemoteLVLM.generate is not supported; use model.nn.generate(...) "
                         "(nnsight's own API) for remote generation")

    def _reads(self) -> tuple[tuple[str, str], ...]:
        """The module inputs/outputs the open captures need, each once, after the first LM
        layer's input (which gives the sequence shape)."""
        reads = [(f"{self.family.lm_layers}.0", "input")]
        for capture in self._captures:
            for point in capture.points:
                key = (point.path, "input" if point.kind == "input" else "output")
                if key not in reads:
                    reads.append(key)
        return tuple(reads)

    def summary(self) -> str:
        where = "NDIF" if self.remote is True else f"nnsight (remote={self.remote!r})"
        return (f"{type(self.hf).__name__} (family {self.family.name}) via {where}: "
                f"{self.n_layers} LM layers x {self.n_heads} heads, d_model={self.d_model}")


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def _trace(nn_model: Any, inputs: dict[str, Any], reads: tuple[tuple[str, str], ...], *,
           remote: bool | str = False, backend: Any = None) -> tuple[dict, Any]:
    """One nnsight trace recording each read (through ``tracer.cache``, which records modules
    whenever they run, so the order of the reads does not matter) and the model output.

    The body is what nnsight serializes for NDIF: it touches only the nnsight model, its module
    envoys and built-in types, so the server needs nothing from lvlm_probe.
    """
    where = {"backend": backend} if backend is not None else {"remote": remote} if remote else {}
    envoys = {path: nn_model.get(path) for path, _ in reads}
    wanted = {kind: [envoys[p] for p, k in reads if k == kind] for kind in ("input", "output")}
    import nnsight

    with nn_model.trace(**inputs, **where) as tracer:
        caches = nnsight.save({kind: tracer.cache(modules=modules, device=None, include_inputs=kind == "input",
                                                  include_output=kind == "output")
                               for kind, modules in wanted.items() if modules})
        output = nn_model.output.save()
    if backend is not None:
        return {}, None  # nothing ran: the backend only built the request
    values = {}
    for path, kind in reads:
        entry = caches[kind][envoys[path].path]
        if len(entry) != 1:
            raise LVLMProbeError(f"module {path!r} ran {len(entry)} times in one forward pass; a "
                                 "capture holds one call per module")
        values[(path, kind)] = entry.input if kind == "input" else entry.output
    return values, output


class RemoteCapture(Capture):
    """:class:`~lvlm_probe.hooks.Capture` for a :class:`RemoteLVLM`: instead of registering
    hooks, it asks the model's next :meth:`~RemoteLVLM.forward` for its modules' values, then
    stores them through the same code as a local capture."""

    def __init__(self, model: RemoteLVLM, names: Any, positions: Any = "all", reduce: str = "none"):
        super().__init__(model, names, positions=positions, reduce=reduce)
        inside = [p.name for p in self.points if p.kind not in ("input", "output")]
        if inside:
            raise InputError(
                f"{inside[:3]} are computed inside the attention function, which nnsight cannot "
                "read by module path; capture them on a local model"
            )
        meta = next(model.hf.parameters()).device.type == "meta"
        results = [p.name for p in self.points if p.transform == "result"]
        if results and meta:
            raise InputError(f"{results[:3]} need the out-projection weights, which a remote model "
                             "does not hold; capture attn.hook_z and apply W_O yourself")

    def __enter__(self) -> Any:
        if self._entered:
            raise LVLMProbeError("a capture context can be entered once; call model.capture(...) again")
        self._entered = True
        self.model._captures.append(self)
        return self.cache

    def __exit__(self, *exc: object) -> None:
        if self in self.model._captures:
            self.model._captures.remove(self)

    def fill(self, values: dict[tuple[str, str], Any], seq_shape: tuple[int, int]) -> None:
        """Store one trace's values (inside ``hooks.running(batch)``)."""
        self._seq_shape = seq_shape
        for point in self.points:
            raw = values[(point.path, "input" if point.kind == "input" else "output")]
            self._store(point, _first(raw))
