"""Read jsonl records, refusing bad lines with the file and line number."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict]:
    """All records of a jsonl file (blank lines skipped).

    Raises:
        ValueError: ``path:line`` and the reason, for a line that is not a JSON object or lacks a required
            string field; also for a missing or empty file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            for key in required:
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{number}: field {key!r} must be a string")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records
