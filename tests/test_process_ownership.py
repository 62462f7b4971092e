"""The run owns its process tree (flows/procs.py): nothing it started outlives it.

Each test starts a real `posttrain run` of the spine recipe with a long SFT stage
(`--set sft.max_steps=20000`, about 100 s), waits until SFT trains, then kills the run:
SIGKILL (no process of the run remains within 5 s, nothing is published, the next plan runs
SFT again), Ctrl-C on a terminal (a pty: the whole foreground group gets SIGINT) and SIGTERM
(exit 130 / 143 within 10 s, no traceback, a lock file for the stages that finished, the MLflow
parent run KILLED). The store is shared by the module's tests: data and base are built once.

Run: ``.venv/bin/python -m pytest tests/test_process_ownership.py -q``
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import RECIPES, run_cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process groups and PR_SET_PDEATHSIG: Linux only")

LONG_SFT = ["--set", "sft.max_steps=20000"]
_SCRIPT = Path(sys.executable).parent / "posttrain"
POSTTRAIN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "flows.cli"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("owned")
    return {"root": root, "store": root / "store"}


@pytest.fixture()
def case(world: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """One run's recipe copy (its own lock file) and state dir, over the module's store."""
    recipe = tmp_path / "spine_tiny.yaml"
    shutil.copy(RECIPES / "spine_tiny.yaml", recipe)
    return dict(world, recipe=recipe, state=tmp_path / "state")


def _argv(case: dict[str, Path], *extra: str) -> list[str]:
    return [*POSTTRAIN, "run", str(case["recipe"]), "--store", str(case["store"]),
            "--state-dir", str(case["state"]), *LONG_SFT, *extra]


def _ps() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, sid) of every live process (zombies count as gone)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        if f[0] not in ("Z", "X"):
            out[int(d)] = (int(f[1]), int(f[2]), int(f[3]))
    return out


def _tree(root: int) -> set[int]:
    """`root`'s descendants, now."""
    ps, found, todo = _ps(), set(), [root]
    while todo:
        parent = todo.pop()
        kids = [p for p, (pp, _, _) in ps.items() if pp == parent and p not in found]
        found.update(kids)
        todo.extend(kids)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _during_sft(run_pid: int, state: Path, timeout: float = 300) -> tuple[int, set[int]]:
    """Once SFT trains (its progress file has a line): (its pid, every process of the run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.stat().st_size for p in state.glob("runs/*/sft.progress.jsonl")):
            tree = _tree(run_pid)
            sft = [p for p in tree if "sft.plan.json" in _cmdline(p)]
            if sft:
                return sft[0], tree
        assert _ps().get(run_pid), f"the run ended before sft trained: {state}"
        time.sleep(0.2)
    raise AssertionError(f"sft did not start training within {timeout} s")


def _gone(pids: set[int], groups: set[int], timeout: float) -> float:
    """Seconds until none of `pids` lives and no process is in a group or session of
    `groups`; fails after `timeout`."""
    t0 = time.time()
    while True:
        ps = _ps()
        left = {p for p in pids if p in ps} | {
            p for p, (_, pg, sid) in ps.items() if pg in groups or sid in groups}
        if not left:
            return time.time() - t0
        assert time.time() - t0 < timeout, {p: _cmdline(p)[:120] for p in left}
        time.sleep(0.05)


def _kill_all(pids: set[int]) -> None:
    """Leave nothing behind, whatever the test's outcome."""
    for p in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(p, signal.SIGKILL)
            except OSError:
                pass


def _sft_key(case: dict[str, Path]) -> str:
    rc, out, err = run_cli("plan", str(case["recipe"]), "--store", str(case["store"]),
                           "--state-dir", str(case["state"]), "--json", *LONG_SFT)
    assert rc == 0, err
    return {p["stage"]: p for p in json.loads(out)}["sft"]


def _locked(case: dict[str, Path]) -> set[str]:
    return set(json.loads(case["recipe"].with_suffix(".lock").read_text())["stages"])


def test_sigkill_of_the_run_leaves_no_process_and_no_artifact(case):
    with open(case["root"] / "kill.log", "w") as log:
        run = subprocess.Popen(_argv(case, "--no-tracking"), start_new_session=True,
                               stdout=log, stderr=subprocess.STDOUT, cwd=case["root"])
    tree: set[int] = set()
    try:
        sft, tree = _during_sft(run.pid, case["state"])
        run.send_signal(signal.SIGKILL)
        run.wait()
        took = _gone(tree | {sft}, {run.pid, sft}, timeout=5)
        print(f"after SIGKILL: no process of the run left in {took:.2f} s")
        time.sleep(2)  # an orphan would go on to publish
        planned = _sft_key(case)
        store = Store(case["store"])
        assert not store.has(planned["key"])
        assert not Path(store.object_path(planned["key"])).exists()
        assert planned["status"] == "run"  # the next run rebuilds it
    finally:
        _kill_all(tree | {run.pid})


def _pty_run(argv: list[str], cwd: Path) -> tuple[int, int, bytearray]:
    """`argv` as the session leader of a new terminal: (pid, master fd, its output so far)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            os.chdir(cwd)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    out = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            out.extend(chunk)

    threading.Thread(target=read, daemon=True).start()
    return pid, fd, out


def _wait_exit(pid: int, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"the run did not exit within {timeout} s")


def test_ctrl_c_stops_the_run_in_seconds_with_a_lock_and_a_killed_mlflow_run(case):
    pid, fd, out = _pty_run(_argv(case), case["root"])  # MLflow on: sqlite under the state
    tree: set[int] = set()
    try:
        sft, tree = _during_sft(pid, case["state"])
        os.write(fd, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground group
        code, took = _wait_exit(pid, timeout=10)
        gone = _gone(tree | {sft}, {pid, sft}, timeout=5)
        print(f"after Ctrl-C: exit {code} in {took:.2f} s, no process left in {gone:.2f} s")
        time.sleep(0.2)
        text = out.decode(errors="replace")
        assert code == 130, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        assert "error: stage sft: interrupted (SIGINT)" in text
        assert "error: stage mopd: not run: interrupted (SIGINT)" in text
        assert _locked(case) == {"data", "base"}
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{case['state'] / 'mlflow.db'}")
        exp = client.get_experiment_by_name("spine_tiny")
        runs = client.search_runs([exp.experiment_id], "tags.`posttrain.role` = 'run'")
        assert [r.info.status for r in runs] == ["KILLED"]
    finally:
        _kill_all(tree | {pid})
        os.close(fd)


def test_sigterm_stops_the_run_in_seconds_with_a_lock(case):
    with open(case["root"] / "term.log", "w") as log:
        run = subprocess.Popen(_argv(case, "--no-tracking"), start_new_session=True,
                               stdout=log, stderr=subprocess.STDOUT, cwd=case["root"])
    tree: set[int] = set()
    try:
        sft, tree = _during_sft(run.pid, case["state"])
        t0 = time.time()
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=10)
        took = time.time() - t0
        gone = _gone(tree | {sft}, {run.pid, sft}, timeout=5)
        print(f"after SIGTERM: exit {code} in {took:.2f} s, no process left in {gone:.2f} s")
        text = (case["root"] / "term.log").read_text()
        assert code == 143, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        assert "error: stage sft: interrupted (SIGTERM)" in text
        assert _locked(case) == {"data", "base"}
    finally:
        _kill_all(tree | {run.pid})


def test_a_stage_whose_parent_died_kills_its_group_and_publishes_nothing(tmp_path, monkeypatch):
    """The stage side alone (POSTTRAIN_PARENT_PID set): its parent SIGKILLed, the stage (its
    own group's leader, as the run starts it) and a grandchild in its group die; and the
    check before publishing refuses once the parent is gone."""
    from flows import procs

    pids = tmp_path / "pids"
    stage = ("import subprocess, sys, time\n"
             "from flows import procs\n"
             "procs.watch_parent(interval=0.05)\n"
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             f"open({str(pids)!r}, 'w').write(str(g.pid))\n"
             "time.sleep(60)\n")
    parent = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {stage!r}], start_new_session=True)\n"
              "time.sleep(60)\n")
    env = dict(os.environ, POSTTRAIN_PARENT_PID="1")
    run = subprocess.Popen([sys.executable, "-c", parent], env=env, start_new_session=True)
    tree: set[int] = set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (pids.exists() and pids.read_text()):
            time.sleep(0.05)
        grandchild = int(pids.read_text())
        tree = _tree(run.pid)
        child = _ps()[grandchild][0]
        run.send_signal(signal.SIGKILL)
        run.wait()
        took = _gone({child, grandchild}, {child}, timeout=5)
        print(f"an orphaned stage and its group gone in {took:.2f} s")
    finally:
        _kill_all(tree | {run.pid})
    monkeypatch.setattr(procs, "_watched", os.getppid() + 100000)  # "started by another"
    with pytest.raises(procs.Orphaned):
        procs.check_parent()


def test_a_stage_killed_by_a_signal_prints_one_error_line_and_no_traceback(tmp_path):
    """A stage that dies (here by SIGKILL) is reported once, by the run: no Prefect traceback
    of the wrapper, no ERROR log lines of its task."""
    recipe = tmp_path / "ft.yaml"
    recipe.write_text("name: ft\nstages:\n  data: {kind: data, domains: [arith], size: 16}\n"
                      "  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2,"
                      " intermediate_size: 32, eval_n: 0}\n")
    env = dict(os.environ, POSTTRAIN_FAULT="base:kill")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([*POSTTRAIN, "run", str(recipe), "--no-tracking", "--state-dir",
                           str(tmp_path / "state"), "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "error: stage base: killed by signal SIGKILL" in proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
