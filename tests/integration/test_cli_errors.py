"""The command line as a user meets it (the installed entry point, run in a subprocess): a user's
mistake prints one short message naming the value and exit code 2, with no traceback unless
``--debug``; inputs are checked before any model is loaded."""
from __future__ import annotations

import subprocess
import sys

from PIL import Image


def lvlm_probe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    code = "import sys; from lvlm_probe.cli import app; sys.argv[0] = 'lvlm-probe'; app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_user_errors_are_one_message_with_exit_code_2(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    cases = {
        # an unknown tiny family: named, with the ones there are
        ("info", "tiny:nope"): "no tiny model for family 'nope'; available: ",
        # a missing image and an --out that is a folder fail before the model loads
        ("attribute", "--model", "tiny:not-loaded", "--image", "nope.png", "--prompt", "Is it red?",
         "--target", "yes", "--out", "map.png"): "--image 'nope.png' is not a file",
        ("attribute", "--model", "tiny:not-loaded", "--image", str(tmp_path / "a.png"), "--prompt",
         "Is it red?", "--target", "yes", "--out", str(tmp_path)): f"--out {str(tmp_path)!r} must be a file path",
    }
    for args, expected in cases.items():
        run = lvlm_probe(*args)
        assert run.returncode == 2, (args, run.stderr)
        assert expected in " ".join(run.stderr.split()), (args, run.stderr)
        assert "Traceback" not in run.stderr and "╭" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) <= 6, run.stderr


def test_debug_shows_the_traceback():
    run = lvlm_probe("info", "tiny:nope", "--debug")
    assert run.returncode != 0 and "UnsupportedModelError" in run.stderr
