"""Bad input raises a clear error naming what was received and what was expected."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.errors import ImageTypeError, InputError, UnsupportedModelError


@pytest.fixture(scope="module")
def llava():
    return lp.zoo.tiny("llava", device="cpu")


def test_unsupported_model_class_names_supported_families(tmp_path):
    from transformers import BertConfig

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8)
    config.architectures = ["BertForMaskedLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        lp.load(tmp_path, device="cpu")
    message = str(err.value)
    assert "BertForMaskedLM" in message and "not an image-text-to-text class" in message
    for name in lp.families.names():
        assert name in message


def test_unknown_family_names_supported_ones():
    with pytest.raises(UnsupportedModelError, match="llava"):
        lp.families.get("not-a-family")
    with pytest.raises(UnsupportedModelError, match="not-a-family"):
        lp.zoo.tiny("not-a-family")


def test_missing_checkpoint_is_a_load_error(tmp_path):
    with pytest.raises(lp.ModelLoadError, match=str(tmp_path / "nowhere")):
        lp.load(tmp_path / "nowhere", device="cpu")


@pytest.mark.parametrize("family", [f for f in lp.families.names() if lp.families.get(f).requires_image])
def test_prompt_without_image_where_family_needs_one(family):
    model = lp.zoo.tiny(family, device="cpu")
    with pytest.raises(InputError, match=f"has no image.*{family}"):
        model.prepare(images=None, prompts=["Is there a heart?"])


@pytest.mark.parametrize("family", [f for f in lp.families.names() if not lp.families.get(f).multi_image])
def test_too_many_images_where_family_takes_one(family):
    model = lp.zoo.tiny(family, device="cpu")
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="2 images"):
        model.prepare(images=[[img, img]], prompts=["Is there a heart?"])


@pytest.mark.parametrize("bad, expected", [
    ("photo.png", "str"),
    (np.zeros((4, 4, 5), dtype=np.uint8), r"shape \(4, 4, 5\)"),
    (torch.zeros(2, 8, 8), r"shape \(2, 8, 8\)"),
    (np.zeros((8, 8, 3), dtype=np.int64), "dtype int64"),
])
def test_wrong_image_type(llava, bad, expected):
    with pytest.raises(ImageTypeError, match=expected):
        llava.prepare(images=[bad], prompts=["Is there a heart?"])


def test_mismatched_images_and_prompts(llava):
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="got 3 image entries for 2 prompts"):
        llava.prepare(images=[img, img, img], prompts=["a?", "b?"])
    with pytest.raises(InputError, match="must be a list of 2 entries"):
        llava.prepare(images=img, prompts=["a?", "b?"])
    with pytest.raises(InputError, match=r"prompts\[1\] must be a string, got int"):
        llava.prepare(images=[img, img], prompts=["a?", 3])


def test_bad_dtype_and_device():
    with pytest.raises(InputError, match="unknown dtype 'float13'"):
        lp.zoo.tiny("llava", dtype="float13")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        lp.zoo.tiny("llava", device="gpu0")


def test_bad_answers(llava):
    batch = llava.prepare(images=[np.zeros((32, 32, 3), dtype=np.uint8)], prompts=["Is it?"])
    with pytest.raises(InputError, match="answers is empty"):
        llava.answer_logprobs(batch, [])
    with pytest.raises(InputError, match="outside the vocabulary"):
        llava.answer_logprobs(batch, [10**9])
    with pytest.raises(InputError, match="got answers for 2 examples"):
        llava.answer_logprobs(batch, [["yes"], ["no"]])


def test_unknown_position_group(llava):
    batch = llava.prepare(images=[np.zeros((32, 32, 3), dtype=np.uint8)], prompts=["Is it red?"])
    with pytest.raises(lp.LayoutError, match="unknown position group 'images'"):
        batch.layouts[0].positions("images")
    with pytest.raises(lp.LayoutError, match="'blue' does not occur"):
        batch.layouts[0].word_positions("blue")


def test_offline_load_from_local_directory(llava, tmp_path, monkeypatch):
    """A saved model loads with the hub unreachable, and its config names the real class."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = llava.save_pretrained(tmp_path / "m")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert not list(path.glob("*.bin")) and list(path.glob("*.safetensors"))
    again = lp.load(path, device="cpu")
    for a, b in zip(llava.hf.state_dict().values(), again.hf.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_shipped_checkpoint_names_the_available_ones():
    with pytest.raises(UnsupportedModelError, match="no shipped checkpoint 'nope'.*shapes-llava"):
        lp.zoo.load("nope")
