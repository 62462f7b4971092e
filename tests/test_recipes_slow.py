"""Every shipped recipe end to end at smoke scale (slow tier: `make test-slow` / CI).

`posttrain run recipes/X.yaml --scale S` (S = $POSTTRAIN_SMOKE_SCALE, default 0.03, or 0.1
for the recipes in NEEDS_A_SKILL: every stage's steps, data sizes, prompts and evaluation shrunk
by its kind's `scale` hook, the models kept at their real size) builds every stage of every
recipe under recipes/ into one store, so the stages recipes share (the same base, data and
SFT) are built once. Checks: the run exits 0,
every stage is stored, the final model has a held-out eval, and for llama3 and nemotron3_ultra
`posttrain lineage NAME-xS:FINAL --up` on the built artifacts shows the paper's structure, with
the candidate each `select` chose. At 0.03 the models learn nothing measurable: this tier proves
that every recipe's real code path runs end to end; the full tiny-scale results come from
``bench/recipes_full.py`` (README, "Shipped recipes").
$POSTTRAIN_SMOKE_RECIPES (comma-separated names) picks recipes; unset, every recipe runs except
`mimo_tiny`, which tests/test_demo_slow.py runs at full size in the same tier.

Run: ``HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m pytest tests/test_recipes_slow.py -m slow
-q`` (about a minute per recipe on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from artifacts.store import Store
from flows.recipe import parse, scaled_name
from tests.conftest import REPO, run_cli
from tests.test_recipes import FINAL

pytestmark = pytest.mark.slow
DEFAULT = float(os.environ.get("POSTTRAIN_SMOKE_SCALE", "0.03"))
# Recipes that sample a data set from a trained model (`generate` in `pairs` or `correct`
# mode) need a model that solves something, or the stage rightly refuses an empty data set
# ("no pairs rows were kept"): at 0.03 their models are still at 0 %, at 0.1 they are not
# (llama2: its round-2 pairs come from a policy fine-tuned on its own low-temperature samples).
NEEDS_A_SKILL = {"llama3": 0.1, "r1": 0.1, "llama2": 0.1}


def smoke(name: str) -> float:
    """The scale `name` runs at in this tier."""
    return NEEDS_A_SKILL.get(name, DEFAULT) if "POSTTRAIN_SMOKE_SCALE" not in os.environ \
        else DEFAULT
ONLY = [n for n in os.environ.get("POSTTRAIN_SMOKE_RECIPES", "").split(",") if n]
NAMES = [p.stem for p in sorted((REPO / "recipes").glob("*.yaml"))
         if p.stem in ONLY or (not ONLY and p.stem != "mimo_tiny") or ONLY == ["all"]]


def _final(name: str) -> str:
    """The recipe's final model: FINAL's entry, else its last stage in topological order."""
    return FINAL.get(name) or list(parse(REPO / "recipes" / f"{name}.yaml").stages)[-1]


@pytest.fixture(scope="module")
def world(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("recipes")
    shutil.copytree(REPO / "recipes", root / "recipes",
                    ignore=shutil.ignore_patterns("*.lock"))  # lock files land in the copy
    return {"recipes": root / "recipes", "store": root / "store", "state": root / "state"}


def _run(world: dict, name: str) -> list[dict]:
    rc, out, err = run_cli("run", str(world["recipes"] / f"{name}.yaml"), "--scale",
                           str(smoke(name)), "--store", str(world["store"]),
                           "--state-dir", str(world["state"]), "--no-tracking",
                           "--max-parallel", "2", "--json")
    assert rc == 0, err[-4000:]
    print(err[-2000:])  # the stages x domains table, for the CI log
    return json.loads(out)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs_end_to_end_at_smoke_scale(world: dict, name: str) -> None:
    rows = _run(world, name)
    assert {r["status"] for r in rows} <= {"trained", "reused"}, rows
    store = Store(world["store"])
    assert all(store.has(r["key"]) for r in rows)
    final = store.manifest(store.resolve(f"{scaled_name(name, smoke(name))}:{_final(name)}"))
    assert final["metrics"]["eval"], final["metrics"]
    assert final["key"] == next(r["key"] for r in rows if r["stage"] == _final(name))


def _built_lineage(world: dict, name: str) -> tuple[dict, set[tuple[str, str, str]]]:
    ref = f"{scaled_name(name, smoke(name))}:{FINAL[name]}"
    rc, out, err = run_cli("lineage", ref, "--up", "--json", "--store", str(world["store"]))
    assert rc == 0, err
    sub = json.loads(out)
    # Named as this recipe names them: an artifact another recipe built first with the same
    # key (the same config at this scale, e.g. deepseek_v3_2's rl_arith for nemotron3_ultra's
    # rl_arith_1) carries that recipe's stage name in its manifest.
    store, scaled = Store(world["store"]), scaled_name(name, smoke(name))
    ours = {}
    for st in parse(REPO / "recipes" / f"{name}.yaml").stages:
        try:
            ours[store.resolve(f"{scaled}:{st}")] = st
        except Exception:  # noqa: BLE001 - a stage this run did not build (not in the lineage)
            continue
    stage = {n["key"]: ours.get(n["key"], n["stage"]) for n in sub["nodes"]}
    return sub, {(stage[e["parent"]], e["role"], stage[e["child"]]) for e in sub["edges"]}


@pytest.mark.skipif("llama3" not in NAMES, reason="llama3 not selected")
def test_built_lineage_of_llama3(world: dict) -> None:
    _run(world, "llama3")  # reused when the test above built it
    sub, edges = _built_lineage(world, "llama3")
    assert ("rm_2", "reward_model:rm", "rs_2") in edges and ("best_1", "init", "rs_2") in edges
    assert ("dpo_s1_2", "candidate:dpo_1", "best_2") in edges
    chosen = {n["stage"]: n["selected"] for n in sub["nodes"] if n["kind"] == "select"}
    assert set(chosen) == {"best_1", "best_2"}
    assert all(c in ("dpo_1", "dpo_2", "rs") for c in chosen.values()), chosen
    store = Store(world["store"])
    m = store.manifest(store.resolve(f"{scaled_name('llama3', smoke('llama3'))}:best_2"))
    assert set(m["metrics"]["scores"]) == {"dpo_1", "dpo_2", "rs"}
    assert set(m["inputs"]["candidates"]) == {"dpo_1", "dpo_2", "rs"}


@pytest.mark.skipif("nemotron3_ultra" not in NAMES, reason="nemotron3_ultra not selected")
def test_built_lineage_of_nemotron3_ultra(world: dict) -> None:
    _run(world, "nemotron3_ultra")
    _, edges = _built_lineage(world, "nemotron3_ultra")
    assert ("student_1", "teacher:general", "mopd_2") in edges
    assert ("rl_arith_1", "teacher:arith", "mopd_2") in edges
    assert ("rl_sort_2", "teacher:sort", "mopd_2") in edges
    assert ("rl_reverse_1", "teacher:reverse", "mopd_1") in edges
