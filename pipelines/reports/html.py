"""Self-contained HTML pages: inline CSS, figures embedded as ``data:`` URIs, every value
escaped. A report written here opens from disk, from an MLflow artifact or a mail, with
nothing to fetch."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1400px; }
h1 { font-size: 1.5rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; } .meta { color: #555; font-size: 0.85rem; }
.champion { font-weight: bold; color: #0a6e2b; } .challenger { color: #8a5a00; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def cell(value: Any) -> str:
    if value is None:
        return "<td>-</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    css = f' class="{esc(value)}"' if value in ("champion", "challenger") else ""
    return f"<td{css}>{esc(value)}</td>"


def table(rows: Iterable[Sequence[Any]], header: Sequence[str], table_id: str = "") -> str:
    ident = f' id="{esc(table_id)}"' if table_id else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return (
        f'<div style="overflow-x: auto"><table{ident}><thead><tr>{head}</tr></thead><tbody>\n'
        f"{body}\n</tbody></table></div>"
    )


def figure(png: Path, caption: str, figure_id: str = "") -> str:
    """A PNG embedded as a ``data:`` URI (the page stays one file)."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    ident = f' id="{esc(figure_id)}"' if figure_id else ""
    return (
        f'<figure{ident}><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{esc(css)}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>"


def page(title: str, *sections: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
