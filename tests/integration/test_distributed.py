"""The Ray backend on a real local Ray instance with two workers: extraction gives a store
byte-identical to a local one, a worker killed mid-extraction is retried without duplicates, and
sweeps give the local results. Ray is started once for the module (worker start-up dominates)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import store_files

import lvlm_probe as lp
from lvlm_probe.errors import InputError
from lvlm_probe.workflows.sweep import run_sweep
from lvlm_probe.workflows.sweep_config import load_config

ray = pytest.importorskip("ray")

HOOKS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"]
SIZES = dict(batch_size=2, shard_size=3, progress=False)
RAY = dict(backend="ray", ray_resources={"num_cpus": 1})  # two workers on the two-CPU instance


@pytest.fixture(scope="module")
def ray_session():
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LVLM_PROBE_CACHE")}
    env["OMP_NUM_THREADS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def llava():
    return lp.zoo.tiny("llava", device="cpu")


@pytest.fixture(scope="module")
def questions():
    return lp.worlds.ShapesWorld(seed=0, image_size=64).questions(10, level="attribute", split="typical")



def crash_once(marker: Path, driver: int):
    """An image selector that kills the Ray worker running it while ``marker`` exists (removing it,
    so exactly one worker dies, once). The driver's own calls never crash."""

    def image_positions(layout):
        if os.getpid() != driver:
            try:
                os.remove(marker)
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        return layout.positions("image")

    return image_positions


@pytest.mark.parametrize("reduce,positions,max_bytes", [
    ("mean", "image", 1 << 30),
    ("none", "all", 2_000),  # padded values; shards closed early by size, as a local run closes them
])
def test_ray_store_equals_local(ray_session, llava, questions, tmp_path, reduce, positions, max_bytes):
    args = dict(hooks=HOOKS, positions=positions, reduce=reduce, max_shard_bytes=max_bytes, **SIZES)
    local = lp.extract(llava, questions, out=tmp_path / "local", **args)
    remote = lp.extract(llava, questions, out=tmp_path / "ray", **RAY, **args)
    expected = store_files(tmp_path / "local")
    assert store_files(tmp_path / "ray") == expected
    assert len(local.records) == len(remote.records) > 1
    assert remote.ids == [q.id for q in questions] and remote.complete


def test_killed_worker_is_retried_and_a_partial_store_resumed(ray_session, llava, questions, tmp_path):
    marker = tmp_path / "crash-once"
    selector = crash_once(marker, os.getpid())
    args = dict(hooks=HOOKS, positions=selector, **SIZES)
    lp.extract(llava, questions[:6], out=tmp_path / "ray", **args)  # two shards, written locally
    marker.touch()
    store = lp.extract(llava, questions, out=tmp_path / "ray", **RAY, **args)
    assert not marker.exists()  # a worker did die
    reference = lp.extract(llava, questions, out=tmp_path / "local", **args)
    assert store.ids == reference.ids and len(set(store.ids)) == len(questions)
    assert store_files(tmp_path / "ray") == store_files(tmp_path / "local")  # no leftovers, no duplicates


def test_ray_sweep_equals_local(ray_session, llava, questions, tmp_path):
    world = lp.worlds.ShapesWorld(seed=0, image_size=64)
    concepts = world.concepts(24, objects=1, split="typical", modality="image")
    store = lp.extract(llava, concepts, ["blocks.*.hook_resid_post", "blocks.1.attn.hook_z"],
                       out=tmp_path / "acts", **SIZES)
    kw = dict(target="shape", hooks=["blocks.*.hook_resid_post", "blocks.1.attn.hook_z"], heads=True,
              n_boot=50, max_iter=100)
    local = lp.probing.sweep(store, **kw)
    remote = lp.probing.sweep(store, backend="ray", **kw)
    arrays = lp.probing.sweep({h: store[h] for h in store.hooks if "resid" in h},
                              target=store.meta["shape"].to_numpy(), control=False, n_boot=0,
                              backend="ray", max_iter=100)
    assert len(local) == 1 + 1 + llava.n_heads and list(remote["hook"]) == list(local["hook"])
    numeric = ["accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity", "chance"]
    np.testing.assert_allclose(remote[numeric].to_numpy(float), local[numeric].to_numpy(float), atol=1e-6)
    pd.testing.assert_frame_equal(remote.drop(columns=numeric), local.drop(columns=numeric))
    resid = local[local["head"].isna()].reset_index(drop=True)
    np.testing.assert_allclose(arrays["accuracy"].to_numpy(float), resid["accuracy"].to_numpy(float), atol=1e-6)


def test_run_sweep_yaml_backend(ray_session, llava, tmp_path):
    definition = tmp_path / "ray.yaml"
    definition.write_text(
        f"model: tiny-llava\nout: {tmp_path / 'run'}\nbackend: ray\n"
        "data:\n  world: {n: 16, objects: 1, image_size: 64, split: typical}\n"
        "extract: {lm_hooks: [blocks.*.hook_resid_post], tower_hooks: [], batch_size: 4}\n"
        "probes: {targets: [shape], n_boot: 20}\n")
    config = load_config(definition)
    assert (config.backend, config.ray_address) == ("ray", None)
    run = run_sweep(config, model=llava, progress=False)
    local = run_sweep(dataclasses.replace(config, backend="local", out=str(tmp_path / "local")),
                      model=llava, progress=False)
    assert len(run.results) == llava.n_layers
    pd.testing.assert_frame_equal(run.results, local.results)
    assert store_files(tmp_path / "run" / "acts" / "lm") == store_files(tmp_path / "local" / "acts" / "lm")
    # the backend is not part of a run's identity: the Ray run's folder resumes locally
    again = run_sweep(dataclasses.replace(config, backend="local"), model=llava, progress=False)
    pd.testing.assert_frame_equal(again.results, run.results)


def test_bad_backend_arguments(llava, questions, tmp_path):
    with pytest.raises(InputError, match=r"unknown backend 'dask'; expected one of \['local', 'ray'\]"):
        lp.extract(llava, questions, HOOKS, out=tmp_path / "a", backend="dask")
    with pytest.raises(InputError, match="ray_address='auto' needs backend='ray'"):
        lp.extract(llava, questions, HOOKS, out=tmp_path / "a", ray_address="auto")
    with pytest.raises(InputError, match="unknown Ray resource key"):
        lp.extract(llava, questions, HOOKS, out=tmp_path / "a", backend="ray", ray_resources={"gpus": 1})
    with pytest.raises(InputError, match="unknown backend 'spark'"):
        lp.probing.sweep({"a": np.zeros((4, 2))}, target=np.array([0, 1, 0, 1]), backend="spark")
    assert not (tmp_path / "a").exists()


def test_in_memory_model_is_refused(ray_session, llava, questions, tmp_path):
    model = lp.LVLM(llava.hf, llava.processor)  # no LoadSpec: workers could not load it
    with pytest.raises(InputError, match="save_pretrained"):
        lp.extract(model, questions, HOOKS, out=tmp_path / "a", backend="ray", **SIZES)


def test_worker_errors_name_the_examples(ray_session, llava, questions, tmp_path):
    rows = [q.to_dict() for q in questions]
    rows[7]["image"] = "not an image"  # reaches a worker: the driver only measures example 0
    with pytest.raises(lp.ImageTypeError, match=r"dataset examples 6\.\.7"):
        lp.extract(llava, rows, HOOKS, out=tmp_path / "s", backend="ray", **SIZES)  # default: one worker


def test_worker_model_must_match_the_driver(ray_session, llava, questions, tmp_path):
    # ray_load changes what workers load; a different model is caught by its fingerprint
    with pytest.raises(lp.StoreError, match="Ray worker loaded .* with fingerprint"):
        lp.extract(llava, questions, HOOKS, out=tmp_path / "a", backend="ray",
                   ray_load={"dtype": "float16"}, **SIZES)
    with pytest.raises(InputError, match="ray_load must be a dict"):
        lp.extract(llava, questions, HOOKS, out=tmp_path / "b", ray_load={"dtype": "float16"})
