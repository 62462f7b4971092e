"""One typed plan in, one typed result out (flows/stagefile.py), and the runner table.

The flow hands each child a `StagePlan` file and reads back a `StageResult` file; the child
builds exactly the planned stage without reading the recipe again, and writes its result even
when it fails. `posttrain stage RECIPE STAGE` by hand plans that stage's ancestors only.

Run: ``.venv/bin/python -m pytest tests/test_stagefile.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.store import Store
from flows import runners
from flows.stagefile import StageFileError, StagePlan, StageResult
from tests.conftest import REPO, run_cli

RECIPE = """
name: tiny
stages:
  data: {kind: data, domains: [arith], size: 16, seed: 0}
  other: {kind: data, domains: [reverse], size: 16, seed: 1}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 2}
  sft: {kind: sft, from: base, data: data, max_steps: 1, per_device_train_batch_size: 4,
        warmup_steps: 0, eval_n: 2}
"""


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("POSTTRAIN_TRACKING", "off")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    return {"recipe": recipe, "store": tmp_path / "store", "state": tmp_path / "state",
            "root": tmp_path}


def _plan(world: dict[str, Path], stage: str) -> StagePlan:
    from flows.stage import plan_stage

    return plan_stage(str(world["recipe"]), stage, Store(world["store"]), [],
                      state_dir=world["state"])


def _stage(world: dict[str, Path], *argv: str) -> tuple[int, str, str]:
    return run_cli("stage", *argv, "--store", str(world["store"]), "--state-dir",
                   str(world["state"]))


def test_plan_and_result_round_trip(world):
    sp = _plan(world, "sft")
    assert sp.parents["init"] == {"stage": "base", "key": sp.input_keys["init"]}
    assert sp.parents["data"]["train"]["stage"] == "data"
    assert sp.parent_stages() == ["base", "data"] and sp.status == "run"
    back = StagePlan.read(sp.write(world["root"] / "sft.plan.json"))
    assert back == sp and back.spec == sp.spec
    r = StageResult("sft", sp.key, "failed", 1.5, "boom")
    assert StageResult.read(r.write(world["root"] / "r.json")) == r
    assert StageResult.from_json(StageResult("sft", sp.key, "trained", 2).to_json()).ok


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d.pop("key"), "missing field(s) key"),
    (lambda d: d.update(colour="red"), "unknown field(s) colour"),
    (lambda d: d.update(format=99), "format 99"),
    (lambda d: d.update(retries="2"), "StagePlan.retries must be int"),
    (lambda d: d.update(status="maybe"), "status is fresh, run or waiting"),
])
def test_a_malformed_plan_file_is_refused(world, edit, words):
    doc = json.loads(_plan(world, "data").to_json())
    edit(doc)
    bad = world["root"] / "bad.plan.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(StageFileError, match=r"bad\.plan\.json") as e:
        StagePlan.read(bad)
    assert words in str(e.value)
    # The child refuses it the same way, and still reports a failed result.
    result = world["root"] / "r.json"
    rc, _, err = _stage(world, "--plan-file", str(bad), "--result-file", str(result))
    assert rc == 2 and words in err, err
    assert StageResult.read(result).status == "failed" and words in StageResult.read(result).error
    bad.write_text("{")
    with pytest.raises(StageFileError, match="not valid JSON"):
        StageResult.read(bad)


def test_a_child_builds_exactly_the_planned_stage_without_the_recipe(world):
    sp = _plan(world, "data")
    plan_file = sp.write(world["root"] / "run" / "data.plan.json")
    world["recipe"].unlink()  # the plan file is the whole plan: the recipe is not read again
    result = world["root"] / "run" / "data.result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "--plan-file", str(plan_file),
         "--result-file", str(result), "--store", str(world["store"]), "--state-dir",
         str(world["state"])], cwd=REPO, env=dict(os.environ, POSTTRAIN_TRACKING="off"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = StageResult.read(result)
    assert (r.stage, r.key, r.status, r.error) == ("data", sp.key, "trained", None)
    store = Store(world["store"])
    assert store.manifest(sp.key)["recipe"] == "tiny" and store.resolve("tiny:data") == sp.key


def test_a_failing_child_writes_failed_with_its_own_error(world):
    plan_file = _plan(world, "sft").write(world["root"] / "sft.plan.json")  # nothing is built
    result = world["root"] / "sft.result.json"
    rc, _, err = _stage(world, "--plan-file", str(plan_file), "--result-file", str(result))
    r = StageResult.read(result)
    assert rc == 2 and r.status == "failed" and r.stage == "sft"
    assert "stage 'sft': its input " in r.error and "is not in the store" in r.error
    assert f"error: {r.error}" in err


def test_code_changed_since_the_plan_is_refused(world):
    sp = _plan(world, "data")
    doc = json.loads(sp.to_json())
    doc["code_digest"] = "0" * 64
    doc["code_files"]["tasks/data.py"] = "0" * 64
    plan_file = world["root"] / "data.plan.json"
    plan_file.write_text(json.dumps(doc))
    result = world["root"] / "data.result.json"
    rc, _, err = _stage(world, "--plan-file", str(plan_file), "--result-file", str(result))
    r = StageResult.read(result)
    assert rc == 2 and r.status == "failed", err
    assert "code changed during the run (tasks/data.py)" in r.error and "run again" in r.error
    assert not Store(world["store"]).has(sp.key)


def test_stage_by_hand_plans_only_its_ancestors(world, monkeypatch):
    from flows import stage

    seen: list[list[str]] = []
    real = stage.plan

    def spy(recipe, *a, **kw):
        seen.append(list(recipe.stages))
        return real(recipe, *a, **kw)

    monkeypatch.setattr(stage, "plan", spy)
    result = world["root"] / "r.json"
    rc, _, err = _stage(world, str(world["recipe"]), "sft", "--result-file", str(result))
    assert seen == [["data", "base", "sft"]]  # not the unrelated `other`
    assert rc == 2 and "is not in the store" in StageResult.read(result).error, err
    # An unrelated stage that could not even be planned (a pin to nothing) does not matter.
    world["recipe"].write_text(RECIPE + "  pinned: {use: 'nowhere:nothing'}\n")
    rc, out, err = _stage(world, str(world["recipe"]), "data")
    assert rc == 0, err
    assert json.loads(out)["status"] == "trained" and seen[-1] == ["data"]


def test_stage_needs_a_recipe_and_stage_or_a_plan_file(world):
    rc, _, err = _stage(world, str(world["recipe"]))
    assert rc == 2 and "RECIPE STAGE" in err and "--plan-file" in err


def test_the_flow_reads_the_result_file_or_the_signal(tmp_path):
    from flows.run import _outcome

    sp = StagePlan("r", "/r.yaml", "s", "data", "k" * 64, {}, {}, {}, "", {}, {},
                   {"processes": 1, "accelerate": None}, {"cpus": 1, "gpus": 0}, 0, "run", ())
    res, log = tmp_path / "s.result.json", tmp_path / "s.log"
    assert _outcome(sp, -9, res, log).error == "killed by signal SIGKILL"
    log.write_text("Traceback ...\nRuntimeError: out of memory\n")
    assert _outcome(sp, 1, res, log).error.endswith("RuntimeError: out of memory")
    StageResult("s", sp.key, "failed", 0.1, "stage 's': bad teacher").write(res)
    assert _outcome(sp, 2, res, log).error == "stage 's': bad teacher"
    StageResult("s", sp.key, "trained", 3.0).write(res)
    assert _outcome(sp, 0, res, log) == StageResult("s", sp.key, "trained", 3.0)


class _Unavailable(runners.ThreadsRunner):
    name = "nowhere"

    @classmethod
    def check(cls) -> None:
        raise runners.RunnerUnavailable("--runner nowhere needs a cluster that is not here")


def test_the_runner_table_drives_runner_validation(world, monkeypatch):
    args = [str(world["recipe"]), "--store", str(world["store"]), "--state-dir",
            str(world["state"]), "--no-tracking"]
    rc, _, err = run_cli("run", *args, "--runner", "k8s")
    assert rc == 2 and "--runner 'k8s': use threads or ray" in err, err
    monkeypatch.setitem(runners.RUNNERS, "nowhere", _Unavailable)
    rc, _, err = run_cli("run", *args, "--runner", "nowhere")
    assert rc == 2 and "error: --runner nowhere needs a cluster that is not here" in err, err
    rc, _, err = run_cli("run", *args, "--runner", "k8s")
    assert "use threads, ray or nowhere" in err
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if the extra were missing
    rc, _, err = run_cli("run", *args, "--runner", "ray")
    assert rc == 2 and ("--runner ray needs prefect-ray: pip install 'posttrain[ray]' "
                        "(or run with --runner threads)") in err
    assert not world["state"].exists()  # refused before anything was written
