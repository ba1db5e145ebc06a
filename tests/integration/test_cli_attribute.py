"""`lvlm-probe attribute`: one prompt to a figure, and the ShapesWorld dataset mode to a folder."""
from __future__ import annotations

import pandas as pd
from PIL import Image
from typer.testing import CliRunner

import lvlm_probe as lp
from lvlm_probe.cli import app


def test_dataset_and_single_prompt_modes(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["attribute", "--model", "shapes-llava", "--device", "cpu", "--world", "12",
                                 "--method", "attention", "--out", str(tmp_path / "world")])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "world" / "split.parquet")
    assert len(table) == 12 and set(table["outcome"]) <= {"right", "typical", "other"}
    assert ((table["prior"] + table["prompt"] + table["image"] - table["full"]).abs() < 1e-4).all()
    for name in ("split.png", "map_0.png", "map_3.png"):
        assert (tmp_path / "world" / name).read_bytes()[:4] == b"\x89PNG"
    # each map says what it explains, in its PNG text too: model, question (the table's column of
    # that name), target and the model's own answer
    stored = Image.open(tmp_path / "world" / "map_0.png").text
    assert stored["model"] == "shapes-llava" and stored["method"] == "attention"
    assert stored["question"] == table["question"][0] and stored["target"] == table["answer"][0]
    assert float(stored["log p(target)"]) <= 0 and 0 < float(stored["model answer probability"]) <= 1

    question = lp.worlds.ShapesWorld(seed=1000, image_size=64).questions(1, level="attribute", kind="color")[0]
    question.image.save(tmp_path / "scene.png")
    result = runner.invoke(app, ["attribute", "--model", "shapes-llava", "--device", "cpu",
                                 "--image", str(tmp_path / "scene.png"), "--prompt", question.prompt,
                                 "--target", question.answer, "--method", "ablation",
                                 "--out", str(tmp_path / "one.png")])
    assert result.exit_code == 0, result.output
    assert "Source split" in result.output and (tmp_path / "one.png").exists()
    assert Image.open(tmp_path / "one.png").text["target"] == question.answer
    # a target the model does not answer: the map is drawn, and the command says so
    wrong = next(c for c in ("red", "green", "blue", "yellow") if c != question.answer)
    result = runner.invoke(app, ["attribute", "--model", "shapes-llava", "--device", "cpu",
                                 "--image", str(tmp_path / "scene.png"), "--prompt", question.prompt,
                                 "--target", wrong, "--method", "attention", "--out", str(tmp_path / "two.png")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"not the target '{wrong}'" in said and "an answer the model does not give" in said
    result = runner.invoke(app, ["attribute", "--model", "shapes-llava", "--device", "cpu",
                                 "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "needs --image, --prompt and --target" in result.output
