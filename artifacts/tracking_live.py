"""A stage's MLflow run, open while the stage trains: its curves stream into the UI live.

`LiveStage` opens the stage run when the stage starts (start time = the stage's start, so the
UI's Duration is the stage's own time) and sends the progress rows the kind reports to it in
batches every few seconds, from a thread of its own, so training never waits on MLflow. When
the stage is published, `Tracker.log_stage(..., live_run=ID)` completes that same run (config,
the full history where the live rows left steps out, eval, LoggedModel, registered version)
and ends it; a failed build ends it FAILED with the reason (`Tracker.log_failure`). The same
rows go to the parent run as `<stage>/<metric>` (MLflow's chart view plots top-level runs, so
the recipe run's charts show every stage's curves, one section per stage).

Snapshots published while the stage trains (flows/snapshot.py) are handed over with
`snapshot(manifest)` and written by the same thread at its next flush: a LoggedModel
`<stage>@<step>` per snapshot, an output of this run (artifacts/tracking_snapshots.py), so the
UI lists them as they land. Those it could not write (`unlogged()`) are recorded once the stage
is published (flows/stage.py `_track`).

MLflow being down is never fatal here: the first error stops the streaming with one warning,
and the stage is recorded once it is published, as without a live run (the pending queue and
`posttrain sync` cover the rest).

Run: ``.venv/bin/python -m pytest tests/test_tracking.py -q -k live``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

FLUSH_S = 3.0  # how often the buffered rows go to MLflow: live enough, and few requests


class LiveStage:
    """The MLflow run of one stage while it trains (see the module docstring)."""

    def __init__(self, tracker: Any, stage: dict[str, Any], parent_run: str | None,
                 started: float, flush_s: float = FLUSH_S, store_uri: str | None = None
                 ) -> None:
        self.tracker, self.stage, self.parent = tracker, stage, parent_run
        self.started, self.flush_s, self.store_uri = started, flush_s, store_uri
        self.run_id: str | None = None
        self._rows: list[tuple[int, dict[str, float]]] = []
        self._snaps: list[dict[str, Any]] = []  # snapshot manifests not in MLflow yet
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._dead = False
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                         name="posttrain-mlflow-live")

    def start(self) -> LiveStage:
        self._thread.start()
        return self

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        """Buffer one progress row (numbers only); never blocks on MLflow."""
        row = {k: float(v) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
        if row and not self._dead:
            with self._lock:
                self._rows.append((int(step), row))

    def snapshot(self, manifest: dict[str, Any]) -> None:
        """Queue a published snapshot's manifest for its LoggedModel; never blocks on MLflow
        (kept for `unlogged()` once the streaming stopped)."""
        with self._lock:
            self._snaps.append(manifest)

    def unlogged(self) -> list[dict[str, Any]]:
        """The snapshot manifests this run did not record (MLflow down, or not flushed)."""
        with self._lock:
            return list(self._snaps)

    def close(self) -> str | None:
        """Stop streaming, send what is buffered; the run id (None: MLflow was unreachable).
        The run stays open for `log_stage` / `log_failure` to complete and end."""
        self._done.set()
        self._thread.join(timeout=60)
        return self.run_id if not self._dead else None

    def _loop(self) -> None:
        try:
            self.run_id = self.tracker.open_stage(self.stage, self.parent, self.started)
            if self.run_id is None:
                self._dead = True
                return
            while True:
                finished = self._done.wait(self.flush_s)
                self._flush()
                if finished:
                    return
        except Exception as e:  # MLflow went away: the published stage is recorded later
            self._dead = True
            print(f"warning: stage {self.stage.get('stage')}: live MLflow curves stopped ({e})",
                  file=sys.stderr)

    def _flush(self) -> None:
        from mlflow import entities as ml

        with self._lock:
            rows, self._rows = self._rows, []
            snaps = list(self._snaps)
        if self.run_id is None or not (rows or snaps):
            return
        if snaps and self.store_uri:
            self._write_snapshots(snaps)
        if not rows:
            return
        ts = int(time.time() * 1000)
        name = self.stage.get("stage")
        metrics = [ml.Metric(k, v, ts, step) for step, row in rows for k, v in row.items()]
        with self.tracker.client() as c:
            # The parent run gets them too, as `<stage>/<metric>`: the experiment's chart
            # view shows top-level runs, so that is where a run's curves are seen at a glance.
            for rid, ms in ((self.run_id, metrics), (self.parent, [
                    ml.Metric(f"{name}/{m.key}", m.value, ts, m.step) for m in metrics])):
                for i in range(0, len(ms), 1000) if rid else ():  # a batch holds <= 1000
                    c.log_batch(rid, metrics=ms[i:i + 1000])

    def _write_snapshots(self, snaps: list[dict[str, Any]]) -> None:
        from artifacts.tracking_snapshots import write_snapshot

        for man in snaps:
            with self.tracker.client() as c:
                write_snapshot(self.tracker, c, man, self.run_id, str(self.store_uri))
            with self._lock:
                self._snaps.remove(man)
