"""Content keys and `posttrain plan`: what makes a stage stale, and nothing else.

- content_key changes with each ingredient (kind, config, inputs, data, code) and only then;
- code digests follow project imports transitively (tasks.mopd -> tasks/mopd_loss.py);
- in a copy of the project (flows/ tasks/ artifacts/ + tests/recipes/spine_tiny.yaml) with
  every stage faked into a store and a lock written, `plan --json` says all fresh; appending a
  statement to a helper or a kind module marks exactly its users and their descendants, with
  reasons; `--set rl_arith.max_steps=3` marks exactly rl_arith and its descendants;
- `plan` imports neither prefect nor torch and answers in under a second.

Run: ``.venv/bin/python -m pytest tests/test_keys_plan.py -q``
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts import keys
from artifacts.keys import code_files, content_key

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "tests" / "recipes" / "spine_tiny.yaml"
STAGES = ["data", "base", "sft", "rl_arith", "rl_reverse", "mopd_r1", "mopd"]

# Run inside the copy: plan, fake every stage into the store, write the lock.
SEED = """
import sys
from artifacts import keys
from artifacts.store import Store
from flows.plan import plan, write_lock
from flows.recipe import parse

assert str(keys.PROJECT_ROOT) == sys.argv[3], (keys.PROJECT_ROOT, sys.argv[3])
recipe, store = parse(sys.argv[1]), Store(sys.argv[2])
planned = plan(recipe, store)
for p in planned:
    staged = store.staging_dir(p.key)
    (staged / "payload.bin").write_bytes(b"tiny")
    store.publish(p.key, staged, {"recipe": recipe.name, "stage": p.name, "kind": p.spec.kind})
    store.set_ref(recipe.name, p.name, p.key)
write_lock(recipe, planned, {p.name for p in planned})
"""


# -- content keys -----------------------------------------------------------------------------

def test_content_key_changes_with_each_ingredient() -> None:
    base = dict(kind="sft", config={"max_steps": 2, "trainer": {"a": 1}},
                inputs={"init": "a" * 64, "data": {"train": "b" * 64}},
                data={"path": "sha256:00"}, code="c0de")
    k0 = content_key(**base)
    assert len(k0) == 64 and k0 == content_key(**base)
    variants = {
        "kind": dict(base, kind="grpo"),
        "config": dict(base, config={"max_steps": 3, "trainer": {"a": 1}}),
        "nested config": dict(base, config={"max_steps": 2, "trainer": {"a": 2}}),
        "new config field": dict(base, config={**base["config"], "seed": 0}),
        "init key": dict(base, inputs={**base["inputs"], "init": "f" * 64}),
        "data input key": dict(base, inputs={**base["inputs"], "data": {"train": "e" * 64}}),
        "input name": dict(base, inputs={**base["inputs"], "data": {"eval": "b" * 64}}),
        "role": dict(base, inputs={"reference": "a" * 64, "data": {"train": "b" * 64}}),
        "data digest": dict(base, data={"path": "sha256:01"}),
        "code": dict(base, code="c0df"),
    }
    seen = {k0}
    for what, v in variants.items():
        k = content_key(**v)
        assert k not in seen, f"changing the {what} must change the key"
        seen.add(k)
    # ...and nothing else: key order in the JSON does not matter
    shuffled = dict(base, config={"trainer": {"a": 1}, "max_steps": 2},
                    inputs={"data": {"train": "b" * 64}, "init": "a" * 64})
    assert content_key(**shuffled) == k0


def _rel(module: str) -> set[str]:
    return {path for path, _ in code_files(module)}


def test_code_files_follow_project_imports() -> None:
    mopd = _rel("tasks.mopd")
    assert {"tasks/mopd.py", "tasks/compat.py", "tasks/mopd_loss.py", "tasks/mopd_trainer.py",
            "tasks/rollout.py"} <= mopd
    assert "tasks/sft.py" not in mopd
    assert "tasks/__init__.py" not in mopd  # the kind table: adding a kind stales nothing
    for kind in ("grpo", "sft"):
        assert "tasks/evaluate.py" in _rel(f"tasks.{kind}")
    # grpo checks its reward models' tokenizers (tasks/compat.py); sft consumes no other model
    assert "tasks/compat.py" in _rel("tasks.grpo") and "tasks/compat.py" not in _rel("tasks.sft")
    assert "tasks/mopd_loss.py" not in _rel("tasks.grpo") | _rel("tasks.sft")
    digest = keys.code_digest("tasks.mopd")
    assert digest == keys.code_digest("tasks.mopd") and digest != keys.code_digest("tasks.sft")
    for path, sha in code_files("tasks.mopd"):
        assert (REPO / path).is_file() and len(sha) == 64


# -- plan in a copy of the project ---------------------------------------------------------

def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_")}
    return dict(env, PYTHONPATH=str(root))


def _copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("flows", "tasks", "artifacts"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=ignore)
    (dest / "recipes").mkdir()
    shutil.copy(RECIPE, dest / "recipes" / RECIPE.name)
    return dest


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A project copy whose every stage is in the store and in the lock."""
    tmp = tmp_path_factory.mktemp("keys_plan")
    proj = _copy_project(tmp / "proj")
    store = tmp / "store"
    proc = subprocess.run([sys.executable, "-c", SEED, f"recipes/{RECIPE.name}", str(store),
                           str(proj)], cwd=proj, env=_env(proj), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (proj / "recipes" / "spine_tiny.lock").is_file()
    return {"proj": proj, "store": store, "state": tmp / "state"}


def _plan(c: dict[str, Path], proj: Path | None = None, *args: str) -> dict[str, dict]:
    proj = proj or c["proj"]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "plan", f"recipes/{RECIPE.name}", "--json",
         "--store", str(c["store"]), "--state-dir", str(c["state"]), *args],
        cwd=proj, env=_env(proj), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["stage"] for r in rows] == STAGES
    return {r["stage"]: r for r in rows}


def _running(rows: dict[str, dict]) -> set[str]:
    return {s for s, r in rows.items() if r["status"] == "run"}


def test_cached_recipe_plans_all_fresh(cached: dict[str, Path]) -> None:
    rows = _plan(cached)
    assert _running(rows) == set()
    assert all(r["reasons"] == [] for r in rows.values())
    lock = json.loads((cached["proj"] / "recipes" / "spine_tiny.lock").read_text())
    assert {s: e["key"] for s, e in lock["stages"].items()} == {
        s: r["key"] for s, r in rows.items()}


@pytest.mark.parametrize("edited,code_changed,downstream", [
    ("tasks/mopd_loss.py", {"mopd_r1", "mopd"}, set()),
    ("tasks/grpo.py", {"rl_arith", "rl_reverse"}, {"mopd_r1", "mopd"}),
])
def test_editing_a_module_marks_exactly_its_users(
        cached: dict[str, Path], tmp_path: Path, edited: str, code_changed: set[str],
        downstream: set[str]) -> None:
    proj = tmp_path / "proj"
    shutil.copytree(cached["proj"], proj)
    before = _plan(cached, proj)
    with open(proj / edited, "a") as f:
        # A statement: a comment alone no longer counts (the digest is over the AST).
        f.write("\n_EDITED = 1\n")
    rows = _plan(cached, proj)
    assert _running(rows) == code_changed | downstream
    for s in code_changed:
        assert f"code changed: {edited}" in rows[s]["reasons"], rows[s]
        assert rows[s]["key"] != before[s]["key"]
    for s in downstream:
        assert f"code changed: {edited}" not in rows[s]["reasons"], rows[s]
        assert any(r.startswith("upstream changed: ") for r in rows[s]["reasons"]), rows[s]
    if edited == "tasks/mopd_loss.py":
        assert rows["mopd"]["reasons"] == ["upstream changed: mopd_r1",
                                           "code changed: tasks/mopd_loss.py"]
    for s in set(STAGES) - code_changed - downstream:
        assert rows[s]["status"] == "fresh" and rows[s]["key"] == before[s]["key"]


def test_set_marks_exactly_the_stage_and_its_descendants(cached: dict[str, Path]) -> None:
    rows = _plan(cached, None, "--set", "rl_arith.max_steps=3")
    assert _running(rows) == {"rl_arith", "mopd_r1", "mopd"}
    assert rows["rl_arith"]["reasons"] == ["config changed: max_steps 1 -> 3"]
    assert rows["mopd_r1"]["reasons"] == ["upstream changed: rl_arith"]
    assert set(rows["mopd"]["reasons"]) == {"upstream changed: mopd_r1",
                                           "upstream changed: rl_arith"}
    # the same value as in the recipe changes nothing
    assert _running(_plan(cached, None, "--set", "rl_arith.max_steps=1")) == set()


def test_force_marks_the_stage_and_with_downstream_its_descendants(
        cached: dict[str, Path]) -> None:
    rows = _plan(cached, None, "--force", "sft")
    assert _running(rows) == {"sft"} and rows["sft"]["reasons"] == ["forced"]
    rows = _plan(cached, None, "--force", "rl_reverse", "--force-downstream")
    assert _running(rows) == {"rl_reverse", "mopd_r1", "mopd"}
    assert all(rows[s]["reasons"] == ["forced"] for s in _running(rows))


def test_plan_imports_neither_prefect_nor_torch_and_is_fast(cached: dict[str, Path]) -> None:
    proj = cached["proj"]
    cmd = [sys.executable, "-m", "flows.cli", "plan", f"recipes/{RECIPE.name}", "--json",
           "--store", str(cached["store"]), "--state-dir", str(cached["state"])]
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], cwd=proj,
                          env=_env(proj), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "flows.plan" in imported and "pydantic" in imported  # the probe does see imports
    heavy = sorted(m for m in imported
                   if m.split(".")[0] in ("prefect", "torch", "transformers", "trl", "mlflow"))
    assert heavy == [], heavy
    walls = []
    for _ in range(3):  # best of 3: the CI box is shared
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=proj, env=_env(proj), capture_output=True, check=True,
                       timeout=60)
        walls.append(time.perf_counter() - t0)
    assert min(walls) < 1.0, walls
