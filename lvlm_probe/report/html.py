"""A small HTML writer for a self-contained report: escaped text, tables, embedded PNG figures.

Everything the document needs is inside it (figures as base64 ``data:`` URIs, the style sheet
inline, no scripts, no links), so it opens offline in any browser.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

STYLE = """
body { font-family: sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; }
.mark { background: #fdd; }
.cause { color: #a00; font-size: 0.75em; margin-left: 0.15em; }
"""


def esc(text: Any) -> str:
    """Text escaped for HTML."""
    return html.escape(str(text), quote=True)


def cell(value: Any) -> str:
    """How a table shows a value: floats with 3 decimals, NaN/None as an en dash."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(map(str, value))
    return str(value)


def table(frame: pd.DataFrame, table_id: str, columns: Sequence[str] | None = None) -> str:
    """A ``<table id=...>``: a header row, then one row per frame row."""
    columns = list(columns or frame.columns)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = []
    for record in frame[columns].to_dict("records"):
        cells = []
        for c in columns:
            v = record[c]
            kind = ' class="text"' if isinstance(v, str) else ""
            cells.append(f"<td{kind}>{esc(cell(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def figure(png: bytes, caption: str, alt: str) -> str:
    """An embedded PNG with its caption."""
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def document(title: str, body: Sequence[str]) -> str:
    """The whole page."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
