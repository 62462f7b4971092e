"""Kind `reward_model` and RM rewards in `grpo`, at toy size, plus the plan-time refusals.

Preference pairs here are built by `pairs_dir` (chosen = the answer, rejected = the pure near
miss `tasks.reward_model.wrong_answer`), standing in for the `generate` kind's `pairs`.

Run: ``.venv/bin/python -m pytest tests/test_reward_model.py -q``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from artifacts.refs import Inputs, StageInputError
from flows.recipe import RecipeError, parse
from tests import stage_fixtures as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def pairs_dir(out: Path, domains: list[str], n: int, seed: int = 0) -> Path:
    """A data directory of preference rows built from train-split problems."""
    from tasks import domains as doms
    from tasks.reward_model import wrong_answer

    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "domain": d,
             "rejected": wrong_answer(d, r["prompt"], r["answer"])}
            for d in domains for r in doms.generate(d, n, seed=seed)]
    sf.write_jsonl(out / "train.jsonl", rows)
    return out


def other_vocab(src: Path, out: Path) -> Path:
    """A copy of a model directory whose config says another vocab_size (the padded-vocabulary
    trap of REFERENCE.md): the check must refuse it from config and tokenizer alone."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] + 28
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def small_rm(tmp_path: Path, init: Path, name: str = "rm", steps: int = 1) -> Path:
    from tasks import reward_model

    reward_model.run(reward_model.Config(max_steps=steps, per_device_train_batch_size=8,
                                         eval_n=0, warmup_steps=0),
                     sf.stage_inputs(init, pairs_dir(tmp_path / f"{name}_pairs", ["count"], 8)),
                     tmp_path / name)
    return tmp_path / name


# ---- pairs ----


def test_wrong_answer_is_pure_wrong_and_near() -> None:
    from tasks import domains
    from tasks.reward_model import heldout_pairs, wrong_answer

    for d in domains.DOMAINS:
        pairs = heldout_pairs(d, 50)
        assert pairs == heldout_pairs(d, 50)
        for p in pairs:
            assert domains.verify(d, p["chosen"], p["chosen"])
            assert not domains.verify(d, p["rejected"], p["chosen"]), (d, p)
            assert abs(len(p["rejected"]) - len(p["chosen"])) <= 1 or p["rejected"].endswith("?")
    w = wrong_answer("arith", "12+34=", "46")
    assert w.isdigit() and w != "46" and len(w) in (1, 2, 3)


# ---- reward_model ----


def test_reward_model_trains_evaluates_and_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tasks import reward_model

    init = sf.tiny_base(tmp_path / "base")
    data = pairs_dir(tmp_path / "pairs", ["arith", "reverse"], 8)  # 16 pairs: memorised
    cfg = reward_model.Config(max_steps=8, learning_rate=3e-3, per_device_train_batch_size=16,
                              warmup_steps=0, lr_scheduler_type="constant", eval_n=8)
    seen: list[int] = []
    metrics = reward_model.run(cfg, sf.stage_inputs(init, data), tmp_path / "rm",
                               lambda step, total, m: seen.append(step))
    hist = metrics["history"]
    assert seen == list(range(1, 9))
    assert sum(h["loss"] for h in hist[-3:]) / 3 < hist[0]["loss"]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"]
    assert set(metrics["eval"]) == {"arith", "reverse"}
    assert all(0.0 <= v <= 1.0 for v in metrics["eval"].values())
    before, after = sf.state(init), sf.state(tmp_path / "rm")
    shared = {k: after[k] for k in before if k in after}  # the transformer; the head is new
    assert "score.weight" in after and len(shared) > 10 and sf.changed(
        {k: before[k] for k in shared}, shared)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert not (tmp_path / "rm" / ".trainer").exists()


def test_reward_model_scores_like_it_trained(tmp_path: Path) -> None:
    """The RM scores prompt+completion+eos; a sample that did not stop lacks the eos."""
    from tasks import rm_scoring

    init = sf.tiny_base(tmp_path / "base")
    model, tok = rm_scoring.load_reward_model(small_rm(tmp_path, init))
    (a, b) = rm_scoring.score(model, tok, rm_scoring.rm_texts(["1+1=", "1+1="], ["2", "2"],
                                                              tok.eos_token, [True, False]))
    (c,) = rm_scoring.score(model, tok, ["1+1=2<eos>"])
    assert a == pytest.approx(c, abs=1e-5) and a != b


# ---- RM rewards in grpo ----


GRPO_SMALL = {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 16,
              "max_completion_length": 2, "eval_n": 2, "domains": ["count"]}


def test_grpo_with_reward_models_logs_them_apart_from_the_verifier(tmp_path: Path) -> None:
    from tasks import grpo

    init = sf.tiny_base(tmp_path / "base")
    rm_a, rm_b = small_rm(tmp_path, init, "help"), small_rm(tmp_path, init, "safe", steps=2)
    base_in = sf.stage_inputs(init, sf.gen_data(tmp_path / "data", ["count"], size=32), "sft")
    ins = Inputs(init=base_in.init, data=base_in.data,
                 reward_model={"help": sf.ref(rm_a, "reward_model", "help"),
                               "safe": sf.ref(rm_b, "reward_model", "safe")})
    cfg = grpo.Config(**GRPO_SMALL, reward_weights={"safe": 0.5}, verifier_weight=1.0)
    metrics = grpo.run(cfg, ins, tmp_path / "rl", lambda s, t, m: None)
    first = metrics["history"][0]
    assert {"verifier", "rm/help", "rm/safe", "reward"} <= set(first)
    assert {"first_rm/help", "final_rm/safe", "final_verifier"} <= set(metrics["train"])
    assert sf.changed(sf.state(init), sf.state(tmp_path / "rl"))

    only_rm = grpo.Config(**GRPO_SMALL, verifier_weight=0.0)
    ins_one = Inputs(init=base_in.init, data=base_in.data,
                     reward_model={"rm": sf.ref(rm_a, "reward_model", "help")})
    metrics = grpo.run(only_rm, ins_one, tmp_path / "rl2", lambda s, t, m: None)
    assert {"verifier", "rm/rm"} <= set(metrics["history"][0])  # the verifier is still logged


def test_grpo_without_reward_model_is_the_verifier_alone(tmp_path: Path) -> None:
    from tasks import grpo
    from tasks.rm_scoring import policy_rewards

    funcs, weights, keys = policy_rewards(grpo.domain_reward, {}, {}, 1.0, None, None)
    assert funcs == [grpo.domain_reward] and weights is None
    assert keys == {"rewards/domain_reward/mean": "verifier"}  # logged like with an RM
    with pytest.raises(StageInputError, match="no reward is left"):
        policy_rewards(grpo.domain_reward, {}, {}, 0.0, None, None)
    with pytest.raises(StageInputError, match=r"reward_weights \['x'\] name no"):
        policy_rewards(grpo.domain_reward, {}, {"x": 1.0}, 1.0, None, None)


def test_grpo_refuses_a_reward_model_with_another_vocabulary(tmp_path: Path) -> None:
    from tasks import grpo

    init = sf.tiny_base(tmp_path / "base")
    bad = other_vocab(small_rm(tmp_path, init), tmp_path / "rm_big")
    base_in = sf.stage_inputs(init, sf.gen_data(tmp_path / "data", ["count"], size=8), "sft")
    ins = Inputs(init=base_in.init, data=base_in.data,
                 reward_model={"helpful": sf.ref(bad, "reward_model", "rm_big")})
    with pytest.raises(StageInputError, match=r"reward model 'helpful' \(stage 'rm_big'.*"
                       r"vocab_size: reward model 'helpful'=128 policy=100"):
        grpo.run(grpo.Config(**GRPO_SMALL), ins, tmp_path / "rl", lambda s, t, m: None)
    assert not (tmp_path / "rl").exists()  # refused before training


# ---- plan time ----

RECIPE = """\
name: prefs
stages:
  data: {kind: data, domains: [arith], size: 16}
  prefs: {kind: data, path: prefs.jsonl}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 1}
  rm: {kind: reward_model, from: sft, data: prefs, max_steps: 1}
  dpo: {kind: dpo, from: sft, data: prefs, max_steps: 1}
  rl: {kind: grpo, from: sft, data: data, reward_model: rm, max_steps: 1,
       num_generations: 2, per_device_train_batch_size: 2}
"""


def _recipe(tmp_path: Path, text: str = RECIPE) -> Path:
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "domain": "arith"}]
    sf.write_jsonl(tmp_path / "prefs.jsonl", rows)
    (tmp_path / "prefs.yaml").write_text(text)
    return tmp_path / "prefs.yaml"


def test_plan_accepts_pairs_rm_and_rm_rewards(tmp_path: Path) -> None:
    recipe = parse(_recipe(tmp_path))
    assert recipe.stages["rl"].inputs["reward_model"] == {"rm": "rm"}
    assert recipe.stages["rm"].inputs["data"] == {"train": "prefs"}


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("rm: {kind: reward_model, from: sft, data: prefs",
     "rm: {kind: reward_model, from: sft, data: data",
     r"stages\.rm\.data\.train: kind reward_model reads prompt, chosen, rejected .* lack "
     r"chosen, rejected"),
    ("dpo: {kind: dpo, from: sft, data: prefs", "dpo: {kind: dpo, from: sft, data: data",
     r"stages\.dpo\.data\.train: kind dpo reads prompt, chosen, rejected .* lack chosen"),
    ("dpo: {kind: dpo, from: sft,", "dpo: {kind: dpo, from: rm,",
     r"stages\.dpo\.from: `from` takes a model, but stage 'rm' \(kind reward_model\) produces "
     r"a reward_model"),
    ("reward_model: rm,", "reward_model: sft,",
     r"stages\.rl\.reward_model\.rm: `reward_model` takes a reward_model, but stage 'sft'"),
    ("reward_model: rm,", "reward_model: rm, reward_weights: {safety: 2},",
     r"stages\.rl\.reward_weights\.safety: 'safety' is not a `reward_model` route \(its routes "
     r"are rm\)"),
    ("reward_model: rm,", "verifier_weight: 0,",
     r"stages\.rl\.verifier_weight: verifier_weight 0 leaves no reward"),
])
def test_plan_refuses(tmp_path: Path, old: str, new: str, needle: str) -> None:
    assert old in RECIPE
    with pytest.raises(RecipeError, match=needle):
        parse(_recipe(tmp_path, RECIPE.replace(old, new)))


def test_cli_plan_exits_2_on_completion_rows_for_dpo(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    path = _recipe(tmp_path, RECIPE.replace("data: prefs, max_steps: 1}\n  rl",
                                            "data: data, max_steps: 1}\n  rl"))
    rc, _, err = run_cli("plan", str(path), "--store", str(tmp_path / "store"),
                         "--state-dir", str(tmp_path / "state"))
    assert rc == 2 and "stages.dpo.data.train" in err and "Traceback" not in err, err
    assert not (tmp_path / "store").exists()


# ---- another vocabulary, seen from the recipe ----

VOCAB_RECIPE = RECIPE.replace(
    "  rm: {kind: reward_model, from: sft, data: prefs, max_steps: 1}\n",
    "  other: {kind: base, model: MODEL_DIR}\n"
    "  rm: {kind: reward_model, from: other, data: prefs, max_steps: 1}\n")


def test_plan_refuses_a_reward_model_built_on_another_vocabulary(tmp_path: Path) -> None:
    """The RM's chain starts at a base whose model directory has another vocab_size: plan names
    the place and both stages, and the CLI exits 2 with nothing written."""
    from tests.conftest import run_cli

    bad = other_vocab(sf.tiny_base(tmp_path / "tiny"), tmp_path / "big_vocab")
    path = _recipe(tmp_path, VOCAB_RECIPE.replace("MODEL_DIR", str(bad)))
    with pytest.raises(RecipeError, match=r"stages\.rl\.reward_model\.rm: stage 'rm' carries the "
                       r"tokenizer of 'other', stage 'sft' that of 'base'.*vocab_size: "
                       r"rm=128 sft=100"):
        parse(path)
    rc, _, err = run_cli("plan", str(path), "--store", str(tmp_path / "store"),
                         "--state-dir", str(tmp_path / "state"))
    assert rc == 2 and "stages.rl.reward_model.rm" in err and "Traceback" not in err, err
    assert not (tmp_path / "store").exists()


def test_plan_accepts_a_model_directory_with_the_same_tokenizer(tmp_path: Path) -> None:
    """A base loaded from a directory that carries the built-in tokenizer (another size: the
    check compares tokenizers, not architectures) is no reason to refuse."""
    same = sf.tiny_base(tmp_path / "tiny")
    recipe = parse(_recipe(tmp_path, VOCAB_RECIPE.replace("MODEL_DIR", str(same))))
    assert recipe.stages["rm"].inputs["init"] == "other"
