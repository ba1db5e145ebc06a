"""A careless user at midnight: every mistake of issue 28's findings 2, 4, 8 (the sweep's side) and
9, and the sweep definition's conveniences (item 10), gives the documented error or warning.

Command-line mistakes print one short message naming what was received and what was expected,
exit with code 2, show no traceback (``--debug`` does), and are caught before any model is loaded:
the definitions name ``tiny:not-a-family``, which would fail differently if it were loaded.
Commands run in this process (``app(args=...)``, the same entry point as the installed
``lvlm-probe``), except the Ctrl-C test, which needs a process to interrupt. The image-map inputs
of finding 8 are covered by ``test_careless_maps.py``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import store_files
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.cli import INTERRUPTED, app
from lvlm_probe.errors import InputError, UnsupportedModelError
from lvlm_probe.probing.stats import wilson_ci
from lvlm_probe.probing.sweeps import SMALL_TEST
from lvlm_probe.workflows.sweep_config import RELATIVE_RULE, load_config

NOT_LOADED = "tiny:not-a-family"  # a model that fails to load: its error means the check came too late


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lvlm-probe *args`` run in this process."""
    try:
        app(args=list(args))
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, expected: str) -> None:
    """Exit code 2 and one short message holding ``expected``, with no traceback."""
    assert code == 2, err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err and "╭" not in err, err
    assert len(err.strip().splitlines()) <= 6, err


def folder(root: Path, n: int, labels: str | None = None, size: int = 16) -> Path:
    """``n`` one-colour PNGs in ``root/images`` with a labels.csv (``labels``: its text, else a
    correct one cycling red, green, blue)."""
    images = root / "images"
    images.mkdir(parents=True)
    colors = [("red", "green", "blue")[i % 3] for i in range(n)]
    for i, color in enumerate(colors):
        Image.new("RGB", (size, size), color).save(images / f"im{i:03d}.png")
    if labels is None:
        labels = "file,color\n" + "".join(f"im{i:03d}.png,{c}\n" for i, c in enumerate(colors))
    (images / "labels.csv").write_text(labels)
    return images


def definition(path: Path, **keys) -> Path:
    """A sweep definition at ``path``: a folder ``images`` next to it, probing ``color``."""
    raw = {"model": NOT_LOADED, "device": "cpu", "out": str(path.parent / "out"),
           "data": {"folder": {"path": "images", "labels": "images/labels.csv"}},
           "extract": {"lm_hooks": ["blocks.*.hook_resid_post"], "tower_hooks": [], "batch_size": 4},
           "probes": {"targets": ["color"], "control_by": [], "n_boot": 50}}
    path.write_text(yaml.safe_dump({**raw, **keys}))
    return path


# --- finding 4: command-line mistakes -----------------------------------------------------------

def test_unknown_tiny_family_is_named_with_the_ones_there_are(capsys):
    code, _, err = cli(capsys, "info", "tiny:nope")
    assert_user_error(code, err, "no tiny model for family 'nope'; available: ")
    assert "llava" in err


def test_debug_shows_the_traceback():
    with pytest.raises(UnsupportedModelError, match="no tiny model for family 'nope'"):
        app(args=["info", "tiny:nope", "--debug"])


def test_a_missing_image_is_named_before_the_model_loads(capsys):
    code, _, err = cli(capsys, "attribute", "--model", NOT_LOADED, "--image", "nope.png", "--prompt",
                       "Is it red?", "--target", "yes", "--out", "map.png")
    assert_user_error(code, err, "--image 'nope.png' is not a file")


def test_layout_names_a_missing_image_before_the_model_loads(capsys, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    code, _, err = cli(capsys, "layout", NOT_LOADED, "--image", str(tmp_path / "a.png"), "--image",
                       "nope.png", "--prompt", "Is it red?")
    assert_user_error(code, err, "--image 'nope.png': not a file; expected image files")


def test_attribute_out_that_is_a_folder_fails_before_the_model_loads(capsys, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    code, _, err = cli(capsys, "attribute", "--model", NOT_LOADED, "--image", str(tmp_path / "a.png"),
                       "--prompt", "Is it red?", "--target", "yes", "--out", str(tmp_path))
    assert_user_error(code, err, f"--out {str(tmp_path)!r} must be a file path")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_the_templates_cuda_on_a_machine_without_cuda(capsys, tmp_path):
    folder(tmp_path, 6)
    code, _, err = cli(capsys, "sweep", str(definition(tmp_path / "def.yaml", device="cuda")))
    assert_user_error(code, err, "device 'cuda' needs CUDA, which this machine does not have")
    assert "use device 'cpu'" in err and "NVIDIA" not in err
    code, _, err = cli(capsys, "info", "tiny:llava", "--device", "cuda")
    assert_user_error(code, err, "device 'cuda' needs CUDA")


@pytest.mark.parametrize("where", ["--out", "definition"])
def test_sweep_out_that_is_a_file_fails_before_the_model_loads(capsys, tmp_path, where):
    folder(tmp_path, 6)
    taken = tmp_path / "results.txt"
    taken.write_text("not a folder")
    if where == "--out":
        code, _, err = cli(capsys, "sweep", str(definition(tmp_path / "def.yaml")), "--out", str(taken))
        assert_user_error(code, err, f"--out {str(taken)!r} is a file; expected a folder to write into")
    else:
        path = definition(tmp_path / "def.yaml", out=str(taken))
        code, _, err = cli(capsys, "sweep", str(path))
        assert_user_error(code, err, f"out (in {path}) {str(taken)!r} is a file; expected a folder")
    assert taken.read_text() == "not a folder"


def test_sweep_out_inside_a_file_cannot_be_created(capsys, tmp_path):
    folder(tmp_path, 6)
    (tmp_path / "notes.txt").write_text("")
    out = tmp_path / "notes.txt" / "run"
    code, _, err = cli(capsys, "sweep", str(definition(tmp_path / "def.yaml")), "--out", str(out))
    assert_user_error(code, err, f"--out {str(out)!r} cannot be created: "
                                 f"{str(tmp_path / 'notes.txt')!r} is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_sweep_out_in_a_folder_without_write_permission(capsys, tmp_path):
    folder(tmp_path, 6)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = cli(capsys, "sweep", str(definition(tmp_path / "def.yaml")), "--out", str(locked / "run"))
    assert_user_error(code, err, "is not writable by this user")


@pytest.mark.parametrize("command", [["report", "--model", NOT_LOADED], ["zoo", "train"],
                                     ["attribute", "--model", NOT_LOADED, "--world", "3"]])
def test_other_commands_check_out_first(capsys, tmp_path, command):
    taken = tmp_path / "taken"
    taken.write_text("")
    code, _, err = cli(capsys, *command, "--out", str(taken))
    assert_user_error(code, err, f"--out {str(taken)!r} is a file; expected a folder to write into")


def _interrupt_when(proc: subprocess.Popen, ready: Path, limit: float = 240) -> None:
    """Send Ctrl-C's signal to ``proc`` as soon as ``ready`` exists (a path the run makes)."""
    start = time.monotonic()
    while not ready.exists():
        assert proc.poll() is None, f"the run ended before {ready} appeared: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() - start < limit, f"{ready} did not appear within {limit} s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)


def test_ctrl_c_says_the_same_command_resumes_and_it_does(capsys, tmp_path):
    """Interrupted while extracting the vision tower (the language model's store complete), the
    sweep says that rerunning resumes and exits with 130; the rerun keeps the finished store
    untouched and ends with the results of an uninterrupted run."""
    folder(tmp_path, 12)
    path = definition(tmp_path / "def.yaml", model="tiny:llava",
                      extract={"lm_hooks": ["blocks.*.hook_resid_post"], "batch_size": 2,
                               "tower_hooks": ["vision.blocks.*.hook_resid_post"]})
    # A terminal delivers SIGINT to a process that has Python's handler; a child of a background
    # job (as under CI) starts with SIGINT ignored, so restore the handler a shell would leave.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from lvlm_probe.cli import app; sys.argv[0] = 'lvlm-probe'; app()")
    command = [sys.executable, "-c", code, "sweep", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the towers' store folder is made when their extraction starts, the language model's
        # store then complete (its shards are written when full, here at its end)
        _interrupt_when(proc, tmp_path / "out" / "acts" / "towers")
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert INTERRUPTED in " ".join(err.split()) and "rerunning the same command resumes" in INTERRUPTED
    assert "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out" / "results.parquet").exists()
    finished = store_files(tmp_path / "out" / "acts" / "lm")

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert store_files(tmp_path / "out" / "acts" / "lm") == finished  # resumed, not redone
    code, _, err = cli(capsys, "sweep", str(path), "--out", str(tmp_path / "reference"))
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "reference" / "results.parquet"))


# --- finding 2: a labels file that does not match its folder ------------------------------------

LABEL_MISTAKES = {
    # the template's example names .jpg files; the folder holds .png
    "jpg names for png files": ("file,color\nim000.jpg,red\nim001.png,green\nim002.png,blue\n",
                                ["line 2: 'im000.jpg' is not an image in the folder", "'im000.png' has no row",
                                 "the folder's images: im000.png, im001.png, im002.png"]),
    "an image without a row": ("file,color\nim000.png,red\nim001.png,green\n", ["'im002.png' has no row"]),
    "a blank cell": ("file,color\nim000.png,red\nim001.png,\nim002.png,blue\n", ["line 3: 'im001.png' has no 'color'"]),
    "an image with two rows": ("file,color\nim000.png,red\nim001.png,green\nim002.png,blue\nim002.png,red\n",
                               ["'im002.png' has 2 rows (lines 4, 5)"]),
}


@pytest.mark.parametrize("mistake", LABEL_MISTAKES)
def test_label_mistakes_are_named_with_their_line_before_the_model_loads(capsys, tmp_path, mistake):
    text, expected = LABEL_MISTAKES[mistake]
    folder(tmp_path, 3, labels=text)
    code, _, err = cli(capsys, "sweep", str(definition(tmp_path / "def.yaml")))
    for part in expected:
        assert_user_error(code, err, part)
    assert not (tmp_path / "out").exists()


# --- item 10: the sweep definition --------------------------------------------------------------

def test_relative_inputs_resolve_against_the_definitions_folder(tmp_path, monkeypatch):
    folder(tmp_path / "project", 3)
    path = definition(tmp_path / "project" / "def.yaml", out="runs/x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "project" / "def.yaml")
    assert config.data.path == str(tmp_path / "project" / "images")
    assert config.data.labels == str(tmp_path / "project" / "images" / "labels.csv")
    assert config.out == "runs/x"  # an output location: relative to the working directory
    assert load_config(path).data == config.data  # the same from any working directory


def test_a_missing_relative_folder_is_named_resolved_with_the_rule(capsys, tmp_path, monkeypatch):
    (tmp_path / "defs").mkdir()
    path = definition(tmp_path / "defs" / "def.yaml")  # no images next to it
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "sweep", "defs/def.yaml")
    assert_user_error(code, err, f"data.folder.path {str(tmp_path / 'defs' / 'images')!r} is not a folder")
    assert RELATIVE_RULE in " ".join(err.split())
    folder(tmp_path / "defs", 3)
    (tmp_path / "defs" / "images" / "labels.csv").unlink()
    code, _, err = cli(capsys, "sweep", str(path))
    assert_user_error(code, err, f"data.folder.labels {str(tmp_path / 'defs' / 'images' / 'labels.csv')!r} "
                                 f"is not a file ({RELATIVE_RULE})")


def test_a_model_that_is_not_a_name(tmp_path):
    with pytest.raises(InputError, match=r"model must be a name such as 'tiny:<family>'.*got 7"):
        load_config(definition(tmp_path / "def.yaml", model=7))


# --- finding 8: small samples and ties ----------------------------------------------------------

def test_tiny_model_sweep_on_a_dozen_images_warns_and_keeps_honest_intervals(capsys, tmp_path, monkeypatch):
    """``model: tiny:llava`` in a definition, relative paths, run from another directory, on 12
    images: the sweep warns once that the test set is small (naming n_test and the threshold),
    and every interval is the Wilson interval of its n_test, never a point."""
    folder(tmp_path / "project", 12)
    path = definition(tmp_path / "project" / "def.yaml", model="tiny:llava", out="out")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, "sweep", str(path.relative_to(tmp_path)))
    assert code == 0, err
    results = pd.read_parquet(tmp_path / "out" / "results.parquet")
    n_test = int(results["n_test"].iloc[0])
    assert (results["n_train"] + results["n_test"] == 12).all() and n_test < SMALL_TEST
    small = [w for w in caught if f"n_test < {SMALL_TEST}" in str(w.message)]
    assert len(small) == 1 and f"target 'color': only {n_test} test examples" in str(small[0].message)
    for row in results.itertuples():
        k = round(row.accuracy * n_test)
        reference = wilson_ci(np.r_[np.ones(k), np.zeros(n_test - k)])
        assert (row.ci_low, row.ci_high) == pytest.approx((float(reference.low), float(reference.high)))
        assert row.ci_high - row.ci_low > 0.2  # a dozen images never give a point interval
    assert "n_test" in out


def test_tower_hooks_of_a_packing_vision_tower_are_refused_before_extraction(capsys, tmp_path):
    """A NaViT-style tower (Qwen2-VL) packs every image's patches into one sequence: its states
    cannot be stored one row per example. The default tower_hooks are refused on the first image,
    naming the setting to change, before anything is extracted."""
    folder(tmp_path, 6)
    path = definition(tmp_path / "def.yaml", model="tiny:qwen2_vl",
                      extract={"lm_hooks": ["blocks.*.hook_resid_post"], "batch_size": 4})
    code, _, err = cli(capsys, "sweep", str(path))
    assert_user_error(code, err, "packs its images' patches into one sequence")
    assert "extract.tower_hooks: []" in " ".join(err.split())
    assert not (tmp_path / "out" / "acts").exists()


def test_a_perfect_probe_on_ten_test_images_is_not_certain():
    """10 of 10 right: the interval is Wilson's [0.72, 1], not the bootstrap's [1, 1]."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    layers = {"blocks.0.hook_resid_post": 5.0 * labels[:, None] + rng.normal(size=(40, 4))}
    with pytest.warns(UserWarning, match=rf"only 10 test examples \(n_test < {SMALL_TEST}\)"):
        row = lp.probing.sweep(layers, labels, control=False, groups=None, seed=0).iloc[0]
    assert row["accuracy"] == 1.0 and row["n_test"] == 10
    assert row["ci_low"] == pytest.approx(float(wilson_ci(np.ones(10)).low)) and row["ci_low"] < 0.75


def test_tied_layers_give_the_same_best_layer_in_any_order():
    """Two layers with the same activations tie in accuracy and selectivity: the earlier one is
    the best, whatever order the sweep saw them in."""
    rng = np.random.default_rng(1)
    labels, types = np.arange(200) % 4, rng.integers(0, 60, 200)
    signal_layer = 2.0 * np.eye(4)[labels] + rng.normal(size=(200, 4))
    noise = rng.normal(size=(200, 4))
    names = ["blocks.2.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]
    for order in (names, names[::-1]):
        arrays = {n: signal_layer if n != "blocks.0.hook_resid_post" else noise for n in order}
        results = lp.probing.sweep(arrays, labels, control_by=types, groups=None, n_boot=0)
        assert results.groupby("layer")["accuracy"].first()[1] == results.groupby("layer")["accuracy"].first()[2]
        assert lp.probing.best_layers(results.assign(target="t"))["hook"].item() == "blocks.1.hook_resid_post"


# --- finding 9: what prepare was given ----------------------------------------------------------

@pytest.fixture(scope="module")
def llava():
    return lp.zoo.tiny("llava")


def picture(color: str = "red", size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), color)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_an_empty_prompt_warns(llava, prompt):
    with pytest.warns(UserWarning, match=r"prompt\(s\) \[0\] is empty or blank.*no question"):
        batch = llava.prepare(images=[picture()], prompts=[prompt])
    assert batch.prompts == [prompt]


def test_transparency_is_composited_on_white_with_a_warning(llava):
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # all transparent: was black, is white
    half = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    half.paste((255, 0, 0, 255), (0, 0, 8, 16))  # left half opaque red
    with pytest.warns(UserWarning, match=r"images\[0\], images\[1\] have transparency.*composited on "
                                         r"white \(255, 255, 255\)"):
        batch = llava.prepare(images=[clear, half], prompts=["What is it?"] * 2)
    assert (np.asarray(batch.images[0][0]) == 255).all()
    pixels = np.asarray(batch.images[1][0])
    assert (pixels[:, :8] == [255, 0, 0]).all() and (pixels[:, 8:] == 255).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an opaque image passes silently
        llava.prepare(images=[picture()], prompts=["What is it?"])


def test_an_image_smaller_than_a_patch_warns_with_both_sizes(llava):
    patch = llava.config.vision_config.patch_size
    tiny_image = picture(size=1)
    with pytest.warns(UserWarning, match=rf"images\[0\]\[0\] \(1x1 px\) is smaller than the vision "
                                         rf"tower's {patch}x{patch} px patch"):
        llava.prepare(images=[tiny_image], prompts=["What is it?"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llava.prepare(images=[picture(size=patch)], prompts=["What is it?"])


def test_one_prompt_string_with_several_images_is_refused(llava):
    a, b = picture("red"), picture("blue")
    with pytest.raises(InputError, match=r"prompts is one string \('q'\) but images holds 2 entries; "
                                         r"for one example with 2 images pass images=\[\[\.\.\.\]\].*"
                                         r"prompts=\['q'\] \* 2"):
        llava.prepare(images=[a, b], prompts="q")
    # the two explicit spellings
    one = llava.prepare(images=[[a, b]], prompts=["q"])
    two = llava.prepare(images=[a, b], prompts=["q", "q"])
    assert [len(x) for x in one.images] == [2] and [len(x) for x in two.images] == [1, 1]
    assert len(one.layouts[0].images) == 2 and len(two) == 2
    # one image (or a list of one) with one string stays one example
    assert [len(x) for x in llava.prepare(images=[a], prompts="q").images] == [1]
