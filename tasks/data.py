"""Stage kind `data`: a training set of prompt/completion/answer/domain rows as JSONL.

Either generated from the synthetic domains (`domains`, `mix` weights, `size`, `seed`), drawn
only from the train split of each domain so evaluation problems never leak into training, or read
from a user JSONL file (`path`), every row validated: each needs `prompt`, `completion` or
`answer`, and a known `domain` (the verifier of that domain scores RL and evaluation). A bad row
raises StageInputError naming ``path:line`` and the fix. Extra columns of user rows are
kept (a consumer may route on them, e.g. mopd ``route_key: source``). User rows whose prompt
falls in the held-out split are kept but counted in a warning (they would inflate held-out
accuracy). With ``flagged: f`` a fraction of generated prompts is flagged for safety (see
tasks/domains.py: prefixed "!", completion "refuse", a ``flagged`` column on every row).

Preference data is first-class: a user file whose rows carry ``chosen`` and ``rejected``
(strings that differ) instead of ``completion`` is a preference data set, rows
``prompt, chosen, rejected, domain`` plus any extra columns, kept as they are (the
reward_model and dpo kinds read them; `generate` with ``mode: pairs`` writes them). One shape
per file: a file mixing both is refused at its first odd row. The shape is part of the
dataset's schema, which the `columns` hook reports at plan time (so `sft` refuses preference
data and `dpo` completion data before anything runs) and the manifest records.

Writes ``out_dir/train.jsonl``; metrics ``{"rows": n, "domains": {domain: count}, "schema":
{"shape": "completion" | "preference", "columns": [every row's columns]}}``.

Run: ``python -m tasks.data /tmp/data arith reverse`` writes 1,000 rows of each.
"""

from __future__ import annotations

import functools
import json
import random
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import Inputs, Progress, StageInputError, no_progress
from tasks import domains as _domains
from tasks.kind import KindCheckError, Role

PRODUCES = "dataset"
ROLES: dict[str, Role] = {}
FILENAME = "train.jsonl"
MAX_ROW_BYTES = 1 << 20


def _check_domains(names: list[str]) -> None:
    for name in names:
        if name not in _domains.DOMAINS:
            raise ValueError(f"unknown domain {name!r}; known: {', '.join(_domains.DOMAINS)}")


class Config(BaseModel):
    """Generate rows from synthetic domains, or validate and copy a user JSONL file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domains: list[str] = Field(
        default_factory=list,
        description="Domains to generate (see tasks.domains.DOMAINS); with `path`, keep only "
        "rows of these domains (empty: keep all).",
    )
    mix: dict[str, float] | None = Field(
        None,
        description="Relative weight per domain, e.g. {arith: 3, reverse: 1}; must name exactly "
        "the listed domains. None: equal shares.",
    )
    size: int = Field(20_000, ge=1, description="Rows to generate (ignored with `path`).")
    seed: int = Field(0, description="Seed of the generator and of the row shuffle.")
    path: str | None = Field(
        None,
        description="A user JSONL file (rows: prompt, completion and/or answer, domain) used "
        "instead of generating.",
    )
    max_row_bytes: int = Field(
        MAX_ROW_BYTES, ge=1, description="Longest accepted line of a user file, in bytes: a "
        "larger row is refused with its path:line (a whole corpus on one line, a stray binary).",
    )
    flagged: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of generated prompts flagged for safety "
        "(prefixed '!', completion 'refuse', answer kept; rows get a `flagged` column): the "
        "property a second, safety reward model judges (tasks.domains.safe). Generated data only.",
    )

    @model_validator(mode="after")
    def _valid(self) -> Config:
        _check_domains(self.domains)
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains listed twice: {self.domains}")
        if self.path is None and not self.domains:
            raise ValueError("give `domains` to generate, or `path` to a JSONL file")
        if self.flagged and self.path is not None:
            raise ValueError("`flagged` applies to generated data only; remove it or `path`")
        if self.mix is not None:
            if self.path is not None:
                raise ValueError("`mix` applies to generated data only; remove it or `path`")
            missing = sorted(set(self.domains) - set(self.mix))
            extra = sorted(set(self.mix) - set(self.domains))
            if missing or extra:
                raise ValueError(
                    f"`mix` must weight exactly the domains: missing {missing}, extra {extra}"
                )
            if any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
                raise ValueError(f"`mix` weights must be >= 0 with a positive sum: {self.mix}")
        return self


def apportion(size: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `size` rows by weight (largest remainder, so counts sum to `size` exactly).

    >>> apportion(7, {"arith": 3, "reverse": 1, "sort": 1, "count": 2})
    {'arith': 3, 'reverse': 1, 'sort': 1, 'count': 2}
    >>> sum(apportion(10, {"a": 1, "b": 1, "c": 1}).values())
    10
    """
    total = sum(weights.values())
    exact = {d: size * w / total for d, w in weights.items()}
    counts = {d: int(x) for d, x in exact.items()}
    by_remainder = sorted(weights, key=lambda d: (exact[d] - counts[d], -list(weights).index(d)))
    for d in reversed(by_remainder[len(by_remainder) - (size - sum(counts.values())) :]):
        counts[d] += 1
    return counts


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


def generate_rows(config: Config) -> list[dict]:
    """The generated rows of `config`, shuffled (train split only)."""
    weights = config.mix or {d: 1.0 for d in config.domains}
    counts = apportion(config.size, {d: float(weights[d]) for d in config.domains})
    rows = [
        r for d in config.domains
        for r in _domains.generate(d, counts[d], config.seed, "train", config.flagged)
    ]
    random.Random(config.seed).shuffle(rows)
    return rows


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks the generated rows (32 at least; a
    user file is kept whole)."""
    from tasks.kind import scaled

    return dict(config) if config.get("path") else scaled(config, factor, {"size": 32})


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """Write ``out_dir/train.jsonl``; return row counts (and a leak warning for user data)."""
    warnings: list[str] = []
    if config.path is not None:
        rows = read_rows(Path(config.path), config.domains or None, config.max_row_bytes)
        leaked = sum(_domains.split_of(r["prompt"]) == "heldout" for r in rows)
        if leaked:
            warnings.append(
                f"{leaked} of {len(rows)} rows of {config.path} are held-out evaluation problems"
            )
    else:
        rows = generate_rows(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / FILENAME).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    progress(1, 1, {"rows": float(len(rows))})
    per_domain: dict[str, int] = {}
    for r in rows:
        per_domain[r["domain"]] = per_domain.get(r["domain"], 0) + 1
    metrics: dict = {"rows": len(rows), "domains": per_domain, "schema": schema(rows)}
    if config.flagged:
        metrics["flagged"] = sum(bool(r.get("flagged")) for r in rows)
    if warnings:
        metrics["warnings"] = warnings
    return metrics


def schema(rows: list[dict]) -> dict[str, Any]:
    """The row schema a dataset's manifest records: its shape and the columns every row has.

    >>> schema([{"prompt": "1+1=", "chosen": "2", "rejected": "3", "domain": "arith"}])
    {'shape': 'preference', 'columns': ['chosen', 'domain', 'prompt', 'rejected']}
    """
    common: set[str] = set(rows[0]) if rows else set()
    for r in rows[1:]:
        common &= set(r)
    return {"shape": shape_of(rows[0]) if rows else "completion", "columns": sorted(common)}


# -- the kind contract's plan-time hooks (tasks/kind.py) ------------------------------------

BASE_COLUMNS = frozenset({"prompt", "completion", "answer", "domain"})
# Larger user files are not scanned at plan time (their columns and route values are checked
# when the consuming stage reads them): plan must stay fast whatever the data size.
PLAN_SCAN_LIMIT = 64 << 20


def prepare(config: dict[str, Any], recipe_dir: Path) -> dict[str, Any]:
    """Resolve a relative `path` against the recipe's folder; refuse a missing file."""
    if not isinstance(config.get("path"), str):
        return config
    p = Path(config["path"]).expanduser()
    p = p if p.is_absolute() else recipe_dir / p
    if not p.is_file():
        raise KindCheckError(("path",), f"data file {str(p)!r} does not exist (relative paths "
                             "are read from the recipe's folder)")
    p = p.resolve()
    limit = config.get("max_row_bytes", MAX_ROW_BYTES)
    st = p.stat()
    if st.st_size <= PLAN_SCAN_LIMIT and isinstance(limit, int):
        try:  # every row checked now, not after an hour of upstream training
            _validated(str(p), st.st_size, st.st_mtime_ns, limit)
        except StageInputError as e:
            raise KindCheckError(("path",), str(e)) from None
    return dict(config, path=str(p))


@functools.lru_cache(maxsize=32)
def _validated(path: str, size: int, mtime_ns: int, limit: int) -> int:
    """Row count of a user file that passes `read_rows` (cached on its size and mtime)."""
    return len(read_rows(Path(path), None, limit))


def data_files(config: dict[str, Any]) -> dict[str, str]:
    """User files whose content enters the key: {"path": file} for a user JSONL."""
    return {"path": config["path"]} if config.get("path") else {}


@functools.lru_cache(maxsize=32)
def _scan(path: str, size: int, mtime_ns: int) -> tuple[frozenset[str], dict[str, frozenset]]:
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


def _scanned(config: dict[str, Any]) -> tuple[frozenset[str], dict[str, frozenset]] | None:
    p = Path(config["path"])
    try:
        st = p.stat()
    except OSError:
        return None
    if st.st_size > PLAN_SCAN_LIMIT:
        return None
    return _scan(str(p), st.st_size, st.st_mtime_ns)


def columns(config: dict[str, Any]) -> set[str] | None:
    """Columns of every row this stage writes (None: a user file too large to scan). A
    preference file's rows are kept as they are (no completion/answer added), so a kind that
    reads `completion` refuses them at plan time, and one that reads `chosen` the others."""
    if not config.get("path"):
        return set(BASE_COLUMNS) | ({"flagged"} if config.get("flagged") else set())
    scanned = _scanned(config)
    if scanned is None:
        return None
    return set(scanned[0]) if set(PAIR) & scanned[0] else set(scanned[0] | BASE_COLUMNS)


def route_values(config: dict[str, Any], column: str) -> set[str] | None:
    """Distinct values of `column` in the rows (synthetic data: its domains)."""
    keep = set(config.get("domains") or ())
    if not config.get("path"):
        return set(config.get("domains") or ()) if column == "domain" else None
    scanned = _scanned(config)
    if scanned is None or column not in scanned[1]:
        return None
    found = set(scanned[1][column])
    return found & keep if column == "domain" and keep else found


def data_file(inputs: Inputs) -> Path:
    """The train.jsonl of a stage's data input ("train", else the only one)."""
    if "train" in inputs.data:
        ref = inputs.data["train"]
    elif len(inputs.data) == 1:
        ref = next(iter(inputs.data.values()))
    else:
        raise StageInputError(
            f"need a data input named 'train' (got {sorted(inputs.data) or 'none'}); "
            "set `data: {train: <stage>}` in the recipe"
        )
    path = Path(ref.path) / FILENAME
    if not path.is_file():
        raise StageInputError(f"data input {ref.stage!r} has no {FILENAME} at {path}")
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/data")
    cfg = Config(domains=sys.argv[2:] or ["arith"], size=1000 * max(1, len(sys.argv[2:])))
    print(run(cfg, Inputs(), target))
