"""Markdown and CSV tables of rows (dicts), for every report: the evaluation's, the main job's and the model card.
Standard library only, so any module may import it."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (``columns``, or every key of the rows in order of appearance; blank where a row
    lacks one); floats with four decimals."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or _keys(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _keys(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def csv_text(rows: Sequence[dict]) -> str:
    """``rows`` as CSV text with every key of the rows as the header, in order of appearance (blank where a row
    lacks one: e.g. ``letter_answer``, a metric of multiple-choice runs only); empty for no rows."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=_keys(rows), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


__all__ = ["csv_text", "markdown_table"]
