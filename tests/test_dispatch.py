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
