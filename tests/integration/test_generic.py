"""The generic adapter: image-text-to-text models without a family adapter load from tiny instances
of their real transformers classes and pass the family conformance suite; models that cannot fit
are refused with the reason.

The conformance checks are imported from ``test_conformance`` and run here on the generic models
(``lp.zoo.tiny_generic()``) through this module's own ``subject`` fixture.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import PROMPTS, random_image
from test_conformance import *  # noqa: F403  (the conformance checks, run on the models below)
from test_conformance import Subject

import lvlm_probe as lp
from lvlm_probe.attribution import image_map
from lvlm_probe.errors import InputError, UnsupportedModelError
from lvlm_probe.families import Generic, GenericAdapterWarning

GENERIC = lp.zoo.tiny_generic()


@pytest.fixture(scope="module", params=GENERIC)
def subject(request, tmp_path_factory) -> Subject:
    """tiny(model type) -> save_pretrained(dir) -> lp.load(dir), through the generic adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericAdapterWarning)
        original = lp.zoo.tiny(request.param, device="cpu")
        path = original.save_pretrained(tmp_path_factory.mktemp(request.param))
        model = lp.load(path, device="cpu")
    batch = model.prepare(images=[[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]],
                          prompts=PROMPTS)
    yes, no = (model.continuation_tokens(batch, 0, answer)[0] for answer in ("yes", "no"))
    assert yes != no
    return Subject(model, original, batch, yes, no)


def test_at_least_three_model_types_outside_the_families():
    assert len(GENERIC) >= 3
    assert not set(GENERIC) & set(lp.families.names())


def test_load_warns_what_it_discovered_and_assumed(subject, tmp_path):
    model = subject.model
    assert isinstance(model.family, Generic)
    path = model.save_pretrained(tmp_path / "again")
    with pytest.warns(GenericAdapterWarning) as record:
        lp.load(path, device="cpu")
    message = str(record[0].message)
    assert type(model.hf).__name__ in message and "no lvlm_probe family adapter" in message
    for path in (model.family.lm_layers, model.family.lm_head, model.family.vision_layers):
        assert repr(path) in message
        model.module(path)  # every discovered path exists
    assert "square" in message and "soft cap" in message and "cross-attention" in message  # the assumptions are named


def test_image_runs_match_the_processor(subject):
    """Each image's tokens are its placeholder run; a run is a spatial grid exactly when the
    processor reports that shape (image_grid_thw) or the run is square."""
    model = subject.model
    images = [[random_image(40, 56, seed=1)], [random_image(72, 48, seed=2)]]
    batch = model.prepare(images=images, prompts=PROMPTS)
    merge = getattr(model.config.vision_config, "spatial_merge_size", 1) or 1
    for i, layout in enumerate(batch.layouts):
        ids = batch.input_ids[i]
        (image,) = layout.images
        assert torch.equal(image.positions, (ids == model.image_token_id).nonzero().flatten())
        (grid,) = image.grids
        n = grid.positions.numel()
        if "image_grid_thw" in batch.inputs:
            t, h, w = batch.inputs["image_grid_thw"][i].tolist()
            assert grid.spatial and grid.shape == (t * h // merge, w // merge)
        else:
            side = int(n ** 0.5)
            assert grid.spatial == (side * side == n)
            assert grid.shape == ((side, side) if grid.spatial else (1, n))


def test_image_map_needs_a_spatial_grid(subject):
    model = subject.model
    batch = model.prepare(images=[random_image(40, 56, seed=1)], prompts=PROMPTS[0])
    grid = batch.layouts[0].images[0].grid
    if grid is not None:
        result = image_map(model, batch, subject.yes, foil=subject.no, method="ablation")
        assert result.grids[0][0].shape == grid.shape
        assert torch.isfinite(torch.as_tensor(result.grids[0][0])).all()
    else:
        with pytest.raises(InputError, match="need a spatial grid.*no spatial grid"):
            image_map(model, batch, subject.yes, foil=subject.no, method="ablation")


def _saved_config(config, path):
    config.save_pretrained(path)
    return path


def test_encoder_decoder_model_is_refused_with_the_reason(tmp_path):
    from transformers import Pix2StructConfig

    config = Pix2StructConfig(text_config={"num_layers": 1, "hidden_size": 16, "d_ff": 32},
                              vision_config={"num_hidden_layers": 1, "hidden_size": 16, "d_ff": 32})
    config.architectures = ["Pix2StructForConditionalGeneration"]
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        lp.load(_saved_config(config, tmp_path), device="cpu")


def test_discrete_image_token_model_is_refused_with_the_reason(tmp_path):
    from transformers import ChameleonConfig

    config = ChameleonConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)
    config.architectures = ["ChameleonForConditionalGeneration"]
    with pytest.raises(UnsupportedModelError, match="discrete tokens.*codebook"):
        lp.load(_saved_config(config, tmp_path), device="cpu")



def test_a_family_class_with_an_encoder_decoder_language_model_is_refused(tmp_path):
    """BLIP-2 and InstructBLIP checkpoints with Flan-T5 share their class with the decoder-only
    ones; the adapters read decoder-only language models, so these are refused by name."""
    from transformers import Blip2Config

    config = Blip2Config(text_config={"model_type": "t5", "d_model": 16, "num_layers": 1,
                                      "num_heads": 2, "d_ff": 32, "d_kv": 8},
                         vision_config={"hidden_size": 16, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "intermediate_size": 32},
                         qformer_config={"hidden_size": 16, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "intermediate_size": 32})
    config.architectures = ["Blip2ForConditionalGeneration"]
    assert config.use_decoder_only_language_model is False
    with pytest.raises(UnsupportedModelError, match="Blip2ForConditionalGeneration.*encoder-decoder"):
        lp.load(_saved_config(config, tmp_path), device="cpu")
