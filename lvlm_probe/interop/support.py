"""What lvlm_probe supports per family: the table ``lvlm-probe families`` prints and the README shows.

Every entry is read from the adapters and from the installed TransformerLens, never written by hand,
so the table cannot drift from the code (a test compares the README's copy with it).
"""
from __future__ import annotations

import pandas as pd

from .. import families
from ..families import Family
from .bridge import bridge_families

COLUMNS = ["family", "transformers classes", "layout", "multi-image", "DLA", "TransformerLens bridge",
           "nnsight"]


def _dla(fam: Family) -> str:
    if fam.nonlinear_writes is not None:
        return "no"
    if type(fam).final_logit_softcap is not Family.final_logit_softcap:
        return "without a final soft cap"  # the cap is a checkpoint setting (e.g. PaliGemma 2)
    return "yes"


def support_table() -> pd.DataFrame:
    """One row per family (``lp.families.names()``), then the generic adapter's row.

    Columns: the family; its transformers classes; how its images are laid out (``grid``: one patch
    grid per image, ``tiles``: tiles and a global view, ``queries``: learned queries, not patches,
    ``cross-attention``: outside the sequence); whether a prompt takes several images; whether
    direct logit attribution applies; whether TransformerLens's installed version bridges it; nnsight
    (every family).
    """
    bridged = set(bridge_families())
    rows = []
    for name in families.names():
        fam = families.get(name)
        rows.append([name, ", ".join(fam.hf_classes), fam.layout_kind, "yes" if fam.multi_image else "no",
                     _dla(fam), "yes" if name in bridged else "no", "yes"])
    rows.append(["generic", "other image-text-to-text classes with a vision tower, a projector and "
                 "an image placeholder token", "generic (placeholder runs)", "yes",
                 "yes, unless sandwich norms", "no", "yes"])
    return pd.DataFrame(rows, columns=COLUMNS)


def support_markdown() -> str:
    """:func:`support_table` as a Markdown table (the README's)."""
    frame = support_table()
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"`{row[0]}`" if i == 0 else str(v) for i, v in enumerate(row)) + " |")
    return "\n".join(lines)
