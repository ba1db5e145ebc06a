"""`lvlm-probe sweep --backend ray` from the shell: with no Ray running and no address, the command
starts a local Ray instance of its own, and its extraction and probes equal a local run's. A module
of its own, so that it runs after test_distributed's shared Ray instance has shut down."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import store_files

import lvlm_probe as lp
from lvlm_probe.workflows.sweep import run_sweep
from lvlm_probe.workflows.sweep_config import load_config

pytest.importorskip("ray")

DEFINITION = """model: {model}
out: {out}
device: cpu
data:
  world: {{n: 16, objects: 1, image_size: 64, split: typical}}
extract: {{lm_hooks: [blocks.*.hook_resid_post], tower_hooks: [], batch_size: 4}}
probes: {{targets: [shape], n_boot: 20}}
"""



def test_cli_backend_ray_starts_local_ray_and_equals_local(tmp_path):
    model = tmp_path / "tiny-llava"  # a folder the shell command can load
    lp.zoo.tiny("llava", device="cpu").save_pretrained(model)
    definition = tmp_path / "local.yaml"  # a local definition; the flag switches it to Ray
    definition.write_text(DEFINITION.format(model=model, out=tmp_path / "local"))
    command = [sys.executable, "-c", "from lvlm_probe.cli import app; app()", "sweep", str(definition),
               "--backend", "ray", "--out", str(tmp_path / "ray")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Best layer per target" in result.stdout

    config = load_config(definition)
    assert config.backend == "local"
    run_sweep(config, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ray" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "local" / "results.parquet"))
    assert store_files(tmp_path / "ray" / "acts" / "lm") == store_files(tmp_path / "local" / "acts" / "lm")


def test_cli_ray_address_needs_the_ray_backend(tmp_path):
    from typer.testing import CliRunner

    from lvlm_probe.cli import app

    definition = tmp_path / "local.yaml"
    definition.write_text(DEFINITION.format(model="unused", out=tmp_path / "run"))
    result = CliRunner().invoke(app, ["sweep", str(definition), "--ray-address", "auto"])
    assert result.exit_code != 0
    assert "ray_address='auto' needs backend='ray'" in str(result.exception)
    assert not (tmp_path / "run").exists()
