"""The families table (``lvlm-probe families``, the README's copy) is read from the adapters, and
each family's declared layout kind is what its tiny model's layouts show."""
from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

import lvlm_probe as lp
from lvlm_probe.cli import app
from lvlm_probe.interop.support import support_markdown, support_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_holds_the_current_table():
    """Regenerate with ``python -c "from lvlm_probe.interop.support import support_markdown;
    print(support_markdown())"`` when a family is added."""
    text = README.read_text()
    match = re.search(r"<!-- families table -->\n(.*?)\n<!-- end families table -->", text, re.S)
    assert match, "README.md has no families table between its markers"
    assert match.group(1) == support_markdown()


def test_cli_prints_every_family():
    result = CliRunner().invoke(app, ["families"])
    assert result.exit_code == 0, result.output
    frame = support_table()
    assert list(frame["family"]) == [*lp.families.names(), "generic"]
    for name in lp.families.names():
        assert name in result.output


def test_declared_layout_kind_is_what_the_layout_shows(tiny_batch):
    model, batch = tiny_batch
    fam = model.family
    kinds = {"queries": "queries", "cross_attention": "cross-attention"}
    assert fam.layout_kind in ("grid", "tiles", "queries", "cross-attention")
    if fam.image_mode in kinds:
        assert fam.layout_kind == kinds[fam.image_mode]
        return
    grids = [len([g for g in image.grids if g.spatial]) for layout in batch.layouts for image in layout.images]
    if fam.layout_kind == "tiles":
        assert max(grids) > 1, grids  # tiles or crops beside a global view
    else:
        assert fam.layout_kind == "grid" and set(grids) == {1}, grids
