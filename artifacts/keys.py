"""Content keys: what makes two stage runs "the same", without ever reading checkpoint bytes.

    key = sha256(canonical_json({
        "v": KEY_VERSION,
        "kind": kind,
        "config": fully resolved config (defaults applied, --set applied),
        "inputs": {role: parent key | {name: parent key}},
        "data": {name: digest of user data files},
        "code": digest of the kind's module + every project module it imports (transitively),
    }))

Each code file counts by its normalized AST (docstrings dropped, no line numbers, comments
and whitespace never parsed), so rewording a docstring or a comment in `tasks/sft.py` retrains
nothing, while any change to a statement, a default or an import makes its users stale.

Parent keys stand in for parent checkpoints, so the cost is flat in checkpoint size: a 1 GB
and a 1 MB checkpoint cost the same to key (bench/plan_speed.py measures this). User data files
(`path:` in a `data` stage) are hashed by content, cached on (path, size, mtime_ns); a file
tracked by DVC is digested by the md5 in its `.dvc` file instead of being re-read.

Run: ``python -m artifacts.keys tasks.sft`` prints the code digest of a kind and its files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

KEY_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("tasks", "artifacts", "flows")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, floats as repr (1e-3 == 0.001)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def content_key(kind: str, config: dict[str, Any], inputs: dict[str, Any],
                data: dict[str, str], code: str, launch: dict[str, Any] | None = None,
                scale: float = 1.0) -> str:
    """The content key of one stage (64 hex). `launch` (data-parallel processes, accelerate
    config digest) counts where given: N ranks train on N times the batch. `scale` (`posttrain
    run --scale`) counts unless 1, so a scaled artifact never stands for a full one.

    >>> k = content_key("sft", {"max_steps": 2}, {"init": "a" * 64}, {}, "c0de")
    >>> len(k), k == content_key("sft", {"max_steps": 2}, {"init": "a" * 64}, {}, "c0de")
    (64, True)
    >>> k == content_key("sft", {"max_steps": 3}, {"init": "a" * 64}, {}, "c0de")
    False
    """
    payload = {"v": KEY_VERSION, "kind": kind, "config": config, "inputs": inputs, "data": data,
               "code": code}
    if launch:  # absent for single-process stages, so their keys predate `launch`
        payload["launch"] = launch
    if scale != 1:  # absent at full scale, so those keys predate `--scale`
        payload["scale"] = scale
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def snapshot_key(stage_key: str, step: int) -> str:
    """The key of a training stage's snapshot at `step`: H(stage key, step). The stage key
    says everything that made the run; the step says how far into it.

    >>> k = snapshot_key("a" * 64, 250)
    >>> len(k), k == snapshot_key("a" * 64, 250), k == snapshot_key("a" * 64, 500)
    (64, True, False)
    """
    payload = {"v": KEY_VERSION, "snapshot_of": stage_key, "step": int(step)}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# -- code digest ---------------------------------------------------------------------------

def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(module: str, path: Path, tree: ast.Module | None = None) -> set[str]:
    """Project modules imported anywhere in `path` (top level or inside functions)."""
    if tree is None:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from tasks import domains` imports the submodule tasks.domains
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if _module_file(m) is not None}


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    """Drop the docstring of the module and of every class and function (in place), leaving
    `pass` where that empties a body, so prose edits do not count as code changes."""
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
            continue
        body = node.body
        if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def ast_digest(tree: ast.Module) -> str:
    """sha256 of a parsed file's normalized AST: docstrings stripped, no positions (so line
    numbers, whitespace and comments never count). Strips `tree`'s docstrings in place."""
    dump = ast.dump(_strip_docstrings(tree), annotate_fields=True, include_attributes=False)
    return hashlib.sha256(dump.encode()).hexdigest()


@cache
def code_files(module: str) -> tuple[tuple[str, str], ...]:
    """((relative path, AST digest), ...) of `module` and its transitive project imports.

    Each file counts by `ast_digest` (not its bytes): editing a docstring or a comment leaves
    every key as it was. Package ``__init__`` files are left out (tasks/__init__.py is the kind
    table: adding a kind must not make every existing stage stale) unless imported as a module
    of their own.
    """
    seen: dict[str, Path] = {}
    digests: dict[str, str] = {}
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = _module_file(mod)
        if path is None:
            continue
        seen[mod] = path
        tree = ast.parse(path.read_bytes(), filename=str(path))
        todo.extend(_imports(mod, path, tree) - seen.keys())
        digests[mod] = ast_digest(tree)  # after _imports: this strips docstrings in place
    rows = []
    for mod, path in seen.items():
        if path.name == "__init__.py" and mod != module:
            continue
        rows.append((path.relative_to(PROJECT_ROOT).as_posix(), digests[mod]))
    return tuple(sorted(rows))


def code_digest(module: str) -> str:
    """One hash over `code_files(module)`."""
    return hashlib.sha256(canonical_json(code_files(module)).encode()).hexdigest()


# -- data digests --------------------------------------------------------------------------

def _dvc_md5(path: Path) -> str | None:
    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    import yaml

    doc = yaml.safe_load(dvc_file.read_text()) or {}
    for out in doc.get("outs", []):
        if out.get("path") == path.name and out.get("md5"):
            return f"dvc-md5:{out['md5']}"
    return None


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of one small file's bytes (a launcher config: its content counts, not its path)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def data_digest(path: str | os.PathLike[str], cache_file: Path | None = None) -> str:
    """Digest of a user data file: its DVC md5 when tracked by DVC, else sha256 of its bytes
    (cached on path, size and mtime so an unchanged file is not re-read by `plan`)."""
    p = Path(path).resolve()
    dvc = _dvc_md5(p)
    if dvc:
        return dvc
    st = p.stat()
    stamp = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache: dict[str, str] = {}
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    if stamp in cache:
        return cache[stamp]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = f"sha256:{h.hexdigest()}"
    if cache_file:
        cache[stamp] = digest
        from artifacts.store import atomic_write

        atomic_write(cache_file, json.dumps(cache))
    return digest


if __name__ == "__main__":
    mod = sys.argv[1] if len(sys.argv) > 1 else "tasks.sft"
    print(code_digest(mod))
    for rel, sha in code_files(mod):
        print(f"  {sha[:12]}  {rel}")
