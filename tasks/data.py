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

The rules of a user row and the plan-time passes over a user file are tasks/data_rows.py.

Run: ``python -m tasks.data /tmp/data arith reverse`` writes 1,000 rows of each.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import Inputs, Progress, StageInputError, no_progress
from tasks import domains as _domains
from tasks.data_rows import (
    MAX_ROW_BYTES,
    PAIR,
    PLAN_SCAN_LIMIT,
    read_rows,  # also imported from here by tests/test_data_inputs.py
    scanned_file,
    shape_of,
    validated,
)
from tasks.kind import KindCheckError, Role

PRODUCES = "dataset"
ROLES: dict[str, Role] = {}
FILENAME = "train.jsonl"


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
            validated(str(p), st.st_size, st.st_mtime_ns, limit)
        except StageInputError as e:
            raise KindCheckError(("path",), str(e)) from None
    return dict(config, path=str(p))


def data_files(config: dict[str, Any]) -> dict[str, str]:
    """User files whose content enters the key: {"path": file} for a user JSONL."""
    return {"path": config["path"]} if config.get("path") else {}


def columns(config: dict[str, Any]) -> set[str] | None:
    """Columns of every row this stage writes (None: a user file too large to scan). A
    preference file's rows are kept as they are (no completion/answer added), so a kind that
    reads `completion` refuses them at plan time, and one that reads `chosen` the others."""
    if not config.get("path"):
        return set(BASE_COLUMNS) | ({"flagged"} if config.get("flagged") else set())
    scanned = scanned_file(config)
    if scanned is None:
        return None
    return set(scanned[0]) if set(PAIR) & scanned[0] else set(scanned[0] | BASE_COLUMNS)


def route_values(config: dict[str, Any], column: str) -> set[str] | None:
    """Distinct values of `column` in the rows (synthetic data: its domains)."""
    keep = set(config.get("domains") or ())
    if not config.get("path"):
        return set(config.get("domains") or ()) if column == "domain" else None
    scanned = scanned_file(config)
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
