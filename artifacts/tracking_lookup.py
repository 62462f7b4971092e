"""Reading the MLflow mirror back, and back-filling it: `models:/` URIs to store keys,
registered versions by key (`posttrain impact`), and `posttrain sync`. Also the one REF
resolver, `resolve_ref`, since a REF may name an artifact in the store or in MLflow.

The writer is artifacts/tracking.py: a `Lookup` wraps one Tracker and goes only through its
public connection (`client`: file lock and known-down check; `mark_down`) and its raw writers
(`write_run`, `write_stage`, `write_finish`), which the back-fill replays so that a back-filled
stage looks exactly like one recorded live. `sync` replays ``<state_dir>/mlflow_pending.jsonl``
(what a Tracker queued while MLflow was down), then records every store manifest MLflow does not
know (by tag posttrain.key). mlflow is imported only when MLflow is asked something.

Run: ``posttrain sync`` or ``posttrain show models:/mimo_tiny.mopd@current``
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from artifacts.store import DEFAULT_STATE, RefError, Store, check_key
from artifacts.tracking import PENDING, Tracker, pages


def resolve_ref(ref: str, store: Store, tracking_uri: str | None = None,
                state_dir: str | Path | None = None) -> str:
    """The key behind any REF a user or a recipe's `use:` writes: a key, a unique key prefix
    (>= 8 hex), `recipe:stage`, or `models:/NAME@ALIAS|/VERSION` (asked of MLflow, and then
    it must be in `store` too: a key from elsewhere would be built on but never found).
    Raises store.RefError naming the REF and the fix."""
    ref = ref.strip()
    if not ref.startswith("models:/"):
        return store.resolve(ref)
    key = resolve_model_uri(ref, tracking_uri, state_dir or DEFAULT_STATE)
    if not store.has(key):
        raise RefError(f"{ref} points at key {key[:12]}, which is not in {store.uri} "
                       "(pass the --store that holds it)")
    return key


def resolve_model_uri(uri: str, tracking_uri: str | None = None,
                      state_dir: str | Path = DEFAULT_STATE) -> str:
    """Lookup.resolve_model_uri for callers that hold no Tracker (a query never warns)."""
    return Lookup(Tracker(tracking_uri, state_dir, warn=False)).resolve_model_uri(uri)


class Lookup:
    """Queries and back-fill over one Tracker's connection, so they share its file lock and its
    memory of MLflow being down. `last_error` is the Tracker's (what `impact` reports)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    @property
    def uri(self) -> str:
        """The tracking URI asked."""
        return self.tracker.uri

    @property
    def last_error(self) -> str | None:
        """Why MLflow was unreachable, or None."""
        return self.tracker.last_error

    # -- back-fill -----------------------------------------------------------------------------
    def sync(self, store: Any) -> int:
        """Replay the pending file, then back-fill the store; returns how many stages were
        recorded: 0 (and last_error set) when MLflow is down. Lines queued while this ran stay
        in the pending file for next time."""
        path = self.tracker.state_dir / PENDING
        lines = path.read_text().splitlines() if path.is_file() else []
        try:
            with self.tracker.client() as c:
                n = self._replay(c, store, [json.loads(x) for x in lines if x.strip()])
        except RefError:  # a corrupt ref or manifest in the store, not MLflow being down
            raise
        except Exception as e:
            self.tracker.mark_down(e)
            return 0
        _drop_replayed(path, len(lines))
        return n

    def _replay(self, c: Any, store: Any, ops: list[dict[str, Any]]) -> int:
        """Record the queued ops, then every manifest MLflow lacks, oldest first."""
        tracker = self.tracker
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
                parents[op["run_id"]] = tracker.write_run(c, op["recipe"], op["run_id"],
                                                          op["params"])
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
                    parents[run_id] = tracker.write_run(c, m["recipe"], run_id, {}, backfilled=True)
                    opened.append(parents[run_id])
                parent = parents.get(run_id)
            ids = tracker.write_stage(c, m, status, parent, store.uri, run_id)
            if status == "trained" and store.mlflow_ids(m["key"]) is None:
                with contextlib.suppress(OSError, RefError):  # best effort, as live
                    store.set_mlflow_ids(m["key"], ids)
        # A snapshot back-filled before its stage had a run (it ended first) got a LoggedModel
        # without one; now that the stage is recorded, link it (queued `log_snapshot` ops are
        # these same manifests: the back-fill walks every snapshot in the store).
        for m, *_ in todo:
            if m.get("snapshot"):
                from artifacts.tracking_snapshots import write_backfilled

                write_backfilled(tracker, c, m, store.uri)
        for op in ops:  # builds or publishes that failed while MLflow was down
            if op["op"] == "log_failure":
                pid = (op["parent_run_id"] if op.get("parent_run_id") in run_ids
                       else parents.get(op.get("run_id")))
                tracker.write_failure(c, op["stage"], op["reason"], pid, op.get("run_id"))
        for op in ops:
            pid = op["parent_run_id"] if op.get("parent_run_id") in run_ids else None
            if op["op"] == "finish_run" and (pid := pid or parents.get(op.get("run_id"))):
                tracker.write_finish(c, pid, op["status"], op["summary"], op["figures"])
                opened = [x for x in opened if x != pid]
        for pid in opened:  # runs that never reported their end (crashed, or back-filled)
            c.set_terminated(pid, "FINISHED")
        return len(todo)

    # -- registry look-ups ---------------------------------------------------------------------
    def versions_for_keys(self, keys: set[str]) -> list[dict[str, Any]] | None:
        """Registered versions tagged with one of `keys`, by (name, version); None if down."""
        tracker = self.tracker
        try:
            with tracker.client() as c:
                hits = [c.get_model_version(v.name, v.version)  # search leaves aliases out
                        for v in pages(c.search_model_versions, max_results=10000)
                        if v.tags.get("posttrain.key") in keys]
        except Exception as e:
            tracker.mark_down(e)
            return None
        return sorted(({"name": v.name, "version": v.version, "aliases": list(v.aliases or []),
                        "key": v.tags["posttrain.key"], "uri": f"models:/{v.name}/{v.version}"}
                       for v in hits), key=lambda r: (r["name"], int(r["version"])))

    def resolve_model_uri(self, uri: str) -> str:
        """The store key behind `models:/name@alias`, `models:/name/version` or `models:/m-id`
        (its tag posttrain.key); RefError naming the URI and the fix."""
        tracker = self.tracker
        if (db := tracker.db_path()) is not None and not db.exists():
            raise RefError(f"cannot resolve {uri!r}: no MLflow database at {db} (pass "
                           "--tracking-uri, or use a key or recipe:stage)")
        try:
            with tracker.client() as c:
                tags = _model_tags(c, uri[len("models:/"):] if uri.startswith("models:/") else "")
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise RefError(f"cannot resolve {uri!r} through MLflow at {tracker.uri}: {msg} (check "
                           "the name and alias, or pass --tracking-uri)") from None
        if not tags.get("posttrain.key"):
            raise RefError(f"{uri!r} has no posttrain.key tag: posttrain did not register it "
                           "(use a key or recipe:stage)")
        # A tag is anyone's to write: the key it holds becomes a path under the store.
        return check_key(tags["posttrain.key"], f"{uri}: MLflow tag posttrain.key",
                         "that registry entry was not written by posttrain or was altered: "
                         "delete it, or use a key or recipe:stage")


def _drop_replayed(path: Path, n: int) -> None:
    from filelock import FileLock

    with FileLock(f"{path}.lock", thread_local=False):
        rest = path.read_text().splitlines()[n:] if path.is_file() else []
        if rest:  # queued by a run while we synced: keep it for next time
            path.write_text("\n".join(rest) + "\n")
        elif path.is_file():
            path.unlink()


def _model_tags(c: Any, body: str) -> dict[str, str]:
    """Tags of `name@alias`, `name/version` (a registered version) or `m-<id>` (LoggedModel)."""
    if "@" in body:
        return c.get_model_version_by_alias(*body.split("@", 1)).tags
    if "/" in body:
        return c.get_model_version(*body.rsplit("/", 1)).tags
    if body.startswith("m-"):
        return c.get_logged_model(body).tags
    raise ValueError("expected models:/NAME@ALIAS or models:/NAME/VERSION")
