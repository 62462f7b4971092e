"""The manifest: every fact about one artifact, written last into its store directory.

Fields (format 1):

    format         1
    key            content key (artifacts/keys.py)
    recipe, stage  who built it (recipe name, stage name after foreach/rounds expansion)
    kind           stage kind (tasks/__init__.py) ; produces: "model" | "dataset"
    config         the fully resolved kind config (defaults and --set applied)
    inputs         {"init": key, "reference": key, "reward_model": key,
                    "teachers": {route: key}, "data": {name: key}}   (present roles only)
    input_refs     the same shape, each edge {"key", "recipe", "stage", "kind"}: lineage can
                   label edges without opening every parent
    data_digests   {name: digest} of user data files (`path:` data stages)
    code           {"digest": sha256, "files": {relpath: sha256}}
    versions       {python, torch, transformers, trl, accelerate, posttrain}
    git_commit     HEAD of the project checkout (None outside git), git_dirty: bool
    files          [{path, size, sha256}] of the payload (computed once, at publish)
    metrics        {"eval": {domain: acc}, "train": {...}, "history": [{step, ...}]}
    timings        {"started", "ended" (ISO 8601 UTC), "started_unix", "ended_unix", "seconds"}
    host           hostname ; run_id: the `posttrain run` that built it (None for `stage`)
    sft_root       key of the nearest `sft` ancestor along init edges (itself for kind sft)
    warnings       [str] (e.g. a cross-lineage teacher let through by allow_cross_lineage)
    inputs_verified  {"mode": "hash" | "size", "inputs", "files", "bytes", "seconds"}: how the
                   inputs were checked against their manifests before training (verify.py)

Not in the manifest: the MLflow ids {"tracking_uri", "experiment_id", "run_id", "model_id"}.
MLflow is mirrored only after the artifact is published, and a published manifest never
changes, so they live beside it in `mlflow.json` (Store.mlflow_ids; manifests written before
this carry them as a `mlflow` field, which Store.mlflow_ids still reads).

Run: ``posttrain show mimo_tiny:sft --json`` prints one.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
from importlib import metadata
from typing import Any

from artifacts.keys import PROJECT_ROOT

FORMAT = 1


def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="milliseconds")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "posttrain"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> tuple[str | None, bool]:
    """(HEAD, whether tracked files differ from it) of the project checkout, read without
    taking `.git/index.lock`: `git status` refreshes the index and would race the user's own
    git commands while a stage runs. GIT_OPTIONAL_LOCKS=0 keeps `git diff` lock-free too."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=PROJECT_ROOT,
                                text=True, capture_output=True, timeout=5,
                                env=env).stdout.strip() or None
        if commit is None:
            return None, False
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=PROJECT_ROOT,
                              capture_output=True, timeout=10, env=env)
        return commit, diff.returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None, False


def build(*, recipe: str, stage: str, kind: str, produces: str, config: dict[str, Any],
          inputs: dict[str, Any], input_refs: dict[str, Any], data_digests: dict[str, str],
          code_digest: str, code_files: dict[str, str], metrics: dict[str, Any],
          started: float, ended: float, sft_root: str | None, warnings: list[str],
          run_id: str | None) -> dict[str, Any]:
    """A manifest without `key` and `files` (the store adds those while publishing)."""
    commit, dirty = git_state()
    return {
        "format": FORMAT,
        "recipe": recipe,
        "stage": stage,
        "kind": kind,
        "produces": produces,
        "config": config,
        "inputs": inputs,
        "input_refs": input_refs,
        "data_digests": data_digests,
        "code": {"digest": code_digest, "files": code_files},
        "versions": library_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
        "metrics": metrics,
        "timings": {"started": iso(started), "ended": iso(ended), "started_unix": started,
                    "ended_unix": ended, "seconds": round(ended - started, 3)},
        "host": socket.gethostname(),
        "run_id": run_id,
        "sft_root": sft_root,
        "warnings": list(warnings),
    }
