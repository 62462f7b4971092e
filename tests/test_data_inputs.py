"""Bad user data is refused at plan time with path:line and exit 2, through `plan` and `run`,
before anything is written (a non-UTF-8 byte, an oversize row, a malformed row).

Run: ``.venv/bin/python -m pytest tests/test_data_inputs.py -q``
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifacts.refs import StageInputError
from tasks.data import read_rows
from tests.conftest import run_cli

RECIPE = """\
name: userdata
stages:
  data: {kind: data, path: rows.jsonl, max_row_bytes: 200}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 1}
"""
GOOD = json.dumps({"prompt": "1+1=", "completion": "2", "domain": "arith"}) + "\n"


def _world(tmp_path: Path, payload: bytes) -> Path:
    (tmp_path / "rows.jsonl").write_bytes(GOOD.encode() + payload + b"\n" + GOOD.encode())
    (tmp_path / "userdata.yaml").write_text(RECIPE)
    return tmp_path / "userdata.yaml"


BAD = {
    "not-utf8": (json.dumps({"prompt": "1+2=", "completion": "3", "domain": "arith"})
                 .encode().replace(b"3", b"\xff"), "rows.jsonl:2: not UTF-8 (byte 0xff"),
    "oversize": (json.dumps({"prompt": "x" * 300, "completion": "3", "domain": "arith"})
                 .encode(), "rows.jsonl:2: a row of 3"),
    "malformed": (b'{"prompt": "1+2=", ', "rows.jsonl:2: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["plan", "run"])
def test_bad_user_data_exits_2_at_plan_time(tmp_path: Path, case: str, command: str) -> None:
    payload, expect = BAD[case]
    recipe = _world(tmp_path, payload)
    store, state = tmp_path / "store", tmp_path / "state"
    rc, out, err = run_cli(command, str(recipe), "--store", str(store), "--state-dir", str(state),
                           *(["--no-tracking"] if command == "run" else []))
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "stages.data.path" in lines[0]
    assert "Traceback" not in err and not store.exists() and not state.exists()
    assert not recipe.with_suffix(".lock").exists()


def test_read_rows_names_the_line_and_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD.encode() * 2 + b"\xc3\x28\n")
    with pytest.raises(StageInputError, match=r"rows.jsonl:3: not UTF-8 .*re-encode"):
        read_rows(path)
    path.write_bytes(GOOD.encode() * 3)
    assert len(read_rows(path, max_row_bytes=len(GOOD))) == 3
    with pytest.raises(StageInputError, match=r"rows.jsonl:1: .*over max_row_bytes 10"):
        read_rows(path, max_row_bytes=10)
