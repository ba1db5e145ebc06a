"""Properties every family must have, checked on its tiny random-weight model through the real
transformers class and processor: declared module paths, padded batches laid out like their
examples, answer log-probabilities, small deterministic tiny checkpoints. The save -> load round
trip and the layout's accounting of every position are in test_conformance.py."""
from __future__ import annotations

import pytest
import torch

import lvlm_probe as lp

FAMILIES = lp.families.names()
PROMPT = "Is there a red heart left of the blue star? Answer yes or no."


@pytest.fixture(scope="module", params=FAMILIES)
def reloaded(request, tmp_path_factory):
    """tiny(f) -> save_pretrained(dir) -> lp.load(dir)."""
    family = request.param
    tiny = lp.zoo.tiny(family, device="cpu")
    path = tiny.save_pretrained(tmp_path_factory.mktemp(family))
    return lp.load(path, device="cpu")


def test_every_family_has_a_tiny_model():
    assert lp.zoo.tiny_families() == FAMILIES


def test_declared_module_paths_exist(reloaded):
    fam, hf = reloaded.family, reloaded.hf
    layers = hf.get_submodule(fam.lm_layers)
    assert len(layers) == reloaded.n_layers
    attending = fam.self_attention_layers(reloaded.config)[0]
    for rel in (fam.lm_attn, fam.lm_attn_out):
        layers[attending].get_submodule(rel)
    layers[0].get_submodule(fam.lm_mlp)
    for layer in fam.unmasked_mixing_layers(reloaded.config):
        layers[layer].get_submodule(fam.lm_mixer)
    for path in (fam.lm_embed, fam.lm_norm, fam.lm_head, *fam.projector):
        hf.get_submodule(path)
    if fam.vision_layers is not None:
        assert len(hf.get_submodule(fam.vision_layers)) == reloaded.vision_layers


def test_batch_of_examples_with_padding(reloaded, images):
    """Two prompts of different lengths in one batch: each layout matches the example processed
    alone, mapped through the batch row's non-pad positions (padding is usually on the left, but
    BLIP-2's processor puts the query tokens before it)."""
    model = reloaded
    prompts = ["Is there a heart?", PROMPT]
    batch = model.prepare(images=[[images[0]], [images[1]]], prompts=prompts)
    for i, prompt in enumerate(prompts):
        single = model.prepare(images=[[images[i]]], prompts=[prompt])
        alone, batched = single.layouts[0], batch.layouts[i]
        pad = batched.positions("pad").numel()
        assert batched.length == alone.length + pad
        kept = batched.positions("all")  # the unpadded example's positions, in order
        assert torch.equal(batch.input_ids[i, kept], single.input_ids[0])
        for group in ("image", "prompt", "template"):
            assert torch.equal(batched.positions(group), kept[alone.positions(group)])
        assert batched.image_grids == alone.image_grids


def test_answer_logprobs_match_logits(reloaded, images):
    model = reloaded
    batch = model.prepare(images=[[images[0]]], prompts=[PROMPT])
    ids = model.answer_token_ids(batch, ["yes", "no"], first_token=True)  # tiny tokenizers split words
    logits = model.forward(batch).logits[:, -1].float()
    assert torch.allclose(model.answer_logprobs(batch, ["yes", "no"], first_token=True),
                          logits.log_softmax(-1).gather(1, ids))
    assert ids[0, 0] != ids[0, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_stay_small_and_deterministic(family, tmp_path, monkeypatch):
    """Tiny checkpoints stay under 5 MB; a rebuild from the same seed gives the same weights,
    another seed different ones."""
    from lvlm_probe.zoo.tiny_builders import build_dir

    path = build_dir(family, seed=0)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5 * 2**20, f"{family}: {size / 2**20:.1f} MB"
    first = lp.zoo.tiny(family, seed=0, device="cpu").hf.state_dict()
    monkeypatch.setenv("LVLM_PROBE_CACHE", str(tmp_path))  # force a rebuild
    rebuilt = lp.zoo.tiny(family, seed=0, device="cpu").hf.state_dict()
    other = lp.zoo.tiny(family, seed=1, device="cpu").hf.state_dict()
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
