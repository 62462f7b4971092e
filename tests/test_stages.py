"""Stage kinds data, base, sft, grpo called directly, at toy size (a few seconds each).

Run: ``.venv/bin/python -m pytest tests/test_stages.py -q``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from artifacts.refs import Inputs, StageInputError, no_progress
from tests import stage_fixtures as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- data ----


def test_data_generates_train_split_rows(tmp_path: Path) -> None:
    from tasks import data, domains

    cfg = data.Config(domains=["arith", "sort"], mix={"arith": 3, "sort": 1}, size=40, seed=1)
    metrics = data.run(cfg, Inputs(), tmp_path, no_progress)
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert metrics == {"rows": 40, "domains": {"arith": 30, "sort": 10}, "schema": {
        "shape": "completion", "columns": ["answer", "completion", "domain", "prompt"]}}
    assert len(rows) == 40 and {r["domain"] for r in rows} == {"arith", "sort"}
    assert all(domains.split_of(r["prompt"]) == "train" for r in rows)
    assert data.run(cfg, Inputs(), tmp_path / "again", no_progress) == metrics
    assert (tmp_path / "again" / "train.jsonl").read_text() == (
        tmp_path / "train.jsonl"
    ).read_text()


def test_data_config_names_the_bad_domain() -> None:
    from tasks import data

    with pytest.raises(ValidationError, match="'arithm'.*known: arith, reverse"):
        data.Config(domains=["arithm"])
    with pytest.raises(ValidationError, match="missing \\['sort'\\]"):
        data.Config(domains=["arith", "sort"], mix={"arith": 1.0})
    with pytest.raises(ValidationError):
        data.Config(domains=["arith"], size=0)


def test_data_from_user_file(tmp_path: Path) -> None:
    from tasks import data

    src = sf.write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "1+2=", "completion": "3", "domain": "arith"},
            {"prompt": "rev:abcd=", "answer": "dcba", "domain": "reverse"},
            {"prompt": "sort:dcba=", "answer": "abcd", "domain": "sort"},
        ],
    )
    metrics = data.run(
        data.Config(path=str(src), domains=["arith", "reverse"]),
        Inputs(),
        tmp_path / "out",
        no_progress,
    )
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert metrics["rows"] == 2 and metrics["domains"] == {"arith": 1, "reverse": 1}
    assert rows[1] == {
        "prompt": "rev:abcd=",
        "completion": "dcba",
        "answer": "dcba",
        "domain": "reverse",
    }


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"completion": "3", "domain": "arith"}, "'prompt'"),
        ({"prompt": "1+2=", "domain": "arith"}, "'completion'"),
        ({"prompt": "1+2=", "completion": "3", "domain": "algebra"}, "unknown domain 'algebra'"),
    ],
)
def test_data_bad_user_file_names_path_line(tmp_path: Path, row: dict, needle: str) -> None:
    from tasks import data

    good = {"prompt": "1+2=", "completion": "3", "domain": "arith"}
    src = sf.write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(StageInputError, match=f"bad.jsonl:2: .*{needle}"):
        data.run(data.Config(path=str(src)), Inputs(), tmp_path / "out", no_progress)
    src.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(StageInputError, match="bad.jsonl:2: not valid JSON"):
        data.run(data.Config(path=str(src)), Inputs(), tmp_path / "out", no_progress)


# ---- base ----


def test_base_dir_loads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import base, models

    metrics = base.run(
        base.Config(**sf.TINY, domains=["arith", "count"], eval_n=8),
        Inputs(),
        tmp_path,
        no_progress,
    )
    assert set(metrics["eval"]) == {"arith", "count"}
    assert (tmp_path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    batch = tok(["12+34=", "rev:abcd="], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    fp = models.tokenizer_fingerprint(tok, model.config)
    assert fp == models.tokenizer_fingerprint(models.build_tokenizer(), model.config)
    assert tok.decode(tok("rev:abcd=")["input_ids"], skip_special_tokens=True) == "rev:abcd="


def test_evaluate_generate_stops_and_strips(tmp_path: Path) -> None:
    from tasks import evaluate, models

    tok = models.build_tokenizer()
    model = models.build_tiny_model(tok, **sf.TINY, seed=1)
    model.train()
    outs = evaluate.generate(model, tok, ["1+1=", "rev:abcd=", "2+2="], max_new_tokens=4)
    assert len(outs) == 3 and all(len(o) <= 4 and "<" not in o for o in outs)
    a = evaluate.generate(model, tok, ["1+1="] * 4, 4, do_sample=True, seed=3)
    assert a == evaluate.generate(model, tok, ["1+1="] * 4, 4, do_sample=True, seed=3)
    assert tok.padding_side == "left" and model.training  # both restored


# ---- sft ----


def test_sft_changes_weights_and_lowers_loss(tmp_path: Path) -> None:
    from tasks import sft

    init = sf.tiny_base(tmp_path / "base")
    data_dir = sf.gen_data(tmp_path / "data", ["arith", "reverse"], size=128)
    cfg = sft.Config(
        max_steps=6,
        learning_rate=1e-2,
        warmup_steps=0,
        eval_n=8,
        per_device_train_batch_size=16,
        lr_scheduler_type="constant",
    )
    seen: list[int] = []
    metrics = sft.run(
        cfg,
        sf.stage_inputs(init, data_dir),
        tmp_path / "sft",
        lambda step, total, m: seen.append(step),
    )
    losses = [h["loss"] for h in metrics["history"]]
    assert seen == list(range(1, 7)) and len(losses) == 6
    assert losses[-1] < losses[0]
    assert set(metrics["eval"]) == {"arith", "reverse"}
    assert metrics["train"]["steps"] == 6 and metrics["train"]["seconds"] > 0
    assert sf.changed(sf.state(init), sf.state(tmp_path / "sft"))
    assert not (tmp_path / "sft" / ".trainer").exists()


def test_sft_bad_data_names_file_and_line(tmp_path: Path) -> None:
    from tasks import sft

    bad = tmp_path / "data"
    sf.write_jsonl(
        bad / "train.jsonl",
        [
            {"prompt": "1+1=", "completion": "2", "domain": "arith"},
            {"prompt": "1+2=", "domain": "arith"},
        ],
    )
    with pytest.raises(StageInputError, match="train.jsonl:2: missing string field 'completion'"):
        sft.run(
            sft.Config(max_steps=1),
            sf.stage_inputs(tmp_path / "nomodel", bad),
            tmp_path / "out",
            no_progress,
        )


def test_sft_trainer_passthrough_cannot_shadow_fields() -> None:
    from tasks import sft

    with pytest.raises(ValidationError, match="max_steps"):
        sft.Config(trainer={"max_steps": 3})
    assert sft.Config(trainer={"weight_decay": 0.1}).trainer == {"weight_decay": 0.1}


# ---- grpo ----


def test_grpo_reward_dispatches_on_domain() -> None:
    from tasks import grpo

    logged: dict[str, float] = {}
    rewards = grpo.domain_reward(
        prompts=["1+1=", "rev:ab=", "1+2="],
        completions=["2", "ab", "3"],
        answer=["2", "ba", "3"],
        domain=["arith", "reverse", "arith"],
        log_metric=lambda k, v: logged.__setitem__(k, v),
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0, 1.0]
    assert logged == {"reward/arith": 1.0, "reward/reverse": 0.0}


def test_grpo_config_and_vllm_errors(tmp_path: Path) -> None:

    from tasks import grpo

    with pytest.raises(ValidationError, match="multiple of num_generations"):
        grpo.Config(num_generations=8, per_device_train_batch_size=12)
    with pytest.raises(ValidationError, match="unknown domain 'nope'"):
        grpo.Config(domains=["nope"])
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(StageInputError, match="vllm is not importable"):
            grpo.run(grpo.Config(use_vllm=True), Inputs(), tmp_path, no_progress)


def test_grpo_step_changes_weights(tmp_path: Path) -> None:
    from tasks import grpo

    init = sf.tiny_base(tmp_path / "base")
    data_dir = sf.gen_data(tmp_path / "data", ["count", "arith"], size=128)
    # An untrained model answers a 1-token count right ~1% of the time: 512 samples make a
    # group with mixed rewards (the only thing that gives GRPO a gradient) all but certain.
    cfg = grpo.Config(
        max_steps=1,
        num_generations=16,
        per_device_train_batch_size=512,
        max_completion_length=1,
        domains=["count"],
        eval_n=4,
        seed=0,
    )
    metrics = grpo.run(cfg, sf.stage_inputs(init, data_dir, "sft"), tmp_path / "rl", no_progress)
    assert sf.changed(sf.state(init), sf.state(tmp_path / "rl"))
    assert set(metrics["eval"]) == {"arith", "count"}  # a specialist is scored on every domain
    assert metrics["history"][0]["step"] == 1 and "reward" in metrics["history"][0]
    assert metrics["train"]["steps"] == 1


def test_grpo_refuses_a_filter_with_no_rows(tmp_path: Path) -> None:
    from tasks import grpo

    data_dir = sf.gen_data(tmp_path / "data", ["arith"], size=8)
    with pytest.raises(StageInputError, match=r"no rows of domains \['sort'\].*\['arith'\]"):
        grpo.run(
            grpo.Config(domains=["sort"]),
            sf.stage_inputs(tmp_path, data_dir),
            tmp_path,
            no_progress,
        )


def test_grpo_reference_is_used_only_with_beta(tmp_path: Path) -> None:
    from artifacts.refs import Inputs as In
    from tasks import grpo

    init = sf.tiny_base(tmp_path / "base")
    other = sf.tiny_base(tmp_path / "ref", seed=1)
    data_dir = sf.gen_data(tmp_path / "data", ["count"], size=16)
    base_in = sf.stage_inputs(init, data_dir, "sft")
    ins = In(init=base_in.init, data=base_in.data, reference=sf.ref(other, "sft", "ref"))
    small = {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 4}
    small |= {"max_completion_length": 1, "eval_n": 2}
    with_kl = grpo.run(grpo.Config(**small, beta=0.1), ins, tmp_path / "a", no_progress)
    assert "kl" in with_kl["history"][0] and "warnings" not in with_kl
    no_kl = grpo.run(grpo.Config(**small), ins, tmp_path / "b", no_progress)
    assert no_kl["warnings"] == ["a reference input was given but beta == 0: it is not used"]
