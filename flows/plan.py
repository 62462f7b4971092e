"""Plan: content keys for every stage, "fresh" or "run", and why — without running anything.

A stage is fresh when its key is in the store (and it is not forced). Reasons for "run" come
from comparing with `recipes/NAME.lock`, the record of the last good run that users commit:
`new stage`, `config changed: max_steps 100 -> 120`, `upstream changed: sft`,
`code changed: tasks/sft.py`, `data changed: train`, `forced`, `not in store`.

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

from artifacts import keys
from artifacts.store import RefError, Store, atomic_write
from flows.recipe import Recipe, RecipeError, StageSpec, closest

LOCK_FORMAT = 1


@dataclass
class PlannedStage:
    spec: StageSpec
    key: str
    status: str  # "fresh" | "run"
    reasons: list[str]
    input_keys: dict[str, Any]  # role -> key | {name: key}
    code_digest: str = ""
    code_files: dict[str, str] = field(default_factory=dict)
    data_digests: dict[str, str] = field(default_factory=dict)
    launch: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def as_json(self) -> dict[str, Any]:
        return {"stage": self.name, "kind": self.spec.kind, "key": self.key,
                "status": self.status, "reasons": self.reasons}

    def lock_entry(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.spec.kind, "config": self.spec.config,
                "inputs": self.input_keys, "parents": self.spec.inputs,
                "code": self.code_files, "data": self.data_digests, "use": self.spec.use,
                "launch": self.launch}


def lock_path(recipe: Recipe) -> Path:
    return recipe.path.with_suffix(".lock")


def read_lock(recipe: Recipe) -> dict[str, Any]:
    p = lock_path(recipe)
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text())
    except ValueError:
        raise RecipeError(str(p), "", "the lock file is not valid JSON; delete it (it is "
                          "rewritten by the next successful run)") from None
    return doc.get("stages", {}) if isinstance(doc, dict) else {}


def write_lock(recipe: Recipe, planned: list[PlannedStage], done: set[str]) -> None:
    """Record stage -> key for the stages that are in the store now (atomic rewrite)."""
    old = read_lock(recipe)
    stages = {p.name: p.lock_entry() if p.name in done else old.get(p.name)
              for p in planned}
    doc = {"format": LOCK_FORMAT, "recipe": recipe.name,
           "stages": {k: v for k, v in stages.items() if v is not None}}
    atomic_write(lock_path(recipe), json.dumps(doc, indent=2, sort_keys=True) + "\n")


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


def resolve_use(ref: str, store: Store, tracking_uri: str | None = None,
                state_dir: Path | None = None) -> str:
    if ref.startswith("models:/"):
        from artifacts import tracking  # imports mlflow: only for models:/ refs

        key = tracking.resolve_model_uri(ref, tracking_uri, state_dir or Path(".posttrain"))
        if not store.has(key):
            raise RefError(f"{ref} points at key {key[:12]}, which is not in {store.uri} "
                           "(pass the --store that holds it)")
        return key
    return store.resolve(ref)


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
        if spec.kind == "use":
            try:
                key = resolve_use(spec.use or "", store, tracking_uri, state_dir)
            except (RefError, LookupError) as e:
                raise RecipeError(str(recipe.path), spec.where + ".use", str(e)) from None
            out[name] = PlannedStage(spec, key, "fresh", [f"pinned to {spec.use}"], {})
            continue
        input_keys: dict[str, Any] = {}
        for role, value in spec.inputs.items():
            input_keys[role] = ({k: out[v].key for k, v in value.items()}
                                if isinstance(value, dict) else out[value].key)
        data_digests: dict[str, str] = {}
        if spec.kind == "data" and spec.config.get("path"):
            data_digests["path"] = keys.data_digest(spec.config["path"], cache_file)
        module = f"tasks.{spec.kind}"
        files = dict(keys.code_files(module))
        code = keys.code_digest(module)
        launch = launch_key(spec)
        key = keys.content_key(spec.kind, spec.config, input_keys, data_digests, code, launch)
        ps = PlannedStage(spec, key, "fresh", [], input_keys, code, files, data_digests, launch)
        if name in force:
            ps.status, ps.reasons = "run", ["forced"]
        elif not store.has(key):
            ps.status, ps.reasons = "run", _reasons(ps, lock.get(name), out)
        out[name] = ps
    return list(out.values())


def launch_key(spec: StageSpec) -> dict[str, Any] | None:
    """What of `launch` enters the key: the rank count and the accelerate config's content."""
    if not spec.launch.distributed:
        return None
    out: dict[str, Any] = {"processes": spec.launch.processes}
    if spec.launch.accelerate:
        out["accelerate"] = keys.file_digest(spec.launch.accelerate)
    return out


def _reasons(ps: PlannedStage, old: dict[str, Any] | None,
             planned: dict[str, PlannedStage]) -> list[str]:
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
            new_key = planned[parent].key
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
