"""The demo's acceptance, end to end on the real recipe (slow: ~10 min; `make test-slow`).

Runs recipes/mimo_tiny.yaml exactly as `make demo` does (fixed step counts, 500 held-out problems
per domain) and checks what the demo claims: each specialist beats SFT on its own domain by
>= 10 points, the MOPD student beats SFT on every domain and comes within 5 points of the
teachers on average, every checkpoint loads with plain `from_pretrained` and generates, and the
lineage answers who-taught-whom.
"""

from __future__ import annotations

import json
import shutil

import pytest

from artifacts.store import Store
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    recipe = root / "mimo_tiny.yaml"
    shutil.copy(REPO / "recipes" / "mimo_tiny.yaml", recipe)
    world = {"recipe": recipe, "store": root / "store", "state": root / "state"}
    rc, out, err = run_cli("run", str(recipe), "--store", str(world["store"]),
                           "--state-dir", str(world["state"]), "--json")
    assert rc == 0, err[-3000:]
    world["rows"] = json.loads(out)
    print(err[-2500:])  # the stages x domains table, for the CI log
    return world


def _eval(world: dict, stage: str) -> dict[str, float]:
    store = Store(world["store"])
    return store.manifest(store.resolve(f"mimo_tiny:{stage}"))["metrics"]["eval"]


def _domains(world: dict) -> list[str]:
    return sorted(_eval(world, "sft"))


def test_every_stage_trained(demo):
    assert {r["status"] for r in demo["rows"]} == {"trained"}


def test_each_specialist_beats_sft_on_its_domain_by_10_points(demo):
    sft = _eval(demo, "sft")
    gains = {d: _eval(demo, f"rl_{d}")[d] - sft[d] for d in _domains(demo)}
    assert all(g >= 0.10 for g in gains.values()), gains


def test_mopd_student_beats_sft_everywhere_and_nears_its_teachers(demo):
    sft, mopd = _eval(demo, "sft"), _eval(demo, "mopd")
    teachers = {d: _eval(demo, f"rl_{d}")[d] for d in _domains(demo)}
    assert all(mopd[d] > sft[d] for d in _domains(demo)), (sft, mopd)
    gap = sum(teachers[d] - mopd[d] for d in teachers) / len(teachers)
    assert gap <= 0.05, (teachers, mopd, gap)


def test_every_checkpoint_loads_with_plain_transformers_and_generates(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = Store(demo["store"])
    for r in demo["rows"]:
        m = store.manifest(r["key"])
        if m["produces"] != "model":
            continue
        path = store.local_path(r["key"])
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tok("12+34=", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1], r["stage"]


def test_lineage_of_final_rl_and_students_of_a_teacher(demo):
    args = ["--store", str(demo["store"]), "--state-dir", str(demo["state"])]
    rc, out, _ = run_cli("lineage", "mimo_tiny:final_rl", "--up", "--format", "json", *args)
    assert rc == 0
    roles = {n["stage"]: n["role"] for n in json.loads(out)["nodes"]}
    assert roles["mopd"] == "init" and roles["sft"] == "init" and roles["base"] == "init"
    assert all(roles[f"rl_{d}"] == f"teacher:{d}" for d in _domains(demo))
    assert roles["rl_data"].startswith("data:") and roles["sft_data"].startswith("data:")
    rc, out, _ = run_cli("students", "mimo_tiny:rl_arith", "--json", *args)
    assert "mopd" in {s["stage"] for s in json.loads(out)}
