"""Preference data as a first-class data set: user JSONL of prompt/chosen/rejected/domain rows
through the `data` kind (validated with path:line, extra columns kept), its schema in the
metrics (the manifest) and in the `columns` hook, so plan refuses pairs where completions are
read and completions where pairs are; and the `flagged` safety column of generated data.

Run: ``.venv/bin/python -m pytest tests/test_preference_data.py -q``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from artifacts.refs import Inputs, StageInputError
from flows.recipe import RecipeError, parse
from tasks import data

PAIRS = [
    {"prompt": "pal:abba=", "chosen": "yes", "rejected": "no", "domain": "palin", "src": "a"},
    {"prompt": "12-34=", "chosen": "-22", "rejected": "22", "domain": "sub", "src": "b"},
]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_preference_file_is_kept_as_is_with_its_schema(tmp_path: Path) -> None:
    src = _write(tmp_path / "pairs.jsonl", PAIRS)
    metrics = data.run(data.Config(path=str(src)), Inputs(), tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / data.FILENAME).read_text().splitlines()]
    assert rows == PAIRS  # nothing added (no completion / answer), extra columns kept
    assert metrics["schema"] == {"shape": "preference",
                                 "columns": ["chosen", "domain", "prompt", "rejected", "src"]}
    assert metrics["domains"] == {"palin": 1, "sub": 1}
    cfg = data.Config(path=str(src)).model_dump()
    assert data.columns(cfg) == {"prompt", "chosen", "rejected", "domain", "src"}
    assert data.route_values(cfg, "src") == {"a", "b"}
    kept = data.run(data.Config(path=str(src), domains=["sub"]), Inputs(), tmp_path / "sub")
    assert kept["rows"] == 1 and kept["schema"]["shape"] == "preference"


def test_completion_data_reports_its_shape(tmp_path: Path) -> None:
    src = _write(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "answer": "2", "domain": "arith"}])
    metrics = data.run(data.Config(path=str(src)), Inputs(), tmp_path / "out")
    assert metrics["schema"] == {"shape": "completion",
                                 "columns": ["answer", "completion", "domain", "prompt"]}
    assert data.columns(data.Config(path=str(src)).model_dump()) == set(data.BASE_COLUMNS)


@pytest.mark.parametrize(("bad", "needle"), [
    ({"prompt": "pal:abba=", "chosen": "yes", "domain": "palin"}, "'rejected' is missing"),
    ({"prompt": "pal:abba=", "chosen": "yes", "rejected": 1, "domain": "palin"},
     "'rejected' is missing or not a string"),
    ({"prompt": "pal:abba=", "chosen": "yes", "rejected": "yes", "domain": "palin"},
     "'chosen' equals 'rejected'"),
    ({"prompt": "pal:abba=", "chosen": "yes", "rejected": "no", "completion": "yes",
      "domain": "palin"}, "also has a 'completion'"),
    ({"prompt": "pal:abba=", "chosen": "yes", "rejected": "no", "domain": "ethics"},
     "unknown domain 'ethics'"),
    ({"prompt": "1+1=", "completion": "2", "domain": "arith"},
     "a completion row in a file of preference rows"),
])
def test_bad_preference_rows_name_path_and_line(tmp_path: Path, bad: dict, needle: str) -> None:
    src = _write(tmp_path / "pairs.jsonl", [PAIRS[0], bad])
    with pytest.raises(StageInputError, match=f"pairs.jsonl:2: .*{needle}"):
        data.run(data.Config(path=str(src)), Inputs(), tmp_path / "out")


RECIPE = """\
name: prefs
stages:
  pairs: {kind: data, path: pairs.jsonl}
  rows: {kind: data, domains: [palin, sub], size: 32}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: rows, max_steps: 1}
"""


def _recipe(tmp_path: Path, extra: str) -> Path:
    _write(tmp_path / "pairs.jsonl", PAIRS)
    (tmp_path / "prefs.yaml").write_text(RECIPE + extra)
    return tmp_path / "prefs.yaml"


def test_plan_refuses_pairs_for_sft(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "  sft2: {kind: sft, from: base, data: pairs, max_steps: 1}\n")
    with pytest.raises(RecipeError, match=r"stages\.sft2\.data\.train: kind sft reads prompt, "
                       r"completion from every row, but the rows of stage 'pairs' lack "
                       r"completion"):
        parse(path)


def test_plan_refuses_completions_where_pairs_are_read(tmp_path: Path) -> None:
    from tasks import KINDS

    if "dpo" not in KINDS:
        pytest.skip("needs the dpo kind")
    ok = parse(_recipe(tmp_path, "  dpo: {kind: dpo, from: sft, data: pairs, max_steps: 1}\n"))
    assert ok.stages["dpo"].inputs["data"] == {"train": "pairs"}
    path = _recipe(tmp_path, "  dpo: {kind: dpo, from: sft, data: rows, max_steps: 1}\n")
    with pytest.raises(RecipeError, match=r"stages\.dpo\.data\.train: .* the rows of stage "
                       r"'rows' lack chosen, rejected"):
        parse(path)


def test_a_bad_preference_file_is_refused_at_plan_time(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "")
    _write(tmp_path / "pairs.jsonl", [PAIRS[0], {**PAIRS[1], "rejected": PAIRS[1]["chosen"]}])
    with pytest.raises(RecipeError, match=r"stages\.pairs\.path: .*pairs.jsonl:2: 'chosen' "
                       r"equals 'rejected'"):
        parse(path)


def test_flagged_generated_rows(tmp_path: Path) -> None:
    from tasks import domains

    cfg = data.Config(domains=["sub", "min"], size=200, seed=0, flagged=0.25)
    metrics = data.run(cfg, Inputs(), tmp_path)
    rows = [json.loads(x) for x in (tmp_path / data.FILENAME).read_text().splitlines()]
    assert 25 < metrics["flagged"] == sum(r["flagged"] for r in rows) < 80
    assert "flagged" in metrics["schema"]["columns"]
    assert data.columns(cfg.model_dump()) == set(data.BASE_COLUMNS) | {"flagged"}
    assert all(domains.safe(r["prompt"], r["completion"]) for r in rows)
    assert data.columns(data.Config(domains=["sub"]).model_dump()) == set(data.BASE_COLUMNS)
    with pytest.raises(ValidationError, match="generated data only"):
        data.Config(path=str(_write(tmp_path / "x.jsonl", PAIRS)), flagged=0.1)
