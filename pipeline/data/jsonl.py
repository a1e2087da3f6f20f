"""JSONL records (prompt files, completions, external data) with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path


def numbered_records(data: bytes, name: str, fields: tuple[str, ...] = (), error: type[Exception] = ValueError,
                     lists: tuple[str, ...] = (), hint: str = "") -> list[tuple[int, dict]]:
    """(line number, record) of JSONL bytes read from ``name``, each record required to hold string
    ``fields`` and non-empty lists of strings ``lists``; blank lines are skipped. Problems raise
    ``error`` naming ``name`` and the line (and ``hint``, the option that chose a missing field)."""
    records = []
    # Lines end at "\n" only (JSON Lines): str.splitlines() would also split inside a string holding
    # U+2028, U+0085 or a form feed, which JSON allows unescaped.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(f"{name}:{number}: not valid UTF-8 (byte {err.start + 1} of the line)") from err
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{name}:{number}: not valid JSON ({err.msg})") from err
        for field in fields:
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise error(f"{name}:{number}: expected an object with a string field {field!r}" + hint)
        for field in lists:
            value = record.get(field)
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise error(f"{name}:{number}: {field!r} must be a non-empty list of strings, got {value!r}")
        records.append((number, record))
    return records


def read_jsonl(path: Path, fields: tuple[str, ...], error: type[Exception] = ValueError, what: str = "data file",
               lists: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file (``numbered_records``); a missing or empty file raises ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    records = [record for _, record in numbered_records(path.read_bytes(), str(path), fields, error, lists)]
    if not records:
        raise error(f"{path}: no records (the file is empty)")
    return records
