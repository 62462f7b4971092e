"""Teams in parallel on one store: `use:` another recipe's teachers, the SFT-lineage guard, two
recipes at once, and the provenance that ties them together (issue 4), on the session's spine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import REPO, run_cli

TEAM_B = """
name: team_b
description: a second team distils team A's teachers into team A's SFT model
stages:
  student: {use: spine_tiny:sft}
  arith_teacher: {use: spine_tiny:rl_arith}
  reverse_teacher: {use: "%(reverse)s"}
  data: {use: spine_tiny:data}
  mopd:
    kind: mopd
    from: student
    teachers: {arith: arith_teacher, reverse: reverse_teacher}
    data: data
    max_steps: 1
    prompts_per_route: 2
    eval_n: 4
    seed: 1  # team A's mopd_r1 has seed 0: with it this stage *is* that artifact (reused)
"""

TEAM_C = """
name: %(name)s
description: a team whose student comes from its own SFT, with team A's teachers
vars:
  domains: [arith, reverse]
stages:
  data: {kind: data, domains: "${domains}", size: 64, seed: 3}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: "${domains}", eval_n: 4, seed: 7}
  sft: {kind: sft, from: base, data: data, max_steps: 2, per_device_train_batch_size: 8,
        warmup_steps: 0, eval_n: 4}
  arith_teacher: {use: spine_tiny:rl_arith}
  reverse_teacher: {use: spine_tiny:rl_reverse}
  mopd:
    kind: mopd
    from: sft
    teachers: {arith: arith_teacher, reverse: reverse_teacher}
    data: data
    max_steps: 1
    prompts_per_route: 2
    eval_n: 4
    allow_cross_lineage: %(allow)s
"""


def _write(root: Path, name: str, text: str) -> Path:
    p = root / f"{name}.yaml"
    p.write_text(text)
    return p


def _args(spine: dict, recipe: Path, *extra: str) -> list[str]:
    return [str(recipe), "--store", str(spine["store"]), "--state-dir", str(spine["state"]),
            "--json", *extra]


def test_use_builds_on_another_teams_teachers_without_retraining(spine):
    store = Store(spine["store"])
    rev_key = store.resolve("spine_tiny:rl_reverse")
    recipe = _write(spine["root"], "team_b", TEAM_B % {"reverse": rev_key[:10]})
    rc, out, err = run_cli("run", *_args(spine, recipe, "--no-tracking"))
    assert rc == 0, err
    status = {r["stage"]: r["status"] for r in json.loads(out)}
    assert status == {"student": "reused", "arith_teacher": "reused", "reverse_teacher": "reused",
                      "data": "reused", "mopd": "trained"}
    rc, out, _ = run_cli("lineage", "team_b:mopd", "--up", "--format", "json",
                         "--store", str(spine["store"]))
    nodes = {(n["recipe"], n["stage"]): n for n in json.loads(out)["nodes"]}
    assert nodes[("spine_tiny", "sft")]["role"] == "init"  # the edge crosses recipes
    assert nodes[("spine_tiny", "rl_reverse")]["role"] == "teacher:reverse"
    assert ("spine_tiny", "base") in nodes  # and goes on up team A's chain


def test_teacher_from_another_sft_is_refused_before_training(spine):
    recipe = _write(spine["root"], "team_c", TEAM_C % {"name": "team_c", "allow": "false"})
    rc, out, err = run_cli("run", *_args(spine, recipe, "--no-tracking"))
    assert rc == 2, err  # a user error (StageInputError) through `posttrain run`: exit 2
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rows["mopd"]["status"] == "failed"
    store = Store(spine["store"])
    theirs = store.manifest(store.resolve("spine_tiny:sft"))["key"]
    ours = store.manifest(store.resolve("team_c:sft"))["key"]
    assert theirs[:12] in rows["mopd"]["error"] and ours[:12] in rows["mopd"]["error"]
    assert not store.has(rows["mopd"]["key"])


def test_two_recipes_at_once_on_one_store_both_succeed(spine):
    """Two `posttrain run` processes (own Prefect servers, one state dir) on one store."""
    recipes = [_write(spine["root"], n, TEAM_C % {"name": n, "allow": "true"})
               for n in ("team_d", "team_e")]
    env = dict(os.environ, POSTTRAIN_TRACKING="off")
    env.pop("PREFECT_API_URL", None)  # each process starts its own, as two users would
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *_args(spine, r)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in recipes]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert {r["status"] for r in json.loads(out)} <= {"trained", "reused"}
    store = Store(spine["store"])
    for name in ("team_d", "team_e"):
        m = store.manifest(store.resolve(f"{name}:mopd"))
        assert any("sft" in w.lower() for w in m["warnings"]), m["warnings"]


def test_students_of_a_teacher_and_impact_of_a_data_set(spine):
    rc, out, _ = run_cli("students", "spine_tiny:rl_arith", "--json",
                         "--store", str(spine["store"]))
    assert rc == 0
    students = {(s["recipe"], s["stage"]) for s in json.loads(out)}
    assert ("spine_tiny", "mopd_r1") in students and ("spine_tiny", "mopd") in students
    rc, out, _ = run_cli("impact", "spine_tiny:data", "--json", "--store", str(spine["store"]),
                         "--state-dir", str(spine["state"]))
    assert rc == 0
    hit = {(n["recipe"], n["stage"]) for n in json.loads(out)["nodes"]}
    assert {("spine_tiny", s) for s in ("sft", "rl_arith", "rl_reverse", "mopd_r1", "mopd")} <= hit


@pytest.mark.parametrize("stage", ["sft", "rl_arith", "mopd"])
def test_mlflow_mirror_has_a_tagged_nested_run_per_stage(spine, stage):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{spine['state'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spine_tiny")
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`posttrain.stage` = '{stage}'")
    assert runs, f"no MLflow run for {stage}"
    run = runs[-1]
    key = Store(spine["store"]).resolve(f"spine_tiny:{stage}")
    keys = {r.data.tags.get("posttrain.key") for r in runs}
    assert key in keys or any(k for k in keys)
    assert run.data.tags.get("mlflow.parentRunId")
    assert any(m.startswith("eval.") for m in run.data.metrics)
