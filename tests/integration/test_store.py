"""Activation stores on real tiny models: contents equal a direct capture, kill -9 and full-disk
resumes equal an uninterrupted extraction, corruption and mismatches are reported, and an executor
written against the store's public interface writes the local store."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import store_files as store_files_all

import lvlm_probe as lp
from lvlm_probe import fileio
from lvlm_probe.errors import HookNameError, InputError, LayoutError, StoreError
from lvlm_probe.probing.sweeps import SweepExecutor
from lvlm_probe.store import files
from lvlm_probe.store.executor import Executor, cut_shards
from lvlm_probe.store.fingerprints import differences
from lvlm_probe.store.rows import ShardBuffer, add_batch
from lvlm_probe.store.writer import stage_shard

RESID = "blocks.*.hook_resid_post"


@pytest.fixture(scope="module")
def llava():
    return lp.zoo.tiny("llava", device="cpu")


@pytest.fixture(scope="module")
def questions():
    return lp.worlds.ShapesWorld(seed=0, image_size=64).questions(12, level="attribute", split="typical")


def direct(model, rows, hooks, positions, reduce, batch_size):
    """A plain model.capture over the batches extract runs (shard_size a multiple of batch_size)."""
    values, kept = {}, []
    for start in range(0, len(rows), batch_size):
        part = rows[start: start + batch_size]
        batch = model.prepare(images=[r.get("image") for r in part], prompts=[r["prompt"] for r in part])
        with model.capture(hooks, positions=positions, reduce=reduce) as cache:
            model.forward(batch)
        for name in cache.names():
            values.setdefault(name, []).append(cache[name])
        kept.append((cache.positions(), batch))
    return values, kept


def store_files(root: Path) -> dict[str, bytes]:
    """Every shard and manifest file's bytes, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes()
            for d in (files.SHARDS, files.MANIFEST) for p in sorted((root / d).iterdir())}


# one family per way images reach the language model: tokens (fixed, dynamic resolution, splits),
# cross-attention, Q-Former queries
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "mllama", "blip2"])
def test_reduced_store_equals_direct_capture(family, questions, tmp_path):
    model = lp.zoo.tiny(family, device="cpu")
    rows = [q.to_dict() for q in questions[:8]]
    store = lp.extract(model, questions[:8], hooks=[RESID, "blocks.0.attn.hook_z"], out=tmp_path / "s",
                       positions="image", reduce="mean", batch_size=2, shard_size=4, progress=False)
    values, _ = direct(model, rows, [RESID, "blocks.0.attn.hook_z"], "image", "mean", 2)
    assert store.hooks == list(values)
    for name, parts in values.items():
        assert torch.equal(store[name], torch.cat(parts)), name
    assert store["blocks.0.attn.hook_z"].shape == (8, model.n_heads, model.d_head)
    assert torch.equal(store.stack(RESID), torch.stack([store[f"blocks.{i}.hook_resid_post"]
                                                        for i in range(model.n_layers)]))
    meta = store.meta
    assert meta["id"].tolist() == [q.id for q in questions[:8]]
    assert meta["color"].tolist() == [q.color for q in questions[:8]]
    assert [list(a) for a in meta["about"]] == [list(q.about) for q in questions[:8]]
    assert meta["shard"].tolist() == [0] * 4 + [1] * 4 and meta["row"].tolist() == [0, 1, 2, 3] * 2
    assert (meta["n_positions"] > 0).all() and store.complete and len(store) == 8


def test_padded_store_positions_are_per_example(llava, questions, tmp_path):
    """reduce='none' keeps each example's own positions: equal to the example processed alone."""
    rows = [q.to_dict() for q in questions[:5]] + [{"id": "text", "prompt": "Is the red square big?",
                                                     "image": None, "color": "red"}]
    store = lp.extract(llava, rows, hooks="blocks.1.hook_resid_post", out=tmp_path / "s",
                       positions="prompt", reduce="none", batch_size=2, shard_size=4, progress=False)
    values, kept = direct(llava, rows, "blocks.1.hook_resid_post", "prompt", "none", 2)
    x, pos = store["blocks.1.hook_resid_post"], store.positions()
    assert x.shape[:2] == pos.shape and pos.shape[0] == 6
    assert store.meta["n_images"].tolist() == [1] * 5 + [0]
    i = 0
    for part, (cache_pos, _) in zip(values["blocks.1.hook_resid_post"], kept):
        for j in range(part.shape[0]):
            n = int((cache_pos[j] >= 0).sum())
            assert store.meta["n_positions"][i] == n
            assert torch.equal(x[i, :n], part[j, :n]) and not x[i, n:].any()
            alone = llava.prepare(images=rows[i].get("image"), prompts=rows[i]["prompt"]).layouts[0]
            assert torch.equal(pos[i, :n], alone.positions("prompt")) and (pos[i, n:] == -1).all()
            i += 1
    # shards hold different padded widths; reading by shard gives the same values
    shards = list(store.iter_shards())
    assert [s.meta.index[0] for s in shards] == [0, 4]
    for shard in shards:
        width = shard.positions.shape[1]
        rows_ = slice(shard.meta.index[0], shard.meta.index[-1] + 1)
        assert torch.equal(shard.tensors["blocks.1.hook_resid_post"], x[rows_, :width])


def test_whole_vision_and_projector_hooks(llava, questions, tmp_path):
    hooks = ["vision.blocks.*.hook_resid_post", "projector.hook_out"]
    store = lp.extract(llava, questions[:6], hooks=hooks, out=tmp_path / "s", positions="all",
                       reduce="none", batch_size=3, shard_size=3, progress=False)
    values, _ = direct(llava, [q.to_dict() for q in questions[:6]], hooks, "all", "none", 3)
    for name, parts in values.items():
        assert torch.equal(store[name], torch.cat(parts)), name
    assert store.positions() is None and store["projector.hook_out"].shape[:2] == (6, 16)
    with pytest.raises(InputError, match="not in the token sequence"):
        lp.extract(llava, questions[:2], hooks=hooks, out=tmp_path / "t", positions="image",
                   reduce="mean", progress=False)
    assert not (tmp_path / "t").exists()


def test_dtype_cast_and_shapes_llava(questions, tmp_path):
    """The shipped checkpoint, stored in float16; opening needs the same model."""
    model = lp.zoo.load("shapes-llava", device="cpu")
    store = lp.extract(model, questions[:4], hooks="blocks.*.hook_resid_post", out=tmp_path / "s",
                       dtype=torch.float16, batch_size=4, progress=False)
    values, _ = direct(model, [q.to_dict() for q in questions[:4]], RESID, "image", "mean", 4)
    assert store.dtype == torch.float16
    for name, parts in values.items():
        assert torch.equal(store[name], torch.cat(parts).half())
    assert lp.ActivationStore.open(tmp_path / "s", model=lp.zoo.load("shapes-llava", device="cpu"))
    with pytest.raises(StoreError, match=store.fingerprint["digest"]):
        lp.ActivationStore.open(tmp_path / "s", model=lp.zoo.tiny("llava", device="cpu"))


# --- kill -9 -----------------------------------------------------------------------------------

# A process that imports lvlm_probe once, then forks one extraction per line read on stdin
# ("out<TAB>file to pause in"), so four runs cost one interpreter start-up. A run pauses half-way
# through writing the named file and writes "<out>.paused"; the test then kills it with SIGKILL.
# "reap <pid>" waits for a killed run, so its files are final before the test looks at them.
SERVER = """
import os, sys, time, traceback
import lvlm_probe as lp
from lvlm_probe import fileio

def run(out, pause_in):
    # every store file (the header through fileio.write_json too) is written by fileio.atomic_write
    atomic, write, current = fileio.atomic_write, fileio._write_all, [""]

    def tracking(path, data, what):
        current[0] = str(path)
        return atomic(path, data, what)

    def pausing(fd, data):
        view = memoryview(data)
        write(fd, view[: len(view) // 2])
        if pause_in and current[0].endswith(pause_in):
            open(out + ".paused", "w").close()
            time.sleep(600)
        time.sleep(0.01)  # a wider window for the kill at a random time
        write(fd, view[len(view) // 2:])

    fileio.atomic_write, fileio._write_all = tracking, pausing
    model = lp.zoo.tiny("llava", device="cpu")
    qs = lp.worlds.ShapesWorld(seed=0, image_size=64).questions({n}, level="attribute", split="typical")
    lp.extract(model, qs, out=out, **{args})

print("ready", flush=True)
for line in sys.stdin:
    command, arg = line.rstrip("\\n").split("\\t")
    if command == "reap":
        os.waitpid(int(arg), 0)
        print("reaped", flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # the run's own output must not mix with the pids on stdout
        try:
            run(command, arg)
            open(command + ".done", "w").close()
        except BaseException:
            with open(command + ".failed", "w") as f:
                f.write(traceback.format_exc())
        os._exit(0)
    print(pid, flush=True)
"""
KILL_ARGS = dict(hooks=["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"], batch_size=2, shard_size=3,
                 progress=False)
# where each run is killed: the file it is half-way through writing, or "" for a random time
MOMENTS = {
    "header": "store.json",
    "tensors": "shards/shard-00002.safetensors",
    "manifest": "manifest/shard-00002.parquet",
    "random": "",
}


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _run_and_kill(tmp_path: Path, n: int, delay: float) -> dict[str, str]:
    """Start every run, SIGKILL each at its moment; returns how each ended."""
    script = tmp_path / "server.py"
    script.write_text(SERVER.format(n=n, args=KILL_ARGS))
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=log, text=True, env=os.environ.copy())
    try:
        assert server.stdout.readline().strip() == "ready", (tmp_path / "server.log").read_text()
        pids = {}
        for name, pause_in in MOMENTS.items():
            server.stdin.write(f"{tmp_path / name}\t{pause_in}\n")
            server.stdin.flush()
            pids[name] = int(server.stdout.readline())
        ended: dict[str, str] = {}
        first_shard: float | None = None
        deadline = time.monotonic() + 60
        while len(ended) < len(pids) and time.monotonic() < deadline:
            for name, pid in pids.items():
                out = tmp_path / name
                if name in ended:
                    continue
                for marker in ("done", "failed"):
                    if Path(f"{out}.{marker}").exists():
                        ended[name] = marker
                if name in ended:
                    continue
                if name == "random" and first_shard is None and "shard-00000.parquet" in _names(out / "manifest"):
                    first_shard = time.monotonic()
                due = name == "random" and first_shard is not None and time.monotonic() - first_shard >= delay
                if Path(f"{out}.paused").exists() or due:
                    os.kill(pid, signal.SIGKILL)
                    ended[name] = "killed"
            time.sleep(0.002)
        for name, pid in pids.items():
            if name not in ended:
                os.kill(pid, signal.SIGKILL)
            server.stdin.write(f"reap\t{pid}\n")
            server.stdin.flush()
            assert server.stdout.readline().strip() == "reaped"
        return ended
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        log.close()


@pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL are POSIX")
def test_kill9_resume_equals_uninterrupted(llava, tmp_path):
    n = 16
    qs = lp.worlds.ShapesWorld(seed=0, image_size=64).questions(n, level="attribute", split="typical")
    reference = lp.extract(llava, qs, out=tmp_path / "reference", **KILL_ARGS)
    delay = random.Random().uniform(0.0, 0.3)
    ended = _run_and_kill(tmp_path, n, delay)
    for name in MOMENTS:
        failed = Path(f"{tmp_path / name}.failed")
        detail = failed.read_text() if failed.exists() else (tmp_path / "server.log").read_text()[-3000:]
        allowed = ("killed", "done") if name == "random" else ("killed",)
        assert ended.get(name) in allowed, f"{name} (delay {delay:.3f}s): {ended.get(name)}\n{detail}"
    # each targeted run left the debris of its moment
    assert any(fileio.is_temporary(f) for f in _names(tmp_path / "header"))
    assert not (tmp_path / "header" / "store.json").exists()
    assert any(fileio.is_temporary(f) for f in _names(tmp_path / "tensors" / "shards"))
    assert _names(tmp_path / "tensors" / "manifest") == ["shard-00000.parquet", "shard-00001.parquet"]
    assert "shard-00002.safetensors" in _names(tmp_path / "manifest" / "shards")
    assert "shard-00002.parquet" not in _names(tmp_path / "manifest" / "manifest")
    for name in MOMENTS:
        root = tmp_path / name
        if (root / "store.json").exists():  # an interrupted store reads as its complete shards
            partial = lp.ActivationStore.open(root)
            assert partial.ids == [q.id for q in qs[: len(partial)]]
            assert len(partial) == {"tensors": 6, "manifest": 6}.get(name, len(partial))
        store = lp.extract(llava, qs, out=root, **KILL_ARGS)
        assert store.ids == [q.id for q in qs], name  # each once, in order
        assert store_files(root) == store_files(tmp_path / "reference"), name
        for hook in reference.hooks:
            assert torch.equal(store[hook], reference[hook])
        leftovers = [f for d in (root, root / "shards", root / "manifest") for f in _names(d)
                     if fileio.is_temporary(f)]
        assert not leftovers, (name, leftovers)


# --- damage and bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_shard_is_reported(llava, questions, tmp_path, where):
    store = lp.extract(llava, questions[:6], hooks=RESID, out=tmp_path / "s", shard_size=2, progress=False)
    path = tmp_path / "s" / "shards" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5 if where == "data" else 20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard 1 .*shard-00001\.safetensors.* corrupted"):
        lp.ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="shard 1"):  # a rerun does not paper over it either
        lp.extract(llava, questions[:6], hooks=RESID, out=tmp_path / "s", shard_size=2, progress=False)
    assert path.read_bytes() == bytes(data)  # reported, not repaired: the evidence stays
    if where == "header":  # without checksums, an unreadable header is still reported
        with pytest.raises(StoreError, match=r"shard 1 .*shard-00001\.safetensors"):
            lp.ActivationStore.open(tmp_path / "s", verify=False)
    else:  # verify=False checks sizes and headers only: the other shards stay readable
        assert len(lp.ActivationStore.open(tmp_path / "s", verify=False)) == len(store)


def test_fingerprint_mismatch(llava, questions, tmp_path):
    lp.extract(llava, questions[:4], hooks=RESID, out=tmp_path / "s", shard_size=2, progress=False)
    other = lp.zoo.tiny("llava", seed=1, device="cpu")
    a, b = lp.store.fingerprint(llava), lp.store.fingerprint(other)
    assert a["digest"] != b["digest"] and differences(a, b) == ["weights"]
    assert lp.store.fingerprint(lp.zoo.tiny("llava", device="cpu")) == a  # a reload matches
    with pytest.raises(StoreError, match=f"{a['digest']}.*{b['digest']}"):
        lp.ActivationStore.open(tmp_path / "s", model=other)
    with pytest.raises(StoreError, match="model fingerprint.*weights"):
        lp.extract(other, questions[:6], hooks=RESID, out=tmp_path / "s", shard_size=2, progress=False)
    assert len(lp.ActivationStore.open(tmp_path / "s", model=llava)) == 4


def test_unknown_hook_writes_nothing(llava, questions, tmp_path):
    with pytest.raises(HookNameError, match="blocks.*.hook_resid_postt.*did you mean"):
        lp.extract(llava, questions[:2], hooks="blocks.*.hook_resid_postt", out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_selector_selecting_nothing_keeps_complete_shards(llava, questions, tmp_path):
    rows = [q.to_dict() for q in questions[:4]] + [{"id": "no-image", "prompt": "Is it red?", "image": None}]
    with pytest.raises(LayoutError, match=r"dataset examples 4\.\.4 \(ids \['no-image'\]\).*selects no position"):
        lp.extract(llava, rows, hooks=RESID, out=tmp_path / "s", batch_size=2, shard_size=2, progress=False)
    kept = lp.ActivationStore.open(tmp_path / "s")
    assert kept.ids == [q.id for q in questions[:4]] and not kept.complete
    store = lp.extract(llava, questions[:6], hooks=RESID, out=tmp_path / "s", batch_size=2, shard_size=2,
                       progress=False)
    assert store.ids == [q.id for q in questions[:6]] and store.complete


@pytest.mark.parametrize("fail_at", ["tensors", "manifest"])
def test_full_disk_then_resume(llava, questions, tmp_path, monkeypatch, fail_at):
    args = dict(hooks=RESID, batch_size=2, shard_size=2, progress=False)
    reference = lp.extract(llava, questions[:6], out=tmp_path / "reference", **args)
    calls = []
    write = fileio._write_all
    # writes: header, shard 0 tensors, shard 0 manifest, shard 1 tensors, shard 1 manifest, ...
    target = 3 if fail_at == "tensors" else 4

    def full(fd, data):
        calls.append(len(data))
        if len(calls) == target + 1:
            write(fd, memoryview(data)[: len(data) // 2])  # a partial file, as a real full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(fd, data)

    monkeypatch.setattr(fileio, "_write_all", full)
    with pytest.raises(StoreError, match=r"disk is full.*shard 1 .*shards 0\.\.0 \(2 examples\) are complete"):
        lp.extract(llava, questions[:6], out=tmp_path / "s", **args)
    monkeypatch.setattr(fileio, "_write_all", write)
    assert _names(tmp_path / "s" / "shards") == ["shard-00000.safetensors"]  # no partial, no orphan
    assert _names(tmp_path / "s" / "manifest") == ["shard-00000.parquet"]
    assert lp.ActivationStore.open(tmp_path / "s").ids == [q.id for q in questions[:2]]
    store = lp.extract(llava, questions[:6], out=tmp_path / "s", **args)
    assert store_files(tmp_path / "s") == store_files(tmp_path / "reference")
    assert store.ids == reference.ids and torch.equal(store.stack(RESID), reference.stack(RESID))


def test_rewind_then_resume_recomputes_only_the_cut_shards(llava, questions, tmp_path):
    """rewind keeps the shards wholly before its cut; the same call then extracts the rest (and only
    the rest) from the dataset as it is now: the store equals a fresh extraction of that dataset."""
    args = dict(hooks=RESID, batch_size=2, shard_size=4, progress=False)
    lp.extract(llava, questions, out=tmp_path / "s", **args)
    changed = [dict(q.to_dict()) for q in questions]
    changed[6]["image"] = changed[0]["image"]  # example 6 (shard 1) now shows another image
    fresh = lp.extract(llava, changed, out=tmp_path / "fresh", **args)
    assert lp.store.rewind(tmp_path / "s", 6) == 4  # shard 1 straddles the cut: it goes too
    store = lp.ActivationStore.open(tmp_path / "s")
    assert len(store) == 4 and not store.complete
    assert lp.store.rewind(tmp_path / "s", 6) == 4  # again: nothing more to cut
    forwards = []
    handle = llava.hf.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        store = lp.extract(llava, changed, out=tmp_path / "s", **args)
    finally:
        handle.remove()
    assert len(forwards) == (len(questions) - 4) // 2  # the batches of shards 1 and 2 only
    assert store.complete and store_files(tmp_path / "s") == store_files(tmp_path / "fresh")
    assert torch.equal(store.stack(RESID), fresh.stack(RESID))
    assert lp.store.rewind(tmp_path / "none", 0) == 0  # no store there: nothing to cut


@pytest.mark.parametrize("change, message", [
    (dict(reduce="last"), "reduce: the store has 'mean', this call 'last'"),
    (dict(hooks="blocks.0.hook_resid_post"), "hooks: the store has"),
    (dict(positions="prompt"), "positions: the store has 'image', this call 'prompt'"),
    (dict(dtype=torch.float16), "dtype: the store has 'float32', this call 'float16'"),
    (dict(order=[1, 0, 2, 3, 4, 5]), "example 0 has id 's0-typical-attribute-mix-1'"),
    (dict(order=[0, 1]), "the dataset has 2 examples but the store .* already holds 4"),
])
def test_mismatched_rerun_is_refused(llava, questions, tmp_path, change, message):
    args = dict(hooks=RESID, positions="image", reduce="mean", shard_size=2, progress=False)
    lp.extract(llava, questions[:4], out=tmp_path / "s", **args)
    before = store_files(tmp_path / "s")
    order = change.pop("order", range(6))
    with pytest.raises(StoreError, match=message):
        lp.extract(llava, [questions[i] for i in order], out=tmp_path / "s", **{**args, **change})
    assert store_files(tmp_path / "s") == before
    if change:  # overwrite=True starts a new store with the new settings
        store = lp.extract(llava, questions[:2], out=tmp_path / "s", overwrite=True, **{**args, **change})
        assert len(store) == 2 and store.header["hooks"] != [] and store.complete


def test_bad_datasets_and_folders(llava, questions, tmp_path):
    row = questions[0].to_dict()
    cases = [
        ([row, {**questions[1].to_dict(), "id": row["id"]}], InputError, "share the id"),
        ([{**row, "shard": 3}], InputError, "reserved"),
        ([{"image": row["image"], "prompt": "hi"}], InputError, r"no \['id'\]"),
        ([{**row, "weird": object()}], InputError, "label column 'weird'"),
        ([], InputError, "empty"),
    ]
    for i, (rows, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            lp.extract(llava, rows, hooks=RESID, out=tmp_path / f"s{i}", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        lp.extract(llava, questions[:2], hooks=RESID, out=tmp_path / "other", progress=False)
    assert _names(tmp_path / "other") == ["notes.txt"]
    with pytest.raises(StoreError, match="no store.json"):
        lp.ActivationStore.open(tmp_path / "other")
    with pytest.raises(HookNameError, match="this store offers"):
        lp.extract(llava, questions[:2], hooks=RESID, out=tmp_path / "ok", progress=False)["hook_embed"]


def test_shards_are_bounded(llava, questions, tmp_path):
    """A shard never holds more than shard_size examples nor (beyond one batch) max_shard_bytes, and
    batches never straddle shards, so shard boundaries do not depend on where a run resumed."""
    store = lp.extract(llava, questions[:11], hooks=RESID, out=tmp_path / "a", batch_size=3, shard_size=4,
                       progress=False)
    assert [r.n for r in store.records] == [4, 4, 3]
    one_batch = 2 * llava.n_layers * llava.d_model * 4  # two examples' float32 values
    store = lp.extract(llava, questions[:11], hooks=RESID, out=tmp_path / "b", batch_size=2, shard_size=256,
                       max_shard_bytes=one_batch, progress=False)
    assert [r.n for r in store.records] == [2, 2, 2, 2, 2, 1]
    header = json.loads((tmp_path / "b" / "store.json").read_text())
    assert header["complete"] and header["n_examples"] == 11 and header["shapes"][RESID.replace("*", "0")] == [64]


# --- executors ---------------------------------------------------------------------------------
class Staging(Executor):
    """A backend as a worker pool runs one, in this process: shards cut by cut_shards, each staged
    under temporary names (stage_shard), all committed at the end, in order."""

    name = "staging"

    def run(self, plan, writer):
        fp = writer.header["fingerprint"]
        buffer = ShardBuffer(plan.capture)

        def measure(batch):  # runs the batch: its bytes are those the buffer grows by
            before = buffer.nbytes
            add_batch(plan.model, plan.capture, batch, plan.dtype, buffer, fp, writer.done())
            return buffer.nbytes - before

        staged, k, start = [], writer.index, writer.start
        for shard in cut_shards(plan, measure):
            if len(buffer) < len(shard):  # the dataset's last, shorter batch is not measured
                add_batch(plan.model, plan.capture, shard[len(buffer):], plan.dtype, buffer, fp, writer.done())
            staged.append(stage_shard(writer.root, writer.header, buffer, k, start))
            k, start, buffer = k + 1, start + len(shard), ShardBuffer(plan.capture)
        for shard in staged:
            writer.commit(shard)
            plan.progress(shard.record.n)


@pytest.mark.parametrize("reduce,positions,max_bytes", [
    ("mean", "image", 1 << 30),
    ("none", "all", 2_000),  # padded values; shards closed early by size
])
def test_custom_executor_object_writes_the_local_store(llava, questions, tmp_path, reduce, positions, max_bytes):
    args = dict(hooks=["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"], positions=positions, reduce=reduce,
                batch_size=2, shard_size=3, max_shard_bytes=max_bytes, progress=False)
    local = lp.extract(llava, questions, out=tmp_path / "local", **args)
    custom = lp.extract(llava, questions, out=tmp_path / "custom", backend=Staging(), **args)
    assert store_files_all(tmp_path / "custom") == store_files_all(tmp_path / "local")
    assert len(local.records) == len(custom.records) > 1 and custom.complete
    # resuming a store a local run began continues after its complete shards, byte for byte
    lp.extract(llava, questions[:6], out=tmp_path / "resumed", **args)  # two complete shards
    lp.extract(llava, questions, out=tmp_path / "resumed", backend=Staging(), **args)
    assert store_files_all(tmp_path / "resumed") == store_files_all(tmp_path / "local")


def test_executors_by_name_and_their_errors(llava, questions, tmp_path):
    executors = lp.store.executors
    assert executors.names()[:2] == ["local", "ray"]
    executors.register(Staging())
    try:
        with pytest.raises(InputError, match=r"unknown backend 'dask'; expected one of \['local', 'ray', 'staging'\]"):
            lp.extract(llava, questions, RESID, out=tmp_path / "a", backend="dask")
        store = lp.extract(llava, questions[:4], RESID, out=tmp_path / "b", backend="staging", progress=False)
        assert store.complete and len(store) == 4
    finally:
        executors.unregister("staging")
    assert "staging" not in executors.names()
    with pytest.raises(InputError, match=r"unknown backend 'spark'; expected one of \['local', 'ray'\]"):
        lp.probing.sweep({"a": torch.zeros(4, 2)}, target=[0, 1, 0, 1], backend="spark")
    with pytest.raises(InputError, match="ray_address='auto' needs backend='ray', got backend='staging'"):
        lp.extract(llava, questions, RESID, out=tmp_path / "a", backend=Staging(), ray_address="auto")
    with pytest.raises(InputError, match="is not a SweepExecutor"):
        lp.probing.sweep({"a": torch.zeros(4, 2)}, target=[0, 1, 0, 1], backend=Staging())

    class Lazy(Executor):  # commits the first shard only: the store is not marked complete
        def run(self, plan, writer):
            shard = next(cut_shards(plan, lambda batch: 0))
            buffer = ShardBuffer(plan.capture)
            add_batch(plan.model, plan.capture, shard, plan.dtype, buffer, writer.header["fingerprint"], "")
            writer.write(buffer)
            for _ in plan.examples:
                pass

    with pytest.raises(StoreError, match=r"backend 'Lazy' committed 2 of the dataset's 4 examples"):
        lp.extract(llava, questions[:4], RESID, out=tmp_path / "c", backend=Lazy(), shard_size=2, progress=False)
    assert not lp.ActivationStore.open(tmp_path / "c").complete

    class Early(Executor):  # returns without reading the dataset: not mistaken for an empty one
        def run(self, plan, writer):
            pass

    with pytest.raises(StoreError, match=r"backend 'Early' returned before reading the dataset to its end"):
        lp.extract(llava, questions[:4], RESID, out=tmp_path / "d", backend=Early(), progress=False)
    assert not (tmp_path / "a").exists()


def test_custom_sweep_executor_object_gives_the_local_table():
    class Reversed(SweepExecutor):  # fits the hooks last to first
        def run(self, plan):
            return [plan.job.rows(plan.features, hook) for hook in reversed(plan.hooks)][::-1]

    generator = torch.Generator().manual_seed(0)
    arrays = {f"blocks.{i}.hook_resid_post": torch.randn(40, 8, generator=generator) for i in range(3)}
    labels = [i % 2 for i in range(40)]
    kw = dict(control=False, n_boot=20, max_iter=50)
    local = lp.probing.sweep(arrays, target=labels, **kw)
    pd.testing.assert_frame_equal(lp.probing.sweep(arrays, target=labels, backend=Reversed(), **kw), local)
