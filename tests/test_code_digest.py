"""Code digests over the normalized AST, and plan's reasons when the lock file has no entry.

Why: rewording a docstring or a comment in a kind's module must not retrain anything, while a
changed statement must make exactly that kind's users (and their descendants) stale. And a fresh
clone planning against a store built elsewhere (no lock file yet) should still say *what*
changed, from the manifests the store's refs name, instead of "new stage" everywhere.

Everything runs against a small copy of the project packages (`tasks`, `artifacts`, `flows`)
that `artifacts.keys.PROJECT_ROOT` is pointed at, with fake artifacts in a tmp store.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifacts import keys, manifest
from artifacts.store import Store
from flows.plan import PlannedStage, plan, write_lock
from flows.recipe import Recipe, parse

REPO = Path(__file__).resolve().parent.parent
SPINE = Path(__file__).resolve().parent / "recipes" / "spine_tiny.yaml"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the project packages that code digests are computed from."""
    root = tmp_path / "project"
    for pkg in keys.PROJECT_PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(keys, "PROJECT_ROOT", root)
    keys.code_files.cache_clear()
    yield root
    keys.code_files.cache_clear()  # before monkeypatch restores the real root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    keys.code_files.cache_clear()


def _prose_edit(sft: Path) -> None:
    """Reword the module docstring and a function docstring, add comments and blank lines."""
    text = sft.read_text()
    tree = ast.parse(text)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and ast.get_docstring(n))
    fn_doc = ast.get_docstring(fn, clean=False)
    module_doc = ast.get_docstring(tree, clean=False)
    assert fn_doc and module_doc
    first_fn_line = fn_doc.splitlines()[0]
    first_mod_line = module_doc.splitlines()[0]
    _edit(sft, first_mod_line, first_mod_line + " Reworded, with more words.")
    _edit(sft, first_fn_line, "Reworded: " + first_fn_line)
    _edit(sft, "\nimport json\n", "\n# a new comment\n\n\nimport json  # and another\n")


def _statement_edit(sft: Path) -> None:
    """Change one default number: a code change."""
    _edit(sft, "max_steps: int = Field(750,", "max_steps: int = Field(751,")


# -- the digest itself ---------------------------------------------------------------------

def test_ast_digest_ignores_docstrings_comments_and_layout() -> None:
    def digest(src: str) -> str:
        return keys.ast_digest(ast.parse(src))

    base = digest("def f(x):\n    return x + 1\n")
    assert digest('"""Module doc."""\n# comment\n\ndef f(x):\n    """Doc."""\n'
                  "    return (x +\n            1)  # why\n") == base
    # A body that is only a docstring becomes `pass`, so it still parses the same way.
    assert digest('class A:\n    """Doc only."""\n') == digest("class A:\n    pass\n")
    assert digest('async def g():\n    "doc"\n') == digest("async def g():\n    pass\n")
    # Only the first statement is a docstring: a later string expression is code.
    assert digest('def f():\n    pass\n    "not a docstring"\n') != digest("def f():\n    pass\n")
    assert digest("def f(x):\n    return x + 2\n") != base


def test_prose_edit_keeps_the_code_digest(project: Path) -> None:
    before = {m: keys.code_files(m) for m in ("tasks.sft", "tasks.grpo", "tasks.mopd")}
    digest = keys.code_digest("tasks.sft")
    _prose_edit(project / "tasks" / "sft.py")
    assert keys.code_digest("tasks.sft") == digest
    assert {m: keys.code_files(m) for m in before} == before


def test_statement_edit_changes_sft_and_its_importers_only(project: Path) -> None:
    kinds = ("tasks.sft", "tasks.grpo", "tasks.mopd", "tasks.base", "tasks.data")
    importers = {m for m in kinds if "tasks/sft.py" in dict(keys.code_files(m))}
    assert importers == {"tasks.sft", "tasks.grpo"}  # grpo reuses sft's helpers; mopd does not
    before = {m: keys.code_digest(m) for m in kinds}
    _statement_edit(project / "tasks" / "sft.py")
    after = {m: keys.code_digest(m) for m in kinds}
    assert {m for m in kinds if after[m] != before[m]} == importers


# -- through plan --------------------------------------------------------------------------

def _recipe_copy(dest: Path, sets: tuple[str, ...] = ()) -> Recipe:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(SPINE, dest / SPINE.name)
    return parse(dest / SPINE.name, sets)


def _publish_all(store: Store, recipe: Recipe, planned: list[PlannedStage]) -> None:
    """A tiny fake artifact (payload + real manifest) per stage, and the refs to them."""
    for p in planned:
        staged = store.staging_dir(p.key)
        (staged / "payload.txt").write_text(p.name)
        man = manifest.build(
            recipe=recipe.name, stage=p.name, kind=p.spec.kind, produces="model",
            config=p.spec.config, inputs=p.input_keys, input_refs={},
            data_digests=p.data_digests, code_digest=p.code_digest, code_files=p.code_files,
            metrics={}, started=0.0, ended=1.0, sft_root=None, warnings=[], run_id=None)
        store.publish(p.key, staged, man)
        store.set_ref(recipe.name, p.name, p.key)


def _descendants(recipe: Recipe, root: str) -> set[str]:
    out = {root}
    for name, spec in recipe.stages.items():  # topological order
        if out & set(spec.parents()):
            out.add(name)
    return out


def test_plan_after_prose_and_statement_edits(project: Path, tmp_path: Path) -> None:
    recipe = _recipe_copy(tmp_path / "recipes")
    store = Store(tmp_path / "store")
    first = plan(recipe, store)
    _publish_all(store, recipe, first)
    write_lock(recipe, first, done={p.name for p in first})
    old = {p.name: p.key for p in first}
    assert all(p.status == "fresh" for p in plan(recipe, store))

    sft = project / "tasks" / "sft.py"
    _prose_edit(sft)
    again = plan(recipe, store)
    assert {p.name: p.key for p in again} == old
    assert all(p.status == "fresh" for p in again)

    # The recipe's config comes from the imported (real) modules, so only code changes here.
    _statement_edit(sft)
    stale = _descendants(recipe, "sft")
    assert stale == {"sft", "rl_arith", "rl_reverse", "mopd_r1", "mopd"}
    after = {p.name: p for p in plan(recipe, store)}
    for name, p in after.items():
        if name in stale:
            assert p.status == "run" and p.key != old[name], name
        else:
            assert p.status == "fresh" and p.key == old[name], name
    assert after["sft"].reasons == ["code changed: tasks/sft.py"]
    assert after["rl_arith"].reasons == ["upstream changed: sft", "code changed: tasks/sft.py"]
    assert after["mopd_r1"].reasons == ["upstream changed: sft", "upstream changed: rl_arith",
                                        "upstream changed: rl_reverse"]


# -- reasons from the store when the lock has no entry -------------------------------------

def test_fresh_clone_explains_changes_from_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    built = _recipe_copy(tmp_path / "elsewhere")  # the team that built the store
    _publish_all(store, built, plan(built, store))

    clone = _recipe_copy(tmp_path / "clone", ("rl_arith.max_steps=2",))
    assert not clone.path.with_suffix(".lock").exists()
    after = {p.name: p for p in plan(clone, store)}
    assert after["rl_arith"].status == "run"
    assert after["rl_arith"].reasons == ["config changed: max_steps 1 -> 2"]
    for name in ("mopd_r1", "mopd"):
        assert after[name].status == "run"
        assert "upstream changed: rl_arith" in after[name].reasons, after[name].reasons
    assert after["mopd"].reasons == ["upstream changed: mopd_r1", "upstream changed: rl_arith"]
    for name in ("data", "base", "sft", "rl_reverse"):
        assert after[name].status == "fresh", name


def test_no_lock_and_no_usable_ref_is_a_new_stage(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    recipe = _recipe_copy(tmp_path / "clone")
    store.set_ref(recipe.name, "sft", "f" * 64)  # a dangling ref: its key is not stored
    broken = tmp_path / "store" / "objects" / ("e" * 64)
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")  # an unreadable manifest
    store.set_ref(recipe.name, "base", "e" * 64)
    out = plan(recipe, store)
    assert all(p.status == "run" and p.reasons == ["new stage"] for p in out)


def test_lock_entry_wins_over_the_store_ref(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    built = _recipe_copy(tmp_path / "elsewhere")
    _publish_all(store, built, plan(built, store))
    recipe = _recipe_copy(tmp_path / "clone", ("rl_arith.max_steps=3",))
    write_lock(recipe, plan(recipe, store), done={"rl_arith"})  # the lock says max_steps 3
    changed = _recipe_copy(tmp_path / "clone", ("rl_arith.max_steps=4",))
    rl = next(p for p in plan(changed, store) if p.name == "rl_arith")
    assert rl.reasons == ["config changed: max_steps 3 -> 4"]
