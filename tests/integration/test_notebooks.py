"""Every notebook in notebooks/ runs top to bottom without a cell error in under two minutes, and is
kept in git with its outputs stripped."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
TIME_LIMIT = 120.0  # seconds for a whole notebook, on a 2-core CPU machine


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_stripped(path):
    """Outputs and execution counts stay out of git: strip them before committing
    (e.g. `jupyter nbconvert --clear-output --inplace notebooks/*.ipynb`)."""
    notebook = json.loads(path.read_text())
    dirty = [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs or execution counts"


def kernel_command() -> list[str]:
    """The command nbclient will start the kernel with; fails the test when there is no kernel
    or when it would run another Python than this one (which holds lvlm_probe)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no Jupyter kernel {KERNEL!r}: install ipykernel into {sys.prefix} "
                    f"(`{sys.executable} -m pip install ipykernel`)")
    command = list(spec.argv)
    # jupyter_client starts kernels whose spec says "python" with this interpreter
    if command[0] in {"python", f"python{sys.version_info[0]}",
                      "python{}.{}".format(*sys.version_info[:2])}:
        command[0] = sys.executable
    executable = shutil.which(command[0]) or command[0]
    if os.path.realpath(executable) != os.path.realpath(sys.executable):
        pytest.fail(f"kernel {KERNEL!r} ({spec.resource_dir}) runs {executable}, not this "
                    f"interpreter {sys.executable}; install ipykernel into {sys.prefix}")
    return command


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    kernel_command()
    notebook = nbformat.read(path, as_version=4)  # executed in memory; the file is never written
    client = NotebookClient(notebook, timeout=int(TIME_LIMIT), kernel_name=KERNEL,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT, f"{path.name} took {elapsed:.0f} s (limit {TIME_LIMIT:.0f} s)"
