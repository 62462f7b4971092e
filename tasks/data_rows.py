"""User JSONL rows of stage kind `data` (tasks/data.py): read and validated, or scanned for plan.

Holds `read_rows` (every row of a user file validated, a bad one refused with ``path:line`` and
the fix), the row shapes (`shape_of`: completion or preference, `PAIR`), and the cached
plan-time passes over a file (`validated`, `scan`, `scanned_file`) behind the kind's `prepare`,
`columns` and `route_values` hooks. It is apart from tasks/data.py so the kind module stays its
config, generation, hooks and `run`, while the rules of what a user row may be live in one
place. No torch here: `posttrain plan` calls the hooks.

Run: ``.venv/bin/python -m pytest tests/test_data_inputs.py tests/test_preference_data.py -q``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from artifacts.refs import StageInputError
from tasks import domains as _domains

MAX_ROW_BYTES = 1 << 20
# Larger user files are not scanned at plan time (their columns and route values are checked
# when the consuming stage reads them): plan must stay fast whatever the data size.
PLAN_SCAN_LIMIT = 64 << 20


def read_rows(path: Path, keep: list[str] | None = None,
              max_row_bytes: int = MAX_ROW_BYTES) -> list[dict]:
    """Validated rows of a user JSONL file (StageInputError names path:line and the fix)."""
    if not path.is_file():
        raise StageInputError(f"data file {path} does not exist; fix `path` in the data stage")
    rows: list[dict] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if len(raw) > max_row_bytes:
                raise StageInputError(
                    f"{where}: a row of {len(raw):,} bytes, over max_row_bytes "
                    f"{max_row_bytes:,}; split it into rows, or raise `max_row_bytes`"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StageInputError(
                    f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageInputError(
                    f"{where}: not valid JSON ({e.msg}); one object per line"
                ) from e
            if not isinstance(row, dict):
                raise StageInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append(_normalise(row, where))
            if shape_of(rows[-1]) != shape_of(rows[0]):
                raise StageInputError(
                    f"{where}: a {shape_of(rows[-1])} row in a file of {shape_of(rows[0])} rows "
                    f"(line 1 sets the shape); one shape per file: split it into two data stages"
                )
    if not rows:
        raise StageInputError(f"{path}: no rows; a data file needs at least one JSON object")
    return [r for r in rows if not keep or r["domain"] in keep]


PAIR = ("chosen", "rejected")


def shape_of(row: dict) -> str:
    """A row's shape: "preference" with chosen/rejected, else "completion".

    >>> shape_of({"prompt": "1+1=", "chosen": "2", "rejected": "3"}), shape_of({"completion": "2"})
    ('preference', 'completion')
    """
    return "preference" if any(k in row for k in PAIR) else "completion"


def _normalise(row: dict, where: str) -> dict:
    for field in ("prompt", "domain"):
        if not isinstance(row.get(field), str):
            raise StageInputError(
                f"{where}: missing or non-string field {field!r}; add it to the row"
            )
    if row["domain"] not in _domains.DOMAINS:
        raise StageInputError(
            f"{where}: unknown domain {row['domain']!r}; use one of {', '.join(_domains.DOMAINS)} "
            "or add a domain to tasks/domains.py"
        )
    if "chosen" in row or "rejected" in row:  # a preference row: kept as it is
        for field in PAIR:
            if not isinstance(row.get(field), str):
                raise StageInputError(f"{where}: a preference row needs string fields 'chosen' "
                                      f"and 'rejected'; {field!r} is missing or not a string")
        if row["chosen"] == row["rejected"]:
            raise StageInputError(f"{where}: 'chosen' equals 'rejected' ({row['chosen']!r}): "
                                  "the pair prefers nothing; drop the row or fix one side")
        if "completion" in row:
            raise StageInputError(f"{where}: a preference row (chosen/rejected) also has a "
                                  "'completion'; keep one shape: drop 'completion'")
        return dict(row)
    completion, answer = row.get("completion"), row.get("answer")
    if not isinstance(completion, str) and not isinstance(answer, str):
        raise StageInputError(
            f"{where}: missing field 'completion' (for SFT) or 'answer' (for RL); add one"
        )
    completion = completion if isinstance(completion, str) else answer
    answer = answer if isinstance(answer, str) else completion
    # Extra columns are kept: a consumer may route on them (mopd `route_key: source`).
    return {
        **row,
        "prompt": row["prompt"],
        "completion": completion,
        "answer": answer,
        "domain": row["domain"],
    }


@functools.lru_cache(maxsize=32)
def validated(path: str, size: int, mtime_ns: int, limit: int) -> int:
    """Row count of a user file that passes `read_rows` (cached on its size and mtime)."""
    return len(read_rows(Path(path), None, limit))


@functools.lru_cache(maxsize=32)
def scan(path: str, size: int, mtime_ns: int) -> tuple[frozenset[str], dict[str, frozenset]]:
    """(columns every row has, {column: distinct str values}) of a user JSONL file. Bad rows
    are skipped here: the stage itself reports them with path:line."""
    common: set[str] | None = None
    values: dict[str, set[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            common = set(row) if common is None else common & set(row)
            for k, v in row.items():
                if isinstance(v, str | int) and not isinstance(v, bool):
                    values.setdefault(k, set()).add(str(v))
    return frozenset(common or ()), {k: frozenset(v) for k, v in values.items()}


def scanned_file(config: dict[str, Any]) -> tuple[frozenset[str], dict[str, frozenset]] | None:
    """`scan` of a data config's user file, cached on its size and mtime (None: missing,
    or over PLAN_SCAN_LIMIT)."""
    p = Path(config["path"])
    try:
        st = p.stat()
    except OSError:
        return None
    if st.st_size > PLAN_SCAN_LIMIT:
        return None
    return scan(str(p), st.st_size, st.st_mtime_ns)
