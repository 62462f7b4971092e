"""Kind `dpo` at toy size: it trains on pairs, its reference is the init unless named, and a
reference with another vocabulary is refused before training. Plan-time refusals of
completion-only data are in tests/test_reward_model.py (one recipe for both pair kinds).

Run: ``.venv/bin/python -m pytest tests/test_dpo.py -q``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from artifacts.refs import Inputs, StageInputError
from tests import stage_fixtures as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(out: Path, domains: list[str], n: int) -> Path:
    from tasks import domains as doms
    from tasks.reward_model import wrong_answer

    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "domain": d,
             "rejected": wrong_answer(d, r["prompt"], r["answer"])}
            for d in domains for r in doms.generate(d, n, seed=0)]
    sf.write_jsonl(out / "train.jsonl", rows)
    return out


SMALL = {"max_steps": 6, "learning_rate": 3e-3, "per_device_train_batch_size": 16,
         "warmup_steps": 0, "lr_scheduler_type": "constant", "eval_n": 4}


def test_dpo_changes_weights_and_lowers_loss(tmp_path: Path) -> None:
    from tasks import dpo

    init = sf.tiny_base(tmp_path / "base")
    data = _pairs(tmp_path / "pairs", ["arith", "reverse"], 8)
    seen: list[int] = []
    metrics = dpo.run(dpo.Config(**SMALL), sf.stage_inputs(init, data, "sft"), tmp_path / "dpo",
                      lambda step, total, m: seen.append(step))
    losses = [h["loss"] for h in metrics["history"]]
    assert seen == list(range(1, 7)) and losses[-1] < losses[0]
    assert metrics["history"][-1]["pair_accuracy"] > 0.5
    assert set(metrics["eval"]) == {"arith", "reverse"}  # held-out accuracy, as every model
    assert metrics["train"]["steps"] == 6
    assert sf.changed(sf.state(init), sf.state(tmp_path / "dpo"))
    assert not (tmp_path / "dpo" / ".trainer").exists()


def test_dpo_reference_input_and_its_vocabulary(tmp_path: Path) -> None:
    from tasks import dpo

    init = sf.tiny_base(tmp_path / "base")
    other = sf.tiny_base(tmp_path / "ref", seed=1)
    data = _pairs(tmp_path / "pairs", ["arith"], 8)
    base_in = sf.stage_inputs(init, data, "sft")
    ins = Inputs(init=base_in.init, data=base_in.data, reference=sf.ref(other, "sft", "ref"))
    one = dict(SMALL, max_steps=1, eval_n=0)
    # A reference other than the init gives a non-zero DPO margin at step 1 (with the init as
    # reference, policy == reference there and every reward is exactly 0).
    named = dpo.run(dpo.Config(**one), ins, tmp_path / "a")["history"][0]
    default = dpo.run(dpo.Config(**one), base_in, tmp_path / "b")["history"][0]
    assert default["reward_chosen"] == 0.0 and named["reward_chosen"] != 0.0

    big = tmp_path / "ref_big"
    shutil.copytree(other, big)
    cfg = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps(dict(cfg, vocab_size=cfg["vocab_size"] + 28)))
    bad = Inputs(init=base_in.init, data=base_in.data, reference=sf.ref(big, "sft", "ref_big"))
    with pytest.raises(StageInputError, match=r"reference 'ref_big' \(stage 'ref_big'.*"
                       r"vocab_size"):
        dpo.run(dpo.Config(**one), bad, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_dpo_refuses_completion_rows_and_bad_config(tmp_path: Path) -> None:
    from tasks import dpo

    data = sf.gen_data(tmp_path / "data", ["arith"], size=4)
    with pytest.raises(StageInputError, match="train.jsonl:1: missing string field 'chosen'"):
        dpo.run(dpo.Config(max_steps=1), sf.stage_inputs(tmp_path, data), tmp_path / "out")
    with pytest.raises(ValidationError, match="beta"):
        dpo.Config(trainer={"beta": 0.5})
    with pytest.raises(ValidationError, match="save_steps"):
        dpo.Config(trainer={"save_steps": 10})
