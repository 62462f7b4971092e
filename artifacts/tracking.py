"""The MLflow mirror's writer: parent run per `posttrain run`, nested run per stage,
LoggedModels that point at the store, registered versions with an alias.

The manifests stay the source of truth; MLflow is a view for people and UIs. Every public write
(start_run, log_stage, finish_run) swallows MLflow / connection errors: it warns once on
stderr, appends the work to ``<state_dir>/mlflow_pending.jsonl`` and returns None, so a run
completes with MLflow down. Reading MLflow back (`models:/` URIs, registered versions) and the
back-fill that replays that file (`posttrain sync`) live in artifacts/tracking_lookup.py, which
uses this module's public connection (`client`, `mark_down`) and raw writers (`write_*`); this
module never imports it. mlflow is imported inside methods only (2 s): importing stays cheap.

Run: ``posttrain run recipes/mimo_tiny.yaml`` (writes ``sqlite:///.posttrain/mlflow.db``)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from artifacts.mlflow_util import batches as _batches
from artifacts.mlflow_util import flatten, pages, portable_store, store_at  # noqa: F401 (re-exported)
from artifacts.mlflow_util import is_num as _num
from artifacts.store import KEY_RE, is_no_space, no_space_error

PENDING = "mlflow_pending.jsonl"  # in state_dir: appended to by Tracker, replayed by sync
ALIAS = "current"  # "latest" is reserved by MLflow's registry
# A dead server must cost seconds, not MLflow's default 7 retries x 120 s timeout.
ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_DISABLE_TELEMETRY": "true"}
RUN_STATUS = {"ok": "FINISHED", "completed": "FINISHED", "success": "FINISHED",
              "failed": "FAILED", "error": "FAILED", "cancelled": "KILLED", "killed": "KILLED"}


def _source_tags(m: dict[str, Any] | None = None) -> dict[str, str]:
    """MLflow's own source tags (the run list's Source and git commit columns): from the
    manifest for a stage, from the checkout for a run."""
    if m is not None:
        commit = m.get("git_commit")
    else:
        from artifacts.manifest import git_state

        commit = git_state()[0]
    out = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "posttrain"}
    if commit:
        out["mlflow.source.git.commit"] = str(commit)
    return out


def _save_pyfunc(d: str, store_uri: str, key: str) -> None:
    """MLmodel + code (flows/mlflow_pyfunc.py) of a model loadable with
    `mlflow.pyfunc.load_model`; the weights stay in the store (model_config {store, key})."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    code = Path(__file__).resolve().parents[1] / "flows" / "mlflow_pyfunc.py"
    sig = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                         outputs=Schema([ColSpec("string", "completion")]),
                         params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]))
    with warnings.catch_warnings():  # no input example: it would load the weights to check
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(f"{d}/model", python_model=str(code), signature=sig,
                                 model_config={"store": store_uri, "key": key},
                                 pip_requirements=["posttrain"])
    for f in Path(d, "model").iterdir():  # the MLmodel file at the artifact root
        f.rename(Path(d) / f.name)
    Path(d, "model").rmdir()


def _prefixed_history(c: Any, parent: str, m: dict[str, Any], ts: int) -> list[Any]:
    """A stage's history as `<stage>/<metric>` rows for the parent run, less those the live
    stream already sent there."""
    from mlflow.entities import Metric

    stage = m.get("stage")
    have = {k for k in c.get_run(parent).data.metrics if k.startswith(f"{stage}/")}
    sent = {(k, x.step) for k in have for x in c.get_metric_history(parent, k)}
    out = []
    for i, h in enumerate((m.get("metrics") or {}).get("history") or []):
        step = int(h.get("step", i))
        out += [Metric(f"{stage}/{k}", float(v), ts, step) for k, v in h.items()
                if k != "step" and _num(v) and (f"{stage}/{k}", step) not in sent]
    return out


class Tracker:
    """One MLflow mirror per process. Thread-safe; sqlite writers of several processes are
    serialised by a file lock beside the database ("database is locked" otherwise)."""

    def __init__(self, tracking_uri: str | None = None, state_dir: str | Path = ".posttrain", *,
                 upload: bool = False, warn: bool = True) -> None:
        self.state_dir = Path(state_dir)
        # --tracking-uri, else the ecosystem's own MLFLOW_TRACKING_URI, else a local sqlite
        self.uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"sqlite:///{(self.state_dir / 'mlflow.db').absolute()}")
        self.upload, self.warn = upload, warn
        self.last_error: str | None = None
        self._lock = threading.RLock()
        self._run: tuple[str, str] | None = None  # (recipe, posttrain run id) from start_run
        self._models: dict[str, str] = {}  # store key -> LoggedModel id
        for k, v in ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)

    # -- the connection: also what artifacts/tracking_lookup.py reads and back-fills through -
    def db_path(self) -> Path | None:
        """The sqlite file behind a `sqlite:///` URI (None for a server): look-ups must not
        create a database just to find it empty."""
        return Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """An MlflowClient under the sqlite file lock; raises at once (ConnectionError) once
        MLflow is known to be down, so a dead server costs one timeout per process, not one per
        call."""
        if self.last_error:
            raise ConnectionError(self.last_error)  # known down: do not wait a second time
        u = urlparse(self.uri)
        if u.scheme in ("http", "https"):  # a dead host fails here in 3 s, before any retry
            port = u.port or (443 if u.scheme == "https" else 80)
            socket.create_connection((u.hostname, port), timeout=3).close()
        with self._lock, contextlib.ExitStack() as stack:
            if (db := self.db_path()) is not None:
                from filelock import FileLock

                db.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(FileLock(f"{db}.lock", timeout=120, thread_local=False))
            # quiet first-use migrations and the registry's "Waiting up to 300 seconds"
            for name in ("mlflow.store.db.utils", "alembic",
                         "mlflow.store.model_registry.abstract_store"):
                logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow import MlflowClient

            yield MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def mark_down(self, e: BaseException) -> None:
        """Remember that MLflow failed (`last_error`) and warn once, so every later call of
        this process skips it instead of waiting on it again."""
        if self.last_error is None:
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            self.last_error = f"{type(e).__name__}: {msg}"
            if self.warn:
                print(f"warning: MLflow at {self.uri} is unavailable ({self.last_error}); "
                      f"continuing without it, work queued in {self.state_dir / PENDING}: "
                      "run `posttrain sync` when it is back", file=sys.stderr)

    def _safe(self, op: dict[str, Any], fn: Callable[[Any], Any]) -> Any:
        try:
            with self.client() as c:
                return fn(c)
        except Exception as e:  # any MLflow / sqlalchemy / network error: never fail the run
            self.mark_down(e)
            from filelock import FileLock

            path = self.state_dir / PENDING
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                with FileLock(f"{path}.lock", thread_local=False), open(path, "a") as f:
                    f.write(json.dumps(dict(op, queued=time.time()), default=str) + "\n")
            except OSError as err:  # e.g. the state dir is full: still never fail the run
                why = no_space_error(err, path) if is_no_space(err) else err
                print(f"warning: MLflow work not queued in {path} ({why}); run `posttrain "
                      "sync` later to record it from the store", file=sys.stderr)
            return None

    def _experiment(self, c: Any, name: str) -> str:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        db = self.db_path()  # artifacts beside a local db, never in ./mlruns of the cwd
        return c.create_experiment(name, artifact_location=(db.parent / "mlartifacts" / name)
                                   .as_uri() if db else None)

    def experiment_for(self, c: Any, recipe: str) -> str:
        """The experiment this tracker's run writes to (its recipe's; `recipe` without a run)."""
        return self._experiment(c, self._run[0] if self._run else recipe)

    def model_id(self, c: Any, key: str) -> str | None:
        """The LoggedModel recorded for store key `key` (a stage's or a snapshot's), or None."""
        if not KEY_RE.match(str(key)):  # never put a non-key into a filter string
            return None
        if key not in self._models:  # across experiments: another recipe may have built it
            ids = [e.experiment_id for e in pages(c.search_experiments)]
            hits = c.search_logged_models(ids, filter_string=f"tags.`posttrain.key` = '{key}'",
                                          max_results=1) if ids else []
            if not hits:
                return None
            self._models[key] = hits[0].model_id
        return self._models[key]

    # -- what the flow and the stage runner call -------------------------------------------
    def start_run(self, recipe: str, run_id: str, params: dict[str, Any]) -> str | None:
        """The parent run of one `posttrain run` (experiment = recipe); its MLflow run id."""
        self._run = (recipe, run_id)
        op = {"op": "start_run", "recipe": recipe, "run_id": run_id, "params": params}
        return self._safe(op, lambda c: self.write_run(c, recipe, run_id, params))

    def write_run(self, c: Any, recipe: str, run_id: str, params: dict[str, Any],
                  backfilled: bool = False) -> str:
        """start_run's work on an open client, raising on error: start_run queues the failure,
        the back-fill (artifacts/tracking_lookup.py) replays it with the same code."""
        from mlflow.entities import Param

        tags = {"posttrain.run_id": run_id, "posttrain.recipe": recipe, "posttrain.role": "run",
                "posttrain.backfilled": str(backfilled).lower(), **_source_tags()}
        rid = c.create_run(self._experiment(c, recipe), run_name=run_id,  # recipe-date-nonce
                           tags=tags).info.run_id
        _batches(c, rid, params=[Param(k, v) for k, v in flatten(params).items()])
        return rid

    def open_stage(self, stage: dict[str, Any], parent_run_id: str | None,
                   started: float) -> str | None:
        """The run of a stage that starts now (artifacts/tracking_live.py streams its curves;
        `log_stage(..., live_run=)` completes it). `stage` is {key, recipe, stage, kind,
        run_id}. None when MLflow is down (nothing queued: the published stage is)."""
        try:
            with self.client() as c:
                recipe = self._run[0] if self._run else stage["recipe"]
                eid = (c.get_run(parent_run_id).info.experiment_id if parent_run_id
                       else self._experiment(c, recipe))
                tags = {"posttrain.planned_key": stage["key"], "posttrain.stage": stage["stage"],
                        "posttrain.status": "running", "posttrain.kind": stage["kind"],
                        "posttrain.recipe": stage["recipe"],
                        "posttrain.run_id": stage.get("run_id") or "", **_source_tags()}
                if parent_run_id:
                    tags["mlflow.parentRunId"] = parent_run_id
                return c.create_run(eid, run_name=str(stage["stage"]),
                                    start_time=int(started * 1000),
                                    tags={k: str(v) for k, v in tags.items()}).info.run_id
        except Exception as e:
            self.mark_down(e)
            return None

    def log_stage(self, manifest: dict[str, Any], status: str, parent_run_id: str | None,
                  store_uri: str, payload_dir: str | Path | None = None,
                  live_run: str | None = None) -> dict[str, Any] | None:
        """A nested run for one stage: "trained" records config, curves, eval, a LoggedModel and
        a registered version; "reused" only links the existing LoggedModel. `live_run`: the
        run `open_stage` opened when it started, completed instead of a new one. Returns
        {tracking_uri, experiment_id, run_id, model_id} (None when MLflow is down)."""
        run_id = self._run[1] if self._run else manifest.get("run_id")
        op = {"op": "log_stage", "key": manifest["key"], "status": status, "run_id": run_id,
              "parent_run_id": parent_run_id, "store_uri": store_uri}
        return self._safe(op, lambda c: self.write_stage(c, manifest, status, parent_run_id,
                                                         store_uri, run_id, payload_dir,
                                                         live_run))

    def write_stage(self, c: Any, m: dict[str, Any], status: str, parent: str | None,
                    store_uri: str, run_id: str | None, payload_dir: Any = None,
                    live_run: str | None = None) -> dict[str, Any]:
        """log_stage's work on an open client, raising on error (also what the back-fill
        replays, so a back-filled stage looks exactly like one recorded live). A snapshot's
        manifest gets a LoggedModel on its stage's run instead (artifacts/tracking_snapshots.py)."""
        if m.get("snapshot"):
            from artifacts import tracking_snapshots

            return tracking_snapshots.write_backfilled(self, c, m, store_uri)
        from mlflow import entities as ml

        from artifacts.lineage import input_edges  # edge labels exactly as lineage shows them

        store_uri = portable_store(store_uri, self.state_dir)
        # The consuming run's experiment: a reused artifact of recipe A shows up under B's run.
        recipe = self._run[0] if self._run else m["recipe"]
        eid = c.get_run(parent).info.experiment_id if parent else self._experiment(c, recipe)
        existing = self.model_id(c, m["key"])
        link_only = status == "reused" and existing is not None
        edges = input_edges(m)
        tags = {"posttrain.key": m["key"], "posttrain.stage": m.get("stage"),
                "posttrain.status": status, "posttrain.kind": m.get("kind"),
                "posttrain.recipe": m.get("recipe"), "posttrain.sft_root": m.get("sft_root") or "",
                "posttrain.store": store_uri, "posttrain.run_id": run_id or "",
                **_source_tags(m),
                **{f"posttrain.input.{role.replace(':', '.')}": p for role, p, _ in edges},
                **{f"posttrain.input_stage.{role.replace(':', '.')}":
                   f"{r.get('recipe')}:{r.get('stage')}" for role, _, r in edges
                   if r.get("stage")}}
        if parent:
            tags["mlflow.parentRunId"] = parent
        # A trained stage's run spans its training (the manifest's timings), so MLflow's
        # Duration column is the stage's own time, not the few ms of this mirror.
        t = (m.get("timings") or {}) if status == "trained" else {}
        start = int(t["started_unix"] * 1000) if _num(t.get("started_unix")) else None
        end = int(t["ended_unix"] * 1000) if _num(t.get("ended_unix")) else None
        streamed: set[tuple[str, int]] = set()  # (metric, step) rows the live run sent
        if live_run and not link_only:
            rid = live_run
            eid = c.get_run(rid).info.experiment_id
            c.log_batch(rid, tags=[ml.RunTag(k, str(v)) for k, v in tags.items()])
            c.delete_tag(rid, "posttrain.planned_key")
            for name in c.get_run(rid).data.metrics:
                streamed |= {(name, x.step) for x in c.get_metric_history(rid, name)}
        else:
            rid = c.create_run(eid, run_name=f"{m.get('stage')}"
                               f"{' (reused)' if link_only else ''}", start_time=start,
                               tags={k: str(v) for k, v in tags.items()}).info.run_id
        model_id = existing
        if link_only:
            c.log_inputs(rid, models=[ml.LoggedModelInput(existing)])
        else:
            metrics = m.get("metrics") or {}
            ts = int(time.time() * 1000)
            # the final model at the last step: after its snapshots' (tracking_snapshots.py)
            last = max([int(h.get("step", i)) for i, h in enumerate(metrics.get("history") or [])
                        if _num(h.get("step", i))] + [0])
            rows = [ml.Metric(f"train.{k}", float(v), ts, 0)
                    for k, v in (metrics.get("train") or {}).items() if _num(v)]
            for i, h in enumerate(metrics.get("history") or []):
                rows += [ml.Metric(k, float(v), ts, int(h.get("step", i))) for k, v in h.items()
                         if k != "step" and _num(v)
                         and (k, int(h.get("step", i))) not in streamed]
            _batches(c, rid, [ml.Param(k, v) for k, v in flatten(m.get("config") or {}).items()],
                     rows)
            if parent:  # the curves on the recipe run too (tracking_live.py: chart view)
                _batches(c, parent, metrics=_prefixed_history(c, parent, m, ts))
            models = [ml.LoggedModelInput(x) for _, p, _ in edges if (x := self.model_id(c, p))]
            data = [ml.DatasetInput(ml.Dataset(f"{r['recipe']}:{r['stage']}" if r.get("stage")
                                         else role, p[:32], "posttrain",
                                         json.dumps({"store": store_uri, "key": p})),
                                 [ml.InputTag("mlflow.data.context", role)])
                    for role, p, r in edges if role.startswith("data:")]
            if m.get("produces") == "dataset":  # a data set, not a model: no LoggedModel
                data.append(ml.DatasetInput(
                    ml.Dataset(f"{m.get('recipe')}:{m.get('stage')}", m["key"][:32],
                               "posttrain", json.dumps({"store": store_uri, "key": m["key"]})),
                    [ml.InputTag("mlflow.data.context", "output")]))
            if models or data:
                c.log_inputs(rid, datasets=data or None, models=models or None)
            if m.get("produces") == "dataset":
                model = None
                model_id = None
            else:
                model = self.logged_model(c, eid, rid, m, store_uri, payload_dir)
                model_id = model.model_id
                c.log_outputs(rid, [ml.LoggedModelOutput(model_id, last)])
            # Eval metrics belong to the run and to its LoggedModel (MLflow 3 model metrics).
            _batches(c, rid, metrics=[ml.Metric(f"eval.{d}", float(v), ts, last, model_id=model_id)
                                      for d, v in (metrics.get("eval") or {}).items() if _num(v)])
            if m.get("produces", "model") == "model":
                self._register(c, m, rid, model)
        c.set_terminated(rid, "FINISHED", end_time=end)
        return {"tracking_uri": self.uri, "experiment_id": eid, "run_id": rid,
                "model_id": model_id}

    def log_snapshot(self, manifest: dict[str, Any], stage_run: str | None,
                     store_uri: str) -> str | None:
        """A published snapshot's LoggedModel, an output of its stage's MLflow run
        (artifacts/tracking_snapshots.py; never registered). Its id; None when MLflow is down
        (queued as `log_snapshot`)."""
        from artifacts import tracking_snapshots as ts

        run_id = self._run[1] if self._run else manifest.get("run_id")
        return self._safe(ts.op(manifest, store_uri, run_id, stage_run),
                          lambda c: ts.write_snapshot(self, c, manifest, stage_run, store_uri))

    def log_reused(self, parent_run_id: str | None, manifests: list[dict[str, Any]]) -> None:
        """Stages this run reused, recorded on the parent run itself (no child runs: a no-op
        rerun would otherwise add one empty run per stage): a tag per stage,
        `posttrain.reused.<stage>` = "recipe:stage KEY", and their LoggedModels as the
        parent's model inputs. (The parent's summary.json lists them too; `posttrain sync`
        replays that, not this.)"""
        if parent_run_id is None or not manifests:
            return
        op = {"op": "log_reused", "parent_run_id": parent_run_id,
              "keys": [m["key"] for m in manifests]}

        def write(c: Any) -> None:
            from mlflow import entities as ml

            for m in manifests:
                c.set_tag(parent_run_id, f"posttrain.reused.{m.get('stage')}",
                          f"{m.get('recipe')}:{m.get('stage')} {m['key']}")
            models = [ml.LoggedModelInput(x) for m in manifests
                      if (x := self.model_id(c, m["key"]))]
            if models:
                c.log_inputs(parent_run_id, models=models)

        self._safe(op, write)

    def log_failure(self, stage: dict[str, Any], reason: str, parent_run_id: str | None,
                    live_run: str | None = None) -> str | None:
        """A nested run for a stage whose build or publish failed: status FAILED, the reason
        in tag `posttrain.error`, its config as params, and no LoggedModel or registered
        version (its key is not stored: tag `posttrain.planned_key`, not `posttrain.key`).
        `stage` is {key, recipe, stage, kind, config, run_id}. Returns the MLflow run id."""
        run_id = self._run[1] if self._run else stage.get("run_id")
        op = {"op": "log_failure", "stage": stage, "reason": reason, "run_id": run_id,
              "parent_run_id": parent_run_id}
        return self._safe(op, lambda c: self.write_failure(c, stage, reason, parent_run_id,
                                                           run_id, live_run))

    def write_failure(self, c: Any, stage: dict[str, Any], reason: str, parent: str | None,
                      run_id: str | None, live_run: str | None = None) -> str:
        """log_failure's work on an open client, raising on error (replayed by the back-fill)."""
        from mlflow.entities import Param

        recipe = self._run[0] if self._run else stage["recipe"]
        eid = c.get_run(parent).info.experiment_id if parent else self._experiment(c, recipe)
        tags = {"posttrain.planned_key": stage["key"], "posttrain.stage": stage["stage"],
                "posttrain.status": "failed", "posttrain.kind": stage["kind"],
                "posttrain.recipe": stage["recipe"], "posttrain.run_id": run_id or "",
                "posttrain.error": reason[:5000]}
        if parent:
            tags["mlflow.parentRunId"] = parent
        if live_run:  # the run opened when the stage started: ended here, FAILED
            rid = live_run
            c.set_tag(rid, "mlflow.runName", f"{stage['stage']} (failed)")
            for k, v in tags.items():
                c.set_tag(rid, k, str(v))
        else:
            rid = c.create_run(eid, run_name=f"{stage['stage']} (failed)",
                               tags={k: str(v) for k, v in tags.items()}).info.run_id
        _batches(c, rid, params=[Param(k, v) for k, v in
                                 flatten(stage.get("config") or {}).items()])
        c.set_terminated(rid, "FAILED")
        return rid

    def logged_model(self, c: Any, eid: str, rid: str | None, m: dict[str, Any],
                     store_uri: str, payload_dir: Any,
                     extra_tags: dict[str, str] | None = None) -> Any:
        """An external LoggedModel: the weights stay in the store (copied only if upload)."""
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.models.utils import get_external_mlflow_model_spec

        path = f"{store_uri}/objects/{m['key']}"
        tags = {"posttrain.key": m["key"], "posttrain.stage": m.get("stage"),
                "posttrain.recipe": m.get("recipe"), "posttrain.kind": m.get("kind"),
                "posttrain.store": store_uri, "posttrain.path": path,
                "mlflow.model.isExternal": "true", "posttrain.uploaded": str(self.upload).lower(),
                **(extra_tags or {})}
        loadable = m.get("produces", "model") == "model"
        if loadable:  # a pyfunc that reads the store: not external, loadable through MLflow
            del tags["mlflow.model.isExternal"]
        model = c.create_logged_model(eid, name=m.get("stage"), source_run_id=rid,
                                      tags={k: str(v) for k, v in tags.items()},
                                      model_type=f"posttrain.{m.get('kind')}")
        with tempfile.TemporaryDirectory() as d:
            if loadable:
                _save_pyfunc(d, store_uri, m["key"])
            else:  # an MLmodel file marked external: the registry needs one to register
                get_external_mlflow_model_spec(model).save(os.path.join(d, MLMODEL_FILE_NAME))
            c.log_model_artifacts(model.model_id, d)
        if self.upload and Path(src := str(payload_dir or path)).is_dir():
            c.log_model_artifacts(model.model_id, src)
        self._models[m["key"]] = model.model_id
        return c.finalize_logged_model(model.model_id, "READY")

    def _register(self, c: Any, m: dict[str, Any], rid: str, model: Any) -> None:
        from mlflow.exceptions import MlflowException

        name = f"{m.get('recipe')}.{m.get('stage')}"
        try:
            c.create_registered_model(name, tags={"posttrain.recipe": str(m.get("recipe"))})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        same = [v for v in c.search_model_versions(f"name = '{name}'")
                if v.tags.get("posttrain.key") == m["key"]]
        # source = the artifact location: a `models:/<id>` source is looked up through the
        # *global* tracking URI by MLflow's sqlalchemy registry, not through this client's.
        mv = same[0] if same else c.create_model_version(
            name, source=model.artifact_location, run_id=rid, model_id=model.model_id,
            tags={"posttrain.key": m["key"], "posttrain.kind": str(m.get("kind"))})
        c.set_registered_model_alias(name, ALIAS, mv.version)
        # What `mlflow.register_model` also records: the LoggedModel's own list of its
        # versions (without it the UI shows the model as "Not registered").
        versions = json.loads(model.tags.get("mlflow.modelVersions") or "[]")
        entry = {"name": name, "version": str(mv.version)}
        if entry not in versions:
            c.set_logged_model_tags(model.model_id,
                                    {"mlflow.modelVersions": json.dumps([*versions, entry])})

    def finish_run(self, parent_run_id: str | None, status: str, summary: list[dict[str, Any]],
                   figures: dict[str, Any]) -> None:
        """Close the parent run with summary.json, eval table + accuracy PNG (summary rows with
        "eval"), and each figure ({file name: text or path}) as artifacts."""
        recipe, run_id = self._run or (None, None)
        op = {"op": "finish_run", "recipe": recipe, "run_id": run_id, "status": status,
              "parent_run_id": parent_run_id, "summary": summary,
              "figures": {k: str(v) for k, v in figures.items()}}
        if parent_run_id is not None or self.last_error is not None:  # else: tracking was off
            self._safe(op, lambda c: self.write_finish(c, parent_run_id, status, summary,
                                                       figures))

    def write_finish(self, c: Any, pid: str, status: str, summary: list[dict[str, Any]],
                     figures: dict[str, Any]) -> None:
        """finish_run's work on an open client, raising on error (replayed by the back-fill)."""
        from artifacts import pictures

        with tempfile.TemporaryDirectory() as d:
            pictures.write_run_figures(summary, figures, d)
            c.log_artifacts(pid, d)
        for st in {r.get("status") for r in summary if r.get("status")}:
            c.log_metric(pid, f"stages.{st}", sum(r.get("status") == st for r in summary))
        c.set_tag(pid, "posttrain.status", status)
        c.set_terminated(pid, RUN_STATUS.get(status.lower(), status.upper()))
