"""`--scale F`: every stage shrunk by its kind's `scale` hook, F in every key (scaled and full
artifacts never share a key, refs or a lock file), and at F = 1 the keys are exactly those of a
recipe planned without the knob.

Plan only: no compute.

Run: ``.venv/bin/python -m pytest tests/test_scale.py -q``
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from artifacts import keys
from artifacts.store import Store
from flows.plan import lock_path, plan
from flows.recipe import RecipeError, parse
from tasks import kind as kinds

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SHRUNK = ("max_steps", "size", "eval_n", "prompts", "prompts_per_route", "val_n")


def _plan(path: Path, tmp_path: Path, scale: float = 1.0) -> dict:
    r = parse(path, scale=scale)
    return {p.name: p for p in plan(r, Store(tmp_path / "store"))}


def test_scale_1_keys_are_the_keys_without_the_knob(tmp_path: Path) -> None:
    planned = _plan(REPO / "recipes" / "mimo_tiny.yaml", tmp_path, 1.0)
    for p in planned.values():  # the key as content_key made it before --scale existed
        assert p.key == keys.content_key(p.spec.kind, p.spec.config, p.input_keys,
                                         p.data_digests, p.code_digest, p.launch), p.name
    assert {n: p.key for n, p in planned.items()} == \
        {n: p.key for n, p in _plan(REPO / "recipes" / "mimo_tiny.yaml", tmp_path).items()}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_scaled_keys_never_meet_full_keys(path: Path, tmp_path: Path) -> None:
    full, small = _plan(path, tmp_path), _plan(path, tmp_path, 0.1)
    assert set(full) == set(small)
    assert not {p.key for p in full.values()} & {p.key for p in small.values()}
    r = parse(path, scale=0.1)
    assert r.name == f"{parse(path).name}-x0.1" and r.scale == 0.1
    assert lock_path(r) != lock_path(parse(path)) and lock_path(r).name.endswith(".x0.1.lock")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_scale_shrinks_steps_and_sizes(path: Path) -> None:
    full, small = parse(path).stages, parse(path, scale=0.1).stages
    shrunk = 0
    for name, s in full.items():
        if s.config.get("path"):  # a user file is kept whole (its `size` is ignored)
            assert small[name].config == s.config
            continue
        for f in SHRUNK:
            a, b = s.config.get(f), small[name].config.get(f)
            if isinstance(a, int) and a >= 100:
                assert b < a, (name, f, a, b)
                shrunk += 1
            elif isinstance(a, int):
                assert b <= a, (name, f, a, b)
    assert shrunk >= 3, "a recipe has steps, data and evaluation to shrink"


def test_a_stage_the_scale_leaves_alone_still_gets_its_own_key(tmp_path: Path) -> None:
    """llama2's user data file is not shrunk, yet its key carries the scale."""
    path = REPO / "recipes" / "llama2.yaml"
    full, small = _plan(path, tmp_path)["safety_pairs"], _plan(path, tmp_path, 0.1)["safety_pairs"]
    assert full.spec.config == small.spec.config and full.key != small.key


def test_every_training_kind_declares_how_it_scales() -> None:
    for k in tasks.KINDS:
        spec = kinds.spec(k)
        if spec.trains or k in ("data", "generate", "select"):
            assert "scale" in spec.hooks, f"kind {k} has steps or sizes but no `scale` hook"


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan")])
def test_a_scale_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(RecipeError, match=r"--scale: the scale is a number in \(0, 1\]"):
        parse(REPO / "recipes" / "mimo_tiny.yaml", scale=bad)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, cwd=REPO)


def test_cli_plan_scale(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    full = json.loads(_cli("plan", "recipes/r1_zero.yaml", "--json", "--store", store).stdout)
    proc = _cli("plan", "recipes/r1_zero.yaml", "--scale", "0.1", "--json", "--store", store)
    assert proc.returncode == 0, proc.stderr
    small = json.loads(proc.stdout)
    assert [r["stage"] for r in small] == [r["stage"] for r in full]
    assert all(a["key"] != b["key"] for a, b in zip(full, small, strict=True))
    bad = _cli("plan", "recipes/r1_zero.yaml", "--scale", "0", "--store", store)
    assert bad.returncode == 2 and "--scale" in bad.stderr and "Traceback" not in bad.stderr
    assert "--scale F" in _cli("run", "--help").stdout


SNAPSHOTS = """\
name: snap
vars:
  domains: [arith, sort]
stages:
  data: {kind: data, domains: "${domains}", size: 64}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 200}
  rl_{domain}:
    foreach: domains
    kind: grpo
    from: sft
    data: data
    domains: ["{domain}"]
    max_steps: 240
    snapshots: [80, 160]
  rl_every:
    kind: grpo
    from: sft
    data: data
    max_steps: 300
    snapshot_every: 100
  mopd:
    kind: mopd
    from: sft
    teachers: {"{domain}": ["rl_{domain}@80", "rl_{domain}@160", "rl_{domain}"]}
    data: data
    max_steps: 450
    switch_at: [151, 301]
  mopd2:
    kind: mopd
    from: rl_every@200
    teachers: {arith: rl_arith, sort: rl_sort}
    data: data
    max_steps: 100
"""


def test_snapshots_and_their_refs_move_with_the_scaled_run(tmp_path: Path) -> None:
    path = tmp_path / "snap.yaml"
    path.write_text(SNAPSHOTS)
    full, small = parse(path).stages, parse(path, scale=0.1).stages
    assert full["rl_arith"].snapshots == (80, 160) and small["rl_arith"].snapshots == (8, 16)
    assert small["rl_every"].snapshots == (10, 20) and small["rl_every"].config["max_steps"] == 30
    assert small["mopd"].inputs["teachers"] == {"arith#1": "rl_arith@8", "sort#1": "rl_sort@8",
                                                "arith#2": "rl_arith@16", "sort#2": "rl_sort@16",
                                                "arith#3": "rl_arith", "sort#3": "rl_sort"}
    assert small["mopd"].config["switch_at"] == [15, 30]
    assert small["mopd2"].inputs["init"] == "rl_every@20"
    planned = {p.name: p for p in plan(parse(path, scale=0.1), Store(tmp_path / "store"))}
    assert sorted(planned["rl_arith"].snapshots) == [8, 16]
