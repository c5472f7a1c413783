"""HTML building blocks of the QA report: escaped text, formatted cells, tables, inlined PNG
figures, the checks table and the page's CSS. Every value that reaches the page passes through
:func:`esc` (the page is self-contained and must not carry markup from the data)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt_cell(value: Any) -> str:
    """A value for a table cell (escaped)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not np.isfinite(value):
            return esc(value)
        return f"{value:,.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, (dict, list)):
        return esc(json.dumps(value, sort_keys=True, default=str))
    return esc(value)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; every header and cell is escaped (cells formatted by :func:`fmt_cell`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt_cell(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_figure(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}"></figure>'


def html_p(text: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{esc(text)}</p>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1400px;padding:0 24px 48px;color:#222;line-height:1.45}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:40px}
table{border-collapse:collapse;margin:12px 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}
figure{margin:12px 0}img{max-width:100%;height:auto}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:6px 18px}
.meta,.note{color:#555}.note{font-style:italic}
.ok{color:#1a7f37;font-weight:600}.warn{color:#b3261e;font-weight:600}.info{color:#555}
table.neighbours td{width:33%}table.neighbours ol{margin:0;padding-left:22px}
.cat{color:#777;font-size:12px}.score{color:#777;font-size:12px}.both{font-weight:600}
.id{color:#777;font-size:12px;font-family:ui-monospace,monospace}
"""


@dataclass
class Check:
    name: str
    value: str
    status: str   # "ok", "warn" or "info"


def checks_table(checks: Sequence[Check]) -> str:
    rows = "".join(f'<tr><td>{esc(c.name)}</td><td>{esc(c.value)}</td>'
                   f'<td class="{c.status}">{c.status.upper()}</td></tr>' for c in checks)
    return ("<table><thead><tr><th>check</th><th>found</th><th>result</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
