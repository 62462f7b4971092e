"""Structure checks on artifacts/ and flows/: no import cycles, no reaching into another
module's private names, and one CLI mechanism (every subcommand shares the common options and
the one error guard of flows.cli.main).

Cycles are checked over every import, inside functions and under TYPE_CHECKING included: a
cycle hidden in a function still ties two modules together. Private access is checked
syntactically: `x._name` where `x` is bound by an import in that module (a module or a name
from one), or `x._name` on any other name when `_name` is defined nowhere in the module (then it
must belong to another module's class). `self`/`cls` and dunders are always fine.

Run: ``.venv/bin/python -m pytest tests/test_cli_structure.py -q``
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import io
from pathlib import Path

import pytest

from flows import cli, cli_common

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("artifacts", "flows")


def modules() -> dict[str, ast.Module]:
    """{"artifacts.store": tree, ...} for every module of PACKAGES (package __init__ aside)."""
    return {f"{pkg}.{p.stem}": ast.parse(p.read_text(), str(p))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))
            if p.name != "__init__.py"}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules in `known` that `tree` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # from pkg import module
    return out & known


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def private_reaches(tree: ast.Module) -> list[str]:
    """`x._name` accesses that reach into another module's private names."""
    imported: set[str] = set()
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Name):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)  # self._x = ...: this module's own attribute
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        name, attr = node.value.id, node.attr
        if not attr.startswith("_") or attr.startswith("__") or name in ("self", "cls"):
            continue
        if name in imported or attr not in defined:
            bad.append(f"line {node.lineno}: {name}.{attr}")
    return bad


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {m: imports(t, set(mods)) - {m} for m, t in mods.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_cycle_finder_finds_cycles() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_private_cross_module_calls() -> None:
    bad = {m: found for m, t in modules().items() if (found := private_reaches(t))}
    assert not bad, bad


def test_private_check_flags_other_modules_privates() -> None:
    src = ("from artifacts import tracking\nimport os\n"
           "def f(tracker):\n    tracker._client()\n    tracking._pages()\n    os._exit(0)\n"
           "class A:\n    def __init__(self):\n        self._x = 1\n"
           "    def g(self, other):\n        return other._x, self._x\n")
    assert private_reaches(ast.parse(src)) == ["line 4: tracker._client", "line 5: tracking._pages",
                                               "line 6: os._exit"]


def parser_actions(parser: object) -> dict[str, dict[str, object]]:
    """{subcommand: {option: action}} of the `posttrain` parser."""
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))  # type: ignore[attr-defined]
    return {name: {o: a for a in p._actions for o in a.option_strings}
            for name, p in sub.choices.items()}


def test_every_subcommand_has_the_common_options() -> None:
    commands = parser_actions(cli.build_parser())
    assert {"run", "plan", "stage", "ls", "show", "lineage", "teachers", "students", "impact",
            "sync", "export-dvc", "verify"} <= set(commands)
    for name, opts in commands.items():
        for flag in ("--store", "--state-dir"):
            assert flag in opts, (name, flag)
        # One definition: same help and default wherever an option appears.
        for flag in ("--store", "--state-dir", "--tracking-uri", "--set"):
            if flag in opts:
                ref = next(o[flag] for o in commands.values() if flag in o)
                assert (opts[flag].help, opts[flag].default) == (ref.help, ref.default), flag
    for name in ("run", "plan", "stage", "show", "lineage", "teachers", "impact", "sync"):
        assert "--tracking-uri" in commands[name], name


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(argv))
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", [["show", "nope:stage"], ["lineage", "zz"],
                                  ["verify", "models:/x@current"]])
def test_one_error_guard(tmp_path: Path, argv: list[str]) -> None:
    rc, _, err = run_main(*argv, "--store", str(tmp_path / "empty"), "--state-dir",
                          str(tmp_path / "state"))
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_version() -> None:
    rc, out, _ = run_main("--version")
    assert rc == 0 and out.strip() == f"posttrain {importlib.metadata.version('posttrain')}"


def test_version_without_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert cli_common.version() == tomllib.load(f)["project"]["version"]
