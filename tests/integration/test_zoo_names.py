"""lp.zoo.from_name: the one rule by which the command line and sweep definitions name a model
(tiny:<family>, a shipped checkpoint, a local folder or a hub id)."""
from __future__ import annotations

import pytest
import torch

import lvlm_probe as lp
from lvlm_probe.errors import ModelLoadError, UnsupportedModelError
from lvlm_probe.zoo.tiny_builders import build_dir


def _same_weights(a: lp.LVLM, b: lp.LVLM) -> bool:
    left, right = a.hf.state_dict(), b.hf.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_tiny_prefix_and_local_folder():
    named = lp.zoo.from_name("tiny:llava", device="cpu")
    assert _same_weights(named, lp.zoo.tiny("llava", device="cpu"))
    folder = lp.zoo.from_name(str(build_dir("llava")), device="cpu")
    assert folder.source.name_or_path == str(build_dir("llava")) and _same_weights(folder, named)
    assert lp.zoo.from_name("tiny:llava", device="cpu", dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.skipif("shapes-llava" not in lp.zoo.checkpoints(), reason="shapes-llava checkpoint not shipped")
def test_shipped_checkpoint_name():
    model = lp.zoo.from_name("shapes-llava", device="cpu")
    assert model.source.name_or_path == str(lp.zoo.checkpoint_dir("shapes-llava"))


def test_a_bad_name_lists_what_a_name_can_be():
    with pytest.raises(ModelLoadError) as caught:
        lp.zoo.from_name("no-such-model", device="cpu")
    message = str(caught.value)
    assert "cannot load a model named 'no-such-model'" in message
    for name in lp.zoo.checkpoints():
        assert name in message
    assert "tiny:<family>" in message and "tiny:llava" in message
    assert "a local folder in Hugging Face format or a hub id" in message
    with pytest.raises(UnsupportedModelError, match="no tiny model for family 'nope'; available: "):
        lp.zoo.from_name("tiny:nope", device="cpu")


def test_the_command_line_uses_the_rule():
    from typer.testing import CliRunner

    from lvlm_probe.cli import app

    result = CliRunner().invoke(app, ["info", "tiny:llava", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "(family llava)" in result.output
    result = CliRunner().invoke(app, ["info", "no-such-model", "--device", "cpu"])
    assert isinstance(result.exception, ModelLoadError) and "tiny:<family>" in str(result.exception)
