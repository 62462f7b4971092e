"""The MLflow mirror on a throw-away sqlite database, and the unreachable-server path + sync.

Run: ``.venv/bin/python -m pytest tests/test_tracking.py -q``
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

# Before anything imports mlflow / matplotlib: no telemetry, no font cache in ~/.cache.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
os.environ["HF_HUB_OFFLINE"] = "1"

from artifacts import lineage  # noqa: E402
from artifacts.store import RefError, Store  # noqa: E402
from artifacts.tracking import PENDING, Tracker, flatten  # noqa: E402
from artifacts.tracking_lookup import Lookup, resolve_ref  # noqa: E402
from flows import cli as posttrain  # noqa: E402

STAGES = ["data", "sft", "rl_arith", "rl_reverse", "mopd_r1", "mopd"]


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def publish(store: Store, tmp: Path, recipe: str, stage: str, kind: str,
            inputs: dict[str, Any], t: float) -> str:
    key = key_of(f"{recipe}:{stage}")
    refs: dict[str, Any] = {}
    for role, v in inputs.items():  # input_refs as the stage runner writes them
        def ref(k: str) -> dict[str, Any]:
            m = store.manifest(k) or {}
            return {"key": k, "recipe": m["recipe"], "stage": m["stage"], "kind": m["kind"]}
        refs[role] = {n: ref(x) for n, x in v.items()} if isinstance(v, dict) else ref(v)
    staged = tmp / f"s-{recipe}-{stage}"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    man = {"format": 1, "recipe": recipe, "stage": stage, "kind": kind,
           "produces": "dataset" if kind == "data" else "model",
           "config": {"max_steps": 2, "optim": {"lr": 1e-3}, "domains": ["arith", "reverse"]},
           "inputs": inputs, "input_refs": refs,
           "metrics": {"eval": {} if kind == "data" else {"arith": t / 10, "reverse": 0.5},
                       "train": {"loss": 0.4},
                       "history": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.6}]},
           "timings": {"ended_unix": t, "seconds": 1.5}, "run_id": f"run-{recipe}",
           "sft_root": key_of(f"{recipe}:sft") if kind != "data" else None}
    store.publish(key, staged, man)
    store.set_ref(recipe, stage, key)
    return key


def make_store(tmp: Path) -> tuple[Store, dict[str, str]]:
    """data -> sft -> rl_arith / rl_reverse (teachers) -> mopd_r1 -> mopd, plus team_b:student
    taught by mimo_tiny's rl_arith."""
    store, k = Store(tmp / "store"), {}
    k["data"] = publish(store, tmp, "mimo_tiny", "data", "data", {}, 1)
    k["sft"] = publish(store, tmp, "mimo_tiny", "sft", "sft", {"data": {"mix": k["data"]}}, 2)
    for i, d in enumerate(("arith", "reverse")):
        k[f"rl_{d}"] = publish(store, tmp, "mimo_tiny", f"rl_{d}", "grpo",
                               {"init": k["sft"], "reference": k["sft"]}, 3 + i)
    teachers = {"arith": k["rl_arith"], "reverse": k["rl_reverse"]}
    k["mopd_r1"] = publish(store, tmp, "mimo_tiny", "mopd_r1", "mopd",
                           {"init": k["sft"], "teachers": teachers}, 5)
    k["mopd"] = publish(store, tmp, "mimo_tiny", "mopd", "mopd",
                        {"init": k["mopd_r1"], "teachers": teachers}, 6)
    k["student"] = publish(store, tmp, "team_b", "student", "mopd",
                           {"init": k["sft"], "teachers": {"arith": k["rl_arith"]}}, 7)
    return store, k


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_by_stage(c: Any, recipe: str) -> dict[str, Any]:
    eid = c.get_experiment_by_name(recipe).experiment_id
    # get_run: search_runs leaves inputs.model_inputs empty.
    return {r.data.tags.get("posttrain.stage", "(parent)"): c.get_run(r.info.run_id)
            for r in c.search_runs([eid])}


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]",
                                                              "d": "x"}


def test_mirror_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, k = make_store(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = Tracker(uri, tmp_path / "state")
    pid = tr.start_run("mimo_tiny", "run-mimo_tiny", {"sets": ["sft.max_steps=2"]})
    assert pid
    ids = {s: tr.log_stage(store.manifest(k[s]), "trained", pid, store.uri) for s in STAGES}
    summary = [{"stage": s, "key": k[s], "status": "trained",
                "eval": store.manifest(k[s])["metrics"]["eval"]} for s in STAGES]
    tr.finish_run(pid, "ok", summary, {"lineage.md": "```mermaid\nflowchart LR\n```\n"})
    assert tr.last_error is None and all(ids.values())
    c = client(uri)
    runs = runs_by_stage(c, "mimo_tiny")
    parent = runs["(parent)"]
    assert parent.data.tags["posttrain.run_id"] == "run-mimo_tiny"
    assert parent.data.params["sets"] == '["sft.max_steps=2"]'
    assert parent.info.status == "FINISHED"
    arts = {a.path for a in c.list_artifacts(pid)}
    assert {"summary.json", "eval_table.md", "accuracy.png", "lineage.md"} <= arts
    mopd = runs["mopd"]
    tags = mopd.data.tags
    assert tags["mlflow.parentRunId"] == pid
    assert tags["posttrain.key"] == k["mopd"] and tags["posttrain.kind"] == "mopd"
    assert tags["posttrain.sft_root"] == k["sft"] and tags["posttrain.recipe"] == "mimo_tiny"
    assert tags["posttrain.input.teacher.arith"] == k["rl_arith"]
    assert tags["posttrain.input.init"] == k["mopd_r1"]
    assert mopd.data.params["optim.lr"] == "0.001" and mopd.data.params["max_steps"] == "2"
    assert mopd.data.metrics["eval.arith"] == pytest.approx(0.6)
    assert [m.step for m in c.get_metric_history(mopd.info.run_id, "loss")] == [1, 2]
    # LoggedModels: outputs of their run, inputs of their consumers; weights stay in the store.
    model = c.get_logged_model(ids["mopd"]["model_id"])
    assert model.tags["posttrain.path"].endswith(k["mopd"])
    assert "mlflow.model.isExternal" not in model.tags  # a pyfunc that reads the store
    assert json.loads(model.tags["mlflow.modelVersions"]) == [  # shown as registered
        {"name": "mimo_tiny.mopd", "version": "1"}]
    assert parent.info.run_name == "run-mimo_tiny"  # the posttrain run id, not "recipe run-"
    assert mopd.data.tags["posttrain.input_stage.teacher.arith"] == "mimo_tiny:rl_arith"
    assert "mlflow.source.name" in mopd.data.tags
    assert [o.model_id for o in mopd.outputs.model_outputs] == [model.model_id]
    assert {i.model_id for i in mopd.inputs.model_inputs} == {
        ids[s]["model_id"] for s in ("mopd_r1", "rl_arith", "rl_reverse")}
    sft_inputs = runs["sft"].inputs.dataset_inputs
    assert [d.dataset.name for d in sft_inputs] == ["mimo_tiny:data"]
    # Registered versions with an alias, resolvable back to store keys.
    mv = c.get_model_version_by_alias("mimo_tiny.mopd", "current")
    assert mv.tags["posttrain.key"] == k["mopd"]
    assert Lookup(tr).resolve_model_uri("models:/mimo_tiny.mopd@current") == k["mopd"]
    assert resolve_ref("models:/mimo_tiny.sft/1", store, uri) == k["sft"]
    with pytest.raises(RefError, match="nope"):
        Lookup(tr).resolve_model_uri("models:/mimo_tiny.nope@current")
    with pytest.raises(RefError, match="not in"):  # registered, but not in this store
        resolve_ref("models:/mimo_tiny.sft/1", Store(tmp_path / "other"), uri)
    # A second recipe reusing a teacher: a link-only run under its own parent.
    tr_b = Tracker(uri, tmp_path / "state")
    pid_b = tr_b.start_run("team_b", "run-b", {})
    got = tr_b.log_stage(store.manifest(k["rl_arith"]), "reused", pid_b, store.uri)
    assert got["model_id"] == ids["rl_arith"]["model_id"]
    link = c.get_run(got["run_id"])
    assert link.data.tags["posttrain.status"] == "reused" and not link.data.params
    assert [i.model_id for i in link.inputs.model_inputs] == [got["model_id"]]
    assert c.get_experiment(link.info.experiment_id).name == "team_b"
    # impact reports the registered versions that point downstream of a teacher.
    rep = lineage.impact(store, k["rl_arith"], Lookup(tr))
    assert {v["name"] for v in rep["registered_versions"]} == {
        "mimo_tiny.rl_arith", "mimo_tiny.mopd_r1", "mimo_tiny.mopd"}
    assert not (tmp_path / "state" / PENDING).exists()
    # `show` takes every REF the other commands take (one resolver), models:/ included.
    capsys.readouterr()
    assert cli(["show", "models:/mimo_tiny.mopd@current", "--json", "--store", store.uri,
                "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == k["mopd"]
    # upload=True copies the payload next to the MLmodel file (default: the store only).
    up = Tracker(uri, tmp_path / "state", upload=True).log_stage(
        store.manifest(k["sft"]), "trained", None, store.uri)
    files = {f.path for f in c.list_logged_model_artifacts(up["model_id"])}
    assert {"MLmodel", "config.json"} <= files
    assert "config.json" not in {f.path for f in c.list_logged_model_artifacts(
        ids["sft"]["model_id"])}


def cli(argv: list[str]) -> int:
    """`posttrain ARGV` through the real entry point (its one error guard included)."""
    return posttrain.main(argv)


def test_unreachable_then_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    store, k = make_store(tmp_path)
    state = tmp_path / "state"
    t0 = time.time()
    tr = Tracker("http://127.0.0.1:9", state)
    pid = tr.start_run("mimo_tiny", "run-mimo_tiny", {"a": 1})
    results = [tr.log_stage(store.manifest(k[s]), "trained", pid, store.uri) for s in STAGES]
    tr.finish_run(pid, "ok", [{"stage": "mopd", "status": "trained", "eval": {"arith": 1.0}}],
                  {"lineage.md": "flowchart LR"})
    assert time.time() - t0 < 10
    assert pid is None and results == [None] * len(STAGES)
    err = capsys.readouterr().err
    assert err.count("warning: MLflow at http://127.0.0.1:9") == 1 and "posttrain sync" in err
    ops = [json.loads(x)["op"] for x in (state / PENDING).read_text().splitlines()]
    assert ops == ["start_run"] + ["log_stage"] * len(STAGES) + ["finish_run"]
    s = ["--store", store.uri, "--state-dir", str(state)]
    assert cli(["sync", "--tracking-uri", "http://127.0.0.1:9", *s]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "127.0.0.1:9" in err and "Traceback" not in err
    # MLflow is back (here: a sqlite db): sync records every stage, then has nothing to do.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert cli(["sync", "--tracking-uri", uri, *s]) == 0
    assert "recorded 7 stage run(s)" in capsys.readouterr().out
    assert not (state / PENDING).exists()
    c = client(uri)
    runs = runs_by_stage(c, "mimo_tiny")
    parent = runs["(parent)"]
    assert parent.data.tags["posttrain.run_id"] == "run-mimo_tiny"
    assert parent.data.params == {"a": "1"} and parent.info.status == "FINISHED"
    assert runs["mopd"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len(runs["mopd"].inputs.model_inputs) == 3  # parents were recorded first
    assert "lineage.md" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    student = runs_by_stage(c, "team_b")  # never in the pending file: back-filled from store
    assert student["student"].data.tags["posttrain.input.teacher.arith"] == k["rl_arith"]
    assert Lookup(Tracker(uri, state)).sync(store) == 0


def test_a_store_inside_the_state_dir_is_recorded_relative_to_it(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from artifacts.tracking import portable_store, store_at

    state = tmp_path / "state"
    assert portable_store(str(state / "store"), state) == "store"
    assert portable_store(str(tmp_path / "elsewhere"), state) == str(tmp_path / "elsewhere")
    assert portable_store("s3://bucket/store", state) == "s3://bucket/store"
    # read back from wherever the state dir was copied to: beside its MLflow database
    moved = tmp_path / "copy"
    assert store_at("store", f"sqlite:///{moved}/mlflow.db") == str(moved / "store")
    monkeypatch.setenv("POSTTRAIN_STATE_DIR", str(moved))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store_at("store", "http://127.0.0.1:5000") == str(moved / "store")
    assert store_at("/abs/store") == "/abs/store"


def test_live_stage_run_streams_curves_then_is_completed_in_place(tmp_path: Path) -> None:
    from artifacts.tracking_live import LiveStage

    store, k = make_store(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = Tracker(uri, tmp_path / "state")
    pid = tr.start_run("mimo_tiny", "run-mimo_tiny", {})
    m = store.manifest(k["mopd"])
    started = time.time() - 30.0
    live = LiveStage(tr, {"key": k["mopd"], "recipe": "mimo_tiny", "stage": "mopd",
                          "kind": "mopd", "run_id": "run-mimo_tiny"}, pid, started,
                     flush_s=0.1).start()
    live.progress(1, {"loss": 1.0, "note": "x"})
    c = client(uri)
    deadline = time.time() + 30
    while time.time() < deadline:  # visible while the stage still trains
        rid = live.run_id
        if rid and [x.value for x in c.get_metric_history(rid, "loss")] == [1.0]:
            break
        time.sleep(0.1)
    run = c.get_run(rid)
    assert run.info.status == "RUNNING" and run.data.tags["posttrain.status"] == "running"
    assert run.data.tags["mlflow.parentRunId"] == pid
    assert run.info.start_time == int(started * 1000)  # the stage's start, not the mirror's
    assert live.close() == rid
    ids = tr.log_stage(m, "trained", pid, store.uri, live_run=rid)
    assert ids["run_id"] == rid  # completed in place: one run per stage
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["posttrain.status"] == "trained"
    assert "posttrain.planned_key" not in run.data.tags
    # the manifest's history fills the steps the live rows left out, without duplicates
    want = [(1, 1.0)] + [(h["step"], h["loss"]) for h in m["metrics"]["history"][1:]]
    assert [(x.step, x.value) for x in c.get_metric_history(rid, "loss")] == want
    # and on the recipe's run, as `<stage>/<metric>` (the chart view plots top-level runs)
    assert [(x.step, x.value) for x in c.get_metric_history(pid, "mopd/loss")] == want
    # a stage that fails ends its live run FAILED, with the reason
    live = LiveStage(tr, {"key": k["sft"], "recipe": "mimo_tiny", "stage": "sft",
                          "kind": "sft", "run_id": "run-mimo_tiny"}, pid, time.time(),
                     flush_s=0.1).start()
    live.progress(3, {"loss": 2.0})
    rid = live.close()
    tr.log_failure({"key": k["sft"], "recipe": "mimo_tiny", "stage": "sft", "kind": "sft",
                    "config": {}, "run_id": "run-mimo_tiny"}, "boom", pid, rid)
    run = c.get_run(rid)
    assert run.info.status == "FAILED" and run.data.tags["posttrain.error"] == "boom"
    assert run.info.run_name == "sft (failed)"
    assert [x.value for x in c.get_metric_history(rid, "loss")] == [2.0]
