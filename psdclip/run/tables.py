"""The tables psdclip prints and writes: Markdown (reports, study, media copies) and aligned plain text (console),
and the audit's tables read back as lists of pairs."""

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def cell(value, digits: int = 4) -> str:
    """Floats to ``digits`` significant digits (NaN and None blank), anything else as its text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence], digits: int = 4) -> str:
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(value, digits) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(columns: Sequence[str], rows: Iterable[Sequence], digits: int = 4) -> str:
    """Left-aligned columns separated by two spaces, a header line first."""
    cells = [list(map(str, columns))] + [[cell(value, digits) for value in row] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells)


def read_flagged(path: str, setting: str, columns: Sequence[str]) -> "pd.DataFrame":
    """The rows of an audit table (``memory.csv`` or ``scores.csv``, or any CSV with ``columns``) that list pairs:
    its flagged rows where it has a ``flagged`` column, else all. ``setting`` names the option that gave ``path``,
    for the errors."""
    import pandas as pd  # only for the runs that read a list

    try:
        table = pd.read_csv(path, dtype={"key": str, "shard": str})
    except FileNotFoundError:
        raise FileNotFoundError(f"{setting}={path}: no such file (an audit's memory.csv or scores.csv)") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{setting}={path} needs the columns {missing}, found {list(table.columns)}")
    return table[table["flagged"].astype(bool)] if "flagged" in table.columns else table
