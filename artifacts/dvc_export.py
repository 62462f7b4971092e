"""Export a recipe as a DVC pipeline (dvc.yaml) that DVC can run and draw, without ever hashing
a checkpoint.

Each stage runs ``posttrain stage RECIPE STAGE --store URI --pointer .posttrain/pointers/S.json``
(the same entry point Prefect, Kubernetes and ``accelerate launch`` use). Its deps are the recipe
file, the stage's code (``artifacts.keys.code_files`` of its kind module: the files that make up
its code digest) and its inputs' pointer files; its only out is its own pointer file (a small JSON
``{key, store, recipe, stage}``) with ``cache: false``. Checkpoints stay in the content-keyed
store, so ``dvc status`` costs the same for a 1 MB and a 10 GB model. A user data file (``path:``
of a ``data`` stage) is a plain dep; when it is tracked by DVC its key uses the DVC md5
(artifacts/keys.data_digest), so both tools agree on when it changed.

Run: ``posttrain export-dvc recipes/mimo_tiny.yaml --output dvc.yaml && dvc dag``
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

POINTER_DIR = ".posttrain/pointers"


def pointer_path(stage: str, pointer_dir: str = POINTER_DIR) -> str:
    return f"{pointer_dir}/{stage}.json"


def _rel(path: str | Path, root: Path) -> str:
    """`path` relative to the dvc.yaml directory, as DVC wants (posix separators)."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return Path(os.path.relpath(p, root)).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return p.as_posix()


def _kind_code_files(kind: str) -> list[str]:
    """Absolute paths of the files that make up a kind's code digest (AST only: no imports)."""
    from artifacts.keys import PROJECT_ROOT, code_files
    from tasks import KINDS

    if kind not in KINDS:
        return []  # "use" (a pinned artifact): nothing of ours runs
    return [str(PROJECT_ROOT / rel) for rel, _ in code_files(KINDS[kind])]


def stages_from_recipe(recipe: Any) -> list[dict[str, Any]]:
    """The export's stage list from a flows.recipe.Recipe (stages in topological order)."""
    specs = recipe.stages.values() if isinstance(recipe.stages, dict) else recipe.stages
    out = []
    for s in specs:
        data = [s.config["path"]] if s.kind == "data" and s.config.get("path") else []
        out.append({"name": s.name, "kind": s.kind, "parents": list(s.parents()),
                    "code_files": _kind_code_files(s.kind), "data_files": data})
    return out


def _field(stage: Any, name: str, default: Any = None) -> Any:
    # A dict from a test or another caller, or a StageSpec-like object.
    return stage.get(name, default) if isinstance(stage, dict) else getattr(stage, name, default)


def export_doc(recipe_path: str | Path, stages: Iterable[Any], store_uri: str, *,
               root: str | Path | None = None, pointer_dir: str = POINTER_DIR,
               command: str = "posttrain") -> dict[str, Any]:
    """The dvc.yaml document as a dict (see `export`)."""
    base = Path(root or Path.cwd()).absolute()
    recipe_rel = _rel(Path(recipe_path).absolute(), base)
    from artifacts.keys import PROJECT_ROOT

    doc: dict[str, Any] = {"stages": {}}
    for s in stages:
        name, kind = _field(s, "name"), _field(s, "kind")
        parents = _field(s, "parents")
        parents = list(parents() if callable(parents) else parents or [])
        code = _field(s, "code_files")
        if code is None:
            code = _kind_code_files(kind)
        out = pointer_path(name, pointer_dir)
        cmd = [command, "stage", recipe_rel, name, "--store", store_uri, "--pointer", out]
        deps = [recipe_rel]
        # code_files from artifacts.keys are relative to the project root, not to dvc.yaml.
        deps += sorted(_rel(Path(f) if Path(f).is_absolute() else PROJECT_ROOT / f, base)
                       for f in code)
        deps += [_rel(Path(f).absolute(), base) for f in _field(s, "data_files") or []]
        deps += [pointer_path(p, pointer_dir) for p in sorted(parents)]
        doc["stages"][name] = {
            "cmd": shlex.join(cmd),
            "deps": list(dict.fromkeys(deps)),
            "outs": [{out: {"cache": False}}],
            "meta": {"kind": kind},
        }
    return doc


def export(recipe_path: str | Path, stages: Iterable[Any], store_uri: str, *,
           root: str | Path | None = None, pointer_dir: str = POINTER_DIR,
           command: str = "posttrain") -> str:
    """dvc.yaml text for `stages` ([{name, kind, parents, code_files, data_files}] or
    StageSpecs). Paths are written relative to `root` (the directory of dvc.yaml, default the
    working directory); `code_files` may be relative to the project root or absolute."""
    import yaml

    doc = export_doc(recipe_path, stages, store_uri, root=root, pointer_dir=pointer_dir,
                     command=command)
    recipe_rel = _rel(Path(recipe_path).absolute(), Path(root or Path.cwd()).absolute())
    head = (f"# Generated by `posttrain export-dvc {recipe_rel}`: edit the recipe, export again.\n"
            "# Outs are small pointer files (key + store), never checkpoints: cache: false.\n")
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
