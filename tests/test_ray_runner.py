"""`posttrain run --runner ray`: the spine's stages as Ray tasks on a local Ray instance.

Ray pickles the task and the flow into its workers, where the flow process's live board and CPU
slots do not exist: stages must still train, land in the store and report their own failures.
Skipped where the `ray` extra (prefect-ray) is not installed; `make test` installs it.

Run: ``.venv/bin/python -m pytest tests/test_ray_runner.py -q``
"""

from __future__ import annotations

import json

import pytest

from artifacts.store import Store
from tests.conftest import run_cli, spine_restored

pytest.importorskip("prefect_ray")


def test_ray_runner_trains_stages_and_reports_a_killed_one(spine, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    # Ray workers are other processes: point them at the test harness's Prefect server.
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("POSTTRAIN_FAULT", "rl_reverse:kill")
    with spine_restored(spine):
        rc, out, err = run_cli(
            "run", str(spine["recipe"]), "--store", str(spine["store"]), "--state-dir",
            str(spine["state"]), "--json", "--no-tracking", "--runner", "ray",
            "--max-parallel", "2", "--set", "rl_arith.max_steps=3", "--force", "rl_reverse")
    by = {r["stage"]: r for r in json.loads(out)}
    assert rc == 1, err[-2000:]
    assert {by[s]["status"] for s in ("data", "base", "sft")} == {"reused"}
    assert by["rl_arith"]["status"] == "trained", err[-2000:]  # a new key, built on Ray
    store = Store(spine["store"])
    assert store.manifest(by["rl_arith"]["key"])["config"]["max_steps"] == 3
    assert by["rl_reverse"]["status"] == "failed" and "SIGKILL" in by["rl_reverse"]["error"]
    assert store.has(by["rl_reverse"]["key"])  # the killed forced rebuild kept the old copy
    assert by["mopd_r1"]["error"] == "not run: an upstream stage failed"
    assert "error: stage rl_reverse: killed by signal SIGKILL" in err
