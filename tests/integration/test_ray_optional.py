"""What holds without Ray: the local path never imports it, backend="ray" says how to install it,
and a definition's backend is checked when it is read. Not skipped when Ray is absent, unlike
test_distributed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lvlm_probe.errors import InputError
from lvlm_probe.workflows.sweep_config import load_config


def test_yaml_backend_is_checked(tmp_path):
    definition = tmp_path / "bad.yaml"
    definition.write_text("model: tiny-llava\nbackend: slurm\ndata:\n  world: {n: 8}\n")
    with pytest.raises(InputError, match=r"bad.yaml: unknown backend 'slurm'"):
        load_config(definition)


# One interpreter for both checks (its start-up is most of the cost): a local extraction and sweep
# import no Ray; then, with `import ray` made to fail, backend="ray" says how to install it.
LOCAL_RUN = """
import sys
import lvlm_probe as lp
model = lp.zoo.tiny("llava", device="cpu")
qs = lp.worlds.ShapesWorld(seed=0, image_size=64).questions(4, level="attribute", split="typical")
store = lp.extract(model, qs, ["blocks.*.hook_resid_post"], out=sys.argv[1], progress=False)
lp.probing.sweep({h: store[h] for h in store.hooks}, target=[0, 1, 0, 1], control=False, n_boot=0)
from lvlm_probe.probing.sweeps import sweep_executors
from lvlm_probe.store.executor import executors
assert "ray" in executors.names() and "ray" in sweep_executors.names()  # registered, Ray not imported
print("ray" in sys.modules, any(m.startswith("ray.") for m in sys.modules))
sys.modules["ray"] = None  # as if Ray were not installed: `import ray` raises ImportError
try:
    lp.probing.sweep({"a": [[0.0], [1.0], [0.0], [1.0]]}, target=[0, 1, 0, 1], hooks="a",
                      control=False, n_boot=0, backend="ray")
except lp.distributed.MissingDependencyError as err:
    assert isinstance(err, lp.LVLMProbeError) and isinstance(err, ImportError)
    print(err)
"""


def test_local_path_never_imports_ray(tmp_path):
    result = subprocess.run([sys.executable, "-c", LOCAL_RUN, str(tmp_path / "acts")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    first, message = result.stdout.split("\n", 1)
    assert first.split() == ["False", "False"]
    assert "needs Ray, which is not installed" in message
    assert "pip install 'lvlm-probe[distributed]'" in message


def test_former_backend_names_warn_and_still_work():
    from lvlm_probe import distributed
    from lvlm_probe.errors import InputError

    with pytest.warns(DeprecationWarning, match="executors.names"):
        assert distributed.BACKENDS == ("local", "ray")
    with pytest.warns(DeprecationWarning, match="check_backend is deprecated"):
        distributed.check_backend("local")
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match="needs backend='ray'"):
        distributed.check_backend("local", ray_address="auto")
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match="unknown backend 'slurm'"):
        distributed.check_backend("slurm")
