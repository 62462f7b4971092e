"""Snapshots in MLflow and in the live table: a LoggedModel per `STAGE@STEP`, an output of its
stage's run (never registered), an input of the stage that consumes it; the run's live table
lists them as they are published.

The built world is a toy recipe built with `posttrain stage` per stage (no Prefect), tracking on
a throw-away sqlite MLflow in the test's state dir: sft publishes @2 and @4 with eval, `after`
trains from sft@2. Under a minute on 2 cores.

Run: ``.venv/bin/python -m pytest tests/test_snapshot_tracking.py -q``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))

from artifacts.keys import snapshot_key  # noqa: E402
from artifacts.store import Store  # noqa: E402
from artifacts.tracking import PENDING, Tracker  # noqa: E402
from flows.board import Board, Display  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

RECIPE = """\
name: snap_track
stages:
  data: {kind: data, domains: [arith], size: 64, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 0}
  sft: {kind: sft, from: base, data: data, max_steps: 6, per_device_train_batch_size: 8,
        warmup_steps: 0, eval_n: 4, snapshots: [2, 4], eval_snapshots: true}
  after: {kind: sft, from: sft@2, data: data, max_steps: 1, per_device_train_batch_size: 8,
          warmup_steps: 0, eval_n: 0}
"""
REGISTERED = {"snap_track.base", "snap_track.sft", "snap_track.after"}  # no `sft@2`, `sft@4`


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def stage(w: dict, name: str, *extra: str) -> str:
    rc, _, err = run_cli("stage", str(w["recipe"]), name, "--store", str(w["store"]),
                         "--state-dir", str(w["state"]), "--tracking-uri", w["uri"], *extra)
    assert rc == 0, err[-3000:]
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("snaptrack")
    recipe = root / "snap_track.yaml"
    recipe.write_text(RECIPE)
    w = {"recipe": recipe, "store": root / "store", "state": root / "state",
         "uri": f"sqlite:///{root}/state/mlflow.db", "progress": root / "sft.progress.jsonl"}
    saved = {k: os.environ.pop(k, None) for k in ("POSTTRAIN_TRACKING", "MLFLOW_TRACKING_URI")}
    try:
        for name in ("data", "base"):
            stage(w, name)
        stage(w, "sft", "--progress-file", str(w["progress"]))
        stage(w, "after")
        store = Store(w["store"])
        w["sft"] = store.resolve("snap_track:sft")
        w["snaps"] = {s: snapshot_key(w["sft"], s) for s in (2, 4)}
        w["after"] = store.resolve("snap_track:after")
        yield w
    finally:
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def _run_of(c: Any, key: str) -> Any:
    eids = [e.experiment_id for e in c.search_experiments()]
    (run,) = c.search_runs(eids, filter_string=f"tags.`posttrain.key` = '{key}'")
    return c.get_run(run.info.run_id)  # search_runs leaves the model inputs out


def _models(c: Any, key: str) -> list[Any]:
    eids = [e.experiment_id for e in c.search_experiments()]
    return c.search_logged_models(eids, filter_string=f"tags.`posttrain.key` = '{key}'")


def test_each_snapshot_is_a_logged_model_output_of_its_stage_run(world):
    c = client(world["uri"])
    run = _run_of(c, world["sft"])
    outputs = {o.model_id: o.step for o in run.outputs.model_outputs}
    store = Store(world["store"])
    for step, key in world["snaps"].items():
        (model,) = _models(c, key)  # one per snapshot
        assert model.name == f"sft@{step}"
        assert model.source_run_id == run.info.run_id
        assert model.tags["posttrain.step"] == str(step)
        assert model.tags["posttrain.snapshot_of"] == world["sft"]
        assert outputs[model.model_id] == step
        want = store.manifest(key)["metrics"]["eval"]["arith"]
        assert [(m.key, m.step, m.value) for m in model.metrics] == [("eval.arith", step, want)]
    (final,) = _models(c, world["sft"])
    assert outputs[final.model_id] == 6  # the final model at the stage's last step
    # the run's eval curve runs through the snapshots and ends at the final model's eval
    hist = [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "eval.arith")]
    assert [s for s, _ in hist] == [2, 4, 6]
    assert run.data.metrics["eval.arith"] == pytest.approx(
        store.manifest(world["sft"])["metrics"]["eval"]["arith"])


def test_snapshots_are_not_registered(world):
    c = client(world["uri"])
    versions = c.search_model_versions()
    assert {v.name for v in versions} == REGISTERED
    assert not {v.tags.get("posttrain.key") for v in versions} & set(world["snaps"].values())
    for key in world["snaps"].values():
        (model,) = _models(c, key)
        assert "mlflow.modelVersions" not in model.tags


def test_a_consumer_of_a_snapshot_lists_its_logged_model_as_input(world):
    c = client(world["uri"])
    (snap2,) = _models(c, world["snaps"][2])
    run = _run_of(c, world["after"])
    assert snap2.model_id in {i.model_id for i in run.inputs.model_inputs}


def test_the_progress_file_records_each_snapshot_once(world):
    rows = [json.loads(x) for x in world["progress"].read_text().splitlines()]
    snaps = [(r["snapshot"], r["key"]) for r in rows if "snapshot" in r]
    assert snaps == [(2, world["snaps"][2]), (4, world["snaps"][4])]
    board = Board(["sft"], {"sft": "sft"})
    board.update("sft", state="running", progress_file=str(world["progress"]))
    assert board.snapshots("sft") == [2, 4] and board.progress("sft")["step"] == 6


def test_rebuilding_and_back_filling_add_no_second_logged_model(world):
    stage(world, "sft", "--force")
    from artifacts.tracking_lookup import Lookup

    Lookup(Tracker(world["uri"], world["state"])).sync(Store(world["store"]))
    c = client(world["uri"])
    eids = [e.experiment_id for e in c.search_experiments()]
    for key in world["snaps"].values():
        assert len(_models(c, key)) == 1
        # the back-fill walks every manifest: a snapshot's is not a run of its own
        assert not c.search_runs(eids, filter_string=f"tags.`posttrain.key` = '{key}'")
    assert {v.name for v in c.search_model_versions()} == REGISTERED


def test_a_back_fill_into_an_empty_mlflow_links_each_snapshot_to_its_stage_run(world, tmp_path):
    """The back-fill meets a snapshot before its stage (it ended first): the LoggedModel made
    without a run is linked once the stage's run exists, in the same sync."""
    from artifacts.tracking_lookup import Lookup

    uri = f"sqlite:///{tmp_path}/fresh.db"
    Lookup(Tracker(uri, tmp_path / "state")).sync(Store(world["store"]))
    c = client(uri)
    run = _run_of(c, Store(world["store"]).resolve("snap_track:sft"))
    outputs = {o.model_id: o.step for o in run.outputs.model_outputs}
    for step, key in world["snaps"].items():
        (model,) = _models(c, key)
        assert outputs.get(model.model_id) == step, (step, outputs)


def test_a_snapshot_is_queued_when_mlflow_is_down(tmp_path):
    tr = Tracker("http://127.0.0.1:9", tmp_path / "state", warn=False)
    man = {"key": "a" * 64, "stage": "sft@2", "recipe": "r", "kind": "sft",
           "snapshot": {"of": "b" * 64, "stage": "sft", "step": 2}}
    assert tr.log_snapshot(man, "run123", str(tmp_path / "store")) is None
    (op,) = [json.loads(x) for x in (tmp_path / "state" / PENDING).read_text().splitlines()]
    assert (op["op"], op["key"], op["of"], op["step"], op["mlflow_run"]) == (
        "log_snapshot", "a" * 64, "b" * 64, 2, "run123")


def test_the_live_run_records_a_snapshot_while_the_stage_trains(tmp_path):
    from artifacts.tracking_live import LiveStage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = Tracker(uri, tmp_path / "state")
    stage_key = "b" * 64
    live = LiveStage(tr, {"key": stage_key, "recipe": "r", "stage": "rl", "kind": "grpo",
                          "run_id": "run-r"}, None, time.time(), flush_s=0.1,
                     store_uri=str(tmp_path / "store")).start()
    man = {"key": snapshot_key(stage_key, 80), "stage": "rl@80", "recipe": "r", "kind": "grpo",
           "produces": "model", "metrics": {"step": 80, "eval": {"arith": 0.25}},
           "snapshot": {"of": stage_key, "stage": "rl", "step": 80}}
    live.snapshot(man)
    c = client(uri)
    deadline = time.time() + 30
    while time.time() < deadline and not (  # written last: the link to the run
            live.run_id and c.get_run(live.run_id).outputs.model_outputs):
        time.sleep(0.1)
    (model,) = _models(c, man["key"])  # while the run is still open
    run = c.get_run(live.run_id)
    assert run.info.status == "RUNNING"
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 80)]
    assert (model.name, model.source_run_id) == ("rl@80", live.run_id)
    assert [(m.key, m.step, m.value) for m in model.metrics] == [("eval.arith", 80, 0.25)]
    assert live.close() == model.source_run_id and live.unlogged() == []


# -- the live table -----------------------------------------------------------------------------


def _progress(path: Path, *rows: dict, partial: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + partial)


def test_board_lists_snapshots_in_the_row_and_once_in_plain_lines(tmp_path):
    path = tmp_path / "rl.progress.jsonl"
    board = Board(["rl", "sft"], {"rl": "grpo", "sft": "sft"})
    board.update("rl", state="running", started=time.time(), progress_file=str(path))
    board.take_events()
    _progress(path, {"t": 1, "step": 80, "total": 200, "loss": 0.5},
              {"t": 2, "snapshot": 80, "key": "k" * 64},
              partial='{"t": 3, "step": 9')  # a line being written: read once it is whole
    board.poll()
    assert board.take_events() == ["rl: snapshot @80 published"]
    assert board.progress("rl")["step"] == 80  # the snapshot record is not a progress row
    board.poll()
    assert board.take_events() == []  # once
    with open(path, "a") as f:
        f.write('0, "total": 200}\n')
    _progress(path, {"t": 4, "snapshot": 160, "key": "m" * 64})
    assert board.progress("rl")["step"] == 90
    board.update("rl", state="trained")  # the snapshot published before it ended comes first
    assert board.take_events()[0] == "rl: snapshot @160 published"
    assert board.snapshots("rl") == [80, 160] and board.snapshots("sft") == []

    from rich.console import Console

    board.update("rl", state="running")
    out = io.StringIO()
    Console(file=out, width=160).print(Display(board, io.StringIO())._table())
    row = next(x for x in out.getvalue().splitlines() if x.startswith("rl"))
    assert "@80 @160" in row and "90/200" in row


def test_plain_display_prints_a_published_snapshot(tmp_path):
    path = tmp_path / "rl.progress.jsonl"
    board = Board(["rl"], {"rl": "grpo"})
    stream = io.StringIO()
    with Display(board, stream):
        board.update("rl", state="running", progress_file=str(path))
        _progress(path, {"t": 1, "step": 80, "total": 200},
                  {"t": 2, "snapshot": 80, "key": "k" * 64})
        deadline = time.time() + 10
        while "snapshot" not in stream.getvalue() and time.time() < deadline:
            time.sleep(0.1)
    lines = stream.getvalue().splitlines()
    assert sum("rl: snapshot @80 published" in x for x in lines) == 1
    assert all(x.startswith("[") for x in lines)  # timestamped
