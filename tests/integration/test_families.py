"""Properties every family must have, checked on its tiny random-weight model through the real
transformers class and processor: save -> load round trip, logits equal to the HF model's own,
and a token layout that accounts for every image placeholder."""
from __future__ import annotations

import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.layout import GROUPS

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
    for rel in (fam.lm_attn, fam.lm_attn_out, fam.lm_mlp):
        layers[0].get_submodule(rel)
    for path in (fam.lm_embed, fam.lm_norm, fam.lm_head, *fam.projector):
        hf.get_submodule(path)
    if fam.vision_layers is not None:
        assert len(hf.get_submodule(fam.vision_layers)) == reloaded.vision_layers


def _image_sets(model, images):
    sets = [[images[0]]]
    if model.family.multi_image:
        sets.append(images)
    return sets


@pytest.mark.parametrize("n_images", [1, 2])
def test_forward_equals_hf_and_layout_accounts_for_every_image_token(reloaded, images, n_images):
    model = reloaded
    if n_images == 2 and not model.family.multi_image:
        pytest.skip(f"{model.family.name} takes one image per prompt")
    imgs = images[:n_images]
    batch = model.prepare(images=[imgs], prompts=[PROMPT])

    # The processor called directly on the same text gives the same inputs and logits.
    kwargs = dict(model.family.processor_kwargs())
    if model.tokenizer.bos_token and batch.texts[0].startswith(model.tokenizer.bos_token):
        kwargs["add_special_tokens"] = False  # the template wrote BOS already
    direct = model.processor(text=batch.texts, images=model.family.processor_images([imgs]),
                             return_tensors="pt", padding=True, **kwargs)
    assert torch.equal(direct["input_ids"], batch.input_ids)
    with torch.no_grad():
        expected = model.hf(**direct).logits
    assert torch.equal(model.forward(batch).logits, expected)

    layout = batch.layouts[0]
    ids = batch.input_ids[0]
    # groups partition the sequence
    every = torch.cat([layout.groups[g] for g in GROUPS]).sort().values
    assert torch.equal(every, torch.arange(layout.length))
    # image positions are exactly the placeholder tokens
    placeholders = (ids == model.image_token_id).nonzero().flatten()
    assert torch.equal(layout.positions("image"), placeholders)
    assert len(layout.images) == n_images
    # every image position is a grid cell or a named separator, exactly once
    cells = torch.cat([lay.positions for lay in layout.images])
    assert cells.numel() == placeholders.numel() == cells.unique().numel()
    for lay in layout.images:
        assert lay.grids or lay.separators
    # the prompt positions spell the prompt
    prompt_text = model.tokenizer.decode(ids[layout.positions("prompt")])
    assert prompt_text.strip() == PROMPT


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
    ids = model.answer_token_ids(batch, ["yes", "no"])
    logits = model.forward(batch).logits[:, -1].float()
    assert torch.allclose(model.answer_logprobs(batch, ["yes", "no"]),
                          logits.log_softmax(-1).gather(1, ids))
    assert ids[0, 0] != ids[0, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_stay_small_and_deterministic(family, tmp_path, monkeypatch):
    """Tiny checkpoints stay under 5 MB; a rebuild from the same seed gives the same weights,
    another seed different ones."""
    from lvlm_probe.zoo.tiny import build_dir

    path = build_dir(family, seed=0)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5 * 2**20, f"{family}: {size / 2**20:.1f} MB"
    first = lp.zoo.tiny(family, seed=0, device="cpu").hf.state_dict()
    monkeypatch.setenv("LVLM_PROBE_CACHE", str(tmp_path))  # force a rebuild
    rebuilt = lp.zoo.tiny(family, seed=0, device="cpu").hf.state_dict()
    other = lp.zoo.tiny(family, seed=1, device="cpu").hf.state_dict()
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
