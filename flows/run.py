"""The Prefect flow: one task per stage, submitted with `wait_for` its parents. Wiring only.

Each task launches `posttrain stage RECIPE STAGE` as a child process (shared/DESIGN.md, "One
stage, one process"): the flow process stays light, a crash or OOM in one stage cannot take
down its siblings, and torch threads are set per stage from `resources.cpus`. A stage whose key
is in the store is reused without starting a process. At most `max_parallel` stages run at
once, and never more CPU threads than the machine has (unless --max-parallel asks for more).
A stage with `launch: {processes: N}` starts under torchrun (or `accelerate launch` with its
config file); with the Ray runner each task reserves its stage's CPUs and GPUs in Ray instead.

Run: ``posttrain run recipes/mimo_tiny.yaml --max-parallel 2``
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.board import Board

# Per-run objects that cannot travel as task parameters (locks, the live board): keyed by run id.
RUNTIME: dict[str, dict[str, Any]] = {}


class StageFailed(RuntimeError):
    """A stage's child process failed; the message is the stage's own error."""


class Slots:
    """Counting semaphore over CPU threads and concurrent stages."""

    def __init__(self, cpus: int, stages: int) -> None:
        self.cpus, self.stages = cpus, stages
        self.cond = threading.Condition()

    def take(self, n: int) -> None:
        n = min(n, self.cpus)
        with self.cond:
            self.cond.wait_for(lambda: self.cpus >= n and self.stages >= 1)
            self.cpus -= n
            self.stages -= 1

    def give(self, n: int, total: int) -> None:
        with self.cond:
            self.cpus += min(n, total)
            self.stages += 1
            self.cond.notify_all()


def _child_error(log: Path, rc: int) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    if rc < 0:
        return f"killed by signal {signal.Signals(-rc).name}"
    tail = [ln for ln in lines if ln.strip()][-1:] or ["(no output)"]
    return f"exit code {rc}: {tail[0]}"


class _NoBoard:
    """The board where the flow process is not (a Ray worker): the flow updates its own."""

    def update(self, name: str, **fields: Any) -> None:
        pass


def launch_stage(name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """One stage as a child process (the body of `stage_task`)."""
    # In the flow's process (threads runner) the live board and CPU slots are here; in a Ray
    # worker they are not, and Ray itself holds the stage's CPUs (remote_options at submit).
    rt = RUNTIME.get(ctx["run_id"])
    board: Any = rt["board"] if rt else _NoBoard()
    p = ctx["plan"][name]
    if p["status"] == "fresh":
        board.update(name, state="reused")
        return {"stage": name, "key": p["key"], "status": "reused", "seconds": 0.0}
    slots: Slots | None = rt["slots"] if rt else None
    cpus, ranks = _cores(p)
    if slots:
        slots.take(cpus)
    try:
        run_dir = Path(ctx["run_dir"])
        log, progress = run_dir / f"{name}.log", run_dir / f"{name}.progress.jsonl"
        cmd = [*_launcher(p), "-m", "flows.cli", "stage", ctx["recipe"], name,
               "--store", ctx["store"], "--run-id", ctx["run_id"], "--expect-key", p["key"],
               "--progress-file", str(progress), "--state-dir", ctx["state_dir"]]
        for s in ctx["sets"]:
            cmd += ["--set", s]
        if "forced" in p["reasons"]:
            cmd.append("--force")
        if ctx.get("tracking_uri"):
            cmd += ["--tracking-uri", ctx["tracking_uri"]]
        if ctx.get("parent_run"):
            cmd += ["--parent-run", ctx["parent_run"]]
        threads = str(max(1, min(cpus, os.cpu_count() or 1) // ranks))
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                   POSTTRAIN_TRACKING=ctx["tracking"])
        board.update(name, state="running", started=time.time(), progress_file=str(progress))
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
        if proc.returncode != 0:
            msg = _child_error(log, proc.returncode)
            board.update(name, state="failed", ended=time.time(), error=msg)
            raise StageFailed(f"stage {name}: {msg} (log: {log})")
        result = _result_line(proc.stdout, name)
        board.update(name, state=result["status"], ended=time.time())
        return result
    finally:
        if slots and rt:
            slots.give(cpus, rt["slots_total"])


def wire(recipe_name: str, ctx: dict[str, Any]) -> Any:
    """The flow's body: submit every stage after its parents, collect results and failures."""
    futures: dict[str, Any] = {}
    for name, p in ctx["plan"].items():
        task_ = stage_task.with_options(name=f"{recipe_name}:{name}", retries=p["retries"],
                                        task_run_name=name)
        with _resources(ctx["runner"], p):
            futures[name] = task_.submit(name, ctx, wait_for=[futures[x] for x in p["parents"]])
    board: Board = RUNTIME[ctx["run_id"]]["board"]
    results, failures = [], []
    for name, fut in futures.items():
        fut.wait()
        state = fut.state
        if state.is_completed():
            results.append(fut.result())
            if ctx["runner"] != "threads":  # the task ran elsewhere: mirror it on our board
                board.update(name, state=results[-1]["status"], ended=time.time())
            continue
        err = board.get(name).get("error")
        if state.is_failed():
            err = err or _stage_error(name, state)
        if state.is_failed() and err:
            board.update(name, state="failed", error=err)
            failures.append(f"stage {name}: {err}")
        else:
            err = "not run: an upstream stage failed"
            board.update(name, state="failed", error=err)
        results.append({"stage": name, "key": ctx["plan"][name]["key"], "status": "failed",
                        "seconds": 0.0, "error": err})
    RUNTIME[ctx["run_id"]]["results"] = results
    _post_artifacts(ctx)
    if failures:
        # A Failed state, not an exception: the flow run fails with the stages' own messages,
        # without a Python traceback in the user's terminal.
        return Failed(message="; ".join(failures))
    return results


# Plain module-level functions under the task and the flow: Ray pickles them by reference (a
# decorated function's name would point at the Task / Flow object, forcing by-value pickling of
# their globals, RUNTIME's locks included).
stage_task = task(launch_stage, cache_policy=NO_CACHE, persist_result=False)
recipe_flow = flow(wire, name="posttrain", persist_result=False, log_prints=False)


def _cores(p: dict[str, Any]) -> tuple[int, int]:
    """(CPU cores to hold, ranks) for a planned stage: at least one core per rank."""
    ranks = p["launch"]["processes"] if p.get("launch") else 1
    return max(p["cpus"], ranks), ranks


def _launcher(p: dict[str, Any]) -> list[str]:
    """The command prefix that starts a stage: python, torchrun or accelerate launch."""
    launch = p.get("launch")
    if not launch:
        return [sys.executable]
    n = str(launch["processes"])
    if launch["accelerate"]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                launch["accelerate"], "--num_processes", n]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n]


def _result_line(stdout: str, name: str) -> dict[str, Any]:
    """The stage's JSON result: the last stdout line that is one (launchers may print too)."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and row.get("stage") == name:
                return row
    raise StageFailed(f"stage {name}: no result line on stdout: {stdout[-300:]!r}")


def _resources(runner: str, p: dict[str, Any]) -> Any:
    """Ray: reserve the stage's CPUs and GPUs for its task; threads: Slots do it in-process."""
    if runner != "ray":
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_cpus=_cores(p)[0], num_gpus=p.get("gpus", 0))


def _stage_error(name: str, state: Any) -> str | None:
    """The stage's own message from a failed task state (its StageFailed, raised remotely)."""
    exc = state.result(raise_on_failure=False)
    text = str(exc) if isinstance(exc, BaseException) else (state.message or "")
    prefix = f"stage {name}: "
    text = text[text.index(prefix) + len(prefix):] if prefix in text else text
    return text.strip() or None


def _post_artifacts(ctx: dict[str, Any]) -> None:
    """Lineage graph + eval table on the flow run's Artifacts tab (best effort)."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        lineage_md, rows = RUNTIME[ctx["run_id"]]["figures_fn"]()
        if lineage_md:
            create_markdown_artifact(lineage_md, key="posttrain-lineage",
                                     description="Lineage of this run")
        if rows:
            create_table_artifact(rows, key="posttrain-eval", description="Eval per stage")
    except Exception as e:  # never fail a finished run over a picture
        print(f"warning: could not post Prefect artifacts: {e}", file=sys.stderr)


def execute(recipe_name: str, ctx: dict[str, Any], max_parallel: int, runner: str) -> Any:
    """Run the flow with the chosen task runner; returns the flow's final state.

    RUNTIME[ctx["run_id"]] must hold "board" and "figures_fn" () -> (lineage markdown, eval
    rows) beforehand; the
    results land in RUNTIME[ctx["run_id"]]["results"].
    """
    slots_total = max(os.cpu_count() or 1, max_parallel)
    RUNTIME[ctx["run_id"]].update(slots=Slots(slots_total, max_parallel),
                                  slots_total=slots_total)
    if runner == "ray":
        from prefect_ray import RayTaskRunner  # optional extra: pip install posttrain[ray]

        # RAY_ADDRESS (or `ray start` on this node) joins a cluster; otherwise a local Ray
        # instance is started for the run and stopped after it.
        joins = bool(os.environ.get("RAY_ADDRESS"))
        task_runner: Any = RayTaskRunner(init_kwargs={} if joins else {
            "include_dashboard": False, "num_cpus": slots_total, "log_to_driver": False})
    else:
        task_runner = ThreadPoolTaskRunner(max_workers=max(len(ctx["plan"]), 1))
    f = recipe_flow.with_options(task_runner=task_runner, flow_run_name=ctx["run_id"])
    return f(recipe_name, ctx, return_state=True)
