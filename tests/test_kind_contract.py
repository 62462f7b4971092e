"""The kind contract (tasks/kind.py), checked over every entry of `tasks.KINDS`, and the rule
that flows/ and artifacts/ hold no per-kind rules.

Run: ``.venv/bin/python -m pytest tests/test_kind_contract.py -q``
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

import tasks
from artifacts.refs import ROLES as ROLE_NAMES
from artifacts.refs import Inputs
from flows.recipe import RecipeError, parse
from tasks import kind as kinds

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(tasks.KINDS))
def test_kind_honours_the_contract(name: str) -> None:
    spec = kinds.spec(name)
    cfg = spec.config
    assert issubclass(cfg, BaseModel)
    assert cfg.model_config.get("frozen") is True, f"{name}.Config must be frozen"
    assert cfg.model_config.get("extra") == "forbid", f"{name}.Config must forbid extra fields"
    undescribed = [f for f, info in cfg.model_fields.items()
                   if not (info.description or "").strip()]
    assert not undescribed, f"{name}.Config fields without a description: {undescribed}"
    assert spec.produces in kinds.ARTIFACT_TYPES
    for role, decl in spec.roles.items():
        assert role in ROLE_NAMES, f"{name}: unknown role {role!r}"
        assert isinstance(decl, kinds.Role) and decl.accepts in kinds.ARTIFACT_TYPES
        assert decl.description, f"{name}: role {role} needs a description"
        assert not decl.columns or decl.accepts == "dataset"
        assert decl.names is None or decl.many
    if spec.trains:
        assert "max_steps" in cfg.model_fields, f"training kind {name} needs max_steps"
    assert not spec.resumable or spec.produces != "dataset", f"{name}: RESUMABLE trains a model"
    params = list(inspect.signature(spec.module.run).parameters)
    assert params[:4] == ["config", "inputs", "out_dir", "progress"]
    assert set(spec.hooks) <= set(kinds.OPTIONAL_HOOKS)
    hook_like = {n for n, v in vars(spec.module).items()
                 if callable(v) and n in kinds.OPTIONAL_HOOKS}
    assert hook_like == set(spec.hooks)


def _kind_compares(path: Path) -> list[str]:
    """`<something with kind> == "<a kind name>"`-style comparisons in one source file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = {s.value for s in ast.walk(node) if isinstance(s, ast.Constant)
                 and isinstance(s.value, str) and s.value in tasks.KINDS}
        if names and any("kind" in ast.unparse(s) for s in sides):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_flows_and_artifacts_hold_no_per_kind_rules() -> None:
    files = sorted((REPO / "flows").glob("*.py")) + sorted((REPO / "artifacts").glob("*.py"))
    hits = [h for f in files for h in _kind_compares(f)]
    assert not hits, "per-kind rules outside tasks/ (move them into the kind's module):\n" + \
        "\n".join(hits)
    for f in sorted((REPO / "artifacts").glob("*.py")):
        tree = ast.parse(f.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in mods if m == "tasks" or m.startswith("tasks.")}, \
            f"{f.name} imports tasks: artifacts/ reads manifests, not kind modules"


RECIPE = """\
name: routed
vars:
  domains: [arith, reverse]
stages:
  data: {kind: data, path: rows.jsonl}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 1}
  rl_{domain}: {foreach: domains, kind: grpo, from: sft, data: data, max_steps: 1,
                num_generations: 2, per_device_train_batch_size: 2}
  mopd:
    kind: mopd
    from: sft
    data: data
    route_key: source
    teachers: {alpha: rl_arith, beta: rl_reverse}
"""


def _rows(tmp_path: Path, sources: list[str]) -> Path:
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "domain": "arith", "source": s}
            for i, s in enumerate(sources)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "routed.yaml").write_text(RECIPE)
    return tmp_path / "routed.yaml"


def test_route_on_a_user_column_plans_and_the_column_survives(tmp_path: Path) -> None:
    """Case 4: MOPD `route_key: source` on a user JSONL with a `source` column."""
    recipe = parse(_rows(tmp_path, ["alpha", "beta", "alpha"]))
    assert recipe.stages["mopd"].inputs["teachers"] == {"alpha": "rl_arith", "beta": "rl_reverse"}
    from tasks import data, mopd

    out = tmp_path / "out"
    data.run(data.Config(**recipe.stages["data"].config), Inputs(), out)
    rows = [json.loads(x) for x in (out / data.FILENAME).read_text().splitlines()]
    assert [r["source"] for r in rows] == ["alpha", "beta", "alpha"]
    from artifacts.refs import ArtifactRef

    ref = ArtifactRef(key="d" * 64, path=out, kind="data", stage="data", recipe="routed")
    by_value = mopd._rows_by_value(Inputs(data={"train": ref}), "source")
    assert {k: len(v) for k, v in by_value.items()} == {"alpha": 2, "beta": 1}


def test_route_values_of_a_user_column_need_teachers(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\.mopd\.teachers: no teacher for route\(s\) "
                       r"gamma of the routing key 'source'"):
        parse(_rows(tmp_path, ["alpha", "beta", "gamma"]))


def test_idle_teacher_is_a_warning_when_the_recipe_opts_in(tmp_path: Path) -> None:
    path = _rows(tmp_path, ["alpha", "alpha"])
    with pytest.raises(RecipeError, match=r"teachers \['beta'\] get no rows"):
        parse(path)
    recipe = parse(path, ["mopd.route_checks=warn"])
    (w,) = recipe.stages["mopd"].warnings
    assert "teachers ['beta'] get no rows" in w and "route_checks" not in w


def test_plan_warning_is_printed_and_kept_in_the_manifest(spine, monkeypatch) -> None:
    """route_checks: warn lets an idle teacher through: plan prints the warning and the stage's
    manifest keeps it (built by hand: only mopd_r1 is new, its ancestors are stored)."""
    from artifacts.store import Store
    from tests.conftest import run_cli, spine_restored

    monkeypatch.setenv("POSTTRAIN_TRACKING", "off")
    sets = ["--set", "mopd_r1.route_checks=warn", "--set", "mopd_r1.teachers.sort=rl_arith"]
    common = ["--store", str(spine["store"]), "--state-dir", str(spine["state"]), *sets]
    rc, _, err = run_cli("plan", str(spine["recipe"]), *common)
    assert rc == 0 and "warning: stage mopd_r1: teachers ['sort'] get no rows" in err, err
    with spine_restored(spine):
        rc, out, err = run_cli("stage", str(spine["recipe"]), "mopd_r1", *common)
        assert rc == 0, err
        key = json.loads(out.strip().splitlines()[-1])["key"]
        warnings = Store(spine["store"]).manifest(key)["warnings"]
    assert any("teachers ['sort'] get no rows" in w for w in warnings), warnings
