"""Back-fill and registry look-ups of the MLflow mirror: the work behind `Tracker.sync`,
`Tracker.versions_for_keys` and `Tracker.resolve_model_uri` (artifacts/tracking.py).

`sync` replays ``<state_dir>/mlflow_pending.jsonl`` (what a Tracker queued while MLflow was
down), then records every store manifest MLflow does not know (by tag posttrain.key). The
look-ups map store keys to registered model versions, and `models:/` URIs back to store keys.
Each function takes the Tracker and goes through its client (file lock, known-down check) and
its error handling. This module imports neither mlflow nor artifacts.tracking at import time.

Run: ``posttrain sync --store .posttrain/store`` or ``posttrain impact mimo_tiny:data``
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.store import RefError

if TYPE_CHECKING:
    from artifacts.tracking import Tracker

PENDING = "mlflow_pending.jsonl"  # appended to by Tracker._safe, replayed by sync


def pages(fn: Callable[..., Any], *args: Any, **kw: Any) -> list[Any]:
    """Every item of a paged MLflow search (`fn` takes page_token=)."""
    out, token = [], None
    while True:
        page = fn(*args, page_token=token, **kw)
        out.extend(page)
        if not (token := page.token):
            return out


# -- back-fill ---------------------------------------------------------------------------------
def sync(tracker: Tracker, store: Any) -> int:
    """Replay the pending file, then back-fill the store; 0 (and tracker.last_error set) when
    MLflow is down. Lines queued while this ran stay in the pending file for next time."""
    path = tracker.state_dir / PENDING
    lines = path.read_text().splitlines() if path.is_file() else []
    try:
        with tracker._client() as c:
            n = _replay(tracker, c, store, [json.loads(x) for x in lines if x.strip()])
    except Exception as e:
        tracker._fail(e)
        return 0
    _drop_replayed(path, len(lines))
    return n


def _drop_replayed(path: Path, n: int) -> None:
    from filelock import FileLock

    with FileLock(f"{path}.lock", thread_local=False):
        rest = path.read_text().splitlines()[n:] if path.is_file() else []
        if rest:  # queued by a run while we synced: keep it for next time
            path.write_text("\n".join(rest) + "\n")
        elif path.is_file():
            path.unlink()


def _replay(tracker: Tracker, c: Any, store: Any, ops: list[dict[str, Any]]) -> int:
    ids = [e.experiment_id for e in pages(c.search_experiments)]
    runs = pages(c.search_runs, ids, max_results=5000) if ids else []
    run_ids = {r.info.run_id for r in runs}
    tags = [r.data.tags for r in runs]
    known = {(t.get("posttrain.key"), t.get("posttrain.run_id") or None) for t in tags}
    parents = {t["posttrain.run_id"]: r.info.run_id for t, r in zip(tags, runs, strict=True)
               if t.get("posttrain.role") == "run"}
    opened: list[str] = []  # parent runs created here: closed at the end
    for op in ops:
        if op["op"] == "start_run" and op["run_id"] not in parents:
            parents[op["run_id"]] = tracker._start(c, op["recipe"], op["run_id"], op["params"])
            opened.append(parents[op["run_id"]])
    todo = [(m, op["status"], op.get("run_id"), op["parent_run_id"]) for op in ops
            if op["op"] == "log_stage" and (op["key"], op.get("run_id")) not in known
            and (m := store.manifest(op["key"])) is not None]
    keys = {t.get("posttrain.key") for t in tags} | {t[0]["key"] for t in todo}
    todo += [(m, "trained", m.get("run_id"), None) for m in store.iter_manifests()
             if m["key"] not in keys]
    # Parents end before children: models exist before their consumers link them.
    todo.sort(key=lambda t: (t[0].get("timings") or {}).get("ended_unix") or 0)
    for m, status, run_id, parent in todo:
        if parent not in run_ids:
            if run_id and run_id not in parents:
                parents[run_id] = tracker._start(c, m["recipe"], run_id, {}, backfilled=True)
                opened.append(parents[run_id])
            parent = parents.get(run_id)
        tracker._log_stage(c, m, status, parent, store.uri, run_id)
    for op in ops:
        pid = op["parent_run_id"] if op.get("parent_run_id") in run_ids else None
        if op["op"] == "finish_run" and (pid := pid or parents.get(op.get("run_id"))):
            tracker._finish(c, pid, op["status"], op["summary"], op["figures"])
            opened = [x for x in opened if x != pid]
    for pid in opened:  # runs that never reported their end (crashed, or back-filled)
        c.set_terminated(pid, "FINISHED")
    return len(todo)


# -- registry look-ups -------------------------------------------------------------------------
def versions_for_keys(tracker: Tracker, keys: set[str]) -> list[dict[str, Any]] | None:
    """Registered versions tagged with one of `keys`, sorted by (name, version); None if down."""
    try:
        with tracker._client() as c:
            hits = [c.get_model_version(v.name, v.version)  # search leaves aliases out
                    for v in pages(c.search_model_versions, max_results=10000)
                    if v.tags.get("posttrain.key") in keys]
    except Exception as e:
        tracker._fail(e)
        return None
    return sorted(({"name": v.name, "version": v.version, "aliases": list(v.aliases or []),
                    "key": v.tags["posttrain.key"], "uri": f"models:/{v.name}/{v.version}"}
                   for v in hits), key=lambda r: (r["name"], int(r["version"])))


def resolve_model_uri(tracker: Tracker, uri: str) -> str:
    """The posttrain.key tag behind a `models:/` URI; RefError naming the URI and the fix."""
    if (db := tracker._db()) is not None and not db.exists():
        raise RefError(f"cannot resolve {uri!r}: no MLflow database at {db} (pass "
                       "--tracking-uri, or use a key or recipe:stage)")
    try:
        with tracker._client() as c:
            tags = _model_tags(c, uri[len("models:/"):] if uri.startswith("models:/") else "")
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RefError(f"cannot resolve {uri!r} through MLflow at {tracker.uri}: {msg} (check "
                       "the name and alias, or pass --tracking-uri)") from None
    if not tags.get("posttrain.key"):
        raise RefError(f"{uri!r} has no posttrain.key tag: posttrain did not register it "
                       "(use a key or recipe:stage)")
    return tags["posttrain.key"]


def _model_tags(c: Any, body: str) -> dict[str, str]:
    """Tags of `name@alias`, `name/version` (a registered version) or `m-<id>` (LoggedModel)."""
    if "@" in body:
        return c.get_model_version_by_alias(*body.split("@", 1)).tags
    if "/" in body:
        return c.get_model_version(*body.rsplit("/", 1)).tags
    if body.startswith("m-"):
        return c.get_logged_model(body).tags
    raise ValueError("expected models:/NAME@ALIAS or models:/NAME/VERSION")
