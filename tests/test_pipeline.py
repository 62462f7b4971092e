"""Pipelining (issue 10): a stage that reads `X@N` starts once that snapshot is published, while
X keeps training, on the threads and Ray runners; if X fails before step N, the consumer fails
with X's error. And across teams: a student recipe started first with --wait-for-upstream
begins its MOPD once the teacher recipe's snapshot lands, before the teacher recipe ends.

Times come from the manifests (`timings.started_unix` is when the stage's `run` began, after its
process started and its inputs were read; `ended_unix` when it returned), so an overlap is the
consumer training while its producer still trains. Toy sizes: the producer is a GRPO stage of
a one-layer model made long by its step count alone.

Run: ``.venv/bin/python -m pytest tests/test_pipeline.py -q`` (the Ray and two-team tests are
marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import REPO, run_cli

TEACHER = """\
name: %(name)s
stages:
  data: {kind: data, domains: [arith], size: 64, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 0}
  sft: {kind: sft, from: base, data: data, max_steps: 4, per_device_train_batch_size: 8,
        warmup_steps: 0, eval_n: 0}
  rl: {kind: grpo, from: sft, data: data, reference: base, beta: 0.5, max_steps: %(steps)d,
       num_generations: 2, per_device_train_batch_size: 4, max_completion_length: 4, eval_n: 0,
       snapshots: [2]}
"""
MOPD = """\
  mopd: {kind: mopd, from: sft, teachers: {arith: [rl@2, rl]}, data: data, max_steps: 4,
         prompts_per_route: 2, eval_n: 0, switch_at: [4]}
"""
STEPS = 200  # GRPO steps after the snapshot at 2: long enough for MOPD to start meanwhile


def _recipe(root: Path, name: str = "pipe", steps: int = STEPS, mopd: bool = True) -> Path:
    p = root / f"{name}.yaml"
    p.write_text(TEACHER % {"name": name, "steps": steps} + (MOPD if mopd else ""))
    return p


def _times(store: Store, ref: str) -> tuple[float, float]:
    t = store.manifest(store.resolve(ref))["timings"]
    return t["started_unix"], t["ended_unix"]


def _run(recipe: Path, root: Path, *extra: str) -> tuple[int, dict, str]:
    rc, out, err = run_cli("run", str(recipe), "--store", str(root / "store"), "--state-dir",
                           str(root / "state"), "--json", "--no-tracking", "--max-parallel", "2",
                           *extra)
    return rc, {r["stage"]: r for r in json.loads(out or "[]")}, err


def _overlap(root: Path, runner: str, steps: int) -> None:
    """`steps` differs per runner: new keys, so nothing of another test's run is reused."""
    rc, rows, err = _run(_recipe(root, steps=steps), root, "--runner", runner)
    assert rc == 0, err[-3000:]
    store = Store(root / "store")
    rl_start, rl_end = _times(store, "pipe:rl")
    snap_end = _times(store, "pipe:rl@2")[1]
    mopd_start, mopd_end = _times(store, "pipe:mopd")
    assert snap_end < mopd_start < rl_end, (snap_end, mopd_start, rl_end)  # they overlap
    assert mopd_end > rl_end  # phase 2 (the final rl) was waited for inside the stage
    sched = store.manifest(rows["mopd"]["key"])["metrics"]["train"]["teacher_schedule"]["arith"]
    assert [p["stage"] for p in sched] == ["rl@2", "rl"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module: data, base and sft are built once and reused."""
    return tmp_path_factory.mktemp("pipeline")


def test_a_consumer_of_a_snapshot_trains_while_its_producer_does(prefect_harness, shared):
    _overlap(shared, "threads", STEPS)


def test_a_producer_failing_before_the_snapshot_fails_its_consumer(prefect_harness, shared,
                                                                  monkeypatch):
    monkeypatch.setenv("POSTTRAIN_FAULT", "rl:kill-at-step-1")
    rc, rows, err = _run(_recipe(shared, steps=6), shared)
    assert rc == 1, err[-3000:]
    assert rows["rl"]["status"] == "failed" and "SIGKILL" in rows["rl"]["error"]
    assert rows["mopd"]["status"] == "failed"
    assert "stage rl failed before it: killed by signal SIGKILL" in rows["mopd"]["error"]


@pytest.mark.slow
def test_pipelining_on_the_ray_runner(prefect_harness, shared, monkeypatch):
    pytest.importorskip("prefect_ray")
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    _overlap(shared, "ray", STEPS + 1)


STUDENT = """\
name: student
stages:
  sft: {use: {recipe: teacher.yaml, stage: sft}}
  teacher: {use: {recipe: teacher.yaml, stage: rl@2}}
  data: {kind: data, domains: [arith], size: 64, seed: 0}
  mopd: {kind: mopd, from: sft, teachers: {arith: teacher}, data: data, max_steps: 3,
         prompts_per_route: 2, eval_n: 0}
"""


@pytest.mark.slow
def test_a_student_team_started_first_waits_for_the_teacher_teams_snapshot(prefect_harness,
                                                                           tmp_path):
    from prefect.settings import PREFECT_API_URL

    teacher = _recipe(tmp_path, "teacher", mopd=False)
    student = tmp_path / "student.yaml"
    student.write_text(STUDENT)
    env = dict(os.environ, POSTTRAIN_TRACKING="off", PREFECT_API_URL=PREFECT_API_URL.value())
    common = ["--store", str(tmp_path / "store"), "--state-dir", str(tmp_path / "state"),
              "--json", "--no-tracking"]

    def start(recipe: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(recipe),
                                 *common, *extra], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    first = start(student, "--wait-for-upstream", "--upstream-timeout", "600")
    time.sleep(3)
    assert first.poll() is None  # waiting, not refused
    second = start(teacher)
    _, t_err = second.communicate(timeout=600)
    teacher_done = time.time()  # the teacher recipe's run has ended
    s_out, s_err = first.communicate(timeout=600)
    assert second.returncode == 0, t_err[-3000:]
    assert first.returncode == 0, s_err[-3000:]
    rows = {r["stage"]: r for r in json.loads(s_out)}
    assert rows["mopd"]["status"] == "trained" and rows["teacher"]["status"] == "reused"
    store = Store(tmp_path / "store")
    snap_end = _times(store, "teacher:rl@2")[1]
    rl_end = _times(store, "teacher:rl")[1]
    mopd_start = _times(store, "student:mopd")[0]
    assert snap_end < mopd_start < rl_end < teacher_done
    assert rows["teacher"]["key"] == store.resolve("teacher:rl@2")
