"""Recipe ergonomics: template --set, product foreach, placeholder names, and every YAML the
project shows a user (README blocks, recipes/, tests/recipes/) parses as documented.

Validation only (flows.recipe.parse): no compute, no store, no Prefect.

Run: ``.venv/bin/python -m pytest tests/test_recipe_ergonomics.py -q``
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.recipe import Recipe, RecipeError, _placeholders, parse, singular

REPO = Path(__file__).resolve().parent.parent

# Small, valid; domains are real (the data kind checks them). Cases edit it in one place.
BASE = """\
name: ergo
vars:
  domains: [arith, reverse, sort]
  seeds: [1, 2]
defaults:
  grpo: {max_steps: 3, num_generations: 2}
stages:
  data: {kind: data, domains: "${domains}", size: 16}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 2}
  rl_{domain}:
    foreach: domains
    kind: grpo
    from: sft
    data: data
    domains: ["{domain}"]
  mopd:
    kind: mopd
    from: sft
    teachers: {"{domain}": "rl_{domain}"}
    data: data
    max_steps: 4
    rounds: 2
"""


def _parse(tmp_path: Path, text: str, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = tmp_path / "ergo.yaml"
    path.write_text(text)
    return parse(path, sets)


def _edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def _line(text: str, needle: str) -> int:
    """1-based line of the one line of `text` that contains `needle`."""
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def _steps(r: Recipe) -> dict[str, Any]:
    return {n: s.config.get("max_steps") for n, s in r.stages.items()}


# -- --set on a foreach template ---------------------------------------------------------------

def test_base_recipe_is_valid(tmp_path: Path) -> None:
    r = _parse(tmp_path, BASE)
    assert list(r.stages) == ["data", "base", "sft", "rl_arith", "rl_reverse", "rl_sort",
                              "mopd_r1", "mopd"]


def test_template_set_reaches_every_copy(tmp_path: Path) -> None:
    r = _parse(tmp_path, BASE, ["rl_{domain}.max_steps=7", "rl_{domain}.trainer.weight_decay=0.1"])
    for d in ("arith", "reverse", "sort"):
        cfg = r.stages[f"rl_{d}"].config
        assert cfg["max_steps"] == 7 and cfg["trainer"] == {"weight_decay": 0.1}, d
        assert cfg["domains"] == [d]
    assert _steps(r) | {"base": None} == {"data": None, "base": None, "sft": 2, "rl_arith": 7,
                                          "rl_reverse": 7, "rl_sort": 7, "mopd_r1": 4, "mopd": 4}


def test_stage_set_after_template_set_stays_on_its_stage(tmp_path: Path) -> None:
    """Each copy gets its own value: a later --set on one copy does not leak to the others."""
    r = _parse(tmp_path, BASE, ["rl_{domain}.trainer={weight_decay: 0.1}",
                                "rl_reverse.trainer.weight_decay=0.5",
                                "rl_{domain}.max_steps=7", "rl_sort.max_steps=9"])
    assert [r.stages[f"rl_{d}"].config["trainer"]["weight_decay"]
            for d in ("arith", "reverse", "sort")] == [0.1, 0.5, 0.1]
    assert [_steps(r)[f"rl_{d}"] for d in ("arith", "reverse", "sort")] == [7, 7, 9]


def test_set_by_expanded_name_still_hits_one_stage(tmp_path: Path) -> None:
    steps = _steps(_parse(tmp_path, BASE, ["rl_reverse.max_steps=11"]))
    assert (steps["rl_arith"], steps["rl_reverse"], steps["rl_sort"]) == (3, 11, 3)


def test_set_on_rounds_is_the_last_round_and_r1_is_the_first(tmp_path: Path) -> None:
    steps = _steps(_parse(tmp_path, BASE, ["mopd.max_steps=9"]))
    assert (steps["mopd_r1"], steps["mopd"]) == (4, 9)
    steps = _steps(_parse(tmp_path, BASE, ["mopd_r1.max_steps=8"]))
    assert (steps["mopd_r1"], steps["mopd"]) == (8, 4)


def test_template_set_with_rounds_is_one_set_per_value(tmp_path: Path) -> None:
    """Like `--set mopd.x`, a template --set reaches each copy's last round."""
    text = _edit('    domains: ["{domain}"]\n', '    domains: ["{domain}"]\n    rounds: 2\n')
    r = _parse(tmp_path, text, ["rl_{domain}.max_steps=7", "rl_arith_r1.max_steps=5"])
    steps = _steps(r)
    assert [steps[f"rl_{d}"] for d in ("arith", "reverse", "sort")] == [7, 7, 7]
    assert [steps[f"rl_{d}_r1"] for d in ("arith", "reverse", "sort")] == [5, 3, 3]
    assert r.stages["rl_sort"].inputs["init"] == "rl_sort_r1"


def test_template_set_on_a_product_foreach(tmp_path: Path) -> None:
    text = BASE + ("  rl_{domain}_{seed}:\n    foreach: [domains, seeds]\n    kind: grpo\n"
                   "    from: sft\n    data: data\n    seed: \"{seed}\"\n")
    steps = _steps(_parse(tmp_path, text, ["rl_{domain}_{seed}.max_steps=6"]))
    assert {n: v for n, v in steps.items() if n.count("_") == 2} == {
        f"rl_{d}_{s}": 6 for d in ("arith", "reverse", "sort") for s in (1, 2)}
    assert steps["rl_arith"] == 3


# -- foreach over several vars -------------------------------------------------------------------

PRODUCT = BASE + """\
  rl_{domain}_{seed}:
    foreach: [domains, seeds]
    kind: grpo
    from: sft
    data: data
    domains: ["{domain}"]
    seed: "{seed}"
    description: "{domains} with seed {seeds}"
"""


def test_product_foreach_names_and_configs(tmp_path: Path) -> None:
    r = _parse(tmp_path, PRODUCT)
    made = [n for n in r.stages if n.count("_") == 2]
    assert made == [f"rl_{d}_{s}" for d in ("arith", "reverse", "sort") for s in (1, 2)]
    for d in ("arith", "reverse", "sort"):
        for s in (1, 2):
            spec = r.stages[f"rl_{d}_{s}"]
            assert spec.kind == "grpo" and spec.where == "stages.rl_{domain}_{seed}"
            assert spec.config["domains"] == [d] and spec.config["seed"] == s
            assert spec.inputs == {"init": "sft", "data": {"train": "data"}}


def test_product_foreach_order_follows_the_list(tmp_path: Path) -> None:
    text = _edit("foreach: [domains, seeds]", "foreach: [seeds, domains]", PRODUCT)
    made = [n for n in _parse(tmp_path, text).stages if n.count("_") == 2]
    assert made == [f"rl_{d}_{s}" for s in (1, 2) for d in ("arith", "reverse", "sort")]


def test_a_value_is_not_substituted_twice(tmp_path: Path) -> None:
    """One pass: a var value that looks like a placeholder stays as it is."""
    from flows.recipe import _subst
    assert _subst("rl_{domain}_{seed}", {"{domain}": "{seed}", "{seed}": 1}) == "rl_{seed}_1"
    assert _subst({"{item}": ["{item}x", 3]}, ["{item}"], "a") == {"a": ["ax", 3]}


# -- placeholder names ---------------------------------------------------------------------------

@pytest.mark.parametrize("var, one", [
    ("domains", "domain"), ("specialties", "specialty"), ("boxes", "box"), ("classes", "class"),
    ("batches", "batch"), ("seeds", "seed"), ("sizes", "size"), ("seed", None), ("lr", None),
    ("class", None), ("corpus", None), ("s", None),
])
def test_singular(var: str, one: str | None) -> None:
    assert singular(var) == one


def test_placeholders() -> None:
    assert _placeholders("domains") == ["{item}", "{domains}", "{domain}"]
    assert _placeholders("domains", item=False) == ["{domains}", "{domain}"]
    assert _placeholders("lr") == ["{item}", "{lr}"]
    assert _placeholders("items") == ["{item}", "{items}"]


def test_specialties_var_gets_specialty(tmp_path: Path) -> None:
    text = BASE.replace("domains: [arith, reverse, sort]", "specialties: [arith, sort]") \
        .replace("${domains}", "${specialties}").replace("{domain}", "{specialty}") \
        .replace("foreach: domains", "foreach: specialties")
    r = _parse(tmp_path, text)
    assert [n for n in r.stages if n.startswith("rl_")] == ["rl_arith", "rl_sort"]
    assert r.stages["rl_sort"].config["domains"] == ["sort"]
    assert r.stages["mopd"].inputs["teachers"] == {"arith": "rl_arith", "sort": "rl_sort"}


@pytest.mark.parametrize("name, value", [("rl_{domains}", "{domains}"), ("rl_{item}", "{item}")])
def test_var_name_and_item_placeholders(tmp_path: Path, name: str, value: str) -> None:
    text = _edit("  rl_{domain}:\n", f"  {name}:\n").replace('["{domain}"]', f'["{value}"]')
    r = _parse(tmp_path, text)
    assert [r.stages[f"rl_{d}"].config["domains"] for d in ("arith", "reverse", "sort")] == [
        ["arith"], ["reverse"], ["sort"]]


def test_var_without_plural_uses_its_own_name(tmp_path: Path) -> None:
    text = _edit("  seeds: [1, 2]\n", "  seed: [1, 2]\n") + (
        "  rl_s{seed}:\n    foreach: seed\n    kind: grpo\n    from: sft\n    data: data\n"
        "    seed: \"{seed}\"\n")
    r = _parse(tmp_path, text)
    assert (r.stages["rl_s1"].config["seed"], r.stages["rl_s2"].config["seed"]) == (1, 2)


# -- errors ----------------------------------------------------------------------------------------

ERRORS = [
    # (id, recipe text, --set items, substrings of the message, the line's needle or None)
    ("product-missing-var", _edit("foreach: [domains, seeds]", "foreach: [domains, missing]",
                                  PRODUCT), [],
     ["stages.rl_{domain}_{seed}.foreach.1", "foreach over missing var 'missing'",
      "declared vars: domains, seeds"], "foreach: [domains, missing]"),
    ("product-missing-var-hint", _edit("foreach: [domains, seeds]", "foreach: [domains, sedes]",
                                       PRODUCT), [],
     ["missing var 'sedes'", "did you mean 'seeds'"], "foreach: [domains, sedes]"),
    ("product-name-lacks-a-var", _edit("  rl_{domain}_{seed}:\n", "  rl2_{domain}:\n",
                                       PRODUCT), [],
     ["stages.rl2_{domain}", "must contain one of {seeds}, {seed}", "(for var 'seeds')",
      "its own name"], "rl2_{domain}:"),
    ("product-item", _edit("  rl_{domain}_{seed}:\n", "  rl_{domain}_{item}:\n", PRODUCT), [],
     ["stages.rl_{domain}_{item}", "{item} is only for a foreach over one var",
      "{domain}, {seed}"], "rl_{domain}_{item}:"),
    ("product-same-var-twice", _edit("foreach: [domains, seeds]", "foreach: [domains, domains]",
                                     PRODUCT), [],
     ["stages.rl_{domain}_{seed}.foreach.1", "names var 'domains' twice"], None),
    ("product-ambiguous-placeholder",
     _edit("  seeds: [1, 2]\n", "  seeds: [1, 2]\n  domain: [x, y]\n",
           _edit("foreach: [domains, seeds]", "foreach: [domains, domain]", PRODUCT)), [],
     ["placeholder {domain} stands for both 'domains' and 'domain'", "rename one"], None),
    ("foreach-not-a-var", _edit("foreach: domains", "foreach: {domains: 1}"), [],
     ["stages.rl_{domain}.foreach", "a list of vars for their product", "got {'domains': 1}"],
     "foreach: {domains: 1}"),
    ("foreach-empty-list", _edit("foreach: domains", "foreach: []"), [],
     ["stages.rl_{domain}.foreach", "a list of vars"], "foreach: []"),
    ("placeholder-foreach-does-not-fill", _edit("  rl_{domain}:\n", "  rl_{domain}_{seed}:\n"),
     [], ["stages.rl_{domain}_{seed}", "'rl_arith_{seed}' keeps a placeholder",
          "`foreach: domains` does not fill"], "rl_{domain}_{seed}:"),
    ("set-unknown-template", BASE, ["rl_{domian}.max_steps=3"],
     ["--set rl_{domian}.max_steps", "no stage 'rl_{domian}'", "did you mean 'rl_{domain}'",
      "stages: data, base, sft, rl_arith", "foreach templates: rl_{domain}"], None),
    ("set-template-unknown-field", BASE, ["rl_{domain}.max_stpes=3"],
     ["--set rl_{domain}.max_stpes", "stage 'rl_{domain}' has no field 'max_stpes'",
      "did you mean 'max_steps'"], None),
    ("set-template-foreach", BASE, ["rl_{domain}.foreach=seeds"],
     ["--set rl_{domain}.foreach", "expanded before --set", "edit the recipe"], None),
    ("set-template-out-of-range", BASE, ["rl_{domain}.max_steps=0"],
     ["stages.rl_{domain}.max_steps", "greater than or equal to 1"], "  rl_{domain}:"),
    ("set-unknown-round", BASE, ["mopd_r2.max_steps=3"],
     ["no stage 'mopd_r2'", "did you mean", "mopd_r1"], None),
]


@pytest.mark.parametrize("text, sets, expect, needle", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors(tmp_path: Path, text: str, sets: list[str], expect: list[str],
                needle: str | None) -> None:
    with pytest.raises(RecipeError) as info:
        _parse(tmp_path, text, sets)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "ergo.yaml")), msg
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"
    if needle is not None:
        assert info.value.line == _line(text, needle), msg


# -- every YAML a user is shown ----------------------------------------------------------------

def _readme_blocks() -> list[tuple[int, str]]:
    """(line of the fence, text) of every ```yaml block of README.md."""
    text = (REPO / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M)]


def test_readme_has_yaml_blocks() -> None:
    blocks = [yaml.safe_load(b) for _, b in _readme_blocks()]
    assert any(isinstance(b, dict) and "name" in b and "stages" in b for b in blocks)


@pytest.mark.parametrize("line, block", _readme_blocks(),
                         ids=[f"README.md:{n}" for n, _ in _readme_blocks()])
def test_readme_yaml_block_is_valid(line: int, block: str, tmp_path: Path) -> None:
    """Every block is YAML; a full recipe (name + stages) is a valid one; a block with
    `stages:` but no `name:` is an addition to the README's full recipe, and valid with it."""
    doc = yaml.safe_load(block)
    assert isinstance(doc, dict), f"README.md:{line}: a YAML block that is not a mapping"
    if "stages" not in doc:
        return
    if "name" not in doc:
        full = next(d for d in (yaml.safe_load(b) for _, b in _readme_blocks())
                    if isinstance(d, dict) and "name" in d and "stages" in d)
        doc = dict(full, vars={**full.get("vars", {}), **doc.get("vars", {})},
                   stages={**full["stages"], **doc["stages"]})
        block = yaml.safe_dump(doc, sort_keys=False)
    path = tmp_path / "readme.yaml"
    path.write_text(block)
    r = parse(path)
    assert r.stages


RECIPES = sorted([*REPO.glob("recipes/*.yaml"), *REPO.glob("tests/recipes/*.yaml")])


def test_there_are_recipes() -> None:
    assert any(p.parent.name == "recipes" and p.parent.parent == REPO for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_shipped_recipe_is_valid(path: Path, tmp_path: Path) -> None:
    """Parses, and plans (keys for every stage against an empty store, no compute)."""
    from artifacts.store import Store
    from flows.plan import plan

    r = parse(path)
    assert r.stages and all(s.name in r.stages for s in r.stages.values())
    planned = plan(r, Store(tmp_path / "store"))
    assert [p.name for p in planned] == list(r.stages)
    assert all(p.status == "run" for p in planned if p.spec.kind != "use")
