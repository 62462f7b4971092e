"""`posttrain ui` serves the Prefect and MLflow UIs over the project's state on 127.0.0.1, and a
`posttrain run` with the same --state-dir records there while it is up; Ctrl-C stops both
servers. Slow tier (two servers start: about a minute on 2 cores).

Run: ``.venv/bin/python -m pytest tests/test_ui_slow.py -q -m slow``
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.servers import posttrain_ui

pytestmark = pytest.mark.slow
POSTTRAIN = [sys.executable, "-m", "flows.cli"]
RECIPE = """\
name: ui_tiny
stages:
  data: {kind: data, domains: [arith], size: 32, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 2}
"""


def _post(info: dict, path: str) -> list:
    req = urllib.request.Request(f"{info['prefect_api_url']}/{path}", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def test_posttrain_ui_serves_both_uis_and_runs_record_there(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with posttrain_ui(state, REPO) as (info, env):
        assert info["prefect_ui_url"].startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(info["prefect_ui_url"], timeout=10).read().decode()
        assert "<html" in page.lower()  # the Prefect UI itself is served
        recipe = tmp_path / "ui_tiny.yaml"
        recipe.write_text(RECIPE)
        p = subprocess.run([*POSTTRAIN, "run", str(recipe), "--store", str(tmp_path / "store"),
                            "--state-dir", str(state), "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "posttrain ui is up" in p.stderr
        exps = _get(f"{info['mlflow_url']}/api/2.0/mlflow/experiments/get-by-name"
                    "?experiment_name=ui_tiny")
        assert exps["experiment"]["name"] == "ui_tiny"
        assert [r["state_type"] for r in _post(info, "flow_runs/filter")] == ["COMPLETED"]
        # each stage task: the child's log lines in its Prefect logs, a link to its MLflow run
        logs = " ".join(r["message"] for r in _post(info, "logs/filter"))
        assert "base: eval" in logs, logs[-2000:]
        links = {a["key"]: a["data"] for a in _post(info, "artifacts/filter")}
        assert f"]({info['mlflow_url']}/#/experiments/" in links.get("mlflow-base", ""), links
        # a rerun that forces base reuses data: that task ends Cached
        p = subprocess.run([*POSTTRAIN, "run", str(recipe), "--store", str(tmp_path / "store"),
                            "--state-dir", str(state), "--json", "--force", "base"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        states = {t["name"]: t["state_name"] for t in _post(info, "task_runs/filter")
                  if t["state_name"] == "Cached"}
        assert "data" in states, states
