"""The shipped recipes (recipes/*.yaml): one per system of the field, each opening with its map
to the paper and its departures, each with the structure its paper claims; and the planned
lineage (`posttrain lineage recipes/X.yaml:FINAL --up`, no compute) showing that structure for
llama3 (reward-model edges, the generate stages sampling the round's best, rounds, select
candidates) and nemotron3_ultra (two MOPD rounds, the refreshed panel and its general slot).

Every recipe parses and plans in tests/test_recipe_ergonomics.py::test_shipped_recipe_is_valid;
tests/test_recipes_slow.py runs each one end to end at smoke scale.

Run: ``.venv/bin/python -m pytest tests/test_recipes.py -q``
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.recipe import parse
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
SYSTEMS = ("instructgpt", "llama2", "llama3", "tulu3", "r1_zero", "r1", "deepseek_v3_2",
           "deepseek_v4", "mimo_tiny", "nemotron3_ultra", "mai_thinking1", "kimi_k2_5", "glm5")
# each recipe's final model: what the slow test builds and the lineage starts from
FINAL = {"instructgpt": "ppo", "llama2": "policy_2", "llama3": "best_2", "tulu3": "rlvr",
         "r1_zero": "rl", "r1": "final", "deepseek_v3_2": "mixed_rl", "deepseek_v4": "student",
         "mimo_tiny": "final_rl", "nemotron3_ultra": "student_2", "mai_thinking1": "final_rl",
         "kimi_k2_5": "joint_rl", "glm5": "distill"}


def _stages(name: str) -> dict:
    return parse(RECIPES / f"{name}.yaml").stages


def test_every_system_has_a_recipe() -> None:
    assert set(SYSTEMS) <= {p.stem for p in RECIPES.glob("*.yaml")}
    assert set(FINAL) == set(SYSTEMS)


@pytest.mark.parametrize("name", SYSTEMS)
def test_recipe_opens_with_its_map_to_the_paper(name: str) -> None:
    text = (RECIPES / f"{name}.yaml").read_text()
    header = text[:text.index("\nname:")]
    assert all(line.startswith("#") for line in header.splitlines()), name
    if name != "mimo_tiny":  # the demo's header predates the rule
        assert "Departures" in header and "->" in header, name
    assert FINAL[name] in _stages(name)


def _kinds(name: str) -> dict[str, str]:
    return {n: s.kind for n, s in _stages(name).items()}


def test_r1_zero_has_no_sft() -> None:
    assert "sft" not in _kinds("r1_zero").values()
    assert _stages("r1_zero")["rl"].inputs["init"] == "base"


def test_deepseek_v4_distils_ten_experts_with_full_vocabulary_reverse_kl() -> None:
    s = _stages("deepseek_v4")["student"]
    assert s.kind == "mopd" and s.config["estimator"] == "full_vocab"
    assert len(s.inputs["teachers"]) >= 10


def test_mai_thinking1_three_climbs_then_trace_distillation_then_rl() -> None:
    s = _stages("mai_thinking1")
    gens = s["traces"].inputs["generators"]
    assert len(gens) == 3 and all(s[g].inputs["init"] == f"{g}_r1" for g in gens.values())
    assert s["traces"].config["mode"] == "correct"
    assert s["distill"].inputs["data"] == {"train": "traces"}
    assert s["final_rl"].kind == "grpo" and s["final_rl"].inputs["init"] == "distill"


def test_kimi_k2_5_one_joint_rl_over_every_domain() -> None:
    s = _stages("kimi_k2_5")
    assert [n for n, x in s.items() if x.kind == "grpo"] == ["joint_rl"]
    assert s["joint_rl"].config["domains"] is None  # every domain of its data, at once


def test_glm5_rl_stages_chain_on_disjoint_domain_groups() -> None:
    r = parse(RECIPES / "glm5.yaml")
    chain = ["rl_reasoning", "rl_agentic", "rl_general"]
    assert [r.stages[n].inputs["init"] for n in chain] == ["sft", *chain[:2]]
    groups = [set(r.stages[n].config["domains"]) for n in chain]
    assert all(not a & b for i, a in enumerate(groups) for b in groups[i + 1:])
    assert set().union(*groups) == set(r.vars["domains"])
    # cross-stage distillation: every domain learns again from the stage that trained it
    teachers = r.stages["distill"].inputs["teachers"]
    assert r.stages["distill"].inputs["init"] == "rl_general"
    assert {d: teachers[d] for g, n in zip(groups, chain, strict=True) for d in g} == {
        d: n for g, n in zip(groups, chain, strict=True) for d in g}


def test_llama2_rounds_use_two_reward_models() -> None:
    s = _stages("llama2")
    for r in (1, 2):
        assert set(s[f"policy_{r}"].inputs["reward_model"]) == {"helpful", "safety"}
        assert set(s[f"rs_{r}"].inputs["reward_model"]) == {"helpful", "safety"}
    assert s["pairs_2"].inputs["init"] == "policy_1"


def _lineage(tmp_path: Path, ref: str) -> dict:
    rc, out, err = run_cli("lineage", ref, "--up", "--json", "--store", str(tmp_path / "s"))
    assert rc == 0, err
    sub = json.loads(out)
    names = {n["key"]: n["stage"] for n in sub["nodes"]}
    sub["named"] = {(names[e["parent"]], e["role"], names[e["child"]]) for e in sub["edges"]}
    return sub


def test_planned_lineage_of_llama3_shows_rounds_rms_samplers_and_candidates(
        tmp_path: Path) -> None:
    sub = _lineage(tmp_path, str(RECIPES / "llama3.yaml") + ":best_2")
    edges = sub["named"]
    for r, prev in ((1, "sft"), (2, "best_1")):
        assert (f"rm_{r}", "reward_model:rm", f"rs_{r}") in edges  # RM ranks the samples
        assert (prev, "init", f"rs_{r}") in edges  # the previous round's best samples
        assert (prev, "init", f"pairs_{r}") in edges
        assert (f"rs_{r}", "data:train", f"rs_sft_{r}") in edges  # rejection-sampling SFT
        assert (f"pairs_{r}", "data:train", f"rm_{r}") in edges
        for seed in (1, 2):
            assert (f"dpo_s{seed}_{r}", f"candidate:dpo_{seed}", f"best_{r}") in edges
        assert (f"rs_sft_{r}", "candidate:rs", f"best_{r}") in edges
    assert ("best_1", "init", "rs_sft_2") in edges  # the best model seeds the next round
    roots = [n for n in sub["nodes"] if n["depth"] == 0]
    assert [(n["recipe"], n["stage"], n["kind"]) for n in roots] == [("llama3", "best_2",
                                                                     "select")]


def test_planned_lineage_of_nemotron3_ultra_shows_two_mopd_rounds_and_the_panel(
        tmp_path: Path) -> None:
    sub = _lineage(tmp_path, str(RECIPES / "nemotron3_ultra.yaml") + ":student_2")
    edges = sub["named"]
    for d in ("arith", "reverse", "sort", "max"):
        assert (f"rl_{d}_1", f"teacher:{d}", "mopd_1") in edges
    assert {(p, role) for p, role, c in edges if c == "mopd_2" and role.startswith("teacher")} \
        == {("rl_arith_1", "teacher:arith"), ("rl_sort_2", "teacher:sort"),
            ("rl_max_2", "teacher:max"), ("student_1", "teacher:general")}
    assert ("student_1", "init", "rl_sort_2") in edges  # refreshed from the round-1 student
    assert ("mopd_1", "init", "student_1") in edges and ("mopd_2", "init", "student_2") in edges
    assert ("student_1", "init", "mopd_2") in edges


def test_planned_lineage_tree_names_the_roles(tmp_path: Path) -> None:
    rc, out, err = run_cli("lineage", str(RECIPES / "nemotron3_ultra.yaml") + ":student_2",
                           "--up", "--store", str(tmp_path / "s"))
    assert rc == 0, err
    assert "teacher:general: nemotron3_ultra:student_1" in out
    rc, _, err = run_cli("lineage", str(RECIPES / "llama3.yaml") + ":bset_2", "--store",
                         str(tmp_path / "s"))
    assert rc == 2 and "no such stage (did you mean 'best_2'?)" in err
