"""lp.load(..., backend="nnsight", remote=...): the NDIF request is built (never sent) from a
weightless model, and the same serialized request run locally (remote="local") captures exactly
what a local capture does."""
from __future__ import annotations

import pytest
import torch
from conftest import random_image

import lvlm_probe as lp
from lvlm_probe.interop.remote import RemoteLVLM
from lvlm_probe.zoo.tiny_builders import build_dir

HUB_ID = "llava-hf/llava-1.5-7b-hf"
LM = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.*.hook_resid_post", "blocks.*.attn.hook_z",
      "blocks.*.hook_mlp_out", "ln_final.hook_normalized"]
WHOLE = ["vision.blocks.0.hook_resid_post", "projector.hook_out"]


@pytest.fixture(scope="module")
def path():
    return str(build_dir("llava"))


@pytest.fixture(scope="module")
def batch(path):
    model = lp.load(path, device="cpu")
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    return model, model.prepare(images=images, prompts=["Is there a heart?", "Is the star blue? Answer yes or no."])


@pytest.fixture
def remote_model(path, monkeypatch):
    import nnsight.modeling.huggingface as hf_models

    # nnsight names a deployment by the Hub's canonical repo id, which it asks the Hub for; the
    # answer is given here so the test needs no network, and the local folder stands for HUB_ID
    monkeypatch.setitem(hf_models._ID_CACHE, path, HUB_ID)
    return lp.load(path, backend="nnsight", remote=True)


def test_remote_model_holds_no_weights(remote_model, batch):
    local, _ = batch
    assert isinstance(remote_model, RemoteLVLM)
    assert {p.device.type for p in remote_model.hf.parameters()} == {"meta"}
    assert remote_model.hook_names() == local.hook_names()
    assert remote_model.device == torch.device("cpu")
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    mine = remote_model.prepare(images=images, prompts=["Is there a heart?", "Is the star blue? Answer yes or no."])
    assert torch.equal(mine.input_ids, batch[1].input_ids)
    assert [lay.positions("image").tolist() for lay in mine.layouts] == \
        [lay.positions("image").tolist() for lay in batch[1].layouts]


def test_request_is_built_without_sending(remote_model, batch, monkeypatch):
    import nnsight
    from nnsight.schema.request import RequestModel

    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "key-from-config")
    request = remote_model.request(batch[1], ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"])
    kind, _, key = request.model_key.partition(":")
    assert kind == "nnsight.modeling.transformers.TransformersModel"
    assert '"repo_id": "llava-hf/llava-1.5-7b-hf"' in key and '"task": "image-text-to-text"' in key
    assert request.host == nnsight.CONFIG.API.HOST and request.has_api_key
    assert "attn_implementation" in request.env
    layers = "model.language_model.layers"
    assert request.reads[0] == (f"{layers}.0", "input")  # the sequence shape
    assert set(request.reads[1:]) == {(f"{layers}.0", "output"), (f"{layers}.1", "output"),
                                      (f"{layers}.0.self_attn.o_proj", "input")}
    assert request.payload and b"key-from-config" not in request.payload
    # the server's side: the payload becomes a runnable trace against the named model's modules
    restored = RequestModel.deserialize(request.payload, remote_model.nn._remoteable_persistent_objects(),
                                        compress=request.compressed)
    assert restored is not None


@pytest.mark.parametrize("remote", ["local", False])
def test_local_run_of_the_request_equals_capture(path, batch, remote):
    # "local": the request is serialized and deserialized (with lvlm_probe hidden, as on the
    # server) and run here; False: a plain nnsight trace over local weights
    local, inputs = batch
    model = lp.load(path, backend="nnsight", remote=remote, device="cpu")
    with model.capture(LM, positions="image", reduce="mean") as lm, model.capture(WHOLE) as whole, \
            model.capture("blocks.1.attn.hook_result", positions="last") as result:
        output = model.forward(inputs)
    with local.capture(LM, positions="image", reduce="mean") as lm_ref, local.capture(WHOLE) as whole_ref, \
            local.capture("blocks.1.attn.hook_result", positions="last") as result_ref:
        reference = local.forward(inputs)
    torch.testing.assert_close(output.logits, reference.logits, rtol=0, atol=0)
    for mine, theirs in ((lm, lm_ref), (whole, whole_ref), (result, result_ref)):
        assert mine.names() == theirs.names()
        for name in theirs.names():
            torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0, msg=name)
    assert torch.equal(lm.positions(), lm_ref.positions())


def test_what_a_remote_model_refuses(remote_model, batch):
    with pytest.raises(lp.InputError, match="out-projection weights"):
        remote_model.capture("blocks.0.attn.hook_result")
    with pytest.raises(lp.InputError, match="inside the attention function"):
        remote_model.capture("blocks.0.attn.hook_pattern")
    with pytest.raises(lp.HookNameError):
        remote_model.capture("blocks.99.hook_resid_post")
    with pytest.raises(lp.InputError, match="plain forward pass"):
        remote_model.forward(batch[1], grad=True)
    with pytest.raises(lp.InputError, match="remote must be True, False, 'local' or an https:// host URL"):
        lp.load(HUB_ID, backend="nnsight", remote="ndif")


def test_lp_load_adds_the_nnsight_backend_to_the_local_loader(path):
    from lvlm_probe.interop.loading import load
    from lvlm_probe.model import load as load_local

    assert lp.load is load
    local, through = load_local(path, device="cpu"), lp.load(path, device="cpu")
    assert type(local) is type(through) is lp.LVLM and local.source == through.source
    assert all(torch.equal(a, b) for a, b in zip(local.hf.state_dict().values(), through.hf.state_dict().values()))
