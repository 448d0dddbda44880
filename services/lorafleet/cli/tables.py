"""Tables that keep ids and numbers whole on an 80-column terminal."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.table import Table


def fitted_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """No vertical rules or edges, and every column as wide as its widest cell
    (cells may hold several lines), so nothing is cut to an ellipsis while the
    table fits. Free text such as reasons belongs below the table, not in it."""
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False
    )
    for i, header in enumerate(headers):
        widest = max((len(line) for row in rows for line in row[i].splitlines()), default=0)
        table.add_column(header, no_wrap=True, min_width=max(len(header), widest))
    for row in rows:
        table.add_row(*row)
    return table
