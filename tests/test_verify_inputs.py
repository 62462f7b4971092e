"""Inputs are verified before use: a corrupted, truncated, missing or planted input file stops
the stage before training (exit 2, the file named, the fix given), by sha256 by default and by
size alone under `verify_inputs: size`, which the manifest records and the key ignores.

The first tests use a hand-made store (Store.publish); the last ones the session's `spine`
store (tests/conftest.py), whose sft checkpoint they corrupt and always restore.

Run: ``.venv/bin/python -m pytest tests/test_verify_inputs.py -q``
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from artifacts import verify
from artifacts.refs import StageInputError
from artifacts.store import Store
from flows.recipe import RecipeError, parse
from flows.stagefile import StagePlan, StageResult
from tests.conftest import run_cli, spine_restored


def _publish(store: Store, tmp: Path, name: str) -> str:
    """A fake model artifact: a weights file, a config and a nested tokenizer file."""
    key = hashlib.sha256(name.encode()).hexdigest()
    staged = tmp / f"stage-{name}"
    (staged / "tok").mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (staged / "config.json").write_text('{"hidden_size": 16}')
    (staged / "tok" / "tokenizer.json").write_text("{}")
    store.publish(key, staged, {"format": 1, "recipe": "r", "stage": name, "kind": "sft",
                                "produces": "model"})
    return key


@pytest.fixture()
def art(tmp_path: Path) -> dict[str, Any]:
    store = Store(tmp_path / "store")
    key = _publish(store, tmp_path, "sft")
    root = Path(store.object_path(key))
    return {"store": store, "key": key, "root": root,
            "input": verify.Input("input init (stage 'sft')", key, root, store.manifest(key),
                                  "rebuild it")}


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_clean_input_passes_and_is_counted(art):
    (art["root"] / "mlflow.json").write_text("{}")  # the store's MLflow ids: not payload
    stats = verify.check([art["input"]], "hash", stage="rl")
    assert stats["mode"] == "hash" and stats["inputs"] == 1 and stats["files"] == 3
    assert stats["bytes"] == 256 * 64 + len('{"hidden_size": 16}') + 2
    assert verify.sha256_file(art["root"] / "config.json", buffer=4) == hashlib.sha256(
        b'{"hidden_size": 16}').hexdigest()


def test_one_flipped_byte_is_named_with_hashes_and_the_fix(art):
    _flip(art["root"] / "model.safetensors")
    with pytest.raises(StageInputError) as e:
        verify.check([art["input"]], "hash", stage="rl")
    msg = str(e.value)
    assert f"{art['root']}/model.safetensors: sha256 " in msg and "manifest says" in msg
    assert "stage 'rl': input init (stage 'sft')" in msg and msg.endswith("fix: rebuild it")
    # size mode does not hash: a same-size flip passes, a truncation does not.
    assert verify.check([art["input"]], "size")["mode"] == "size"
    with (art["root"] / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(StageInputError, match=r"model\.safetensors: size 1000 bytes, "
                                              r"manifest says 16384 bytes"):
        verify.check([art["input"]], "size")


def test_missing_and_planted_files_are_errors_in_both_modes(art):
    (art["root"] / "tok" / "tokenizer.json").unlink()
    (art["root"] / "tok" / "evil.py").write_text("import os")
    for mode in verify.MODES:
        with pytest.raises(StageInputError) as e:
            verify.check([art["input"]], mode)
        msg = str(e.value)
        assert "tok/tokenizer.json: missing (listed in the manifest)" in msg
        assert "tok/evil.py: not in the manifest" in msg and "2 problem(s)" in msg


def test_a_manifest_path_outside_the_payload_is_refused(art):
    bad = dict(art["input"].manifest, files=[{"path": "../../x", "size": 1, "sha256": "0"}])
    inp = verify.Input("input init", art["key"], art["root"], bad, "rebuild it")
    with pytest.raises(StageInputError, match="'../../x' is not a path inside the payload"):
        verify.check([inp])


RECIPE = """
name: tiny
stages:
  data: {kind: data, domains: [arith], size: 16, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 2}
  sft: {kind: sft, from: base, data: data, max_steps: 1, eval_n: 2VERIFY}
"""


def test_the_field_is_validated_reaches_the_plan_file_and_not_the_key(tmp_path):
    from flows.plan import plan

    def planned(extra: str) -> Any:
        f = tmp_path / "tiny.yaml"
        f.write_text(RECIPE.replace("VERIFY", extra))
        recipe = parse(str(f))
        return recipe, next(p for p in plan(recipe, Store(tmp_path / "s"),
                                            state_dir=tmp_path / "st") if p.name == "sft")

    with pytest.raises(RecipeError, match=r"stages\.sft\.verify_inputs: verify_inputs is "
                                          r"`hash`.*got 'sha1'"):
        planned(", verify_inputs: sha1")
    recipe, hashed = planned("")
    recipe2, sized = planned(", verify_inputs: size")
    assert hashed.spec.verify_inputs == "hash" and sized.spec.verify_inputs == "size"
    assert hashed.key == sized.key  # how inputs are checked changes no trained byte
    sp = StagePlan.from_planned(sized, recipe2)
    assert StagePlan.from_json(sp.to_json()).verify_inputs == "size"
    old = json.loads(sp.to_json())
    del old["verify_inputs"]  # a plan file written before the field existed
    assert StagePlan.from_json(old).verify_inputs == "hash"
    res = json.loads(StageResult("sft", sp.key, "failed", 1.0, "boom").to_json())
    del res["user_error"]
    assert StageResult.from_json(res).user_error is False


# -- end to end, on the session's spine store ----------------------------------------------

PINNED = """
name: pinned_tiny
stages:
  sft: {use: "spine_tiny:sft"}
  data: {use: "spine_tiny:data"}
  rl:
    kind: grpo
    from: sft
    data: data
    domains: [arith]
    max_steps: 1
    num_generations: 2
    per_device_train_batch_size: 4
    max_completion_length: 4
    eval_n: 4
    seed: 7
"""


def _run(recipe: Path, spine: dict, *rest: str) -> tuple[int, list[dict], str]:
    rc, out, err = run_cli("run", str(recipe), "--store", str(spine["store"]), "--state-dir",
                           str(spine["state"]), "--no-tracking", "--json", *rest)
    return rc, json.loads(out) if out.strip() else [], err


def test_a_flipped_parent_byte_stops_forced_and_pinned_consumers(spine, tmp_path):
    store = Store(spine["store"])
    keys = {r["stage"]: r["key"] for r in spine["first_run"]}
    weights = Path(store.object_path(keys["sft"])) / "model.safetensors"
    clean = weights.read_bytes()
    rl_manifest = (Path(store.object_path(keys["rl_arith"])) / "manifest.json").read_text()
    pinned = tmp_path / "pinned_tiny.yaml"
    pinned.write_text(PINNED)
    try:
        _flip(weights, len(clean) // 2)
        with spine_restored(spine):
            rc, rows, err = _run(spine["recipe"], spine, "--force", "rl_arith")
        assert rc == 2, err
        by = {r["stage"]: r for r in rows}
        assert by["rl_arith"]["status"] == "failed", rows
        msg = by["rl_arith"]["error"]
        assert f"{weights}: sha256 " in msg and "input init (stage 'sft')" in msg, msg
        assert f"posttrain verify {keys['sft']}" in msg, msg
        assert f"posttrain run {spine['recipe']} --force sft" in msg, msg
        run_dir = spine["state"] / "runs" / re.search(r"run (\S+):", err).group(1)
        assert not (run_dir / "rl_arith.progress.jsonl").exists()  # stopped before training
        assert (Path(store.object_path(keys["rl_arith"])) / "manifest.json").read_text() \
            == rl_manifest

        rc, rows, err = _run(pinned, spine)  # the same sft through `use:` from another recipe
        assert rc == 2, err
        msg = {r["stage"]: r for r in rows}["rl"]["error"]
        assert f"{weights}: sha256 " in msg and "pinned from recipe 'spine_tiny'" in msg, msg
        rl_key = {r["stage"]: r for r in rows}["rl"]["key"]
        assert not store.has(rl_key)

        # verify_inputs: size skips the hash (a same-size flip passes) and says so; same key.
        rc, rows, err = _run(pinned, spine, "--set", "rl.verify_inputs=size")
        assert rc == 0, err
        row = {r["stage"]: r for r in rows}["rl"]
        assert row["status"] == "trained" and row["key"] == rl_key
        done = store.manifest(rl_key)["inputs_verified"]
        assert done["mode"] == "size" and done["inputs"] == 2 and done["files"] >= 3, done
    finally:
        weights.write_bytes(clean)
    assert not store.verify(keys["sft"])
