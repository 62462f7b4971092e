"""Snapshots in the MLflow mirror: one LoggedModel per published `STAGE@STEP`, an output of its
stage's run.

A snapshot (flows/snapshot.py) is recorded as it lands: the stage process hands its manifest to
the stage's live run (artifacts/tracking_live.py `LiveStage.snapshot`), whose thread writes it
here, so the MLflow UI lists `sft@2`, `sft@4` under the stage run's Logged models while the
stage still trains. Each is a LoggedModel named `<stage>@<step>` (loadable through
`models:/<id>` like a stage's, its weights in the store), `source_run_id` = the stage's run,
tags `posttrain.key` (the snapshot key: lineage consumers find it by it, `Tracker.model_id`),
`posttrain.step`, `posttrain.snapshot_of` (the stage key), and its eval per domain as model
metrics `eval.<domain>` at its step (the final model's are at the stage's last step, so the
run's eval curves run through the snapshots). Snapshots are never registered: only a stage's
final model gets a version.

A snapshot key already on a LoggedModel (a rebuilt stage republishing it, a back-fill run
again) is linked as an output of the run, not created twice. Snapshots the live run could not
record (MLflow down when the stage started) are written once the stage is published
(`Tracker.log_snapshot`, flows/stage.py `_track`), or queued as `log_snapshot` in the pending
file like any other write. A snapshot manifest given to `Tracker.write_stage` (the back-fill
walks every manifest of the store) goes to `write_backfilled`: a LoggedModel on its stage's
run, never a run or registered version of its own.

Run: ``.venv/bin/python -m pytest tests/test_snapshot_tracking.py -q``.
"""

from __future__ import annotations

import time
from typing import Any

from artifacts.store import KEY_RE


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def op(man: dict[str, Any], store_uri: str, run_id: str | None,
       mlflow_run: str | None) -> dict[str, Any]:
    """The pending-queue record of a snapshot MLflow did not get (replayed by key)."""
    snap = man.get("snapshot") or {}
    return {"op": "log_snapshot", "key": man["key"], "of": snap.get("of"),
            "step": snap.get("step"), "run_id": run_id, "mlflow_run": mlflow_run,
            "store_uri": store_uri}


def _linked(c: Any, rid: str, model_id: str) -> bool:
    outputs = getattr(c.get_run(rid), "outputs", None)
    return any(o.model_id == model_id for o in (getattr(outputs, "model_outputs", None) or []))


def write_snapshot(tracker: Any, c: Any, man: dict[str, Any], rid: str | None,
                   store_uri: str, eid: str | None = None) -> str:
    """Record the snapshot `man` on an open client, raising on error: its LoggedModel (created
    once per key) and its link as an output of the stage run `rid` at its step. `eid`: the
    experiment when there is no run. Returns the LoggedModel id."""
    from mlflow import entities as ml

    from artifacts.mlflow_util import batches as _batches
    from artifacts.mlflow_util import portable_store

    snap = man["snapshot"]
    step = int(snap["step"])
    store_uri = portable_store(store_uri, tracker.state_dir)
    model_id = tracker.model_id(c, man["key"])
    if model_id is None:
        if rid is not None:
            eid = c.get_run(rid).info.experiment_id
        extra = {"posttrain.step": str(step), "posttrain.snapshot_of": str(snap.get("of")),
                 "posttrain.snapshot_stage": str(snap.get("stage"))}
        model = tracker.logged_model(c, eid, rid, man, store_uri, None, extra_tags=extra)
        model_id = model.model_id
        ts = int(time.time() * 1000)
        if rid is not None:  # model metrics, on the stage run too: its eval curve
            _batches(c, rid, metrics=[
                ml.Metric(f"eval.{d}", float(v), ts, step, model_id=model_id)
                for d, v in ((man.get("metrics") or {}).get("eval") or {}).items() if _num(v)])
    if rid is not None and not _linked(c, rid, model_id):
        c.log_outputs(rid, [ml.LoggedModelOutput(model_id, step)])
    return model_id


def stage_run(c: Any, stage_key: str) -> str | None:
    """The MLflow run that recorded the stage `stage_key` (the newest), or None."""
    from artifacts.mlflow_util import pages

    if not KEY_RE.match(str(stage_key)):  # never put a non-key into a filter string
        return None
    ids = [e.experiment_id for e in pages(c.search_experiments)]
    runs = c.search_runs(ids, filter_string=f"tags.`posttrain.key` = '{stage_key}'",
                         order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    return runs[0].info.run_id if runs else None


def write_backfilled(tracker: Any, c: Any, man: dict[str, Any], store_uri: str) -> dict[str, Any]:
    """A snapshot manifest met by the back-fill (`Tracker.write_stage`): its LoggedModel on its
    stage's run when MLflow has that run, else in the recipe's experiment without a run (linked
    by a later back-fill once the stage is recorded)."""
    rid = stage_run(c, (man.get("snapshot") or {}).get("of"))
    eid = (c.get_run(rid).info.experiment_id if rid
           else tracker.experiment_for(c, man["recipe"]))
    model_id = write_snapshot(tracker, c, man, rid, store_uri, eid)
    return {"tracking_uri": tracker.uri, "experiment_id": eid, "run_id": rid,
            "model_id": model_id}
