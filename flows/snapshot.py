"""Snapshots on the runner's side: publishing them from a training stage, waiting for them.

- `publisher(...)`: the `tasks.snapshots.Snapshots` a stage's `run` gets (flows/stage.py): each
  snapshot becomes the artifact `STAGE@STEP` under key H(stage key, step), manifest last,
  `refs/<recipe>/<stage>@<step>` pointed at it, one line in the stage log. Its manifest is the
  stage's (recipe, kind, config, inputs, code) with `stage: NAME@STEP`, `snapshot: {of, stage,
  step}`, and the metrics at that step. A snapshot already stored (a resumed or repeated build)
  is left as it is. Once stored, `on_publish(step, key, manifest)` (flows/stage.py's progress
  writer) tells the run's live table (a progress record, flows/board.py) and the stage's live
  MLflow run (a LoggedModel per snapshot, artifacts/tracking_snapshots.py).
- `wait_for(...)`: block until a key is published, failing with the producer's own error when
  the producer ended (failed, or done without publishing it) first, or on a timeout. The flow
  calls it before a pipelined stage takes its CPUs (flows/run.py), and a stage calls it when it
  reaches a deferred input (tasks/snapshots.py `await_input`). The producer's end is read from
  its result file in the run dir (flows/stagefile.py), which every runner writes there.

Imports neither prefect nor torch.

Run: ``.venv/bin/python -m pytest tests/test_snapshots.py -q``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from artifacts import keys
from artifacts import manifest as manifest_mod
from artifacts.refs import ArtifactRef, StageInputError
from artifacts.store import Store
from flows.stagefile import StageFileError, StagePlan, StageResult
from tasks import snapshots as snap_mod

POLL_S = 0.5


class UpstreamFailed(StageInputError):
    """What a consumer waited for will never be published (its producer failed or ended)."""


def publisher(sp: StagePlan, store: Store, edges: dict[str, Any], sft_root: str | None,
              produces: str, run_id: str | None, force: bool,
              on_publish: Callable[[int, str, dict[str, Any]], None] | None = None
              ) -> snap_mod.Snapshots | None:
    """The stage's snapshot settings with a `publish` that stores each one (None: none);
    `on_publish(step, key, manifest)` is called after each is stored and its ref set."""
    if not sp.snapshots:
        return None
    from tasks.kind import spec

    started = time.time()
    lineage_root = spec(sp.kind).starts_lineage

    def publish(step: int, staged: Path, metrics: dict[str, Any]) -> None:
        key = keys.snapshot_key(sp.key, step)
        name = f"{sp.name}@{step}"
        with store.lock(key):
            if not store.has(key) or force:
                work = store.staging_dir(key)
                work.rmdir()
                import shutil

                shutil.copytree(staged, work)
                man = manifest_mod.build(
                    recipe=sp.recipe, stage=name, kind=sp.kind, produces=produces,
                    config=sp.config, inputs=sp.input_keys, input_refs=edges,
                    data_digests=sp.data_digests, code_digest=sp.code_digest,
                    code_files=sp.code_files, metrics=metrics, started=started,
                    ended=time.time(), sft_root=key if lineage_root else sft_root,
                    warnings=list(sp.warnings), run_id=run_id)
                man["snapshot"] = {"of": sp.key, "stage": sp.name, "step": step}
                store.publish(key, work, man)
        store.set_ref(sp.recipe, name, key)
        snap_mod.announce(step, key)
        if on_publish is not None:
            on_publish(step, key, dict(store.manifest(key) or {}, key=key))

    return snap_mod.Snapshots(frozenset(sp.snapshots), sp.eval_snapshots, publish)


def producer_end(run_dir: str | Path | None, stage: str) -> StageResult | None:
    """How `stage` of this run ended (its result file), or None while it has not."""
    if not run_dir:
        return None
    path = Path(run_dir) / f"{stage}.result.json"
    try:
        return StageResult.read(path) if path.exists() else None
    except StageFileError:  # being written: not ended yet as far as we can tell
        return None


def wait_for(store: Store, key: str, what: str, producer: str | None, run_dir: str | None,
             timeout: float | None = None, stop: Callable[[], str | None] | None = None,
             on_wait: Callable[[], None] | None = None) -> None:
    """Return once `key` is in `store`. Raises UpstreamFailed when `producer` (a stage of this
    run) ended without publishing it, or when `timeout` seconds pass; `stop()` returning a
    reason (the run was interrupted) also ends the wait."""
    t0 = time.time()
    told = False
    while not store.has(key):
        end = producer_end(run_dir, producer) if producer else None
        if end is not None and not store.has(key):
            if end.status == "failed":
                raise UpstreamFailed(f"{what} will not be published: stage {producer} failed "
                                     f"before it: {end.error}")
            raise UpstreamFailed(f"{what} will not be published: stage {producer} ended "
                                 f"({end.status}) without it")
        why = stop() if stop else None
        if why:
            raise UpstreamFailed(f"interrupted ({why}) while waiting for {what}")
        if timeout is not None and time.time() - t0 > timeout:
            raise UpstreamFailed(f"{what} was not published within {timeout:g} s "
                                 "(--upstream-timeout); build it, or wait longer")
        if not told and on_wait:
            on_wait()
            told = True
        time.sleep(POLL_S)


def waiter(sp: StagePlan, store: Store, run_dir: str | None,
           check: Callable[[ArtifactRef], None]) -> Callable[[ArtifactRef], ArtifactRef]:
    """For tasks.snapshots.await_input: wait for a deferred input of `sp`, then return its full
    ref (manifest read), after `check` (the stage's input verification) passed on it."""
    producers = {}
    for value in sp.parents.values():
        for entry in ([value] if isinstance(value.get("stage"), str) else value.values()):
            producers[entry["key"]] = entry["stage"].split("@")[0]

    def wait(ref: ArtifactRef) -> ArtifactRef:
        print(f"waiting for input {ref.stage} ({ref.key[:12]})", flush=True)
        wait_for(store, ref.key, f"input {ref.stage} ({ref.key[:12]})",
                 producers.get(ref.key), run_dir)
        m = store.manifest(ref.key) or {}
        full = ArtifactRef(key=ref.key, path=store.local_path(ref.key), kind=m.get("kind", "?"),
                           stage=m.get("stage", "?"), recipe=m.get("recipe", "?"), manifest=m)
        check(full)
        return full

    return wait
