"""Sweep definitions run end to end: YAML -> stores -> probes -> tables and figures; resumes
after kill -9; refuses a folder whose activations came from other inputs, and refits from the stored
activations when only labels or probe settings change; reads a user's image folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

import lvlm_probe as lp
from lvlm_probe.errors import InputError, StoreError
from lvlm_probe.workflows.sweep import run_sweep
from lvlm_probe.workflows.sweep_config import load_config

DEFINITION = {
    "model": "shapes-llava",
    "device": "cpu",
    "data": {"world": {"seed": 3, "image_size": 64, "n": 96, "objects": 1, "split": "counterfactual"}},
    "extract": {"lm_hooks": ["hook_embed", "blocks.*.hook_resid_post"],
                "tower_hooks": ["vision.blocks.*.hook_resid_post", "projector.hook_out"],
                "head_hooks": ["blocks.*.attn.hook_z"], "batch_size": 16},
    "probes": {"targets": ["color", "size"], "n_boot": 200},
    "transfer": ["color"],
    "alignment": ["cka", "mutual_knn"],
}


def write(path: Path, definition: dict, out: Path) -> Path:
    path.write_text(yaml.safe_dump({**definition, "out": str(out)}))
    return path


@pytest.fixture(scope="module")
def model():
    return lp.zoo.load("shapes-llava", device="cpu")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return run_sweep(write(root / "def.yaml", DEFINITION, root / "out"), model=model, progress=False)


def test_run_writes_tables_and_figures(reference):
    run = reference
    results = pd.read_parquet(run.out / "results.parquet")
    pd.testing.assert_frame_equal(results, run.results)
    per_target = results.groupby("target").size()
    # 4 vision layers + projector + embed + 4 LM layers, and 4 LM layers x 4 heads of hook_z
    assert per_target.to_dict() == {"color": 10 + 16, "size": 10 + 16}
    assert set(results["tower"]) == {"vision", "projector", "lm"}
    colour = results[(results["target"] == "color") & results["head"].isna()].set_index("hook")
    assert colour.loc["vision.blocks.3.hook_resid_post", "accuracy"] > 0.9  # the tower sees colour
    assert colour.loc["hook_embed", "accuracy"] <= colour.loc["hook_embed", "chance"] + 0.05
    assert set(run.transfer["direction"]) == {"text -> image", "image -> text"}
    assert set(run.alignment["metric"]) == {"cka", "mutual_knn"}
    assert run.cka.shape[0] == 4 * 4 and run.cka["value"].between(0, 1.000001).all()
    expected = {"color_layers", "color_heads", "size_layers", "size_heads", "transfer", "alignment", "cka"}
    assert set(run.figures) == expected
    for path in run.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_equal_a_direct_sweep_on_the_stored_activations(reference):
    store = lp.ActivationStore.open(reference.out / "acts" / "lm")
    direct = lp.probing.sweep(store, "size", hooks="blocks.*.hook_resid_post", n_boot=200,
                              control_by=["shape", "color", "size"])
    ours = reference.results.query("target == 'size' and hook.str.startswith('blocks.') and head.isna()")
    pd.testing.assert_frame_equal(ours.reset_index(drop=True)[direct.columns], direct, check_dtype=False)


def test_kill9_then_rerun_gives_the_same_results(reference, tmp_path):
    """Killed while extracting or probing, a rerun of the same command finishes the job and gives
    exactly the uninterrupted run's tables."""
    definition = write(tmp_path / "def.yaml", DEFINITION, tmp_path / "out")
    command = [sys.executable, "-m", "lvlm_probe.cli", "sweep", str(definition)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for marker in ("acts/lm/manifest/shard-00000.parquet", "results/color.parquet"):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (tmp_path / "out" / marker).exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    for table in ("results.parquet", "transfer.parquet", "alignment.parquet", "cka_vision_lm.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / table),
                                      pd.read_parquet(reference.out / table))


def test_folder_holding_other_activations_is_refused(reference, model, tmp_path):
    changed = {**DEFINITION, "extract": {**DEFINITION["extract"], "head_hooks": []}}
    with pytest.raises(StoreError, match=r"activations of other inputs \(definition keys \['extract'\]\)"):
        run_sweep(write(tmp_path / "def.yaml", changed, reference.out), model=model, progress=False)


def _user_folder(root: Path, n: int = 96) -> dict:
    """A folder of ShapesWorld images with a labels.csv, and a definition that probes it."""
    rows = lp.worlds.ShapesWorld(seed=5, image_size=64).concepts(n, split="counterfactual")
    images = root / "images"
    images.mkdir()
    for row in rows:
        row["image"].save(images / f"{row['id']}.png")
    pd.DataFrame({"file": [f"{r['id']}.png" for r in rows], "color": [r["color"] for r in rows],
                  "kind": [r["shape"] for r in rows]}).to_csv(root / "labels.csv", index=False)
    return {"model": "shapes-llava", "device": "cpu",
            "data": {"folder": {"path": str(images), "labels": str(root / "labels.csv")}},
            "extract": {"lm_hooks": ["blocks.*.hook_resid_post"], "tower_hooks": []},
            "probes": {"targets": ["color"], "control_by": ["kind"], "n_boot": 0}}


class _Forwards:
    """Counts the model's forward passes (extraction runs one per batch)."""

    def __init__(self, model):
        self.n, self.model = 0, model

    def __enter__(self):
        self.handle = self.model.hf.register_forward_pre_hook(lambda *args: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_changed_labels_are_refitted_from_the_stored_activations(model, tmp_path):
    """The labels file changes between two runs into one folder: the second run extracts nothing
    and reports exactly what a fresh run on the new labels reports (never the old labels' numbers)."""
    definition = _user_folder(tmp_path)
    first = run_sweep(write(tmp_path / "a.yaml", definition, tmp_path / "out"), model=model, progress=False)
    assert (first.results["accuracy"] > first.results["chance"]).all()
    # a folder recorded without digests (an older run) is taken over and refitted, not refused
    record = tmp_path / "out" / "sweep.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "provenance"}))
    with _Forwards(model) as forwards:
        rerun = run_sweep(write(tmp_path / "a.yaml", definition, tmp_path / "out"), model=model, progress=False)
    assert forwards.n == 0 and "provenance" in json.loads(record.read_text())
    pd.testing.assert_frame_equal(rerun.results, first.results)
    labels = pd.read_csv(tmp_path / "labels.csv")
    labels["color"] = labels["color"].sample(frac=1.0, random_state=0).to_numpy()  # shuffled
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with _Forwards(model) as forwards:
        again = run_sweep(write(tmp_path / "a.yaml", definition, tmp_path / "out"), model=model, progress=False)
    assert forwards.n == 0  # the activations were reused
    fresh = run_sweep(write(tmp_path / "b.yaml", definition, tmp_path / "fresh"), model=model, progress=False)
    pd.testing.assert_frame_equal(again.results, fresh.results)
    assert not again.results["accuracy"].equals(first.results["accuracy"])
    assert pd.read_parquet(tmp_path / "out" / "results.parquet").equals(again.results)

    # a probe setting alone changes: refitted, nothing extracted
    definition["probes"] = {**definition["probes"], "C": 0.01}
    with _Forwards(model) as forwards:
        refit = run_sweep(write(tmp_path / "a.yaml", definition, tmp_path / "out"), model=model, progress=False)
    assert forwards.n == 0 and not refit.results["accuracy"].equals(again.results["accuracy"])

    # an image file changes and another is removed: the stores are cut back to before the first of
    # them and extracted again from there; every table equals a fresh run's on the new folder
    files = sorted((tmp_path / "images").iterdir())
    changed, removed = files[3], files[-1]
    Image.new("RGB", (64, 64), "white").save(changed)
    removed.unlink()
    labels[labels["file"] != removed.name].to_csv(tmp_path / "labels.csv", index=False)
    with _Forwards(model) as forwards:
        redone = run_sweep(write(tmp_path / "a.yaml", definition, tmp_path / "out"), model=model, progress=False)
    assert redone.changed_images == sorted([changed.name, removed.name])
    assert forwards.n == -(-(len(files) - 1) // 16)  # one shard: every batch of the new folder
    fresh = run_sweep(write(tmp_path / "b.yaml", definition, tmp_path / "fresh2"), model=model, progress=False)
    pd.testing.assert_frame_equal(redone.results, fresh.results)
    assert redone.provenance == fresh.provenance and redone.provenance["images"] != refit.provenance["images"]
    assert redone.provenance["labels"] != refit.provenance["labels"] and redone.provenance["model"] == refit.provenance["model"]


def test_tables_and_figures_record_the_digests_they_came_from(model, tmp_path):
    definition = _user_folder(tmp_path, n=48)
    run = run_sweep(write(tmp_path / "a.yaml", definition, tmp_path / "out"), model=model, progress=False)
    store = lp.ActivationStore.open(tmp_path / "out" / "acts" / "lm")
    assert run.provenance["model"] == store.fingerprint["digest"] == lp.store.fingerprint(model)["digest"]
    assert set(run.provenance) == {"labels", "images", "model"} and all(run.provenance.values())
    assert pd.read_parquet(tmp_path / "out" / "results.parquet").attrs["provenance"] == run.provenance
    for path in run.figures.values():
        text = Image.open(path).text
        assert {k.removeprefix("lvlm_probe."): v for k, v in text.items() if k.startswith("lvlm_probe.")} \
            == run.provenance, path.name


def test_definition_errors(tmp_path):
    def bad(definition: dict, match: str):
        with pytest.raises(InputError, match=match):
            load_config(write(tmp_path / "bad.yaml", definition, tmp_path / "out"))

    bad({**DEFINITION, "probe": {}}, r"unknown key\(s\) \['probe'\]")
    bad({k: v for k, v in DEFINITION.items() if k != "model"}, "missing required key 'model'")
    bad({**DEFINITION, "extract": {"hooks": []}}, r"unknown key\(s\) \['hooks'\] in .*extract")
    bad({**DEFINITION, "data": {"folder": {"path": "x"}}}, "only data.world provides")
    bad({**DEFINITION, "alignment": ["cca"]}, r"unknown alignment metric\(s\) \['cca'\]")
    bad({**DEFINITION, "probes": {**DEFINITION["probes"], "control_design": "latin"}},
        r"unknown probes.control_design 'latin'; expected one of \('auto', 'factorial', 'independent'\)")
    with pytest.raises(InputError, match="no sweep definition"):
        load_config(tmp_path / "missing.yaml")
    for shipped in Path(__file__).parents[2].joinpath("probes").glob("*.yaml"):
        assert load_config(shipped).model  # every shipped definition is valid


def test_bad_definitions_fail_before_any_extraction(model, tmp_path):
    def refused(definition: dict, error: type, match: str):
        out = tmp_path / "out"
        with pytest.raises(error, match=match):
            run_sweep(write(tmp_path / "def.yaml", definition, out), model=model, progress=False)
        assert not out.exists()  # nothing written, so the fixed definition can use the folder

    extract = DEFINITION["extract"]
    refused({**DEFINITION, "extract": {**extract, "lm_hooks": ["blocks.*.hook_resid_pots"]}},
            lp.HookNameError, "did you mean")
    refused({**DEFINITION, "probes": {"targets": ["colour"]}}, InputError,
            r"'colour' is not a column of the dataset; it has \[.*'color'")
    refused({**DEFINITION, "probes": {"targets": ["color"], "control_by": ["texture"]}}, InputError,
            "'texture' is not a column")
    images = tmp_path / "images"
    images.mkdir()
    for row in lp.worlds.ShapesWorld(seed=5, image_size=64).concepts(5):
        row["image"].save(images / f"{row['id']}.png")
    files = sorted(p.name for p in images.iterdir())
    pd.DataFrame({"file": files, "kind": ["a", "a", "b", "b", "c"]}).to_csv(tmp_path / "labels.csv", index=False)
    refused({"model": "shapes-llava", "data": {"folder": {"path": str(images), "labels": str(tmp_path / "labels.csv")}},
             "probes": {"targets": ["kind"], "control_by": []}},
            InputError, r"class\(es\) \['c'\] have a single example")


def test_folder_of_user_images(model, tmp_path):
    definition = _user_folder(tmp_path)
    run = run_sweep(write(tmp_path / "def.yaml", definition, tmp_path / "out"), model=model, progress=False)
    store = lp.ActivationStore.open(tmp_path / "out" / "acts" / "lm")
    names = sorted(p.stem for p in (tmp_path / "images").iterdir())
    assert store.ids == names and names == sorted(pd.read_csv(tmp_path / "labels.csv")["file"].str[:-4])
    assert (store.meta["prompt"] == "Describe the image.").all()
    assert len(run.results) == model.n_layers and (run.results["accuracy"] > run.results["chance"]).all()


def test_label_file_problems_are_all_reported_before_loading_the_model(tmp_path):
    """Rows naming files the folder lacks (.jpg for .png), an image without a row, one with two,
    and a blank target cell: one error names them all with their CSV lines, before any model is
    loaded (the definition's model name would fail to load)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8), "red").save(images / f"{name}.png")
    (tmp_path / "labels.csv").write_text("file,color\na.png,red\nb.jpg,blue\nc.png,\nd.png,red\nd.png,blue\n")
    definition = {"model": "tiny:not-a-family", "device": "cpu",
                  "data": {"folder": {"path": str(images), "labels": str(tmp_path / "labels.csv")}},
                  "probes": {"targets": ["color"], "control_by": []}}
    with pytest.raises(InputError) as err:
        run_sweep(write(tmp_path / "def.yaml", definition, tmp_path / "out"), progress=False)
    message = str(err.value)
    for problem in ("line 3: 'b.jpg' is not an image in the folder", "'b.png' has no row",
                    "'d.png' has 2 rows (lines 5, 6)", "line 4: 'c.png' has no 'color'",
                    "the folder's images: a.png, b.png, c.png"):
        assert problem in message, message
    assert not (tmp_path / "out").exists()
