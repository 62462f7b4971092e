"""At home in MLflow and Prefect: a run honours the ecosystem's own configuration
(`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`) and writes no local SQLite then; a registered model
loads and generates through `mlflow.pyfunc.load_model("models:/<recipe>.<stage>@current")`;
reused stages are tags on the parent run, not empty child runs.

Run: ``.venv/bin/python -m pytest tests/test_ecosystem.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.servers import mlflow_server

POSTTRAIN = [sys.executable, "-m", "flows.cli"]
RECIPE = """\
name: eco_tiny
stages:
  data: {kind: data, domains: [arith], size: 32, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 2}
  sft: {kind: sft, from: base, data: data, max_steps: 1, per_device_train_batch_size: 4,
        warmup_steps: 0, eval_n: 2}
"""


def test_a_run_lands_on_the_servers_the_environment_names(prefect_harness, tmp_path: Path):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    recipe = tmp_path / "eco_tiny.yaml"
    recipe.write_text(RECIPE)
    state, store = tmp_path / "state", tmp_path / "store"
    with mlflow_server(tmp_path) as url:
        env = dict(os.environ, MLFLOW_TRACKING_URI=url, PREFECT_API_URL=PREFECT_API_URL.value())
        argv = [*POSTTRAIN, "run", str(recipe), "--store", str(store), "--state-dir",
                str(state), "--json"]
        p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"MLflow {url} (MLFLOW_TRACKING_URI)" in p.stderr
        # each model checkpoint carries a Hugging Face model card with its lineage
        keys = {r["stage"]: r["key"] for r in json.loads(p.stdout)}
        card = (store / "objects" / keys["sft"] / "README.md").read_text()
        assert "base_model: eco_tiny:base" in card and "base_model_relation: finetune" in card
        assert not (store / "objects" / keys["data"] / "README.md").exists()
        assert f"Prefect {PREFECT_API_URL.value()}" in p.stderr
        # nothing local: no MLflow sqlite, no Prefect database under the state dir
        assert not list(state.rglob("*.db")), list(state.rglob("*.db"))
        c = MlflowClient(url)
        exp = c.get_experiment_by_name("eco_tiny")
        runs = c.search_runs([exp.experiment_id])
        stage_runs = [r for r in runs if "posttrain.stage" in r.data.tags]
        assert {r.data.tags["posttrain.stage"] for r in stage_runs} == {"data", "base", "sft"}
        parent = next(r for r in runs if r.data.tags.get("posttrain.role") == "run")
        assert parent.info.run_name.startswith("eco_tiny-")
        # data sets are not models: only base and sft are LoggedModels / registered
        names = {m.name for m in c.search_registered_models()}
        assert names == {"eco_tiny.base", "eco_tiny.sft"}

        # a partial rerun: one child run (the forced stage); the reused ones are parent tags
        p = subprocess.run([*argv, "--force", "sft"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs2 = c.search_runs([exp.experiment_id])
        assert len(runs2) == len(runs) + 2  # a parent and the sft run, nothing for reused
        parent2 = next(r for r in runs2 if r.data.tags.get("posttrain.role") == "run"
                       and r.info.run_id != parent.info.run_id)
        assert parent2.data.tags["posttrain.reused.base"].startswith("eco_tiny:base ")
        assert "posttrain.reused.data" in parent2.data.tags
        # a no-op rerun: no run at all
        p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and len(c.search_runs([exp.experiment_id])) == len(runs2)


def test_a_registered_model_loads_and_generates_through_mlflow_pyfunc(spine, monkeypatch):
    import mlflow
    import pandas as pd

    uri = f"sqlite:///{spine['state'] / 'mlflow.db'}"
    # set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: recorded here, so
    # monkeypatch takes them back and no later test inherits this test's MLflow.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/spine_tiny.sft@current")
        out = model.predict(pd.DataFrame({"prompt": ["12+34=", "reverse:abc="]}),
                            params={"max_new_tokens": 4})
        assert isinstance(out, list) and len(out) == 2 and all(isinstance(x, str) for x in out)
        one = model.predict({"prompt": ["12+34="]}, params={"max_new_tokens": 4})
        assert len(one) == 1 and one == model.predict({"prompt": ["12+34="]},  # greedy
                                                       params={"max_new_tokens": 4})
        sig = json.loads(json.dumps(model.metadata.signature.to_dict()))
        assert "prompt" in sig["inputs"] and "completion" in sig["outputs"]
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.mark.parametrize("where", ["env", "profile"])
def test_the_users_prefect_server_wins_over_the_local_fallback(where, tmp_path, monkeypatch):
    from flows import cli

    for name in ("PREFECT_API_URL", "PREFECT_HOME"):  # recorded, so _quiet_env's are undone
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if where == "env":
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    else:
        prof = tmp_path / "home" / ".prefect" / "profiles.toml"
        prof.parent.mkdir(parents=True)
        prof.write_text('active = "team"\n[profiles.team]\n'
                        'PREFECT_API_URL = "http://127.0.0.1:4200/api"\n')
    cli._quiet_env(tmp_path / "state")
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert os.environ["PREFECT_HOME"] == str((tmp_path / "state" / "prefect").absolute())
