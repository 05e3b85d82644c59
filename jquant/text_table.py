"""Plain-text tables for reports (site tables, link tables, mapping tables): one formatter for all of them."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], footer: Sequence[object] | None = None
) -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the header (and above ``footer``)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    if footer is not None:
        cells.append([str(c) for c in footer])
    for i, row in enumerate(cells):
        if len(row) != len(header):
            raise ValueError(f"format_table: row {i} has {len(row)} cells, the header has {len(header)}")
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, rule)
    if footer is not None:
        lines.insert(len(lines) - 1, rule)
    return "\n".join(lines)
