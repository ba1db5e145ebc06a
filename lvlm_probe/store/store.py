""":class:`ActivationStore`: reading a store written by :func:`lvlm_probe.extract`, and the shard
scan that both the reader and a resuming extraction rely on."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .. import fileio
from ..errors import HookNameError, StoreError
from ..hooks.names import pattern_regex, unknown_message
from . import files, manifest
from .fingerprints import differences, fingerprint

POSITIONS = "__positions__"  # tensor name of the kept positions in a shard (never a hook name)


@dataclass(frozen=True)
class Scan:
    """The state of a store's shard folders.

    Attributes:
        records: the complete shards, in order (a contiguous prefix ``0 .. len - 1``).
        leftovers: files of an interrupted write: temporary files (of shards, manifests or the
            header), and a tensor file of the next shard whose manifest was never written. Safe
            to delete.
    """

    records: list[manifest.ShardRecord]
    leftovers: list[Path]

    @property
    def n_examples(self) -> int:
        return sum(r.n for r in self.records)


def scan(root: Path, verify: bool = True) -> Scan:
    """Find the complete shards of a store and the leftovers of an interrupted write.

    A shard is complete when its manifest exists, its record is consistent with the shards before
    it, and its tensor file exists with the recorded size (and, when ``verify``, checksum).

    Args:
        root: the store folder.
        verify: recompute every tensor file's sha256 (reads every byte of the store).

    Raises:
        StoreError: for anything an interrupted write cannot leave behind: a missing or corrupted
            tensor file under a manifest, a gap in the manifests, tensor files beyond the next
            shard. The message names the shard and its files.
    """
    shard_dir, manifest_dir = root / files.SHARDS, root / files.MANIFEST
    tensors: dict[int, Path] = {}
    manifests: dict[int, Path] = {}
    leftovers: list[Path] = []
    for folder, found, ext in ((shard_dir, tensors, "safetensors"), (manifest_dir, manifests, "parquet")):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            parsed = files.shard_index(path.name)
            if fileio.is_temporary(path.name):
                leftovers.append(path)
            elif parsed is not None and parsed[1] == ext:
                found[parsed[0]] = path
    leftovers += [p for p in root.iterdir() if fileio.is_temporary(p.name)] if root.is_dir() else []
    n = len(manifests)
    if set(manifests) != set(range(n)):
        missing = min(set(range(max(manifests) + 1)) - set(manifests))
        raise StoreError(
            f"store {root} is damaged: the manifest of shard {missing} "
            f"({manifest_dir / files.shard_name(missing, 'parquet')}) is missing but later shards exist; "
            "restore it, or delete that shard's files and every later shard's to re-extract from there"
        )
    records, start = [], 0
    for k in range(n):
        record = manifest.read_record(manifests[k])
        where = f"shard {k} ({shard_dir / files.shard_name(k, 'safetensors')})"
        if (record.index, record.start, record.file) != (k, start, files.shard_name(k, "safetensors")):
            raise StoreError(
                f"store {root} is damaged: the manifest of {where} records shard {record.index} "
                f"starting at example {record.start} in {record.file!r}; expected shard {k} "
                f"starting at example {start}"
            )
        path = tensors.get(k)
        if path is None:
            raise StoreError(f"store {root} is damaged: {where} is missing but its manifest exists")
        size = path.stat().st_size
        if size != record.bytes:
            raise StoreError(
                f"{where} is corrupted: {size} bytes on disk, its manifest records {record.bytes}"
            )
        if verify and (digest := files.file_checksum(path)) != record.sha256:
            raise StoreError(
                f"{where} is corrupted: its sha256 is {digest}, its manifest records {record.sha256}; "
                "restore the file, or delete it, its manifest and every later shard to re-extract them"
            )
        records.append(record)
        start += record.n
    beyond = sorted(i for i in tensors if i > n)
    if beyond:
        raise StoreError(
            f"store {root} is damaged: tensor files of shards {beyond} exist but shard {n} has no "
            "manifest (an interrupted extraction leaves at most the next shard's tensor file)"
        )
    if n in tensors:
        leftovers.append(tensors[n])
    return Scan(records, leftovers)


@contextlib.contextmanager
def open_shard(path: Path, index: int) -> Iterator[Any]:
    """``safe_open`` a shard's tensor file (memory-mapped), reporting an unreadable one as damage.

    Raises:
        StoreError: naming the shard, if the file cannot be opened or a tensor cannot be read.
    """
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise StoreError(f"shard {index} ({path}) is corrupted or unreadable: {err}") from err


@dataclass(frozen=True)
class Shard:
    """One shard's examples, from :meth:`ActivationStore.iter_shards`.

    Attributes:
        index: the shard number.
        meta: its manifest rows (global example indices as the DataFrame index).
        tensors: ``{hook: [n, ...]}``; padded hooks are ``[n, n_max_shard, ...]``.
        positions: ``[n, n_max_shard]`` kept positions (``-1`` at padding) or None.
    """

    index: int
    meta: pd.DataFrame
    tensors: dict[str, Tensor]
    positions: Tensor | None


class ActivationStore:
    """Activations of a dataset, one tensor per hook, written by :func:`lvlm_probe.extract`.

    Use :meth:`open`; see :mod:`lvlm_probe.store` for the on-disk format.

    Attributes:
        root: the store folder.
        header: the content of ``store.json``.
        records: one :class:`~lvlm_probe.store.manifest.ShardRecord` per complete shard.
        hooks: the stored hook names, in forward order.
        padded: hooks whose values keep a positions axis (``reduce="none"`` language-model hooks).
        shapes: per-example shape of each hook (``n_max`` over the whole store on a padded axis).
        dtype: the stored dtype.

    Example:
        >>> store = lp.ActivationStore.open("acts/", model=model)
        >>> len(store), store.hooks[:2], store.meta.columns[:3].tolist()
        (200, ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post'], ['id', 'shard', 'row'])
    """

    def __init__(self, root: Path, header: dict[str, Any], records: list[manifest.ShardRecord]):
        self.root, self.header, self.records = root, header, records
        self.hooks: list[str] = list(header["hooks"])
        self.padded: list[str] = list(header["padded"])
        self.dtype: torch.dtype = getattr(torch, header["dtype"])
        self.shapes, self._widths = self._read_shapes()

    @classmethod
    def open(cls, path: str | Path, model: Any = None, *, verify: bool = True) -> ActivationStore:
        """Open a store, checking every shard.

        Args:
            path: the folder given to ``extract(out=...)``.
            model: if given, the store must have been extracted from a model with the same
                fingerprint (see :mod:`lvlm_probe.store.fingerprints`).
            verify: recompute every shard's sha256 and read every manifest (reads the whole store
                once); with False only sizes and headers are checked.

        Returns:
            The store. Examples of an extraction still running (or interrupted) are those of its
            complete shards; ``store.complete`` says whether the extraction finished.

        Raises:
            StoreError: the folder is not a store, a shard is corrupted (names it), or the model's
                fingerprint differs from the store's (names both).

        Example:
            >>> store = lp.ActivationStore.open("acts/")
            >>> X, y = store["blocks.3.hook_resid_post"], store.meta["color"]
        """
        root = Path(path)
        header = files.read_json(root / files.HEADER)
        if model is not None:
            current, stored = fingerprint(model), header["fingerprint"]
            if current["digest"] != stored["digest"]:
                raise StoreError(
                    f"store {root} was extracted from another model: its fingerprint is "
                    f"{stored['digest']} ({header.get('model', '?')}), this model's is "
                    f"{current['digest']} ({type(model.hf).__name__}); differing parts: "
                    f"{differences(stored, current)}"
                )
        store = cls(root, header, scan(root, verify=verify).records)
        if verify:
            _ = store.meta  # reads every manifest with its page checksums verified
        return store

    # --- shape facts ---------------------------------------------------------------------------
    def _read_shapes(self) -> tuple[dict[str, tuple[int, ...]], list[int]]:
        """Per-example shapes from the shard headers, checked across shards; and each shard's
        padded width."""
        shapes: dict[str, tuple[int, ...]] = {}
        widths = []
        for record in self.records:
            with open_shard(self._path(record), record.index) as f:
                names = set(f.keys())
                expected = set(self.hooks) | ({POSITIONS} if self.padded else set())
                if names != expected:
                    raise StoreError(
                        f"shard {record.index} holds tensors {sorted(names)}; the store lists "
                        f"{sorted(expected)}"
                    )
                width = 0
                for name in self.hooks:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape[0] != record.n:
                        raise StoreError(
                            f"shard {record.index}: {name} has {shape[0]} rows, its manifest {record.n}"
                        )
                    rest = shape[1:]
                    if name in self.padded:
                        width = rest[0]
                        rest = (-1, *rest[1:])
                    if shapes.setdefault(name, rest) != rest:
                        raise StoreError(
                            f"shard {record.index}: {name} has per-example shape {rest}, earlier "
                            f"shards {shapes[name]}"
                        )
                widths.append(width)
        n_max = max(widths, default=0)
        return {k: tuple(n_max if d == -1 else d for d in v) for k, v in shapes.items()}, widths

    def _path(self, record: manifest.ShardRecord) -> Path:
        return self.root / files.SHARDS / record.file

    def __len__(self) -> int:
        return sum(r.n for r in self.records)

    def __contains__(self, hook: object) -> bool:
        return hook in self.hooks

    @property
    def complete(self) -> bool:
        """Whether the extraction that wrote the store finished."""
        return bool(self.header.get("complete")) and self.header.get("n_examples") == len(self)

    @property
    def fingerprint(self) -> dict[str, str]:
        """The model fingerprint the store was extracted with."""
        return dict(self.header["fingerprint"])

    @property
    def positions_selector(self) -> str:
        """The ``positions`` argument of the extraction (a callable as ``callable:module.name``)."""
        return self.header["positions"]

    @property
    def reduce(self) -> str:
        return self.header["reduce"]

    # --- reading -------------------------------------------------------------------------------
    def _check(self, hook: str) -> None:
        if hook not in self.hooks:
            raise HookNameError(unknown_message(hook, self.hooks).replace("this model", "this store"))

    def __getitem__(self, hook: str) -> Float[Tensor, "example ..."]:
        """Every example's value of one hook, in manifest order.

        Reads the hook's bytes from each shard through a memory map (other hooks are not read).

        Returns:
            ``[N, ...]``: ``[N, d_model]`` or ``[N, head, d]`` for reduced stores, ``[N, n_max, ...]``
            zero-padded for padded hooks (see :meth:`positions`), the whole value for vision and
            projector hooks.

        Raises:
            HookNameError: for a hook the store does not hold.

        Example:
            >>> store["blocks.1.hook_resid_post"].shape
            torch.Size([200, 64])
        """
        self._check(hook)
        out = torch.zeros((len(self), *self.shapes[hook]), dtype=self.dtype)
        for record in self.records:
            with open_shard(self._path(record), record.index) as f:
                value = f.get_tensor(hook)
            rows = slice(record.start, record.start + record.n)
            if hook in self.padded:
                out[rows, : value.shape[1]] = value
            else:
                out[rows] = value
        return out

    def positions(self) -> Int[Tensor, "example n_max"] | None:
        """Token positions kept for each example of the padded hooks, ``-1`` at padding.

        Positions index the example's own token sequence (its batch's left padding removed), so
        they do not depend on how examples were batched. None when no hook is padded.

        Returns:
            ``[N, n_max]`` LongTensor, or None.

        Example:
            >>> pos = store.positions(); mask = pos >= 0
            >>> store["blocks.1.hook_resid_post"][mask]   # [total kept positions, d_model]
        """
        if not self.padded:
            return None
        n_max = max(self._widths, default=0)
        out = torch.full((len(self), n_max), -1, dtype=torch.long)
        for record, width in zip(self.records, self._widths):
            with open_shard(self._path(record), record.index) as f:
                out[record.start: record.start + record.n, :width] = f.get_tensor(POSITIONS)
        return out

    def stack(self, pattern: str) -> Float[Tensor, "layer example ..."]:
        """Stack the hooks matching a ``*`` pattern along a new first axis, by layer.

        Raises:
            HookNameError: if no stored hook matches.

        Example:
            >>> store.stack("blocks.*.hook_resid_post").shape   # [layer, N, d_model]
        """
        regex = pattern_regex(pattern)
        hits = sorted((tuple(int(g) for g in m.groups()), h) for h in self.hooks if (m := regex.match(h)))
        if not hits:
            raise HookNameError(unknown_message(pattern, self.hooks).replace("this model", "this store"))
        return torch.stack([self[h] for _, h in hits])

    @cached_property
    def meta(self) -> pd.DataFrame:
        """One row per example, in order: ``id``, ``shard``, ``row``, the dataset's label columns,
        ``n_images``, ``n_positions``, ``layout``, ``fingerprint``, ``processor_fingerprint``."""
        frames = [manifest.read_rows(self.root / files.MANIFEST / files.shard_name(r.index, "parquet"))
                  for r in self.records]
        for frame, record in zip(frames, self.records):
            if len(frame) != record.n:
                raise StoreError(f"manifest of shard {record.index} has {len(frame)} rows, records {record.n}")
        if not frames:
            return pd.DataFrame(columns=["id", "shard", "row"])
        return pd.concat(frames, ignore_index=True)

    @property
    def ids(self) -> list[Any]:
        """Example ids, in order."""
        return self.meta["id"].tolist()

    def iter_shards(self, hooks: list[str] | None = None) -> Iterator[Shard]:
        """Read the store one shard at a time (bounded memory for stores larger than RAM).

        Args:
            hooks: the hooks to read (default all).

        Yields:
            A :class:`Shard` per shard, in order.

        Example:
            >>> for shard in store.iter_shards(["blocks.1.hook_resid_post"]):
            ...     partial_fit(shard.tensors["blocks.1.hook_resid_post"], shard.meta["color"])
        """
        hooks = list(self.hooks if hooks is None else hooks)
        for hook in hooks:
            self._check(hook)
        for record in self.records:
            meta = manifest.read_rows(self.root / files.MANIFEST / files.shard_name(record.index, "parquet"))
            meta.index = pd.RangeIndex(record.start, record.start + record.n)
            with open_shard(self._path(record), record.index) as f:
                tensors = {h: f.get_tensor(h) for h in hooks}
                positions = f.get_tensor(POSITIONS) if self.padded else None
            yield Shard(record.index, meta, tensors, positions)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        shown = ", ".join(self.hooks[:3]) + (f", ... ({len(self.hooks)} hooks)" if len(self.hooks) > 3 else "")
        return (f"ActivationStore({str(self.root)!r}, {len(self)} examples in {len(self.records)} "
                f"shards, {state}, hooks=[{shown}], positions={self.positions_selector!r}, "
                f"reduce={self.reduce!r}, dtype={self.header['dtype']})")
