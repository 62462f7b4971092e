"""Plan: content keys for every stage, "fresh" or "run", and why — without running anything.

A stage is fresh when its key is in the store (and it is not forced). Reasons for "run" come
from comparing with `recipes/NAME.lock`, the record of the last good run that users commit, or,
where the lock has no entry for the stage (a fresh clone against a store built elsewhere), with
the manifest of the store's ref `recipe:stage`:
`new stage`, `config changed: max_steps 100 -> 120`, `upstream changed: sft`,
`code changed: tasks/sft.py`, `data changed: train`, `forced`, `not in store`, and for a stored
stage whose snapshots are not all stored, `snapshots not in store: @250`. Each stage's snapshot
keys (H(stage key, step)) are listed with it; a `use: {recipe: FILE, stage: ...}` pin not built
yet is planned `waiting`, its key computed from that recipe file (`posttrain run
--wait-for-upstream` waits for it).

Imports neither prefect nor torch, and never reads checkpoint bytes: it answers in well under a
second on a cached 12-stage recipe whatever the checkpoint sizes (bench/plan_speed.py).

Run: ``python -m flows.plan recipes/mimo_tiny.yaml``
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tasks
from artifacts import keys
from artifacts.store import KEY_RE, RefError, Store, atomic_write
from artifacts.tracking_lookup import resolve_ref  # imports mlflow only for models:/ refs
from flows.recipe import Recipe, RecipeError, StageSpec, closest
from tasks import kind as kinds
from tasks.kind import FIELD_OF_ROLE

LOCK_FORMAT = 1


@dataclass
class PlannedStage:
    spec: StageSpec
    key: str
    status: str  # "fresh" | "run" | "waiting" (a `use:` of another recipe's stage not built yet)
    reasons: list[str]
    input_keys: dict[str, Any]  # role -> key | {name: key}
    code_digest: str = ""
    code_files: dict[str, str] = field(default_factory=dict)
    data_digests: dict[str, str] = field(default_factory=dict)
    launch: dict[str, Any] | None = None
    snapshots: dict[int, str] = field(default_factory=dict)  # step -> key of `NAME@STEP`

    @property
    def name(self) -> str:
        return self.spec.name

    def as_json(self) -> dict[str, Any]:
        out = {"stage": self.name, "kind": self.spec.kind, "key": self.key,
               "status": self.status, "reasons": self.reasons,
               "warnings": list(self.spec.warnings)}
        if self.snapshots:
            out["snapshots"] = {str(step): key for step, key in self.snapshots.items()}
        return out

    def lock_entry(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.spec.kind, "config": self.spec.config,
                "inputs": self.input_keys, "parents": self.spec.inputs,
                "code": self.code_files, "data": self.data_digests, "use": self.spec.use,
                "launch": self.launch}


def lock_path(recipe: Recipe) -> Path:
    """recipes/NAME.lock; at `--scale F`, recipes/NAME.xF.lock (a smoke run never rewrites
    the committed lock)."""
    scale = getattr(recipe, "scale", 1.0)
    return recipe.path.with_suffix(".lock" if scale == 1 else f".x{scale:g}.lock")


def read_lock(recipe: Recipe) -> dict[str, Any]:
    p = lock_path(recipe)
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text())
    except ValueError:
        raise RecipeError(str(p), "", "the lock file is not valid JSON; delete it (it is "
                          "rewritten by the next successful run)") from None
    stages = doc.get("stages", {}) if isinstance(doc, dict) else {}
    fix = "delete the lock file (it is rewritten by the next successful run)"
    if not isinstance(stages, dict):
        raise RecipeError(str(p), "stages", f"not a mapping of stage -> entry; {fix}")
    for name, entry in stages.items():  # keys read back must be keys, here as everywhere
        if not isinstance(entry, dict):
            raise RecipeError(str(p), f"stages.{name}", f"not a lock entry; {fix}")
        found = [("key", entry.get("key"))]
        inputs = entry.get("inputs") or {}
        for role, v in (inputs.items() if isinstance(inputs, dict) else [("", inputs)]):
            found += [(f"inputs.{role}.{n}", k) for n, k in v.items()] if isinstance(v, dict) \
                else [(f"inputs.{role}", v)]
        for where, key in found:
            if not (isinstance(key, str) and KEY_RE.match(key)):
                raise RecipeError(str(p), f"stages.{name}.{where}", f"{str(key)[:80]!r} is not "
                                  f"a content key (64 lowercase hex digits); {fix}")
    return stages


def write_lock(recipe: Recipe, planned: list[PlannedStage], done: set[str]) -> None:
    """Record stage -> key for the stages that are in the store now (atomic rewrite)."""
    old = read_lock(recipe)
    stages = {p.name: p.lock_entry() if p.name in done else old.get(p.name)
              for p in planned}
    doc = {"format": LOCK_FORMAT, "recipe": recipe.name,
           "stages": {k: v for k, v in stages.items() if v is not None}}
    atomic_write(lock_path(recipe), json.dumps(doc, indent=2, sort_keys=True) + "\n")


def upstream(recipe: Recipe, targets: set[str]) -> Recipe:
    """`recipe` cut down to `targets` and their ancestors, in the same (topological) order:
    what `plan` needs to key those stages, and nothing unrelated (`posttrain stage` by hand).

    A key depends on its ancestors only, so each kept stage plans exactly as in the whole recipe.
    """
    import dataclasses

    keep = set(targets)
    for name in reversed(list(recipe.stages)):  # children before their parents
        if name in keep:
            keep.update(recipe.stages[name].parents())
    return dataclasses.replace(recipe, stages={n: s for n, s in recipe.stages.items()
                                               if n in keep})


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """["max_steps 100 -> 120", ...] between two configs.

    >>> config_changes({"a": 1, "t": {"x": 2}}, {"a": 1, "t": {"x": 3}, "b": True})
    ['b (unset) -> true', 't.x 2 -> 3']
    """
    fo, fn = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(fo) | set(fn)):
        a, b = fo.get(k, "(unset)"), fn.get(k, "(unset)")
        if a != b:
            out.append(f"{k} {json.dumps(a) if a != '(unset)' else a} -> "
                       f"{json.dumps(b) if b != '(unset)' else b}")
    return out


def plan(recipe: Recipe, store: Store, force: set[str] | None = None,
         force_downstream: bool = False, state_dir: Path | None = None,
         tracking_uri: str | None = None) -> list[PlannedStage]:
    """Keys, statuses and reasons for every stage of `recipe`, in topological order."""
    force = set(force or ())
    unknown = force - set(recipe.stages)
    if unknown:
        bad = sorted(unknown)[0]
        raise RecipeError(str(recipe.path), "--force", f"no stage {bad!r}"
                          f"{closest(bad, tuple(recipe.stages))}; stages: "
                          f"{', '.join(recipe.stages)}")
    if force_downstream:
        for name in recipe.stages:  # topological order: parents are decided first
            if any(p in force for p in recipe.stages[name].parents()):
                force.add(name)
    lock = read_lock(recipe)
    cache_file = (state_dir / "data_digests.json") if state_dir else None
    out: dict[str, PlannedStage] = {}
    for name, spec in recipe.stages.items():
        if spec.kind == "use" and spec.use_recipe:
            key, their = _their_key(recipe, spec, store, state_dir, tracking_uri)
            status, why = (("fresh", [f"pinned to {their}"]) if store.has(key) else
                           ("waiting", [f"waiting for {their} (not built yet)"]))
            out[name] = PlannedStage(spec, key, status, why, {})
            continue
        if spec.kind == "use":
            try:
                key = resolve_ref(spec.use or "", store, tracking_uri, state_dir)
            except (RefError, LookupError) as e:
                hint = ("; to plan on another team's stage before it is built, write use: "
                        "{recipe: path/to/their.yaml, stage: STAGE[@STEP]}"
                        if ":" in (spec.use or "") else "")
                raise RecipeError(str(recipe.path), spec.where + ".use", f"{e}{hint}") from None
            out[name] = PlannedStage(spec, key, "fresh", [f"pinned to {spec.use}"], {})
            continue
        input_keys: dict[str, Any] = {}
        for role, value in spec.inputs.items():
            input_keys[role] = ({k: _input_key(out, v) for k, v in value.items()}
                                if isinstance(value, dict) else _input_key(out, value))
        data_digests: dict[str, str] = {}
        kspec = kinds.spec(spec.kind)
        _check_pinned_inputs(recipe, spec, kspec, out, store)
        files_of = kspec.hooks.get("data_files")
        for dname, dpath in (files_of(spec.config) if files_of else {}).items():
            data_digests[dname] = keys.data_digest(dpath, cache_file)
        module = tasks.KINDS[spec.kind]
        files = dict(keys.code_files(module))
        code = keys.code_digest(module)
        launch = launch_key(spec)
        key = keys.content_key(spec.kind, spec.config, input_keys, data_digests, code, launch,
                               recipe.scale)
        ps = PlannedStage(spec, key, "fresh", [], input_keys, code, files, data_digests, launch,
                          {step: keys.snapshot_key(key, step) for step in spec.snapshots})
        missing = [f"@{step}" for step, k in ps.snapshots.items() if not store.has(k)]
        if name in force:
            ps.status, ps.reasons = "run", ["forced"]
        elif not store.has(key):
            ps.status, ps.reasons = "run", _reasons(ps, lock.get(name), out, store, recipe.name)
        elif missing:  # snapshots are published while the stage trains: train it again
            ps.status, ps.reasons = "run", [f"snapshots not in store: {', '.join(missing)}"]
        out[name] = ps
    return list(out.values())


def _input_key(planned: dict[str, PlannedStage], ref: str) -> str:
    """The key an input ref names: a stage's key, or for `STAGE@STEP` its snapshot's."""
    stage, step = kinds.split_ref(ref)
    return planned[stage].key if step is None else keys.snapshot_key(planned[stage].key, step)


_THEIRS: set[str] = set()  # other recipes being planned now (a cycle of `use:` files)


def _their_key(recipe: Recipe, spec: StageSpec, store: Store, state_dir: Path | None,
               tracking_uri: str | None) -> tuple[str, str]:
    """(key, "their_recipe:STAGE[@STEP]") of a `use: {recipe: FILE, stage: ...}` pin, planned
    from their recipe file against this store: the key their run will publish under."""
    from flows.recipe import parse

    where, file = spec.where + ".use", str(spec.use_recipe)
    if file in _THEIRS or file == str(recipe.path.resolve()):
        raise RecipeError(str(recipe.path), where, f"{file} pins stages of this recipe back "
                          "(a cycle of `use:` recipes); pin built artifacts instead")
    stage, step = kinds.split_ref(spec.use or "")
    _THEIRS.add(file)
    try:
        theirs = parse(file, (), getattr(recipe, "scale", 1.0))  # the scale this run uses
        if stage not in theirs.stages:
            raise RecipeError(str(recipe.path), where + ".stage", f"recipe {file} has no stage "
                              f"{stage!r}{closest(stage, tuple(theirs.stages))}")
        planned = plan(upstream(theirs, {stage}), store, state_dir=state_dir,
                       tracking_uri=tracking_uri)
    finally:
        _THEIRS.discard(file)
    ps = next(p for p in planned if p.name == stage)
    label = f"{theirs.name}:{spec.use}"
    if step is None:
        return ps.key, label
    if step not in ps.snapshots:
        saved = ", ".join(map(str, ps.snapshots)) or "none"
        raise RecipeError(str(recipe.path), where + ".stage", f"{theirs.name}:{stage} saves no "
                          f"snapshot at step {step} (it saves: {saved}); name a saved step")
    return ps.snapshots[step], label


def _check_pinned_inputs(recipe: Recipe, spec: StageSpec, kspec: kinds.KindSpec,
                         planned: dict[str, PlannedStage], store: Store) -> None:
    """The recipe loader checks edges between built stages; an edge from a `use:` pin is
    checked here, once the pinned artifact's manifest says what it is."""
    for role, decl in kspec.roles.items():
        value = spec.inputs.get(role)
        pairs = value.items() if isinstance(value, dict) else [(None, value)] if value else []
        for sub, parent in pairs:
            parent = kinds.split_ref(parent)[0]
            if planned[parent].spec.kind != "use":
                continue
            made = (store.manifest(planned[parent].key) or {}).get("produces")
            if made and made != decl.accepts:
                fld = FIELD_OF_ROLE[role]
                raise RecipeError(str(recipe.path), f"{spec.where}.{fld}{'.' + sub if sub else ''}",
                                  f"`{fld}` takes a {decl.accepts}, but {parent!r} is pinned to "
                                  f"a {made} ({planned[parent].spec.use}); pin a {decl.accepts}")


def launch_key(spec: StageSpec) -> dict[str, Any] | None:
    """What of `launch` enters the key: the rank count and the accelerate config's content."""
    if not spec.launch.distributed:
        return None
    out: dict[str, Any] = {"processes": spec.launch.processes}
    if spec.launch.accelerate:
        out["accelerate"] = keys.file_digest(spec.launch.accelerate)
    return out


def manifest_lock_entry(manifest: dict[str, Any], ps: PlannedStage) -> dict[str, Any]:
    """A stored manifest in the shape of a lock entry, so `_reasons` explains a change against
    the store when the lock file has no entry (a fresh clone, or the lock was never committed).

    The manifest's `launch` names the accelerate config by path, the key by content: with the
    same path, the old content cannot be known, so the new digest stands in for it (a content
    change then shows as "key changed" rather than a wrong "launch changed").
    """
    launch = manifest.get("launch")
    old_launch: dict[str, Any] | None = None
    if launch:
        old_launch = {"processes": launch.get("processes", 1)}
        acc = launch.get("accelerate")
        if acc and ps.launch and acc == ps.spec.launch.accelerate:
            old_launch["accelerate"] = ps.launch.get("accelerate")
        elif acc:
            old_launch["accelerate"] = acc
    return {"key": manifest.get("key"), "kind": manifest.get("kind"),
            "config": manifest.get("config") or {}, "inputs": manifest.get("inputs") or {},
            "code": (manifest.get("code") or {}).get("files") or {},
            "data": manifest.get("data_digests") or {}, "launch": old_launch}


def _stored_entry(store: Store, recipe: str, ps: PlannedStage) -> dict[str, Any] | None:
    """The lock-shaped entry of the artifact the store's ref `recipe:stage` names, or None."""
    try:
        key = store.resolve(f"{recipe}:{ps.name}")
        manifest = store.manifest(key)
    except (RefError, ValueError):  # no ref, a dangling ref, or an unreadable manifest
        return None
    return manifest_lock_entry(manifest, ps) if manifest else None


def _reasons(ps: PlannedStage, old: dict[str, Any] | None, planned: dict[str, PlannedStage],
             store: Store | None = None, recipe: str = "") -> list[str]:
    if not old and store is not None:
        old = _stored_entry(store, recipe, ps)
    if not old:
        return ["new stage"]
    if old.get("key") == ps.key:
        return ["not in store"]
    reasons: list[str] = []
    if old.get("kind") != ps.spec.kind:
        reasons.append(f"kind changed: {old.get('kind')} -> {ps.spec.kind}")
    else:
        reasons += [f"config changed: {c}" for c in config_changes(old.get("config", {}),
                                                                   ps.spec.config)]
    old_inputs = old.get("inputs", {})
    for role, value in ps.spec.inputs.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, parent in pairs:
            new_key = ps.input_keys[role][sub] if sub else ps.input_keys[role]
            old_v = old_inputs.get(role)
            old_key = old_v.get(sub) if isinstance(old_v, dict) and sub else old_v
            if old_key != new_key:
                reasons.append(f"data changed: {sub}" if role == "data"
                               else f"upstream changed: {parent}")
    old_code = old.get("code", {})
    for f in sorted(set(old_code) | set(ps.code_files)):
        if old_code.get(f) != ps.code_files.get(f):
            reasons.append(f"code changed: {f}")
    single = {"processes": 1}
    reasons += [f"launch changed: {c}" for c in config_changes(old.get("launch") or single,
                                                               ps.launch or single)]
    old_data = old.get("data", {})
    for n in sorted(set(old_data) | set(ps.data_digests)):
        if old_data.get(n) != ps.data_digests.get(n):
            reasons.append(f"data changed: {n}")
    return sorted(set(reasons), key=reasons.index) or ["key changed"]


if __name__ == "__main__":
    from flows.recipe import parse

    r = parse(sys.argv[1])
    for p in plan(r, Store(".posttrain/store")):
        print(json.dumps(p.as_json()))
