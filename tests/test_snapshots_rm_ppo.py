"""Snapshots of the kinds `reward_model` (TRL RewardTrainer) and `ppo` (our own loop).

The built world (`posttrain stage` per stage, no Prefect) is a toy recipe: an RM publishes
`rm@2` with its own eval (pairwise accuracy), and a ppo stage scores with that snapshot while it
publishes `ppo@2` and `ppo@4` with eval. Rebuilding ppo and the RM (--force, same key) without
their snapshots gives the same bytes. Plan-level checks import no torch. About a minute on 2
cores.

Run: ``.venv/bin/python -m pytest tests/test_snapshots_rm_ppo.py -q``.
"""

from __future__ import annotations

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
name: snap_rp
stages:
  data: {kind: data, domains: [arith], size: 64, seed: 0}
  prefs: {kind: data, path: prefs.jsonl}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 0}
  rm: {kind: reward_model, from: base, data: prefs, max_steps: 4, per_device_train_batch_size: 8,
       warmup_steps: 0, eval_n: 8, snapshots: [2], eval_snapshots: true}
  ppo: {kind: ppo, from: base, data: data, reward_model: rm@2, max_steps: 5, prompts_per_step: 4,
        minibatches: 2, ppo_epochs: 1, max_new_tokens: 4, warmup_steps: 0, eval_n: 4,
        snapshots: [2, 4], eval_snapshots: true}
"""
PPO_SNAPS = ",\n        snapshots: [2, 4], eval_snapshots: true}"
RM_SNAPS = ", snapshots: [2], eval_snapshots: true}"
CONSUMER = "  after: {kind: sft, from: ppo@4, data: data, max_steps: 1}\n"


def _recipe(tmp: Path, text: str = RECIPE, name: str = "snap_rp.yaml") -> Path:
    from tasks import domains
    from tasks.reward_model import wrong_answer

    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "domain": "arith",
             "rejected": wrong_answer("arith", r["prompt"], r["answer"])}
            for r in domains.generate("arith", 32, seed=0)]
    import json

    (tmp / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = tmp / name
    p.write_text(text)
    return p


def _build(recipe: Path, store: Path, state: Path, *stages: str, force: bool = False) -> dict:
    errs = {}
    for stage in stages:
        rc, _, err = run_cli("stage", str(recipe), stage, "--store", str(store),
                             "--state-dir", str(state), *(["--force"] if force else []))
        assert rc == 0, err[-3000:]
        errs[stage] = err
    return errs


def _weights(store: Store, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(store.local_path(store.resolve(name)) / "model.safetensors"))


# -- plan time ---------------------------------------------------------------------------------


def test_rm_and_ppo_snapshots_plan_with_keys_out_of_the_stage_key(tmp_path):
    recipe = parse(_recipe(tmp_path))
    assert recipe.stages["rm"].snapshots == (2,) and recipe.stages["ppo"].snapshots == (2, 4)
    planned = {p.name: p for p in plan(recipe, Store(tmp_path / "store"))}
    rm, ppo = planned["rm"], planned["ppo"]
    assert rm.snapshots == {2: snapshot_key(rm.key, 2)}
    assert ppo.snapshots == {2: snapshot_key(ppo.key, 2), 4: snapshot_key(ppo.key, 4)}
    assert ppo.input_keys["reward_model"] == {"rm": rm.snapshots[2]}  # scores with rm@2
    plain = RECIPE.replace(PPO_SNAPS, "}").replace(RM_SNAPS, "}").replace("rm@2", "rm")
    without = {p.name: p.key for p in plan(parse(_recipe(tmp_path, plain, "b.yaml")),
                                           Store(tmp_path / "store"))}
    assert without["rm"] == rm.key  # snapshots stay out of the key
    without = {p.name: p.key for p in plan(parse(_recipe(tmp_path, RECIPE.replace(PPO_SNAPS, "}"),
                                                         "c.yaml")), Store(tmp_path / "store"))}
    assert without["ppo"] == ppo.key

def test_a_grpo_stage_may_score_with_an_rm_snapshot(tmp_path):
    text = RECIPE + ("  rl: {kind: grpo, from: base, data: data, reward_model: {good: rm@2}, "
                     "max_steps: 1, num_generations: 2, per_device_train_batch_size: 2}\n")
    planned = {p.name: p for p in plan(parse(_recipe(tmp_path, text)), Store(tmp_path / "s"))}
    assert planned["rl"].input_keys["reward_model"] == {"good": planned["rm"].snapshots[2]}


@pytest.mark.parametrize("old,new,where,words", [
    ("from: ppo@4", "from: ppo@3", "stages.after.from", "saves no snapshot at step 3"),
    ("reward_model: rm@2", "reward_model: rm@3", "stages.ppo.reward_model", "it saves: 2"),
    ("snapshots: [2, 4]", "snapshots: [2, 5]", "stages.ppo.snapshots.1", "max_steps is 5"),
    ("from: ppo@4", "from: rm@2", "stages.after.from", "takes a model"),
])
def test_a_step_the_stage_never_saves_is_refused_at_plan_time(tmp_path, old, new, where, words):
    text = (RECIPE + CONSUMER).replace(old, new)
    with pytest.raises(RecipeError) as e:
        parse(_recipe(tmp_path, text))
    assert where in str(e.value) and words in str(e.value), str(e.value)
    rc, _, err = run_cli("plan", str(tmp_path / "snap_rp.yaml"), "--store",
                         str(tmp_path / "store"), "--state-dir", str(tmp_path / "state"))
    assert rc == 2 and where in err and "Traceback" not in err, err
    assert not (tmp_path / "store").exists()


# -- built -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import torch

    root = tmp_path_factory.mktemp("snapshots_rm_ppo")
    w = {"root": root, "recipe": _recipe(root), "store": root / "store", "state": root / "state"}
    before = os.environ.get("POSTTRAIN_TRACKING")
    threads = torch.get_num_threads()
    os.environ["POSTTRAIN_TRACKING"] = "off"
    torch.set_num_threads(1)
    try:
        w["err"] = _build(w["recipe"], w["store"], w["state"], "data", "prefs", "base", "rm",
                          "ppo")
        yield w
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop("POSTTRAIN_TRACKING", None)
        else:
            os.environ["POSTTRAIN_TRACKING"] = before


def test_ppo_publishes_its_snapshots_with_manifests(world):
    store = Store(world["store"])
    ppo = store.resolve("snap_rp:ppo")
    final = _weights(store, "snap_rp:ppo")
    for step in (2, 4):
        key = store.resolve(f"snap_rp:ppo@{step}")
        assert key == snapshot_key(ppo, step)
        m = store.manifest(key)
        assert m["snapshot"] == {"of": ppo, "stage": "ppo", "step": step}
        assert m["stage"] == f"ppo@{step}" and m["kind"] == "ppo" and m["produces"] == "model"
        assert m["metrics"]["step"] == step and "score" in m["metrics"]["train"]
        assert set(m["metrics"]["eval"]) == {"arith"}  # eval_snapshots: true
        assert not store.verify(key)
        assert f"snapshot @{step} published: {key}" in world["err"]["ppo"]
        snap = _weights(store, f"snap_rp:ppo@{step}")
        assert set(snap) == set(final)  # the policy alone, no value head
        assert any(not (snap[k] == final[k]).all() for k in final)  # an earlier policy


def test_rm_snapshot_is_a_reward_model_with_its_own_eval(world):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks import models
    from tasks.reward_model import pairwise_accuracy

    store = Store(world["store"])
    rm = store.resolve("snap_rp:rm")
    key = store.resolve("snap_rp:rm@2")
    m = store.manifest(key)
    assert key == snapshot_key(rm, 2)
    assert m["snapshot"] == {"of": rm, "stage": "rm", "step": 2}
    assert m["kind"] == "reward_model" and m["produces"] == "reward_model"
    assert "loss" in m["metrics"]["train"] and not store.verify(key)
    path = store.local_path(key)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    assert model.config.num_labels == 1
    # its eval is the RM's own: held-out pairwise accuracy, as the snapshot itself scores now
    want = pairwise_accuracy(model, models.load_tokenizer(path), ["arith"], 8)
    assert m["metrics"]["eval"] == want
    assert any(not (a == b).all() for a, b in zip(_weights(store, "snap_rp:rm@2").values(),
                                                   _weights(store, "snap_rp:rm").values(),
                                                   strict=True))
    ppo = store.manifest(store.resolve("snap_rp:ppo"))  # scored with rm@2 while rm went on
    assert ppo["inputs"]["reward_model"] == {"rm": key}
    assert ppo["input_refs"]["reward_model"]["rm"]["stage"] == "rm@2"
    assert any(k.startswith("rm/") for k in ppo["metrics"]["train"])


def test_taking_snapshots_leaves_the_final_weights_as_they_were(world):
    """Same key with or without snapshots, so the same bytes (max abs diff 0.0), for ppo's own
    loop (snapshot eval included) and the RM's TRL callback."""
    store = Store(world["store"])
    before = {s: (store.resolve(f"snap_rp:{s}"), _weights(store, f"snap_rp:{s}"))
              for s in ("ppo", "rm")}
    root = world["root"]
    plain_ppo = _recipe(root, RECIPE.replace(PPO_SNAPS, "}"), "plain_ppo.yaml")
    plain_rm = _recipe(root, RECIPE.replace(RM_SNAPS, "}").split("  ppo:")[0], "plain_rm.yaml")
    errs = {**_build(plain_ppo, world["store"], world["state"], "ppo", force=True),
            **_build(plain_rm, world["store"], world["state"], "rm", force=True)}
    for stage, err in errs.items():  # trained again, this time taking no snapshot
        assert f"{stage}: eval arith=" in err and "snapshot @" not in err, err[-2000:]
    for stage, (key, weights) in before.items():
        assert store.resolve(f"snap_rp:{stage}") == key
        after = _weights(store, f"snap_rp:{stage}")
        assert set(after) == set(weights)
        diff = max(float((after[k].float() - weights[k].float()).abs().max()) for k in weights)
        assert diff == 0.0, stage
