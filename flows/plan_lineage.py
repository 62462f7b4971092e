"""Lineage of a recipe's plan: the graph its manifests will have, before anything is built.

`posttrain lineage recipes/llama3.yaml:best_2 --up` answers from the plan (no compute, no
store needed): every stage is a node keyed by its planned content key, every input an edge
labelled by its role exactly as artifacts/lineage.py labels a manifest's (`init`,
`reward_model:<name>`, `teacher:<route>`, `generator:<route>`, `candidate:<name>`,
`data:<name>`). A stage already in the store shows its stored metrics (held-out eval, the
candidate a `select` chose); the others show none. `RECIPE:STAGE` (a recipe name, not a file)
still reads the built artifacts' manifests.

Run: ``posttrain lineage recipes/nemotron3_ultra.yaml:student_2 --up``
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from artifacts import lineage
from artifacts.store import Store
from flows.recipe import RecipeError, closest, parse
from tasks import kind as kinds

# `path/to/recipe.yaml:STAGE`: a recipe file and one of its stages.
PLAN_REF = re.compile(r"^(?P<file>.+\.ya?ml):(?P<stage>[^:]+)$")


def is_plan_ref(ref: str) -> bool:
    """Whether `ref` names a stage of a recipe file (`recipes/x.yaml:stage`) that exists."""
    m = PLAN_REF.match(ref)
    return bool(m) and Path(m.group("file")).is_file()


def graph(recipe_file: str | Path, store: Store,
          sets: tuple[str, ...] = ()) -> tuple[lineage.Graph, dict[str, str]]:
    """(lineage graph of the recipe's plan, stage -> planned key)."""
    from flows.plan import plan

    recipe = parse(recipe_file, sets)
    planned = plan(recipe, store)
    manifests: list[dict[str, Any]] = []
    for p in planned:
        stored = store.manifest(p.key) if store.has(p.key) else None
        produces = None if p.spec.kind == "use" else kinds.spec(p.spec.kind).produces
        manifests.append({"key": p.key, "recipe": recipe.name, "stage": p.name,
                          "kind": p.spec.kind, "produces": produces, "inputs": p.input_keys,
                          "metrics": (stored or {}).get("metrics") or {}})
        for step, key in p.snapshots.items():  # `STAGE@STEP`, published while it trains
            snap = store.manifest(key) if store.has(key) else None
            manifests.append({"key": key, "recipe": recipe.name, "stage": f"{p.name}@{step}",
                              "kind": p.spec.kind, "produces": produces, "inputs": p.input_keys,
                              "snapshot": {"of": p.key, "stage": p.name, "step": step},
                              "metrics": (snap or {}).get("metrics") or {}})
    return lineage.from_manifests(manifests), {p.name: p.key for p in planned}


def resolve(ref: str, store: Store) -> tuple[lineage.Graph, str]:
    """(plan graph, key of the stage) for `recipes/x.yaml:STAGE`; RecipeError for a stage the
    recipe does not have."""
    m = PLAN_REF.match(ref)
    if m is None:
        raise RecipeError(ref, "", "expected path/to/recipe.yaml:STAGE")
    g, keys = graph(m.group("file"), store)
    stage = m.group("stage")
    if stage not in keys:
        raise RecipeError(m.group("file"), f"stage {stage}", f"no such stage"
                          f"{closest(stage, tuple(keys))}; stages: {', '.join(keys)}")
    return g, keys[stage]
