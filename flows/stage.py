"""Run exactly one stage in this process: `posttrain stage`.

This is the unit that every scheduler wraps: the Prefect flow launches it as a child process
per stage, a DVC stage calls it, a Kubernetes job or `accelerate launch` runs it on a cluster.
Its input is one `StagePlan` (flows/stagefile.py): the flow's plan file (`--plan-file`), built
as planned without re-reading the recipe, or, by hand (`posttrain stage RECIPE STAGE`), the plan
of that stage and its ancestors only. Either way the same code builds it: it refuses if the
stage's code changed since it was planned, resolves its inputs in the store (they must be there
already), checks their files against their manifests before training (artifacts/verify.py;
sizes, and sha256 unless `verify_inputs: size`), builds the payload in a staging directory,
writes the manifest last, points
`refs/<recipe>/<stage>` at the key and only then mirrors the stage to MLflow (never fatal;
the run ids go to the store's `mlflow.json` beside the manifest; a failed build or publish is
a FAILED MLflow run with the reason, and no model or version). A full disk is an exit-2 error
naming the path and the free space. Under a
launcher (`launch: {processes: N}`), every rank reads the same plan and trains; rank 0 alone
locks, publishes, tracks and writes the `StageResult`, and the rank count must match the plan's.

Resume (`resume_every: N` on a stage of a RESUMABLE kind): the kind saves its training state
every N steps into a stable per-key directory (`Store.resume_dir`: `<store>/tmp/<key>.resume/`,
or `<state dir>/resume/<key>/` for a remote store), named to it by POSTTRAIN_RESUME_DIR and
POSTTRAIN_RESUME_EVERY for the duration of `run` (tasks/resume.py). A build killed by SIGKILL,
preemption or an error leaves it; the next build of the key (the next `posttrain run`, or a
Prefect retry) resumes from it, says so in its log, and the manifest records
`resumed_from_step` (null when it started from scratch). It is removed once the key is
published (or found already published).

Snapshots (`snapshots:` / `snapshot_every:` on a SNAPSHOTS kind): while `run` runs, the kind
finds a publisher through tasks/snapshots.py `current()`; flows/snapshot.py publishes each as
`STAGE@STEP` (key H(stage key, step), its own manifest, `refs/<recipe>/<stage>@<step>`). A
stored stage whose snapshots are not all stored is built again. A deferred input (a later
phase of a teacher schedule, not published when the stage starts) is waited for when the kind
reaches it, then verified like the others.

Fault injection for tests (documented, inert unless set): POSTTRAIN_FAULT="<stage>:kill" kills
the process with SIGKILL as the stage starts; "<stage>:kill-before-manifest" kills it after the
payload is in place and before the manifest is written; "<stage>:kill-at-step-<N>" kills it when
the kind reports step N to its progress callback (a TRL kind reports before its step-N
checkpoint is written, our own loops after their step-N snapshot).

Run: ``posttrain stage recipes/mimo_tiny.yaml sft``; the flow runs
``posttrain stage --plan-file RUN/sft.plan.json --result-file RUN/sft.result.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from artifacts import manifest as manifest_mod
from artifacts.refs import ArtifactRef, Inputs, StageInputError
from artifacts.store import NoSpaceError, RefError, Store, atomic_write, guard_space
from flows.plan import PlannedStage, plan, upstream
from flows.recipe import RecipeError, parse
from flows.stagefile import StagePlan, StageResult


class ProgressWriter:
    """Turns progress(step, total, metrics) into JSON lines for the flow's live table, and a
    published snapshot into one record `{"t", "snapshot": STEP, "key"}` (flows/board.py shows
    it) and a LoggedModel on the stage's live MLflow run (`snapshot`)."""

    def __init__(self, path: str | None, stage: str, live: Any = None) -> None:
        self.path, self.stage, self.last, self.live = path, stage, 0.0, live
        self.tty = sys.stderr.isatty() and path is None

    def snapshot(self, step: int, key: str, manifest: dict[str, Any]) -> None:
        """flows/snapshot.py's `on_publish`: the snapshot at `step` is stored as `key`."""
        if self.path:
            with guard_space(self.path, "point --state-dir elsewhere"), \
                    open(self.path, "a") as f:
                f.write(json.dumps({"t": time.time(), "snapshot": int(step), "key": key}) + "\n")
        if self.live is not None:  # queued: the live run's thread writes it (never blocks)
            self.live.snapshot(manifest)

    def __call__(self, step: int, total: int, metrics: Any) -> None:
        _fault(self.stage, f"kill-at-step-{step}")  # before the throttle: every step counts
        now = time.time()
        if now - self.last < 0.5 and step < total:
            return
        self.last = now
        if self.live is not None:  # the stage's MLflow run, streaming (tracking_live.py)
            self.live.progress(step, dict(metrics))
        row = {"t": now, "step": step, "total": total,
               **{k: float(v) for k, v in dict(metrics).items()
                  if isinstance(v, int | float)}}
        if self.path:  # in the run's state dir: a full disk there is named as such
            with guard_space(self.path, "point --state-dir elsewhere"), \
                    open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tty:
            width = 30
            done = int(width * step / max(total, 1))
            extra = " ".join(f"{k}={v:.4g}" for k, v in row.items()
                             if k not in ("t", "step", "total"))
            print(f"\r{self.stage} [{'#' * done}{'.' * (width - done)}] {step}/{total} {extra}",
                  end="", file=sys.stderr, flush=True)
            if step >= total:
                print(file=sys.stderr)


def _fault(stage: str, point: str) -> None:
    if os.environ.get("POSTTRAIN_FAULT") == f"{stage}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _resume_env(resume: Path | None, every: int | None) -> Iterator[None]:
    """Name the resume dir and interval to the kind (tasks/resume.py) while it runs, and only
    then: an in-process caller (tests, a later stage) must not inherit them."""
    from tasks import resume as resume_mod

    names = (resume_mod.ENV_DIR, resume_mod.ENV_EVERY)
    before = {n: os.environ.get(n) for n in names}
    if resume is not None and every:
        os.environ.update({resume_mod.ENV_DIR: str(resume), resume_mod.ENV_EVERY: str(every)})
    else:  # resume off: a value left in the environment must not turn it on
        for n in names:
            os.environ.pop(n, None)
    try:
        yield
    finally:
        for n, v in before.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _ref(store: Store, key: str) -> ArtifactRef:
    m = store.manifest(key) or {}
    return ArtifactRef(key=key, path=store.local_path(key), kind=m.get("kind", "?"),
                       stage=m.get("stage", "?"), recipe=m.get("recipe", "?"), manifest=m)


def _input_keys(sp: StagePlan) -> list[tuple[str, str | None, str, str]]:
    """(role, name within the role or None, key, parent stage) of every input of the plan:
    `use:` pins included, since the plan lists every input by key."""
    out = []
    for role, value in sp.input_keys.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, key in pairs:
            out.append((role, sub, key,
                        (sp.parents[role][sub] if sub else sp.parents[role])["stage"]))
    return out


def _verify_inputs(sp: StagePlan, inputs: Inputs, only: ArtifactRef | None = None
                   ) -> dict[str, Any]:
    """Check every input's payload against its manifest (sizes; sha256 unless the stage says
    `verify_inputs: size`) before training: a corrupted or planted parent file must stop the
    stage (exit 2), not be trained on under the clean parent's key. A deferred input not
    published yet is checked when the stage reaches it (`only`: that input alone)."""
    from artifacts import verify

    checks = []
    for role, sub, key, parent in _input_keys(sp):
        ref: ArtifactRef = getattr(inputs, role)[sub] if sub else getattr(inputs, role)
        if only is not None:
            if key != only.key:
                continue
            ref = only
        elif not ref.manifest:  # deferred and not published yet
            continue
        if ref.recipe == sp.recipe:
            rebuild = f"posttrain run {sp.recipe_file} --force {ref.stage}"
        else:  # pinned with `use:`: its own recipe builds it
            rebuild = (f"it is pinned from recipe {ref.recipe!r}: rebuild it there, posttrain "
                       f"run <{ref.recipe} recipe file> --force {ref.stage}")
        checks.append(verify.Input(
            label=f"input {role}{'.' + sub if sub else ''} (stage {parent!r})", key=key,
            root=ref.path, manifest=ref.manifest,
            fix=f"check it with `posttrain verify {key}`; rebuild it: {rebuild}; "
                "then run this stage again"))
    return verify.check(checks, sp.verify_inputs, stage=sp.name)


def _inputs(sp: StagePlan, store: Store) -> tuple[Inputs, dict[str, Any]]:
    refs: dict[str, Any] = {}
    edges: dict[str, Any] = {}
    recipe_file = sp.recipe_file
    for role, sub, key, parent in _input_keys(sp):
        if not store.has(key) and sp.spec.deferred(sub):  # waited for when the stage needs it
            ref = ArtifactRef(key=key, path=_pending_path(store, key), kind="?",
                              stage=parent, recipe=sp.recipe)
            refs.setdefault(role, {})[sub] = ref
            edges.setdefault(role, {})[sub] = {"key": key, "recipe": sp.recipe,
                                               "stage": parent, "kind": "?"}
            continue
        if not store.has(key):
            raise StageInputError(
                f"{recipe_file}: stage {sp.name!r}: its input {role}{'.' + sub if sub else ''}"
                f" (stage {parent!r}, key {key[:12]}) is not in the store {store.uri}; build "
                f"it first: posttrain run {recipe_file}")
        ref = _ref(store, key)
        edge = {"key": key, "recipe": ref.recipe, "stage": ref.stage, "kind": ref.kind}
        if sub:
            refs.setdefault(role, {})[sub] = ref
            edges.setdefault(role, {})[sub] = edge
        else:
            refs[role] = ref
            edges[role] = edge
    return Inputs(**refs), edges


def _pending_path(store: Store, key: str) -> Path:
    """Where a not yet published input will be (a local store's object dir), for messages."""
    return Path(store.object_path(key)) if store.local else Path("/nonexistent") / key


def _complete_edges(edges: dict[str, Any], store: Store) -> dict[str, Any]:
    """The manifest's input_refs with every deferred input as it was finally published."""
    for value in edges.values():
        if isinstance(value, dict) and "key" not in value:
            for sub, e in value.items():
                m = store.manifest(e["key"]) if e.get("kind") == "?" else None
                if m:
                    value[sub] = {"key": e["key"], "recipe": m.get("recipe"),
                                  "stage": m.get("stage"), "kind": m.get("kind")}
    return edges


def _sft_root(ps: PlannedStage, inputs: Inputs, selected: str | None = None) -> str | None:
    """This stage's key if its kind starts an SFT lineage, else its init's sft_root; without
    an init (`select`), that of the candidate its metrics say it `selected` (the artifact is
    that model), else the one sft_root all its candidates share, if they do."""
    from tasks.kind import spec

    if spec(ps.spec.kind).starts_lineage:
        return ps.key
    if inputs.init:
        return inputs.init.sft_root
    if selected in inputs.candidates:
        return inputs.candidates[selected].sft_root
    roots = {ref.sft_root for ref in inputs.candidates.values()}
    return roots.pop() if len(roots) == 1 else None


def rank() -> int:
    """This process's rank under a launcher (0 without one): rank 0 reports the result."""
    return int(os.environ.get("RANK", "0"))


def ranks(sp: StagePlan) -> tuple[int, int]:
    """(rank, world size) of this process, checked against the stage's `launch.processes`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = int(sp.launch.get("processes", 1))
    if world != want:
        how = (f"torchrun --nproc_per_node {want} -m flows.cli stage ..." if want > 1
               else "posttrain stage ... without a launcher")
        raise StageInputError(
            f"stage {sp.name!r} declares launch.processes {want} but runs as {world} process(es);"
            f" start it with `posttrain run` (which launches it), or as {how}")
    return rank(), world


def _module(sp: StagePlan, world: int) -> Any:
    """The stage's task module, with torch threads set per rank before any work."""
    from tasks import module_for

    module = module_for(sp.kind)
    if module.PRODUCES == "model":
        import torch

        torch.set_num_threads(max(1, int(sp.resources.get("cpus", 1)) // world))
    return module


def _follow(sp: StagePlan, inputs: Inputs, world: int, t0: float) -> StageResult:
    """A rank > 0 of a data-parallel stage: trains beside rank 0, keeps and publishes nothing
    (rank 0 holds the key's lock, writes the artifact, the ref and the MLflow mirror)."""
    import tempfile

    module = _module(sp, world)
    with tempfile.TemporaryDirectory(prefix=f"posttrain-{sp.name}-rank") as scratch:
        module.run(module.Config(**sp.config), inputs, Path(scratch))
    return StageResult(sp.name, sp.key, "follower", round(time.time() - t0, 3))


def write_pointer(path: str | None, store: Store, ps: StagePlan | PlannedStage,
                  recipe: str) -> None:
    """A small JSON file standing for the artifact (what DVC tracks instead of checkpoints)."""
    if path:
        atomic_write(Path(path), json.dumps({"key": ps.key, "store": store.uri, "recipe": recipe,
                                             "stage": ps.name}, indent=2) + "\n")


def plan_stage(recipe_file: str, stage: str, store: Store, sets: list[str], *,
               force: bool = False, state_dir: Path = Path(".posttrain"),
               tracking_uri: str | None = None, scale: float = 1.0) -> StagePlan:
    """`posttrain stage RECIPE STAGE` by hand: plan the stage from its ancestors only, so an
    unrelated stage (a missing `use:` pin, a slow data digest) neither costs nor blocks it."""
    recipe = parse(recipe_file, sets, scale)
    if stage not in recipe.stages:
        from flows.recipe import closest

        raise RecipeError(recipe_file, f"stage {stage}", f"no such stage"
                          f"{closest(stage, tuple(recipe.stages))}; stages: "
                          f"{', '.join(recipe.stages)}")
    recipe = upstream(recipe, {stage})
    ps = next(p for p in plan(recipe, store, force={stage} if force else set(),
                              state_dir=state_dir, tracking_uri=tracking_uri)
              if p.name == stage)
    return StagePlan.from_planned(ps, recipe)


def check_current(sp: StagePlan, state_dir: Path | None = None) -> None:
    """Refuse to build when the stage's code (or a user data file) is no longer what was
    planned: the artifact would be stored under a key that does not describe it."""
    import tasks
    from artifacts import keys

    module = tasks.KINDS[sp.kind]
    if keys.code_digest(module) != sp.code_digest:
        now = dict(keys.code_files(module))
        changed = sorted(f for f in set(now) | set(sp.code_files)
                         if now.get(f) != sp.code_files.get(f))
        raise StageInputError(f"stage {sp.name!r}: code changed during the run "
                              f"({', '.join(changed) or module}) since it was planned as key "
                              f"{sp.key[:12]}; run again")
    from tasks import kind as kinds

    files_of = kinds.spec(sp.kind).hooks.get("data_files")
    cache = state_dir / "data_digests.json" if state_dir else None
    for name, path in (files_of(sp.config) if files_of else {}).items():
        if keys.data_digest(path, cache) != sp.data_digests.get(name):
            raise StageInputError(f"stage {sp.name!r}: data changed during the run ({path}) "
                                  f"since it was planned as key {sp.key[:12]}; run again")


def run_stage(sp: StagePlan, store_uri: str, *, run_id: str | None = None,
              expect_key: str | None = None, pointer: str | None = None,
              progress_file: str | None = None, state_dir: Path = Path(".posttrain"),
              tracking_uri: str | None = None, parent_run: str | None = None) -> StageResult:
    """Build one planned stage (or reuse it); a rank > 0 returns status "follower"."""
    stage, force = sp.name, "forced" in sp.reasons
    store = Store(store_uri)
    if expect_key and expect_key != sp.key:
        raise StageInputError(f"stage {stage!r}: key {sp.key[:12]} differs from the planned "
                              f"{expect_key[:12]}: the recipe or code changed during the run; "
                              "run again")
    t0 = time.time()
    if sp.kind == "use":
        store.set_ref(sp.recipe, stage, sp.key)
        write_pointer(pointer, store, sp, sp.recipe)
        return StageResult(stage, sp.key, "reused", 0.0)
    _fault(stage, "kill")
    inputs, edges = _inputs(sp, store)
    # Check the launcher and the code only where something will be built: a stored stage is
    # reused anywhere, by the code that built it.
    from artifacts.keys import snapshot_key

    missing_snaps = [s for s in sp.snapshots if not store.has(snapshot_key(sp.key, s))]
    force = force or bool(missing_snaps)  # snapshots are published only while it trains
    building = force or not store.has(sp.key)
    if building:
        check_current(sp, state_dir)
    rank_, world = ranks(sp) if building else (0, 1)
    if rank_ > 0:  # (0, 1) above when the stage is stored: every rank reuses it below
        return _follow(sp, inputs, world, t0)
    with store.lock(sp.key) as lease:
        resume = store.resume_dir(sp.key, state_dir)
        if store.has(sp.key) and not force:
            shutil.rmtree(resume, ignore_errors=True)  # another builder finished the key
            store.set_ref(sp.recipe, stage, sp.key)
            write_pointer(pointer, store, sp, sp.recipe)
            return StageResult(stage, sp.key, "reused", round(time.time() - t0, 3))
        # Rank 0 alone, before any training: a mismatch fails the launch group (nothing kept).
        verified = _verify_inputs(sp, inputs)
        module = _module(sp, world)
        config = module.Config(**sp.config)
        staged = store.staging_dir(sp.key)
        from flows import snapshot as snapshot_mod
        from tasks import snapshots as snap_mod

        progress = ProgressWriter(progress_file, stage)
        snaps = snapshot_mod.publisher(sp, store, edges, _sft_root(sp, inputs), module.PRODUCES,
                                       run_id, force, on_publish=progress.snapshot)
        wait = snapshot_mod.waiter(sp, store, os.environ.get("POSTTRAIN_RUN_DIR"),
                                   lambda ref: _verify_inputs(sp, inputs, only=ref))
        live = None
        try:
            started = time.time()
            live = progress.live = _live_run(sp, started, state_dir, tracking_uri, parent_run,
                                             run_id, store.uri)
            # The payload is written into the store's staging: a full disk there is the store's.
            with guard_space(staged, "point --store elsewhere"), \
                    _resume_env(resume, sp.resume_every), snap_mod.active(snaps, wait):
                metrics = module.run(config, inputs, staged, progress)
            ended = time.time()
            edges = _complete_edges(edges, store)
            metrics = dict(metrics or {})
            resumed = metrics.pop("resumed_from_step", None)
            if module.PRODUCES in ("model", "reward_model") and not (staged / "README.md") \
                    .exists():  # the Hub's model card: base_model lineage and the eval table
                from artifacts.model_card import card

                (staged / "README.md").write_text(card(sp.recipe, stage, sp.kind, sp.key,
                                                       sp.parents, metrics.get("eval")))
            warnings = list(sp.warnings) + list(metrics.pop("warnings", []) or [])
            man = manifest_mod.build(
                recipe=sp.recipe, stage=stage, kind=sp.kind, produces=module.PRODUCES,
                config=sp.config, inputs=sp.input_keys, input_refs=edges,
                data_digests=sp.data_digests, code_digest=sp.code_digest,
                code_files=sp.code_files, metrics=metrics, started=started, ended=ended,
                sft_root=_sft_root(sp, inputs, metrics.get("selected")), warnings=warnings,
                run_id=run_id)
            man["key"] = sp.key
            man["inputs_verified"] = verified
            man["resumed_from_step"] = resumed  # null: trained from its inputs, not resumed
            if sp.spec.launch.distributed:
                man["launch"] = {"processes": world, "accelerate": sp.launch.get("accelerate")}
            from flows.procs import check_parent

            check_parent()  # the run that started this stage died: an orphan publishes nothing
            lease.check()  # another builder took the key over (a remote lease expired)
            published = store.publish(
                sp.key, staged, man, before_manifest=lambda: _fault(stage, "kill-before-manifest"))
        except BaseException as e:  # nothing was published: MLflow may say so, nothing more
            live_id = live.close() if live is not None else None
            if isinstance(e, Exception) or live_id:  # an interrupt ends its live run too
                _track_failure(sp, e, state_dir, tracking_uri, parent_run, run_id, live_id)
            raise
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        # Published: the resumable state has served (kept on any failure above, for a retry).
        shutil.rmtree(resume, ignore_errors=True)
    # Publish first, mirror second: the ref, the pointer and MLflow only name a stored key.
    store.set_ref(sp.recipe, stage, sp.key)
    write_pointer(pointer, store, sp, sp.recipe)
    live_id = live.close() if live is not None else None
    _track(published, store, state_dir, tracking_uri, parent_run, live_id,
           live.unlogged() if live is not None else [])
    for w in warnings:
        print(f"warning: stage {stage}: {w}", file=sys.stderr)
    ev = metrics.get("eval") or {}
    if ev:
        print(f"{stage}: eval " + " ".join(f"{d}={a:.3f}" for d, a in ev.items()),
              file=sys.stderr)
    return StageResult(stage, sp.key, "trained", round(time.time() - t0, 3))


def _live_run(sp: StagePlan, started: float, state_dir: Path, tracking_uri: str | None,
              parent_run: str | None, run_id: str | None, store_uri: str | None = None) -> Any:
    """The stage's MLflow run, opened now and streaming its curves while it trains
    (artifacts/tracking_live.py); None with POSTTRAIN_TRACKING=off."""
    if os.environ.get("POSTTRAIN_TRACKING", "on") == "off":
        return None
    from artifacts.tracking import Tracker
    from artifacts.tracking_live import LiveStage

    stage = {"key": sp.key, "recipe": sp.recipe, "stage": sp.name, "kind": sp.kind,
             "run_id": run_id}
    return LiveStage(Tracker(tracking_uri, state_dir, warn=False), stage, parent_run,
                     started, store_uri=store_uri).start()


def _track(man: dict[str, Any], store: Store, state_dir: Path, tracking_uri: str | None,
           parent_run: str | None, live_run: str | None = None,
           snapshots: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Mirror a published stage to MLflow (run, LoggedModel, registered version), then record
    the run ids in the store's sidecar beside the manifest: the manifest is immutable once
    published, and MLflow must never name a key that is not stored. Never fatal.

    POSTTRAIN_TRACKING=off skips it; =upload also uploads the weights to MLflow (a second
    copy; by default the LoggedModel only points at the store). `snapshots`: manifests of
    snapshots the live run did not record (MLflow down when the stage started), recorded now
    on the stage's run."""
    mode = os.environ.get("POSTTRAIN_TRACKING", "on")
    if mode == "off":
        return None
    from artifacts.tracking import Tracker

    tracker = Tracker(tracking_uri, state_dir, upload=mode == "upload")
    ids = tracker.log_stage(man, "trained", parent_run, store.uri,
                            payload_dir=store.local_path(man["key"]) if mode == "upload" else None,
                            live_run=live_run)
    for snap in snapshots or []:  # queued in the pending file when MLflow is down
        tracker.log_snapshot(snap, (ids or {}).get("run_id"), store.uri)
    if ids:
        try:
            store.set_mlflow_ids(man["key"], ids)
        except (OSError, RefError) as e:  # the artifact is stored and MLflow has the run
            print(f"warning: stage {man.get('stage')}: MLflow run {ids.get('run_id')} not "
                  f"recorded beside the manifest ({e})", file=sys.stderr)
    return ids


def _track_failure(sp: StagePlan, e: BaseException, state_dir: Path, tracking_uri: str | None,
                   parent_run: str | None, run_id: str | None,
                   live_run: str | None = None) -> None:
    """A stage whose build or publish failed: a FAILED MLflow stage run with the reason, and
    nothing else (no LoggedModel, no registered version: its key is not stored). Never masks
    the stage's own error."""
    if os.environ.get("POSTTRAIN_TRACKING", "on") == "off":
        return
    from artifacts.tracking import Tracker

    user = isinstance(e, StageInputError | RefError | NoSpaceError | RecipeError)
    reason = str(e) if user else f"{type(e).__name__}: {e}"
    stage = {"key": sp.key, "recipe": sp.recipe, "stage": sp.name, "kind": sp.kind,
             "config": sp.config, "run_id": run_id}
    try:
        Tracker(tracking_uri, state_dir).log_failure(stage, reason, parent_run, live_run)
    except Exception as err:  # e.g. the state dir is full too: the stage's error comes first
        print(f"warning: stage {sp.name}: failure not recorded in MLflow ({err})",
              file=sys.stderr)
