"""The threads runner takes a stage's cores before submitting its task, so Prefect's task
durations are the stages' own time: two stages that each need every core run one after the
other, and the second task's Prefect run starts only when the first has ended (a wait for
cores inside the task would start it at once and count the wait as its duration).

Run: ``.venv/bin/python -m pytest tests/test_dispatch.py -q``
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.runners import Slots
from tests.conftest import run_cli


def test_slots_never_hand_out_more_cores_than_are_free() -> None:
    s = Slots(2, 4)
    assert s.try_take(1) and not s.try_take(2)  # one core is free, not two
    s.give(1)
    assert s.try_take(2) and not s.try_take(1)
    s.give(2)
    assert s.try_take(5)  # more than the machine: it runs alone, on all of it
    assert not s.try_take(1)
    s.give(5)
    assert s.cpus == 2 and s.stages == 4


def test_a_task_starts_when_its_cores_are_free_not_before(prefect_harness, tmp_path: Path
                                                          ) -> None:
    from prefect.client.orchestration import get_client

    n = os.cpu_count() or 1
    recipe = tmp_path / "cores.yaml"
    recipe.write_text(f"""\
name: cores
stages:
  a: {{kind: data, domains: [arith], size: 3000, seed: 0, resources: {{cpus: {n}}}}}
  b: {{kind: data, domains: [arith], size: 3000, seed: 1, resources: {{cpus: {n}}}}}
""")
    rc, out, err = run_cli("run", str(recipe), "--store", str(tmp_path / "store"),
                           "--state-dir", str(tmp_path / "state"), "--max-parallel", "2")
    assert rc == 0, err
    with get_client(sync_client=True) as c:
        runs = {t.name: t for t in c.read_task_runs() if t.name in ("a", "b")
                and t.flow_run_id is not None}
    first, second = sorted(runs.values(), key=lambda t: t.start_time)
    assert first.end_time is not None and second.start_time is not None
    assert second.start_time >= first.end_time, (first.end_time, second.start_time)


def test_a_failure_two_stages_up_ends_the_run_instead_of_hanging(prefect_harness, tmp_path: Path
                                                                 ) -> None:
    """`b` is never run (its parent `a` failed) and Prefect leaves it Pending "NotReady", not
    Failed; `c` and `d` below it must not take cores either (a NotReady task never gives them
    back). They did, and with every core leaked to `c`, `d` waited for cores forever."""
    import subprocess
    import sys

    from tests.conftest import REPO

    n = os.cpu_count() or 1
    every = f"resources: {{cpus: {n}}}"
    sft = "kind: sft, data: data, max_steps: 2, per_device_train_batch_size: 4, eval_n: 0"
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(f"""\
name: chain
stages:
  data: {{kind: data, domains: [arith], size: 32, seed: 0}}
  base: {{kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 0}}
  a: {{{sft}, from: base, {every}}}
  b: {{{sft}, from: a, {every}}}
  c: {{{sft}, from: b, {every}}}
  d: {{kind: select, candidates: {{x: c, y: base}}, domains: [arith], val_n: 2, {every}}}
""")
    env = {**os.environ, "POSTTRAIN_FAULT": "a:kill-at-step-1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe), "--store",
                        str(tmp_path / "store"), "--state-dir", str(tmp_path / "state"),
                        "--no-tracking"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode != 0, p.stderr[-2000:]
    for stage in ("b", "c", "d"):
        assert f"stage {stage}: not run: an upstream stage failed" in p.stderr, p.stderr[-2000:]
