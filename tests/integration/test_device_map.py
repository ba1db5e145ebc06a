"""A model split by a device_map (part of it offloaded to disk) captures, extracts and attributes
exactly like the same model on one device."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import random_image

import lvlm_probe as lp
from lvlm_probe.store import fingerprint
from lvlm_probe.zoo.tiny_builders import build_dir

# the vision tower and layer 0 stay in memory; layer 1 and the unembedding live on disk and are
# loaded by accelerate's hooks only for their forward pass
SPLIT = {
    "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
    "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
    "model.language_model.norm": "cpu", "lm_head": "disk",
}
NAMES = ["hook_embed", "blocks.*.hook_resid_post", "blocks.*.attn.hook_z", "blocks.1.attn.hook_result",
         "vision.blocks.0.hook_resid_post"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = build_dir("llava")
    whole = lp.load(path, device="cpu")
    split = lp.load(path, device_map=SPLIT, offload_folder=str(tmp_path_factory.mktemp("offload")))
    return whole, split


@pytest.fixture(scope="module")
def batch(models):
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    return models[0].prepare(images=images, prompts=["Is there a heart?", "Is the star blue? Answer yes or no."])


def test_the_map_really_offloads(models):
    _, split = models
    assert set(split.hf.hf_device_map.values()) == {"cpu", "disk"}
    offloaded = [n for n, p in split.hf.named_parameters() if p.device.type == "meta"]
    assert any(n.startswith("model.language_model.layers.1.") for n in offloaded)
    assert "lm_head.weight" in offloaded
    assert split.device == torch.device("cpu")
    # the fingerprint reads offloaded values, so stores of both placements are interchangeable
    assert fingerprint(split) == fingerprint(models[0])


@pytest.mark.parametrize("positions,reduce", [("all", "none"), ("image", "mean")])
def test_capture_equals_single_device(models, batch, positions, reduce):
    whole, split = models
    lm = [n for n in NAMES if not n.startswith("vision.")]
    results = []
    for model in (whole, split):
        with model.capture(lm, positions=positions, reduce=reduce) as cache:
            logits = model.forward(batch).logits
        results.append((cache, logits))
    (a, logits_a), (b, logits_b) = results
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    assert a.names() == b.names()
    for name in a.names():
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(b.stack("blocks.*.hook_resid_post"), a.stack("blocks.*.hook_resid_post"))
    with split.capture("vision.blocks.0.hook_resid_post") as vision:
        split.forward(batch)
    with whole.capture("vision.blocks.0.hook_resid_post") as reference:
        whole.forward(batch)
    torch.testing.assert_close(vision["vision.blocks.0.hook_resid_post"],
                               reference["vision.blocks.0.hook_resid_post"], rtol=0, atol=0)


def test_extraction_is_bitwise_equal(models, tmp_path):
    whole, split = models
    rows = [{"id": i, "image": random_image(40, 40, seed=i), "prompt": "Is there a heart?", "k": i % 2}
            for i in range(5)]
    stores = [lp.extract(m, rows, ["blocks.*.hook_resid_post"], out=tmp_path / name, batch_size=2,
                         shard_size=3, progress=False)
              for m, name in ((whole, "whole"), (split, "split"))]
    for part in ("store.json", "shards/shard-00000.safetensors", "shards/shard-00001.safetensors",
                 "manifest/shard-00000.parquet", "manifest/shard-00001.parquet"):
        assert (tmp_path / "split" / part).read_bytes() == (tmp_path / "whole" / part).read_bytes(), part
    assert stores[1].fingerprint == stores[0].fingerprint


def test_attribution_on_split_model(models, batch):
    whole, split = models
    a = lp.attribution.source_split(whole, batch, target="yes", foil="no")
    b = lp.attribution.source_split(split, batch, target="yes", foil="no")
    for part in ("prior", "prompt", "image", "full"):
        torch.testing.assert_close(torch.as_tensor(getattr(b, part)), torch.as_tensor(getattr(a, part)),
                                   rtol=0, atol=1e-6)
    # the unembedding is on disk: the lens decodes through accelerate's hooks
    lens = [lp.attribution.logit_lens(m, batch, positions="last", k=3) for m in (whole, split)]
    assert torch.equal(lens[1].top_ids, lens[0].top_ids)
    torch.testing.assert_close(lens[1].top_probs, lens[0].top_probs, rtol=0, atol=1e-6)
    knocked = [lp.attribution.knockout(m, batch, source="image", dest="last", layers=range(0, 2))
               for m in (whole, split)]
    pd.testing.assert_frame_equal(knocked[1].to_frame(), knocked[0].to_frame())


def test_bad_placement_arguments():
    with pytest.raises(lp.InputError, match="max_memory"):
        lp.load(build_dir("llava"), max_memory={"cpu": "1GiB"})
    with pytest.raises(lp.InputError, match="unknown backend 'vllm'"):
        lp.load(build_dir("llava"), backend="vllm")
    with pytest.raises(lp.InputError, match="needs backend='nnsight'"):
        lp.load(build_dir("llava"), remote=True)


def test_load_spec_replays_and_replaces_placement(models):
    whole, split = models
    assert dict(split.source.hf_kwargs)["device_map"] == SPLIT
    single = split.source.replace(device_map=None, offload_folder=None)
    assert "device_map" not in dict(single.hf_kwargs) and single.dtype == "float32"
    again = single.load(device="cpu")
    assert not hasattr(again.hf, "hf_device_map") or not again.hf.hf_device_map
    assert fingerprint(again) == fingerprint(whole)


def test_auto_map_with_max_memory_offloads_and_captures_the_same(models, batch, tmp_path):
    whole, _ = models
    # a CPU budget smaller than the model makes accelerate's "auto" placement spill to disk
    auto = lp.load(build_dir("llava"), device_map="auto", max_memory={"cpu": "200KiB"},
                   offload_folder=str(tmp_path))
    assert set(auto.hf.hf_device_map.values()) == {"cpu", "disk"}
    captured = []
    for model in (whole, auto):
        with model.capture("blocks.*.hook_resid_post", positions="image", reduce="mean") as cache:
            model.forward(batch)
        captured.append(cache.stack("blocks.*.hook_resid_post"))
    torch.testing.assert_close(captured[1], captured[0], rtol=0, atol=0)
