"""Lineage queries and renderers over a hand-made store (manifests published through Store).

Run: ``.venv/bin/python -m pytest tests/test_lineage.py -q``
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from artifacts import lineage
from artifacts.store import RefError, Store
from artifacts.tracking_lookup import resolve_ref
from flows import cli as posttrain

DOMAINS = ("arith", "reverse")


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def publish(store: Store, tmp: Path, recipe: str, stage: str, kind: str,
            inputs: dict[str, Any], t: float, ev: dict[str, float] | None = None,
            sft_root: str | None = None) -> str:
    """Publish a fake artifact (one small payload file) with a hand-written manifest."""
    key = key_of(f"{recipe}:{stage}")
    staged = tmp / f"stage-{recipe}-{stage}"
    staged.mkdir()
    (staged / "payload.txt").write_text(stage)
    refs: dict[str, Any] = {}
    for role, v in inputs.items():
        def ref(k: str) -> dict[str, Any]:
            m = store.manifest(k) or {}
            return {"key": k, "recipe": m.get("recipe"), "stage": m.get("stage"),
                    "kind": m.get("kind")}
        refs[role] = {n: ref(k) for n, k in v.items()} if isinstance(v, dict) else ref(v)
    produces = "dataset" if kind == "data" else "model"
    if kind == "sft" and sft_root is None:  # as flows/stage.py records it: its own root
        sft_root = key
    man = {"format": 1, "recipe": recipe, "stage": stage, "kind": kind, "produces": produces,
           "config": {"lr": 1e-3, "opt": {"beta": 0.9}}, "inputs": inputs, "input_refs": refs,
           "metrics": {"eval": ev or {}, "train": {"loss": 0.5},
                       "history": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.7}]},
           "timings": {"ended_unix": t, "seconds": 1.0}, "sft_root": sft_root,
           "run_id": f"run-{recipe}", "warnings": [], "mlflow": None}
    store.publish(key, staged, man)
    store.set_ref(recipe, stage, key)
    return key


def make_store(tmp: Path) -> tuple[Store, dict[str, str]]:
    """Recipe mimo_tiny: data -> sft (from base) -> rl_<d> teachers -> final_rl_r1 -> final_rl
    (two MOPD rounds); recipe team_b: its own sft, then a student taught by mimo_tiny's
    rl_arith (a cross-recipe edge)."""
    store = Store(tmp / "store")
    k: dict[str, str] = {}
    ev = {"arith": 0.3, "reverse": 0.4}
    k["data"] = publish(store, tmp, "mimo_tiny", "data", "data", {}, 1)
    k["base"] = publish(store, tmp, "mimo_tiny", "base", "base", {}, 2)
    k["sft"] = publish(store, tmp, "mimo_tiny", "sft", "sft",
                       {"init": k["base"], "data": {"sft_mix": k["data"]}}, 3, ev)
    for i, d in enumerate(DOMAINS):
        k[f"rl_{d}"] = publish(store, tmp, "mimo_tiny", f"rl_{d}", "grpo",
                               {"init": k["sft"], "reference": k["sft"],
                                "data": {"prompts": k["data"]}}, 4 + i, ev, k["sft"])
    teachers = {d: k[f"rl_{d}"] for d in DOMAINS}
    k["final_rl_r1"] = publish(store, tmp, "mimo_tiny", "final_rl_r1", "mopd",
                               {"init": k["sft"], "teachers": teachers}, 10, ev, k["sft"])
    k["final_rl"] = publish(store, tmp, "mimo_tiny", "final_rl", "mopd",
                            {"init": k["final_rl_r1"],
                             "teachers": dict(teachers, reverse=k["final_rl_r1"])},
                            11, {"arith": 0.8, "reverse": 0.7}, k["sft"])
    k["b_sft"] = publish(store, tmp, "team_b", "sft", "sft", {"init": k["base"]}, 12, ev)
    k["b_student"] = publish(store, tmp, "team_b", "student", "mopd",
                             {"init": k["b_sft"], "teachers": {"arith": k["rl_arith"]}}, 13,
                             ev, k["b_sft"])
    return store, k


@pytest.fixture()
def demo(tmp_path: Path) -> tuple[Store, dict[str, str]]:
    return make_store(tmp_path)


def test_ancestors_have_roles(demo: tuple[Store, dict[str, str]]) -> None:
    store, k = demo
    sub = lineage.ancestors(store, k["final_rl"])
    by = {n["key"]: n for n in sub["nodes"]}
    assert set(by) == {k[s] for s in ("final_rl", "final_rl_r1", "rl_arith", "rl_reverse",
                                      "sft", "base", "data")}
    assert by[k["final_rl_r1"]]["role"] == "init"
    assert by[k["rl_arith"]]["role"] == "teacher:arith"
    assert "teacher:reverse" in by[k["final_rl_r1"]]["roles"]
    assert by[k["data"]]["roles"] == ["data:prompts", "data:sft_mix"]
    assert set(by[k["sft"]]["roles"]) >= {"init", "reference"}
    assert by[k["final_rl"]]["eval"] == {"arith": 0.8, "reverse": 0.7}
    edges = {(e["parent"], e["child"], e["role"]) for e in sub["edges"]}
    assert (k["sft"], k["rl_arith"], "reference") in edges
    assert lineage.sft_root(store, k["final_rl"]) == k["sft"]
    assert [n["stage"] for n in lineage.ancestors(store, k["final_rl"], 1)["nodes"]] == \
        ["final_rl", "final_rl_r1", "rl_arith"]


def test_teachers_per_route_and_round(demo: tuple[Store, dict[str, str]]) -> None:
    store, k = demo
    rows = lineage.teachers_of(store, k["final_rl"])
    got = [(r["round"], r["route"], r["teacher"]["stage"], r["student"]["stage"]) for r in rows]
    assert got == [(1, "arith", "rl_arith", "final_rl_r1"),
                   (1, "reverse", "rl_reverse", "final_rl_r1"),
                   (2, "arith", "rl_arith", "final_rl"),
                   (2, "reverse", "final_rl_r1", "final_rl")]
    assert [r["round"] for r in lineage.teachers_of(store, k["final_rl_r1"])] == [1, 1]
    assert lineage.teachers_of(store, k["sft"]) == []


def test_students_through_rounds_and_recipes(demo: tuple[Store, dict[str, str]]) -> None:
    store, k = demo
    rows = {r["key"]: r for r in lineage.students_of(store, k["rl_reverse"])}
    assert set(rows) == {k["final_rl_r1"], k["final_rl"]}
    assert rows[k["final_rl_r1"]]["direct"] and rows[k["final_rl_r1"]]["via"] == \
        ["teacher:reverse"]
    rows = {r["key"]: r for r in lineage.students_of(store, k["rl_arith"])}
    assert set(rows) == {k["final_rl_r1"], k["final_rl"], k["b_student"]}
    assert rows[k["b_student"]]["recipe"] == "team_b"  # cross-recipe edge


def test_impact_of_data_lists_every_model(demo: tuple[Store, dict[str, str]]) -> None:
    store, k = demo
    rep = lineage.impact(store, k["data"])
    got = {n["key"] for n in rep["nodes"]}
    models = {k[s] for s in ("sft", "rl_arith", "rl_reverse", "final_rl_r1", "final_rl")}
    # team_b's student never read the data, but its teacher was trained on it: impacted.
    assert models | {k["data"], k["b_student"]} == got and k["b_sft"] not in got
    assert {r["ref"] for r in rep["refs"]} == {f"mimo_tiny:{s}" for s in
                                               ("data", "sft", "rl_arith", "rl_reverse",
                                                "final_rl_r1", "final_rl")} | {"team_b:student"}
    assert rep["registered_versions"] is None
    base = {n["key"] for n in lineage.impact(store, k["base"])["nodes"]}
    assert {k["b_sft"], k["b_student"], k["final_rl"]} <= base


def test_cross_recipe_edge_and_missing_parent(demo: tuple[Store, dict[str, str]],
                                             tmp_path: Path) -> None:
    store, k = demo
    sub = lineage.ancestors(store, k["b_student"])
    recipes = {n["recipe"] for n in sub["nodes"]}
    assert recipes == {"team_b", "mimo_tiny"}
    ghost = key_of("elsewhere")
    publish(store, tmp_path, "team_c", "x", "sft", {"init": ghost}, 20)
    node = lineage.build(store).nodes[ghost]
    assert node["missing"] and "(no manifest" in lineage.render(
        lineage.ancestors(store, key_of("team_c:x")))


def test_renderers(demo: tuple[Store, dict[str, str]]) -> None:
    store, k = demo
    sub = lineage.ancestors(store, k["b_student"])
    text = lineage.render(sub, "tree")
    assert "teacher:arith: mimo_tiny:rl_arith" in text and "(shown above)" in text
    assert json.loads(lineage.render(sub, "json"))["root"] == k["b_student"]
    mm = lineage.render(sub, "mermaid")
    assert mm.startswith("flowchart LR")
    for n in sub["nodes"]:
        assert n["key"][:8] in mm
    assert '-->|"teacher:arith"|' in mm and 'subgraph r1["team_b"]' in mm
    page = lineage.render(sub, "html")
    boxes = 'class="node"' if shutil.which("dot") else "<rect"  # Graphviz, or the fallback
    assert page.count(boxes) == len(sub["nodes"]) and "<svg" in page
    assert not re.search(r"<script|https?://(?!www\.w3\.org)", page)  # renders offline
    with pytest.raises(ValueError):
        lineage.render(sub, "png")


def test_resolve_errors(demo: tuple[Store, dict[str, str]]) -> None:
    store, k = demo
    assert resolve_ref("mimo_tiny:sft", store) == k["sft"]
    assert resolve_ref(f" {k['sft'][:10]}\n", store) == k["sft"]
    with pytest.raises(RefError, match="mimo_tiny:nope"):
        resolve_ref("mimo_tiny:nope", store)
    with pytest.raises(RefError, match="no MLflow database"):  # asked of MLflow, never created
        resolve_ref("models:/mimo_tiny.sft@current", store, state_dir=store.uri + "-state")


def cli(argv: list[str]) -> int:
    """`posttrain ARGV` through the real entry point (its one error guard included)."""
    return posttrain.main(argv)


def test_cli(demo: tuple[Store, dict[str, str]], tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> None:
    store, k = demo
    s = ["--store", store.uri, "--state-dir", str(tmp_path / "state")]
    assert cli(["lineage", "mimo_tiny:final_rl", "--up", "--format", "json", *s]) == 0
    roles = {n["stage"]: n["role"] for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert roles["final_rl_r1"] == "init" and roles["rl_arith"] == "teacher:arith"
    out = tmp_path / "l.html"
    assert cli(["lineage", "mimo_tiny:data", "--down", "--format", "html", "-o", str(out),
                *s]) == 0
    assert "final_rl" in out.read_text()
    assert cli(["students", "mimo_tiny:rl_arith", *s]) == 0
    assert "team_b:student" in capsys.readouterr().out
    assert cli(["teachers", "mimo_tiny:final_rl", "--json", *s]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert cli(["impact", "mimo_tiny:data", *s]) == 0
    assert "mimo_tiny:final_rl " in capsys.readouterr().out
    assert cli(["verify", "mimo_tiny:sft", *s]) == 0
    (Path(store.object_path(k["sft"])) / "payload.txt").write_text("tampered")
    assert cli(["verify", "mimo_tiny:sft", *s]) == 1
    capsys.readouterr()
    assert cli(["lineage", "mimo_tiny:nope", *s]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mimo_tiny:nope" in err and "Traceback" not in err
    assert cli(["teachers", "zz", "--store", str(tmp_path / "empty")]) == 2
    assert "empty" in capsys.readouterr().err


def test_ls_in_dag_order_and_show_names_roles_like_lineage(
        demo: tuple[Store, dict[str, str]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = demo
    s = ["--store", store.uri, "--state-dir", str(tmp_path / "state")]
    assert cli(["ls", "--json", *s]) == 0
    refs = [r["ref"] for r in json.loads(capsys.readouterr().out)]
    assert refs[0].startswith("mimo_tiny:") and refs[-1].startswith("team_b:")
    mine = [r.split(":")[1] for r in refs if r.startswith("mimo_tiny:")]
    # parents first, whatever the names sort to (alphabetically `final_rl` precedes `sft`)
    for parent, child in [("base", "sft"), ("data", "sft"), ("sft", "rl_arith"),
                          ("rl_arith", "final_rl_r1"), ("final_rl_r1", "final_rl")]:
        assert mine.index(parent) < mine.index(child), (parent, child, mine)
    assert [r for r in refs if r.startswith("team_b:")] == ["team_b:sft", "team_b:student"]
    assert cli(["show", "mimo_tiny:final_rl", *s]) == 0
    out = capsys.readouterr().out
    assert "teacher:arith" in out and "teachers:" not in out
