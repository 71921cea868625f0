"""The tables psdclip prints and writes: Markdown (reports, study, media copies) and aligned plain text (console)."""

import math
from collections.abc import Iterable, Sequence


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
