"""The one table formatter: aligned text for terminals, Markdown for CI summaries and reports."""
from __future__ import annotations

from typing import Iterable, Sequence


def text_table(rows: Iterable[Sequence[object]], prefix: str = "") -> list[str]:
    """Rows (the first one is the header) as left-aligned columns, two spaces apart."""
    cells = [[str(v) for v in row] for row in rows]
    if not cells:
        return []
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    return [(prefix + "  ".join(v.ljust(w) for v, w in zip(r, widths))).rstrip() for r in cells]


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """A GitHub-flavoured Markdown table; pipes inside cells are escaped."""
    def line(values: Sequence[object]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]
