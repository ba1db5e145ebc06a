"""Activation stores: :func:`extract` streams a dataset's activations to disk, and
:class:`ActivationStore` reads them back.

On-disk format (version 1)::

    acts/
      store.json                     header: format, version, hooks, padded hooks, positions,
                                     reduce, dtype, model fingerprint, sizes, complete, n_examples,
                                     per-example shapes (written before the first shard and again,
                                     with complete=true, at the end)
      shards/shard-00000.safetensors every hook's tensor [n, ...] for the shard's n examples (and
                                     ``__positions__`` [n, n_max] when hooks are padded)
      manifest/shard-00000.parquet   one row per example: id, shard, row, the dataset's label
                                     columns, n_images, n_positions, layout (TokenLayout.summary),
                                     fingerprint, processor_fingerprint; its metadata records the
                                     shard's start, size, byte count and sha256
      .lock                          held by the running extraction (released by the OS on exit)

Atomicity and resuming. Every file is written to a hidden temporary name, fsynced and renamed
into place. A shard's tensor file is written first and its manifest second: the manifest is the
commit record, so a shard is complete exactly when its manifest exists and the tensor file has the
recorded size and checksum. A rerun of the same ``extract`` call deletes the leftovers an
interruption can leave (temporary files, the next shard's tensor file without its manifest),
checks that the dataset's first ids, the hooks, positions, reduction, dtype and model fingerprint
match the store, and continues with the first example after the last complete shard. Batches
never straddle shards (a shard's last batch is cut short), so a resumed run forms exactly the
batches of an uninterrupted one with the same sizes, and its files are byte-identical. A full disk removes the partial file and raises
:class:`~lvlm_probe.StoreError`; complete shards stay. Anything an interruption cannot produce (a
checksum mismatch, a missing tensor file under a manifest, a gap) is reported as damage, never
silently repaired or read. :func:`~lvlm_probe.store.rewinding.rewind` cuts a store back to its
first examples by the same rules (last shard first, manifest before tensor file), so the same
call then recomputes the rest.

Executors. :func:`extract` hands the examples to an executor (:mod:`lvlm_probe.store.executor`,
chosen with ``backend=``), which commits shards only through the store's writer
(:mod:`lvlm_probe.store.writer`): the local one writes each shard as it fills; with
``backend="ray"`` (see :mod:`lvlm_probe.distributed`) workers write each shard's two files under
temporary names and the extracting process renames them in shard order, so the same rules hold
and the files are those a local run writes.

Values. Reduced stores (``reduce="mean"`` / ``"last"``) hold ``[N, d_model]`` or ``[N, head, d]``
per hook. With ``reduce="none"`` language-model hooks are *padded*: ``[N, n_max, ...]`` with zeros
after each example's kept positions, and :meth:`ActivationStore.positions` gives the kept token
positions ``[N, n_max]`` (``-1`` at padding) in each example's own, unpadded sequence;
``positions="all"`` then means every non-pad token. Vision and projector hooks are kept whole
(``positions="all", reduce="none"``) and need one row per example of a fixed shape. Values move
to the CPU batch by batch and are cast there to the store's dtype (default: the model's).

Memory. An extraction holds at most one shard of values (``shard_size`` examples; a shard is also
closed after the batch that brings it to ``max_shard_bytes``) and then its serialised bytes; ids
of earlier examples are the only state kept across shards, so peak memory does not grow with the
dataset.
Reads go through safetensors memory maps: ``store[hook]`` reads that hook's bytes of each shard into
one ``[N, ...]`` tensor, and :meth:`ActivationStore.iter_shards` reads one shard at a time.

Example:
    >>> store = lp.extract(model, questions, hooks=["blocks.*.hook_resid_post"], out="acts/")
    >>> store = lp.ActivationStore.open("acts/", model=model)
    >>> X, y = store["blocks.1.hook_resid_post"], store.meta["color"]
"""
from __future__ import annotations

from .executor import Executor, ExtractionPlan, LocalExecutor, executors
from .extraction import extract
from .fingerprints import fingerprint
from .rewinding import rewind
from .store import ActivationStore, Shard
from .writer import ShardWriter, StagedShard, stage_shard

__all__ = ["extract", "rewind", "ActivationStore", "Shard", "fingerprint", "Executor", "ExtractionPlan", "LocalExecutor",
           "executors", "ShardWriter", "StagedShard", "stage_shard"]
