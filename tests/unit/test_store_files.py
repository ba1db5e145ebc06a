"""Store file primitives without a model: atomic writes, names, manifest records."""
from __future__ import annotations

import errno
import os

import pytest

from lvlm_probe import fileio
from lvlm_probe.errors import InputError, StoreError
from lvlm_probe.store import files, manifest


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "shard-00000.parquet"
    files.atomic_write(path, b"old content", "shard 0")
    write = fileio._write_all

    def full(fd, data):
        write(fd, memoryview(data)[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "_write_all", full)
    with pytest.raises(StoreError, match=r"disk is full: writing shard 7 \(9 bytes"):
        files.atomic_write(path, b"new bytes", "shard 7")
    monkeypatch.setattr(fileio, "_write_all", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(StoreError, match="writing shard 7 .* failed: .*I/O error") as info:
        files.atomic_write(path, b"new bytes", "shard 7")
    assert "disk is full" not in str(info.value)
    assert path.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.parquet"]


def test_names():
    assert files.shard_name(3, "safetensors") == "shard-00003.safetensors"
    assert files.shard_index("shard-00003.safetensors") == (3, "safetensors")
    assert files.shard_index("shard-123456.parquet") == (123456, "parquet")
    assert files.shard_index(".shard-00003.parquet.tmp-12") is None
    assert fileio.is_temporary(".shard-00003.parquet.tmp-12") and fileio.is_temporary(".store.json.tmp-1")
    assert not fileio.is_temporary("shard-00003.parquet") and not fileio.is_temporary(".lock")


def test_manifest_round_trip_and_bad_labels(tmp_path):
    record = manifest.ShardRecord(2, 10, 2, "shard-00002.safetensors", 123, "ab" * 32)
    rows = [{"id": "a", "shard": 2, "row": 0, "about": [0, 1], "pope": None},
            {"id": "b", "shard": 2, "row": 1, "about": [], "pope": "random"}]
    path = tmp_path / "m.parquet"
    path.write_bytes(manifest.encode(rows, record))
    assert manifest.read_record(path) == record
    frame = manifest.read_rows(path)
    assert frame["id"].tolist() == ["a", "b"] and [list(a) for a in frame["about"]] == [[0, 1], []]
    assert frame["pope"].isna().tolist() == [True, False] and frame["pope"][1] == "random"
    with pytest.raises(InputError, match="label column 'mask'"):
        manifest.encode([{"id": "a", "mask": object()}], record)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StoreError, match="junk.parquet is corrupted"):
        manifest.read_record(tmp_path / "junk.parquet")
    with pytest.raises(InputError, match=r"columns \['shard', 'layout'\]"):
        manifest.check_columns({"id": "a", "shard": 1, "layout": "x"}, 4)


def test_weight_fingerprint_of_a_tensor_past_float32_exact_integers():
    """Sample positions are computed in float32; past 2**24 elements the last one rounds up past the
    end (a 32064 x 4096 embedding, LLaVA-1.5's, is such a tensor): it is clamped to the last
    element, and the sample still sees a change there."""
    import torch

    from lvlm_probe.store.fingerprints import _weights

    n = 2**24 + 4  # float32(n - 1) == n
    assert int(torch.tensor(float(n - 1), dtype=torch.float32).item()) == n
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    before = _weights(module)
    with torch.no_grad():
        module.weight[-1] = 1.0
    assert _weights(module) != before
