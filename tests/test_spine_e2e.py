"""End-to-end: the real stage kinds, shrunk, through the real Prefect flow and child processes.

The session's `spine` store (tests/conftest.py) is shared by the tests of this module, in order:
first run, no-op rerun, a --set on one specialist, a crash by signal, a kill between payload and
manifest; each leaves every stage of the recipe stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import run_cli


@pytest.fixture()
def world(spine: dict) -> dict[str, Path]:
    return spine


def _cli(world: dict[str, Path], cmd: str, *rest: str) -> tuple[int, list]:
    rc, out, _ = run_cli(cmd, str(world["recipe"]), "--store", str(world["store"]),
                         "--state-dir", str(world["state"]), "--json", *rest,
                         *(["--no-tracking"] if cmd == "run" else []))
    return rc, json.loads(out)


def _by_stage(rows: list[dict]) -> dict[str, dict]:
    return {r["stage"]: r for r in rows}


def test_first_run_trains_every_stage_with_parallel_specialists(world):
    rows = world["first_run"]  # the session fixture ran it: --max-parallel 2, tracking on
    assert [r["status"] for r in rows] == ["trained"] * 7
    store = Store(world["store"])
    t = {s: store.manifest(r["key"])["timings"] for s, r in _by_stage(rows).items()}
    a, b = t["rl_arith"], t["rl_reverse"]
    assert a["started_unix"] < b["ended_unix"] and b["started_unix"] < a["ended_unix"], (a, b)
    lock = json.loads(world["recipe"].with_suffix(".lock").read_text())
    assert {s: v["key"] for s, v in lock["stages"].items()} == {
        r["stage"]: r["key"] for r in rows}


def test_second_run_trains_nothing_and_plan_is_fresh(world, monkeypatch):
    import flows.run

    runs_before = set((world["state"] / "runs").iterdir())
    # Every stage fresh: the run answers from the plan, without starting a flow.
    monkeypatch.setattr(flows.run, "execute", lambda *a, **k: pytest.fail("flow started"))
    rc, rows = _cli(world, "run")
    assert rc == 0 and {r["status"] for r in rows} == {"reused"}
    assert set((world["state"] / "runs").iterdir()) == runs_before  # no run dir, no MLflow run
    rc, plan = _cli(world, "plan")
    assert rc == 0 and {p["status"] for p in plan} == {"fresh"}


def test_set_one_specialist_reruns_exactly_it_and_descendants(world):
    rc, plan = _cli(world, "plan", "--set", "rl_arith.max_steps=2")
    runs = {p["stage"]: p["reasons"] for p in plan if p["status"] == "run"}
    assert set(runs) == {"rl_arith", "mopd_r1", "mopd"}
    assert runs["rl_arith"] == ["config changed: max_steps 1 -> 2"]
    assert "upstream changed: rl_arith" in runs["mopd_r1"]
    assert runs["mopd"] == ["upstream changed: mopd_r1", "upstream changed: rl_arith"]
    rc, rows = _cli(world, "run", "--set", "rl_arith.max_steps=2")
    assert rc == 0
    trained = {r["stage"] for r in rows if r["status"] == "trained"}
    assert trained == {"rl_arith", "mopd_r1", "mopd"}


def test_a_stage_killed_by_a_signal_fails_alone(world, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_FAULT", "rl_reverse:kill")
    rc, rows = _cli(world, "run", "--force", "rl_arith", "--force", "rl_reverse",
                    "--max-parallel", "2")
    by = _by_stage(rows)
    assert rc == 1
    assert by["rl_reverse"]["status"] == "failed"
    assert "SIGKILL" in by["rl_reverse"]["error"]
    assert by["rl_arith"]["status"] == "trained"  # the sibling finished and is stored
    assert Store(world["store"]).has(by["rl_arith"]["key"])
    assert by["mopd_r1"]["status"] == "failed" and "upstream" in by["mopd_r1"]["error"]


def test_kill_between_payload_and_manifest_leaves_nothing_visible(world, monkeypatch):
    store = Store(world["store"])
    key = store.resolve("spine_tiny:sft")
    old = store.manifest(key)
    monkeypatch.setenv("POSTTRAIN_FAULT", "sft:kill-before-manifest")
    # A forced rebuild killed after training, before its manifest: the old copy stays whole.
    rc, rows = _cli(world, "run", "--force", "sft")
    assert rc == 1 and _by_stage(rows)["sft"]["status"] == "failed"
    assert store.manifest(key) == old and store.verify(key) == []
    # A stage built for the first time and killed there does not exist for anyone.
    rc, rows = _cli(world, "run", "--set", "sft.max_steps=3")
    by = _by_stage(rows)
    assert rc == 1 and by["sft"]["status"] == "failed"
    assert by["mopd"]["status"] == "failed" and "upstream" in by["mopd"]["error"]
    monkeypatch.delenv("POSTTRAIN_FAULT")
    rc, plan = _cli(world, "plan", "--set", "sft.max_steps=3")
    sft = _by_stage(plan)["sft"]
    assert sft["status"] == "run" and not store.has(sft["key"])
    assert not Path(store.object_path(sft["key"])).exists()  # no half-artifact either
    rc, plan = _cli(world, "plan")
    assert rc == 0 and {p["status"] for p in plan} == {"fresh"}
