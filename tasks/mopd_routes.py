"""The run-time checks of stage kind `mopd` (tasks/mopd.py) before any weight is loaded.

Holds the routing of data rows to teachers (`rows_by_value`, `route_table`), the tokenizer and
SFT-lineage checks of teachers against the student (`check_teachers`, also handed to
tasks/mopd_schedule.py for teachers that arrive later) and `preflight`, which runs them all.
It is apart from tasks/mopd.py so the kind module stays its config, plan-time hooks and `run`,
and so these checks read as one piece: everything that must pass before training starts. Like
the kind module it imports torch / transformers inside functions only.

Run: ``.venv/bin/python -m pytest tests/test_mopd.py -q -k "route or lineage or tokenizer"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artifacts.refs import ArtifactRef, Inputs, StageInputError


def route_table(values: list[str], routes: list[str], unmapped: str) -> dict[str, str]:
    """Route value -> teacher route, refusing (or defaulting) values without a teacher.

    >>> route_table(["arith", "count"], ["arith"], "default:arith")
    {'arith': 'arith', 'count': 'arith'}
    """
    default = unmapped.removeprefix("default:") if unmapped != "error" else None
    if default is not None and default not in routes:
        raise StageInputError(
            f"unmapped: {unmapped!r} names no teacher; known routes: {sorted(routes)}"
        )
    missing = sorted(v for v in values if v not in routes)
    if missing and default is None:
        raise StageInputError(
            f"data has route values {missing} with no teacher; known routes: {sorted(routes)}. "
            "Fix: add a teacher for each, or set `unmapped: default:<route>`."
        )
    return {v: v if v in routes else str(default) for v in values}


def rows_by_value(inputs: Inputs, key: str) -> dict[str, list[dict]]:
    """The data input's rows grouped by their `key` value (StageInputError at a row without
    it, with its path:line)."""
    from tasks.data import data_file

    by_value: dict[str, list[dict]] = {}
    path = data_file(inputs)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if key not in row:
                raise StageInputError(
                    f"{path}:{lineno}: no field {key!r} to route on; fix `route_key`"
                )
            by_value.setdefault(str(row[key]), []).append(row)
    return by_value


def preflight(config: Any, inputs: Inputs) -> tuple[dict[str, list[dict]], dict, list[str]]:
    """Every check that must pass before training: (rows by route value, route table, warnings).
    `config` is a tasks.mopd.Config."""
    if inputs.init is None or not inputs.teachers:
        raise StageInputError("mopd needs an `init` student and at least one teacher")
    from tasks import mopd_schedule
    from tasks.mopd_schedule import phases

    by_value = rows_by_value(inputs, config.route_key)
    table = route_table(sorted(by_value), sorted(phases(inputs.teachers)), config.unmapped)
    warnings = check_teachers(config, inputs, mopd_schedule.ready(inputs.teachers))
    if config.orm_weight:
        from tasks.domains import DOMAINS

        bad = sorted({v for v, rs in by_value.items() for r in rs
                      if r.get("domain") not in DOMAINS or not isinstance(r.get("answer"), str)})
        if bad:
            raise StageInputError(
                f"orm_weight > 0 needs a known `domain` and an `answer` in every row; rows of "
                f"route values {bad} lack them. Fix: set orm_weight: 0 or complete the data."
            )
    if config.accelerate_config is not None and not Path(config.accelerate_config).is_file():
        raise StageInputError(
            f"accelerate_config {config.accelerate_config} does not exist; fix the path or drop it"
        )
    idle = sorted(set(phases(inputs.teachers)) - set(table.values()))
    if idle:
        warnings.append(f"teachers {idle} get no data (no row has their {config.route_key!r})")
    return by_value, table, warnings


def check_teachers(config: Any, inputs: Inputs, teachers: Mapping[str, ArtifactRef]
                   ) -> list[str]:
    """Tokenizer and SFT-lineage compatibility of `teachers` with the student (tasks/compat.py).
    `config` is a tasks.mopd.Config."""
    from tasks.compat import check_lineage, check_tokenizers
    from tasks.models import fingerprint_of

    assert inputs.init is not None
    fps = {r: fingerprint_of(t.path) for r, t in teachers.items()}
    check_tokenizers(fingerprint_of(inputs.init.path), fps)
    return check_lineage(inputs.init, teachers, config.allow_cross_lineage)
