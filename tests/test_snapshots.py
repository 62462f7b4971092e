"""Snapshots as artifacts (issue 10): `STAGE@STEP` planned, published while a stage trains,
shown, traced in the lineage, and distilled from as a progressive teacher schedule.

Plan-level checks import no torch; the built world (`posttrain stage` per stage, no Prefect) is
a toy recipe: sft publishes @2 and @4 with eval, grpo every 2 steps, and mopd distils the
schedule [rl@2, rl@4, rl] switching at steps 3 and 5. Under a minute on 2 cores.

Run: ``.venv/bin/python -m pytest tests/test_snapshots.py -q``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifacts.keys import snapshot_key
from artifacts.store import Store
from flows.plan import plan
from flows.recipe import RecipeError, parse
from tests.conftest import run_cli

RECIPE = """\
name: snap_tiny
stages:
  data: {kind: data, domains: [arith], size: 64, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 0}
  sft: {kind: sft, from: base, data: data, max_steps: 6, per_device_train_batch_size: 8,
        warmup_steps: 0, eval_n: 4, snapshots: [2, 4], eval_snapshots: true}
  rl: {kind: grpo, from: sft, data: data, reference: base, beta: 0.5, max_steps: 6,
       num_generations: 2, per_device_train_batch_size: 4, max_completion_length: 4, eval_n: 0,
       snapshot_every: 2}
  mopd: {kind: mopd, from: sft, teachers: {arith: [rl@2, rl@4, rl]}, data: data, max_steps: 6,
         prompts_per_route: 2, eval_n: 0, switch_at: [3, 5]}
"""


def _recipe(tmp: Path, text: str = RECIPE, name: str = "snap_tiny.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _refused(tmp: Path, old: str, new: str) -> str:
    with pytest.raises(RecipeError) as e:
        parse(_recipe(tmp, RECIPE.replace(old, new)))
    return str(e.value)


# -- plan time ---------------------------------------------------------------------------------


def test_snapshot_steps_expand_and_plan_keys_are_h_of_stage_key_and_step(tmp_path):
    recipe = parse(_recipe(tmp_path))
    assert recipe.stages["sft"].snapshots == (2, 4)
    assert recipe.stages["rl"].snapshots == (2, 4)  # snapshot_every: 2, below max_steps 6
    assert recipe.stages["mopd"].inputs["teachers"] == {"arith#1": "rl@2", "arith#2": "rl@4",
                                                        "arith#3": "rl"}
    planned = {p.name: p for p in plan(recipe, Store(tmp_path / "store"))}
    rl = planned["rl"]
    assert rl.snapshots == {2: snapshot_key(rl.key, 2), 4: snapshot_key(rl.key, 4)}
    assert planned["mopd"].input_keys["teachers"] == {
        "arith#1": rl.snapshots[2], "arith#2": rl.snapshots[4], "arith#3": rl.key}
    assert planned["rl"].as_json()["snapshots"] == {"2": rl.snapshots[2], "4": rl.snapshots[4]}
    rc, out, _ = run_cli("plan", str(tmp_path / "snap_tiny.yaml"), "--store",
                         str(tmp_path / "store"), "--state-dir", str(tmp_path / "state"))
    assert rc == 0 and "rl@2" in out and rl.snapshots[2][:12] in out


def test_snapshots_stay_out_of_the_stage_key(tmp_path):
    with_snaps = {p.name: p.key for p in plan(parse(_recipe(tmp_path)), Store(tmp_path / "s"))}
    text = RECIPE.replace(", snapshots: [2, 4], eval_snapshots: true", "")
    text = text.replace(",\n       snapshot_every: 2", "").replace("[rl@2, rl@4, rl]", "rl")
    text = text.replace(", switch_at: [3, 5]", "")
    plain = {p.name: p.key for p in plan(parse(_recipe(tmp_path, text, "b.yaml")),
                                         Store(tmp_path / "s"))}
    assert with_snaps["sft"] == plain["sft"] and with_snaps["rl"] == plain["rl"]


@pytest.mark.parametrize("old,new,where,words", [
    ("[rl@2, rl@4, rl]", "[rl@3, rl]", "stages.mopd.teachers.arith", "saves no snapshot at step 3"),
    ("from: sft, teachers", "from: sft@5, teachers", "stages.mopd.from", "it saves: 2, 4"),
    ("snapshots: [2, 4]", "snapshots: [2, 6]", "stages.sft.snapshots.1", "max_steps is 6"),
    ("snapshot_every: 2", "snapshot_every: 0", "stages.rl.snapshot_every", "got 0"),
    ("snapshots: [2, 4]", "snapshots: 2", "stages.sft.snapshots", "a list of steps"),
    ("eval_snapshots: true", "eval_snapshots: yes please", "stages.sft.eval_snapshots",
     "true or false"),
    ("size: 64, seed: 0}", "size: 64, seed: 0, snapshots: [1]}", "stages.data.snapshots",
     "publishes no snapshots"),
    ("switch_at: [3, 5]", "switch_at: [3]", "stages.mopd.switch_at", "needs 2 steps"),
    ("switch_at: [3, 5]", "switch_at: [5, 3]", "stages.mopd.switch_at", "must increase"),
    ("[rl@2, rl@4, rl]", "[rl@x, rl]", "stages.mopd.teachers.arith", "STAGE@STEP"),
])
def test_bad_snapshot_settings_are_refused_at_plan_time(tmp_path, old, new, where, words):
    msg = _refused(tmp_path, old, new)
    assert where in msg and words in msg, msg
    assert "snap_tiny.yaml:" in msg  # the file and its line


def test_use_of_another_recipes_snapshot_is_planned_waiting_with_their_key(tmp_path):
    theirs = _recipe(tmp_path, RECIPE, "teacher.yaml")
    ours = _recipe(tmp_path, """\
name: student
stages:
  teacher: {use: {recipe: teacher.yaml, stage: rl@4}}
""", "student.yaml")
    store = Store(tmp_path / "store")
    want = next(p for p in plan(parse(theirs), store) if p.name == "rl").snapshots[4]
    (ps,) = plan(parse(ours), store)
    assert (ps.status, ps.key) == ("waiting", want)
    assert ps.reasons == ["waiting for snap_tiny:rl@4 (not built yet)"]
    rc, _, err = run_cli("run", str(ours), "--store", str(tmp_path / "store"),
                         "--state-dir", str(tmp_path / "state"), "--no-tracking")
    assert rc == 2 and "--wait-for-upstream" in err
    bad = _recipe(tmp_path, "name: s2\nstages:\n  t: {use: {recipe: teacher.yaml, stage: rl@3}}\n",
                  "s2.yaml")
    with pytest.raises(RecipeError, match="saves no snapshot at step 3"):
        plan(parse(bad), store)


# -- built: published while training, shown, traced, distilled from ---------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("snapshots")
    w = {"recipe": _recipe(root), "store": root / "store", "state": root / "state"}
    before = os.environ.get("POSTTRAIN_TRACKING")
    os.environ["POSTTRAIN_TRACKING"] = "off"
    try:
        for stage in ("data", "base", "sft", "rl", "mopd"):
            rc, _, err = run_cli("stage", str(w["recipe"]), stage, "--store", str(w["store"]),
                                 "--state-dir", str(w["state"]))
            assert rc == 0, err[-3000:]
            w[f"err_{stage}"] = err
        yield w
    finally:
        if before is None:
            os.environ.pop("POSTTRAIN_TRACKING", None)
        else:
            os.environ["POSTTRAIN_TRACKING"] = before


def test_snapshots_are_published_as_model_dirs_with_manifests(world):
    store = Store(world["store"])
    sft = store.resolve("snap_tiny:sft")
    for step in (2, 4):
        key = store.resolve(f"snap_tiny:sft@{step}")
        assert key == snapshot_key(sft, step)
        m = store.manifest(key)
        assert m["snapshot"] == {"of": sft, "stage": "sft", "step": step}
        assert m["stage"] == f"sft@{step}" and m["kind"] == "sft" and m["produces"] == "model"
        assert m["metrics"]["step"] == step and "loss" in m["metrics"]["train"]
        assert set(m["metrics"]["eval"]) == {"arith"}  # eval_snapshots: true
        assert m["sft_root"] == key  # an sft snapshot starts its own lineage
        assert not store.verify(key)
        assert (store.local_path(key) / "config.json").is_file()
        assert f"snapshot @{step} published: {key}" in world["err_sft"]
    rl2 = store.manifest(store.resolve("snap_tiny:rl@2"))
    assert "eval" not in rl2["metrics"] and rl2["sft_root"] == sft
    from safetensors.torch import load_file

    w2 = load_file(str(store.local_path(store.resolve("snap_tiny:sft@2")) / "model.safetensors"))
    w6 = load_file(str(store.local_path(sft) / "model.safetensors"))
    assert any(not (w2[k] == w6[k]).all() for k in w6)  # an earlier model, not the final one


def test_show_and_lineage_name_snapshots(world):
    s = ["--store", str(world["store"])]
    rc, out, _ = run_cli("show", "snap_tiny:rl@2", *s)
    assert rc == 0 and out.startswith("snap_tiny:rl@2  kind=grpo")
    rc, out, _ = run_cli("lineage", "snap_tiny:rl", "--up", "--format", "json", *s)
    roles = {(n["stage"], n["role"]) for n in json.loads(out)["nodes"]}
    assert {("rl@2", "snapshot"), ("rl@4", "snapshot"), ("sft", "init")} <= roles
    rc, out, _ = run_cli("lineage", "snap_tiny:rl@2", "--down", *s)
    assert "teacher:arith#1: snap_tiny:mopd" in out and "snapshot: snap_tiny:rl" in out


def test_progressive_teachers_record_which_snapshot_scored_which_steps(world):
    store = Store(world["store"])
    m = store.manifest(store.resolve("snap_tiny:mopd"))
    rl = store.resolve("snap_tiny:rl")
    sched = m["metrics"]["train"]["teacher_schedule"]["arith"]
    assert [(p["stage"], p["steps"], p["key"]) for p in sched] == [
        ("rl@2", [1, 2], snapshot_key(rl, 2)), ("rl@4", [3, 4], snapshot_key(rl, 4)),
        ("rl", [5, 6], rl)]
    assert {k: v["stage"] for k, v in m["input_refs"]["teachers"].items()} == {
        "arith#1": "rl@2", "arith#2": "rl@4", "arith#3": "rl"}
    assert set(m["metrics"]["train"]["routes"].values()) == {"arith"}


def test_taking_snapshots_leaves_the_final_weights_as_they_were(world, tmp_path):
    """Same key with or without snapshots, so the same bytes: saving and evaluating a snapshot
    draws no random number the training run would have drawn."""
    text = RECIPE.replace(", snapshots: [2, 4], eval_snapshots: true", "")
    text = text.replace(",\n       snapshot_every: 2", "").replace("[rl@2, rl@4, rl]", "rl")
    plain = _recipe(tmp_path, text.replace(", switch_at: [3, 5]", ""), "snap_tiny.yaml")
    store = tmp_path / "store"
    for stage in ("data", "base", "sft", "rl"):
        rc, _, err = run_cli("stage", str(plain), stage, "--store", str(store),
                             "--state-dir", str(tmp_path / "state"))
        assert rc == 0, err[-2000:]
    from safetensors.torch import load_file

    a, b = Store(world["store"]), Store(store)
    for stage in ("sft", "rl"):
        assert a.resolve(f"snap_tiny:{stage}") == b.resolve(f"snap_tiny:{stage}")
        wa = load_file(str(a.local_path(a.resolve(f"snap_tiny:{stage}")) / "model.safetensors"))
        wb = load_file(str(b.local_path(b.resolve(f"snap_tiny:{stage}")) / "model.safetensors"))
        assert all((wa[k] == wb[k]).all() for k in wa), stage


def test_planned_lineage_has_snapshot_nodes_before_anything_is_built(tmp_path):
    recipe = _recipe(tmp_path)
    rc, out, err = run_cli("lineage", f"{recipe}:mopd", "--up", "--format", "json",
                           "--store", str(tmp_path / "empty"))
    assert rc == 0, err
    nodes = {n["stage"]: n for n in json.loads(out)["nodes"]}
    rl = next(p for p in plan(parse(recipe), Store(tmp_path / "empty")) if p.name == "rl")
    assert nodes["rl@2"]["key"] == rl.snapshots[2] and nodes["rl@2"]["role"] == "teacher:arith#1"
    assert "teacher:arith#2" in nodes["rl@4"]["roles"] and nodes["rl"]["depth"] == 1


def test_waiting_ends_with_the_producers_error_its_end_or_a_timeout(tmp_path):
    from flows.snapshot import UpstreamFailed, wait_for
    from flows.stagefile import StageResult

    store, run_dir, key = Store(tmp_path / "store"), tmp_path / "run", "a" * 64
    run_dir.mkdir()
    with pytest.raises(UpstreamFailed, match="not published within 0.2 s"):
        wait_for(store, key, "pinned x", None, None, timeout=0.2)
    StageResult("rl", "b" * 64, "failed", 1.0, "killed by signal SIGKILL").write(
        run_dir / "rl.result.json")
    with pytest.raises(UpstreamFailed, match="stage rl failed before it: killed by signal"):
        wait_for(store, key, "snapshot rl@2", "rl", str(run_dir))
    StageResult("rl", "b" * 64, "trained", 1.0).write(run_dir / "rl.result.json")
    with pytest.raises(UpstreamFailed, match=r"ended \(trained\) without it"):
        wait_for(store, key, "snapshot rl@2", "rl", str(run_dir))
    with pytest.raises(UpstreamFailed, match="interrupted"):
        wait_for(store, key, "snapshot rl@9", "other", str(run_dir), stop=lambda: "SIGINT")
