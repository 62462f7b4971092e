"""Run exactly one stage in this process: `posttrain stage RECIPE STAGE`.

This is the unit that every scheduler wraps: the Prefect flow launches it as a child process
per stage, a DVC stage calls it, a Kubernetes job or `accelerate launch` runs it on a cluster.
It recomputes the stage's key from the recipe, resolves its inputs in the store (they must be
there already), builds the payload in a staging directory, writes the manifest last, points
`refs/<recipe>/<stage>` at the key and mirrors the stage to MLflow (never fatal). Under a
launcher (`launch: {processes: N}`), every rank trains; rank 0 alone locks, publishes and
tracks, and the rank count must match the recipe's.

Fault injection for tests (documented, inert unless set): POSTTRAIN_FAULT="<stage>:kill" kills
the process with SIGKILL as the stage starts; "<stage>:kill-before-manifest" kills it after the
payload is in place and before the manifest is written.

Run: ``posttrain stage recipes/mimo_tiny.yaml sft``
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from artifacts import manifest as manifest_mod
from artifacts.refs import ArtifactRef, Inputs, StageInputError
from artifacts.store import Store, atomic_write
from flows.plan import PlannedStage, plan
from flows.recipe import RecipeError, parse


class ProgressWriter:
    """Turns progress(step, total, metrics) into JSON lines for the flow's live table."""

    def __init__(self, path: str | None, stage: str) -> None:
        self.path, self.stage, self.last = path, stage, 0.0
        self.tty = sys.stderr.isatty() and path is None

    def __call__(self, step: int, total: int, metrics: Any) -> None:
        now = time.time()
        if now - self.last < 0.5 and step < total:
            return
        self.last = now
        row = {"t": now, "step": step, "total": total,
               **{k: float(v) for k, v in dict(metrics).items()
                  if isinstance(v, int | float)}}
        if self.path:
            with open(self.path, "a") as f:
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


def _ref(store: Store, key: str) -> ArtifactRef:
    m = store.manifest(key) or {}
    return ArtifactRef(key=key, path=store.local_path(key), kind=m.get("kind", "?"),
                       stage=m.get("stage", "?"), recipe=m.get("recipe", "?"), manifest=m)


def _inputs(ps: PlannedStage, store: Store, recipe_file: str) -> tuple[Inputs, dict[str, Any]]:
    refs: dict[str, Any] = {}
    edges: dict[str, Any] = {}
    for role, value in ps.input_keys.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, key in pairs:
            parent = ps.spec.inputs[role][sub] if sub else ps.spec.inputs[role]
            if not store.has(key):
                raise StageInputError(
                    f"{recipe_file}: stage {ps.name!r}: its input {role}{'.' + sub if sub else ''}"
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


def _sft_root(ps: PlannedStage, inputs: Inputs) -> str | None:
    if ps.spec.kind == "sft":
        return ps.key
    return inputs.init.sft_root if inputs.init else None


def ranks(ps: PlannedStage) -> tuple[int, int]:
    """(rank, world size) of this process, checked against the stage's `launch.processes`."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = ps.spec.launch.processes
    if world != want:
        how = (f"torchrun --nproc_per_node {want} -m flows.cli stage ..." if want > 1
               else "posttrain stage ... without a launcher")
        raise StageInputError(
            f"stage {ps.name!r} declares launch.processes {want} but runs as {world} process(es);"
            f" start it with `posttrain run` (which launches it), or as {how}")
    return rank, world


def _module(ps: PlannedStage, world: int) -> Any:
    """The stage's task module, with torch threads set per rank before any work."""
    from tasks import module_for

    module = module_for(ps.spec.kind)
    if module.PRODUCES == "model":
        import torch

        torch.set_num_threads(max(1, ps.spec.resources.cpus // world))
    return module


def _follow(ps: PlannedStage, inputs: Inputs, world: int, t0: float) -> dict[str, Any]:
    """A rank > 0 of a data-parallel stage: trains beside rank 0, keeps and publishes nothing
    (rank 0 holds the key's lock, writes the artifact, the ref and the MLflow mirror)."""
    import tempfile

    module = _module(ps, world)
    with tempfile.TemporaryDirectory(prefix=f"posttrain-{ps.name}-rank") as scratch:
        module.run(module.Config(**ps.spec.config), inputs, Path(scratch))
    return {"stage": ps.name, "key": ps.key, "status": "follower",
            "seconds": round(time.time() - t0, 3)}


def write_pointer(path: str | None, store: Store, ps: PlannedStage, recipe: str) -> None:
    """A small JSON file standing for the artifact (what DVC tracks instead of checkpoints)."""
    if path:
        atomic_write(Path(path), json.dumps({"key": ps.key, "store": store.uri, "recipe": recipe,
                                             "stage": ps.name}, indent=2) + "\n")


def run_stage(recipe_file: str, stage: str, store_uri: str, sets: list[str], *,
              force: bool = False, run_id: str | None = None, expect_key: str | None = None,
              pointer: str | None = None, progress_file: str | None = None,
              state_dir: Path = Path(".posttrain"), tracking_uri: str | None = None,
              parent_run: str | None = None) -> dict[str, Any]:
    """Build one stage (or reuse it); returns {"stage", "key", "status", "seconds"}."""
    recipe = parse(recipe_file, sets)
    if stage not in recipe.stages:
        from flows.recipe import closest

        raise RecipeError(recipe_file, f"stage {stage}", f"no such stage"
                          f"{closest(stage, tuple(recipe.stages))}; stages: "
                          f"{', '.join(recipe.stages)}")
    store = Store(store_uri)
    ps = next(p for p in plan(recipe, store, force={stage} if force else set(),
                              state_dir=state_dir, tracking_uri=tracking_uri)
              if p.name == stage)
    if expect_key and expect_key != ps.key:
        raise StageInputError(f"stage {stage!r}: key {ps.key[:12]} differs from the planned "
                              f"{expect_key[:12]}: the recipe or code changed during the run; "
                              "run again")
    t0 = time.time()
    if ps.spec.kind == "use":
        store.set_ref(recipe.name, stage, ps.key)
        write_pointer(pointer, store, ps, recipe.name)
        return {"stage": stage, "key": ps.key, "status": "reused", "seconds": 0.0}
    _fault(stage, "kill")
    inputs, edges = _inputs(ps, store, recipe_file)
    # Check the launcher only where something will be built: a stored stage is reused anywhere.
    rank, world = ranks(ps) if force or not store.has(ps.key) else (0, 1)
    if rank > 0:  # (0, 1) above when the stage is stored: every rank reuses it below
        return _follow(ps, inputs, world, t0)
    with store.lock(ps.key):
        if store.has(ps.key) and not force:
            store.set_ref(recipe.name, stage, ps.key)
            write_pointer(pointer, store, ps, recipe.name)
            return {"stage": stage, "key": ps.key, "status": "reused",
                    "seconds": round(time.time() - t0, 3)}
        module = _module(ps, world)
        config = module.Config(**ps.spec.config)
        staged = store.staging_dir(ps.key)
        try:
            started = time.time()
            metrics = module.run(config, inputs, staged, ProgressWriter(progress_file, stage))
            ended = time.time()
            metrics = dict(metrics or {})
            warnings = list(metrics.pop("warnings", []) or [])
            man = manifest_mod.build(
                recipe=recipe.name, stage=stage, kind=ps.spec.kind, produces=module.PRODUCES,
                config=ps.spec.config, inputs=ps.input_keys, input_refs=edges,
                data_digests=ps.data_digests, code_digest=ps.code_digest,
                code_files=ps.code_files, metrics=metrics, started=started, ended=ended,
                sft_root=_sft_root(ps, inputs), warnings=warnings, run_id=run_id)
            man["key"] = ps.key
            if ps.spec.launch.distributed:
                man["launch"] = {"processes": world, "accelerate": ps.spec.launch.accelerate}
            man["mlflow"] = _track(man, state_dir, tracking_uri, parent_run, store.uri, staged)
            store.publish(ps.key, staged, man,
                          before_manifest=lambda: _fault(stage, "kill-before-manifest"))
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
    store.set_ref(recipe.name, stage, ps.key)
    write_pointer(pointer, store, ps, recipe.name)
    for w in warnings:
        print(f"warning: stage {stage}: {w}", file=sys.stderr)
    ev = metrics.get("eval") or {}
    if ev:
        print(f"{stage}: eval " + " ".join(f"{d}={a:.3f}" for d, a in ev.items()),
              file=sys.stderr)
    return {"stage": stage, "key": ps.key, "status": "trained",
            "seconds": round(time.time() - t0, 3)}


def _track(man: dict[str, Any], state_dir: Path, tracking_uri: str | None,
           parent_run: str | None, store_uri: str, staged: Path) -> dict[str, Any] | None:
    """Mirror the stage to MLflow before publishing, so the manifest can hold the run ids.

    POSTTRAIN_TRACKING=off skips it; =upload also uploads the weights to MLflow (a second
    copy; by default the LoggedModel only points at the store)."""
    mode = os.environ.get("POSTTRAIN_TRACKING", "on")
    if mode == "off":
        return None
    from artifacts.tracking import Tracker

    tracker = Tracker(tracking_uri, state_dir, upload=mode == "upload")
    return tracker.log_stage(man, "trained", parent_run, store_uri,
                             payload_dir=staged if mode == "upload" else None)
