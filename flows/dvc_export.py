"""Export a recipe as a DVC pipeline (dvc.yaml) that DVC can run and draw, without ever hashing
a checkpoint.

Each stage runs ``posttrain stage RECIPE STAGE --store URI --pointer .posttrain/pointers/S.json``
(the entry point Prefect, Kubernetes and ``accelerate launch`` use too). Its only out is its
pointer file (a small JSON ``{key, store, recipe, stage}``, ``cache: false``): checkpoints stay
in the content-keyed store, so ``dvc status`` costs the same for a 1 MB and a 10 GB model.

Deps mirror what feeds the stage's content key, for the stage and every ancestor (an ancestor's
change changes the key too): the kind's code files (``artifacts.keys.code_files``, the files of
its code digest), user data files (``path:`` of a ``data`` stage; a DVC-tracked one is keyed by
its DVC md5, artifacts/keys.data_digest), and the recipe sections as DVC ``params`` (the stage
template, ``defaults.<kind>``, ``vars`` when used), plus the parents' pointer files. So after an
edit ``dvc status`` names the stages ``posttrain plan`` rebuilds (a ``resources:``,
``verify_inputs:`` or ``resume_every:`` edit is the exception: it is in the section but not in
the key). ``--set`` overrides are invisible to DVC.

Run: ``posttrain export-dvc recipes/mimo_tiny.yaml --output dvc.yaml && dvc dag``
"""

from __future__ import annotations

import os
import re
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


def _kind_data_files(kind: str, config: dict[str, Any]) -> dict[str, str]:
    """The user files a stage's key digests: the kind's `data_files` hook (tasks/kind.py)."""
    from tasks import KINDS
    from tasks.kind import spec

    files_of = spec(kind).hooks.get("data_files") if kind in KINDS else None
    return dict(files_of(config)) if files_of else {}


def _get(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def stages_from_recipe(recipe: Any) -> list[dict[str, Any]]:
    """The export's stage list from a flows.recipe.Recipe (stages in topological order).

    `params` name the recipe sections that feed a stage's content key: its template
    (``stages.<name as written>``), ``defaults.<kind>`` and, if the template uses them, ``vars``.
    """
    import yaml

    raw = yaml.safe_load(Path(recipe.path).read_text()) if getattr(recipe, "path", None) else {}
    specs = recipe.stages.values() if isinstance(recipe.stages, dict) else recipe.stages
    out = []
    for s in specs:
        where = getattr(s, "where", "") or ""
        body = _get(raw, where) if where else None
        params = None
        if body is not None:  # else: unknown layout, the whole recipe file stays a dep
            params = [where] + [k for k in (f"defaults.{s.kind}",) if _get(raw, k) is not None]
            # foreach, ${var} and {domain}-style placeholders all read `vars`.
            if "foreach" in body or re.search(r"\$\{|\{\w+\}", yaml.safe_dump(body)):
                params.append("vars")
        data = list(_kind_data_files(s.kind, s.config).values())
        out.append({"name": s.name, "kind": s.kind, "parents": list(s.parents()),
                    "code_files": _kind_code_files(s.kind), "data_files": data,
                    "params": params})
    return out


def _field(stage: Any, name: str, default: Any = None) -> Any:
    # A dict from a test or another caller, or a StageSpec-like object.
    return stage.get(name, default) if isinstance(stage, dict) else getattr(stage, name, default)


def export_doc(recipe_path: str | Path, stages: Iterable[Any], store_uri: str, *,
               root: str | Path | None = None, pointer_dir: str = POINTER_DIR,
               command: str = "posttrain") -> dict[str, Any]:
    """The dvc.yaml document as a dict (see `export`)."""
    from artifacts.keys import PROJECT_ROOT

    base = Path(root or Path.cwd()).absolute()
    recipe_rel = _rel(Path(recipe_path).absolute(), base)
    if "://" not in store_uri:  # a local store path given from the cwd: DVC runs in `root`
        store_uri = _rel(Path(store_uri).absolute(), base)
    info: dict[str, dict[str, Any]] = {}
    for s in stages:
        parents = _field(s, "parents")
        code = _field(s, "code_files")
        info[_field(s, "name")] = {
            "kind": _field(s, "kind"),
            "parents": sorted(parents() if callable(parents) else parents or []),
            # code_files of artifacts.keys are relative to the project root, not to dvc.yaml.
            "code": [_rel(Path(f) if Path(f).is_absolute() else PROJECT_ROOT / f, base)
                     for f in (code if code is not None else _kind_code_files(_field(s, "kind")))],
            "data": [_rel(Path(f).absolute(), base) for f in _field(s, "data_files") or []],
            "params": _field(s, "params")}

    def lineage(name: str) -> list[str]:  # the stage and all its ancestors in this recipe
        seen, todo = [], [name]
        while todo:
            if (n := todo.pop()) not in seen and n in info:
                seen.append(n)
                todo += info[n]["parents"]
        return seen

    doc: dict[str, Any] = {"stages": {}}
    for name, st in info.items():
        # An ancestor's change changes this stage's key too (`posttrain plan` marks it stale);
        # listing the ancestors' code and recipe sections makes `dvc status` agree.
        up = lineage(name)
        params = [p for n in up for p in (info[n]["params"] or [])]
        whole_file = any(info[n]["params"] is None for n in up)
        out = pointer_path(name, pointer_dir)
        deps = [recipe_rel] if whole_file else []
        deps += sorted({f for n in up for f in info[n]["code"]})
        deps += sorted({f for n in up for f in info[n]["data"]})
        deps += [pointer_path(p, pointer_dir) for p in st["parents"]]
        stage: dict[str, Any] = {
            "cmd": shlex.join([command, "stage", recipe_rel, name, "--store", store_uri,
                               "--pointer", out]),
            "deps": list(dict.fromkeys(deps))}
        if params:
            stage["params"] = [{recipe_rel: list(dict.fromkeys(params))}]
        stage["outs"] = [{out: {"cache": False}}]
        stage["meta"] = {"kind": st["kind"]}
        doc["stages"][name] = stage
    return doc


def export(recipe_path: str | Path, stages: Iterable[Any], store_uri: str, *,
           root: str | Path | None = None, pointer_dir: str = POINTER_DIR,
           command: str = "posttrain") -> str:
    """dvc.yaml text for `stages`: dicts {name, kind, parents, code_files, data_files, params}
    (only name/kind/parents required) or StageSpecs. Paths are relative to `root` (where
    dvc.yaml lives, default the working directory); `code_files` may be relative to the project
    root or absolute. Without `params` a stage depends on the whole recipe file."""
    import yaml

    doc = export_doc(recipe_path, stages, store_uri, root=root, pointer_dir=pointer_dir,
                     command=command)
    recipe_rel = _rel(Path(recipe_path).absolute(), Path(root or Path.cwd()).absolute())
    head = (f"# Generated by `posttrain export-dvc {recipe_rel}`: edit the recipe, export again.\n"
            "# Outs are small pointer files (key + store), never checkpoints: cache: false.\n")
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000)
