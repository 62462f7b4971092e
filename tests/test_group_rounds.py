"""Rounds over a group of stages (flows/rounds.py): names, `{prev}`, `first:`, per-round
overrides (a refreshed teacher panel with a general slot), --set, and every error naming its
YAML place and the fix (exit 2 from the CLI).

Validation only (flows.recipe.parse): no compute.

Run: ``.venv/bin/python -m pytest tests/test_group_rounds.py -q``
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.recipe import Recipe, RecipeError, parse

REPO = Path(__file__).resolve().parent.parent

BASE = """\
name: grp
vars:
  domains: [arith, sort]
  refreshed: [sort]
stages:
  data: {kind: data, domains: "${domains}", size: 64}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 2}
  loop:
    rounds: 3
    first:
      best_{round}: sft
    per_round:
      2:
        dpo_{round}: {beta: 0.2}
    stages:
      pairs_{round}:
        kind: generate
        from: best_{prev}
        data: data
        mode: pairs
        num_samples: 2
        prompts: 8
        seed: "{round}"
      dpo_{round}: {kind: dpo, from: "best_{prev}", data: "pairs_{round}", max_steps: 2}
      best_{round}:
        kind: select
        candidates: {new: "dpo_{round}", old: "best_{prev}"}
  final: {kind: grpo, from: best_3, data: data, max_steps: 2}
"""

PANEL = """\
name: panel
vars:
  domains: [arith, reverse, sort]
  refreshed: [sort]
stages:
  data: {kind: data, domains: "${domains}", size: 64}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 2}
  cascade:
    rounds: 2
    first:
      student_{round}: sft
    per_round:
      2:
        rl_{item}_{round}: {foreach: refreshed}
        mopd_{round}:
          teachers:
            "{domain}": null
            arith: rl_arith_1
            sort: rl_sort_2
            general: student_{prev}
          unmapped: default:general
    stages:
      rl_{item}_{round}:
        foreach: domains
        kind: grpo
        from: student_{prev}
        data: data
        domains: ["{item}"]
        max_steps: 2
      mopd_{round}:
        kind: mopd
        from: student_{prev}
        teachers: {"{domain}": "rl_{domain}_{round}"}
        data: data
        max_steps: 2
      student_{round}: {kind: grpo, from: "mopd_{round}", data: data, max_steps: 2}
"""


def _parse(tmp_path: Path, text: str, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = tmp_path / "grp.yaml"
    path.write_text(text)
    return parse(path, sets)


def _edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def _line(text: str, needle: str) -> int:
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def test_rounds_repeat_the_group_and_prev_names_the_previous_round(tmp_path: Path) -> None:
    r = _parse(tmp_path, BASE)
    assert list(r.stages) == ["data", "base", "sft",
                              "pairs_1", "dpo_1", "best_1", "pairs_2", "dpo_2", "best_2",
                              "pairs_3", "dpo_3", "best_3", "final"]
    s = r.stages
    assert s["pairs_1"].inputs["init"] == "sft" and s["dpo_1"].inputs["init"] == "sft"
    assert s["best_1"].inputs["candidates"] == {"new": "dpo_1", "old": "sft"}
    assert s["pairs_2"].inputs["init"] == "best_1"
    assert s["best_3"].inputs["candidates"] == {"new": "dpo_3", "old": "best_2"}
    assert s["dpo_3"].inputs["data"] == {"train": "pairs_3"}
    assert [s[f"pairs_{i}"].config["seed"] for i in (1, 2, 3)] == [1, 2, 3]  # {round} in config
    assert s["final"].inputs["init"] == "best_3"
    assert s["dpo_2"].where == "stages.loop.stages.dpo_{round}"


def test_per_round_override_reaches_one_round(tmp_path: Path) -> None:
    s = _parse(tmp_path, BASE).stages
    assert [s[f"dpo_{i}"].config["beta"] for i in (1, 2, 3)] == [0.1, 0.2, 0.1]


def test_set_on_a_member_template_reaches_every_round_and_a_name_one(tmp_path: Path) -> None:
    s = _parse(tmp_path, BASE, ["dpo_{round}.max_steps=5", "dpo_2.max_steps=7"]).stages
    assert [s[f"dpo_{i}"].config["max_steps"] for i in (1, 2, 3)] == [5, 7, 5]


def test_refreshed_panel_with_reused_teachers_and_a_general_slot(tmp_path: Path) -> None:
    """Nemotron 3 Ultra's round 2: some teachers retrained from the round-1 student, some
    reused from round 1, and a general slot filled by the student's own RL checkpoint."""
    s = _parse(tmp_path, PANEL).stages
    assert [n for n in s if n.startswith("rl_")] == ["rl_arith_1", "rl_reverse_1", "rl_sort_1",
                                                     "rl_sort_2"]
    assert s["rl_sort_2"].inputs["init"] == "student_1"
    assert s["mopd_1"].inputs["teachers"] == {"arith": "rl_arith_1", "reverse": "rl_reverse_1",
                                              "sort": "rl_sort_1"}
    assert s["mopd_2"].inputs["teachers"] == {"arith": "rl_arith_1", "sort": "rl_sort_2",
                                              "general": "student_1"}
    assert s["mopd_2"].config["unmapped"] == "default:general"
    assert s["mopd_2"].inputs["init"] == "student_1"


def test_the_shipped_nemotron_recipe_has_the_refreshed_panel() -> None:
    s = parse(REPO / "recipes" / "nemotron3_ultra.yaml").stages
    t1, t2 = s["mopd_1"].inputs["teachers"], s["mopd_2"].inputs["teachers"]
    assert set(t1.values()) == {f"rl_{d}_1" for d in ("arith", "reverse", "sort", "max")}
    assert t2["general"] == "student_1"
    assert {r for r, t in t2.items() if t.endswith("_1") and r != "general"} == {"arith"}
    assert {r for r, t in t2.items() if t.endswith("_2")} == {"sort", "max"}


ERRORS = [
    # (id, recipe text, substrings of the message, the line's needle or None)
    ("no-first", _edit("    first:\n      best_{round}: sft\n", ""),
     ["stages.loop.stages.pairs_{round}.from", "'best_{prev}' names the previous round's stage",
      "round 1 has none", "add `first: {'best_{round}': STAGE}` to group 'loop'"],
     "from: best_{prev}"),
    ("first-unknown-member", _edit("      best_{round}: sft\n", "      bets_{round}: sft\n"),
     ["stages.loop.first.bets_{round}", "not a stage of the group",
      "did you mean 'best_{round}'"], "bets_{round}: sft"),
    ("no-rounds", _edit("    rounds: 3\n", ""),
     ["stages.loop", "a group needs `rounds: N`"], "  loop:"),
    ("bad-rounds", _edit("    rounds: 3\n", "    rounds: 0\n"),
     ["stages.loop.rounds", "an integer >= 1", "got 0"], "rounds: 0"),
    ("member-without-round", _edit("      dpo_{round}: {kind", "      dpo: {kind"),
     ["stages.loop.stages.dpo", "contains {round}"], "dpo: {kind"),
    ("per-round-out-of-range",
     _edit("      2:\n        dpo_{round}", "      4:\n        dpo_{round}"),
     ["stages.loop.per_round.4", "round 4 is not in 1..3"], "      4:"),
    ("per-round-unknown-member", _edit("        dpo_{round}: {beta: 0.2}",
                                       "        dop_{round}: {beta: 0.2}"),
     ["stages.loop.per_round.2.dop_{round}", "did you mean 'dpo_{round}'"], "dop_{round}"),
    ("unknown-group-field", _edit("    rounds: 3\n", "    rounds: 3\n    kind: sft\n"),
     ["stages.loop.kind", "unknown group field 'kind'", "its stages under `stages:`"],
     "    kind: sft"),
    ("var-clash", _edit("  refreshed: [sort]\n", "  rounds: [1, 2]\n"),
     ["vars.rounds", "placeholder {round}", "rename the var"], "rounds: [1, 2]"),
    ("per-round-bad-value", _edit("      2:\n        dpo_{round}: {beta: 0.2}", "      2: 7"),
     ["stages.loop.per_round.2", "per_round is"], "      2: 7"),
    ("bad-config-in-a-round", _edit("{beta: 0.2}", "{beta: -1}"),
     ["stages.loop.stages.dpo_{round}.beta", "greater than 0"], "      dpo_{round}: {kind"),
]


@pytest.mark.parametrize("text, expect, needle", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors(tmp_path: Path, text: str, expect: list[str], needle: str | None) -> None:
    with pytest.raises(RecipeError) as info:
        _parse(tmp_path, text)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "grp.yaml")), msg
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"
    if needle is not None:
        assert info.value.line == _line(text, needle), msg


def test_cli_exits_2_with_the_place_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "grp.yaml"
    path.write_text(_edit("    first:\n      best_{round}: sft\n", ""))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "plan", str(path), "--store",
                           str(tmp_path / "store")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "stages.loop.stages.pairs_{round}.from" in proc.stderr and "first:" in proc.stderr
    assert "Traceback" not in proc.stderr
