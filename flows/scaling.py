"""`--scale` and snapshots: a snapshot step keeps its place in the shrunk run.

Each kind's `scale` hook shrinks its config (tasks/kind.py). A training stage that publishes
snapshots (`snapshots: [80, 160]`, `snapshot_every: N`) of a 240-step run at `--scale 0.1`
trains 24 steps: its snapshot steps move with it, s -> round(s * 24 / 240) (kept in 1..23,
duplicates merged), and every `STAGE@STEP` ref to them is rewritten the same way, so
`rl_arith@80` names `rl_arith@8`. A run shrunk below two steps has no step to snapshot: its
snapshot fields are dropped and a ref `STAGE@STEP` names the stage itself.

Run: imported by flows/recipe.py (`parse(..., scale=F)`); tested by tests/test_scale.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tasks import kind as kinds

SNAPSHOT_FIELDS = ("snapshots", "snapshot_every", "eval_snapshots")


def map_step(step: int, full: int, small: int) -> int:
    """Step `step` of a `full`-step run, in a `small`-step run (1 .. small - 1).

    >>> [map_step(s, 240, 24) for s in (80, 160, 239)], map_step(5, 240, 24)
    ([8, 16, 23], 1)
    """
    return min(small - 1, max(1, round(step * small / full)))


def snapshot_fields(body: dict[str, Any], full: int, small: int) -> dict[str, Any]:
    """`body` with its snapshot steps moved into a `small`-step run (module docstring);
    malformed fields are left for the recipe loader to report."""
    raw, every = body.get("snapshots", []), body.get("snapshot_every")
    ints = isinstance(raw, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                         for x in raw)
    if not ints or (every is not None and (not isinstance(every, int) or isinstance(every, bool)
                                           or every < 1)):
        return body
    steps = set(raw) | (set(range(every, full, every)) if every else set())
    out = {k: v for k, v in body.items() if k not in SNAPSHOT_FIELDS}
    if small >= 2 and steps:
        out["snapshots"] = sorted({map_step(s, full, small) for s in steps if 1 <= s < full})
        if "eval_snapshots" in body:
            out["eval_snapshots"] = body["eval_snapshots"]
    return out


def rescale_refs(spec: Any, maps: dict[str, tuple[int, int]]) -> Any:
    """`spec` (a StageSpec) with every `STAGE@STEP` input whose STAGE is in `maps` ({stage:
    (full steps, scaled steps)}) moved to its step in the scaled run."""

    def fix(ref: str) -> str:
        stage, step = kinds.split_ref(ref)
        if step is None or stage not in maps:
            return ref
        full, small = maps[stage]
        return stage if small < 2 else f"{stage}@{map_step(step, full, small)}"

    inputs = {role: ({k: fix(v) for k, v in value.items()} if isinstance(value, dict)
                     else fix(value)) for role, value in spec.inputs.items()}
    return dataclasses.replace(spec, inputs=inputs) if inputs != spec.inputs else spec
