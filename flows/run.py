"""The Prefect flow: one task per stage, submitted with `wait_for` its parents. Wiring only.

Each task writes its stage's plan, `<run dir>/<stage>.plan.json` (flows/stagefile.py), and
launches `posttrain stage --plan-file ... --result-file ...` as a child process (shared/DESIGN.md,
"One stage, one process"): the flow process stays light, a crash or OOM in one stage cannot take
down its siblings, and torch threads are set per stage from `resources.cpus`. The child's result
file says how the stage ended, its own error message included; a child killed before it could
write one is known by its signal. A stage whose key is in the store is reused without starting
a process. Where tasks run and what they hold is the runner's (flows/runners.py): threads keep
at most `max_parallel` stages, and never more CPU threads than the machine has, in this process;
Ray places each task with its stage's CPUs and GPUs. A stage with `launch: {processes: N}`
starts under torchrun (or `accelerate launch` with its config file).

Pipelining: a stage that reads a snapshot `X@N` (or a later phase of a teacher schedule) does not
wait for X's task; its own task waits, before taking CPUs, until `X@N` is published
(flows/snapshot.py), and fails with X's error if X ends first (every stage's end is in its
result file in the run dir, which a pipelined consumer reads on any runner). A `waiting` `use:`
pin (another recipe's stage, `--wait-for-upstream`) waits for its key the same way.

Run: ``posttrain run recipes/mimo_tiny.yaml --max-parallel 2``
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from flows import loopback, procs
from flows.board import Board
from flows.procs import Interrupted
from flows.runners import RUNNERS, Runner, cores
from flows.snapshot import UpstreamFailed, wait_for
from flows.stagefile import StageFileError, StagePlan, StageResult

# Per-run objects that cannot travel as task parameters (locks, the live board, the runner with
# its CPU slots): keyed by run id. A task that runs elsewhere (a Ray worker) finds none here.
RUNTIME: dict[str, dict[str, Any]] = {}


class StageFailed(RuntimeError):
    """A stage's child process failed; the message is the stage's own error."""


@dataclass(frozen=True)
class RunContext:
    """What every stage task of one run shares; plain values, so it travels to Ray workers."""

    run_id: str
    runner: str  # a name in flows.runners.RUNNERS
    store: str  # store URI
    run_dir: str  # <state dir>/runs/<run id>: plan, result, log and progress files
    state_dir: str
    tracking: str = "on"  # POSTTRAIN_TRACKING for the children: on | off | upload
    tracking_uri: str | None = None
    parent_run: str | None = None
    # `--wait-for-upstream`: how long a `use:` of another recipe's stage not built yet waits
    # for it to be published (None: no limit).
    upstream_timeout: float | None = None


class _NoBoard:
    """The board where the flow process is not (a Ray worker): the flow updates its own."""

    def update(self, name: str, **fields: Any) -> None:
        pass


def launch_stage(sp: StagePlan, run: RunContext, after: list[Any] | None = None
                 ) -> StageResult | State:
    """One stage as a child process (the body of `stage_task`); a Failed state when the run
    was interrupted. `after` holds the parents' futures, unused here: as a parameter (not only
    `wait_for`) they become Ray object refs, so Ray places the task once its parents are done
    instead of running it early to wait while holding its node's CPUs and custom resources
    (two stages pinned to one node would deadlock)."""
    rt = RUNTIME.get(run.run_id)
    board: Any = rt["board"] if rt else _NoBoard()
    # In a Ray worker the run's runner is not here: a fresh one, which holds nothing, launches.
    runner: Runner = rt["runner"] if rt else RUNNERS[run.runner]()
    if sp.status == "fresh":  # in the store: Prefect shows the task as Cached
        board.update(sp.name, state="reused")
        return _cached(StageResult(sp.name, sp.key, "reused", 0.0))
    # Before taking CPUs: a `use:` of another team's stage, or the snapshots this stage reads
    # while their stages keep training (pipelining), must be published first.
    try:
        _await_upstream(sp, run, board, runner)
    except UpstreamFailed as e:
        board.update(sp.name, state="failed", ended=time.time(), error=str(e))
        StageResult(sp.name, sp.key, "failed", 0.0, str(e)).write(
            Path(run.run_dir) / f"{sp.name}.result.json")  # its own consumers read it
        return Failed(message=f"stage {sp.name}: {e}")
    if sp.kind == "use":  # published by its own recipe's run meanwhile
        board.update(sp.name, state="reused")
        return _cached(StageResult(sp.name, sp.key, "reused", 0.0))
    held = rt.get("held", set()) if rt else set()
    if sp.name in held:  # the flow took its cores before submitting it (`_dispatch`)
        held.discard(sp.name)
    else:  # a retry, or a runner that keeps no slots here (Ray)
        runner.reserve(sp)
    try:
        files = {x: Path(run.run_dir) / f"{sp.name}.{x}"
                 for x in ("plan.json", "result.json", "log", "progress.jsonl")}
        sp.write(files["plan.json"])  # here, where the child runs (a Ray node, maybe)
        files["result.json"].unlink(missing_ok=True)  # a retry's result is its own
        cmd = [*_launcher(sp), "-m", "flows.cli", "stage", "--plan-file", str(files["plan.json"]),
               "--result-file", str(files["result.json"]), "--store", run.store,
               "--run-id", run.run_id, "--progress-file", str(files["progress.jsonl"]),
               "--state-dir", run.state_dir]
        if run.tracking_uri:
            cmd += ["--tracking-uri", run.tracking_uri]
        if run.parent_run:
            cmd += ["--parent-run", run.parent_run]
        cpus, ranks = cores(sp)
        threads = str(max(1, min(cpus, os.cpu_count() or 1) // ranks))
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                   POSTTRAIN_TRACKING=run.tracking, POSTTRAIN_RUN_DIR=run.run_dir)
        board.update(sp.name, state="running", started=time.time(),
                     progress_file=str(files["progress.jsonl"]))
        try:
            with _forward_log(files["log"]):
                rc = runner.launch(cmd, env, files["log"])
        except Interrupted as e:
            return _interrupted(sp, board, f"not run: interrupted ({e})")
        result = _outcome(sp, rc, files["result.json"], files["log"])
        if result.status == "failed" and not files["result.json"].exists():
            result.write(files["result.json"])  # killed: its pipelined consumers read this
        if result.status == "failed" and runner.stopping:
            return _interrupted(sp, board, f"interrupted ({runner.stopping})")
        if result.status == "failed":
            board.update(sp.name, state="failed", ended=time.time(), error=result.error)
            message = f"stage {sp.name}: {result.error} (log: {files['log']})"
            if _attempt() <= sp.retries:  # an exception is what makes Prefect retry
                raise StageFailed(message)
            # The last attempt: a Failed state, so the user reads the stage's own error line
            # (the run prints it) instead of Prefect's traceback of our wrapper.
            return Failed(message=message)
        board.update(sp.name, state=result.status, ended=time.time())
        if result.status == "reused":  # another run stored it meanwhile
            return _cached(result)
        _link_mlflow_run(run.store, sp, result)
        return result
    finally:
        runner.release(sp)


def _await_upstream(sp: StagePlan, run: RunContext, board: Any, runner: Runner) -> None:
    """Block until what `sp` reads before it starts is published: a `use:` pin of another
    recipe's stage (`waiting` in the plan), or the snapshots `X@N` it reads while X trains
    (flows/snapshot.py: fails with X's own error when X ends first)."""
    from artifacts.store import Store

    store = Store(run.store)

    def note(what: str) -> Any:
        return lambda: board.update(sp.name, state="waiting", waiting_for=what)

    if sp.status == "waiting":
        what = "; ".join(sp.reasons) or sp.key[:12]
        wait_for(store, sp.key, f"pinned {sp.use}", None, None, run.upstream_timeout,
                 lambda: runner.stopping, note(what))
        return
    _, snaps = sp.spec.waits_for()
    for stage, step in snaps:
        key = next(k for _, sub, k, parent in _snapshot_inputs(sp) if parent == f"{stage}@{step}")
        wait_for(store, key, f"snapshot {stage}@{step}", stage, run.run_dir, None,
                 lambda: runner.stopping, note(f"{stage}@{step}"))
    # A deferred input (a later schedule phase) is waited for inside the stage, while it holds
    # its CPUs: its producer must hold its own by then, or the two could wait for each other.
    for _, sub, key, ref in _snapshot_inputs(sp):
        producer = ref.split("@")[0]
        log = Path(run.run_dir) / f"{producer}.log"
        while sp.spec.deferred(sub) and not (store.has(key) or log.exists()):
            if runner.stopping:
                raise UpstreamFailed(f"interrupted ({runner.stopping}) while waiting for "
                                     f"{producer} to start")
            if (Path(run.run_dir) / f"{producer}.result.json").exists():
                break  # ended: the stage's own wait reports how
            note(f"{producer} to start")()
            time.sleep(0.5)


def _snapshot_inputs(sp: StagePlan) -> list[tuple[str, str | None, str, str]]:
    """(role, name, key, ref as written) of every input of `sp`."""
    out = []
    for role, value in sp.parents.items():
        pairs = [(None, value)] if isinstance(value.get("stage"), str) else value.items()
        out.extend((role, sub, e["key"], e["stage"]) for sub, e in pairs)
    return out


def _link_mlflow_run(store_uri: str, sp: StagePlan, result: StageResult) -> None:
    """A link artifact on the stage's task to its MLflow run, where MLflow has a UI (a
    tracking server: `posttrain ui`, MLFLOW_TRACKING_URI=http://...). Never fatal."""
    try:
        from artifacts.store import Store

        ids = Store(store_uri).mlflow_ids(result.key) or {}
        uri = str(ids.get("tracking_uri") or "")
        if not uri.startswith(("http://", "https://")) or not ids.get("run_id"):
            return
        from prefect.artifacts import create_link_artifact

        key = "".join(c if c.isalnum() else "-" for c in f"mlflow-{sp.name}".lower())
        create_link_artifact(
            link=f"{uri.rstrip('/')}/#/experiments/{ids['experiment_id']}/runs/{ids['run_id']}",
            link_text=f"MLflow run of {sp.recipe}:{sp.name}", key=key,
            description=f"store key {result.key}")
    except Exception as e:  # the stage is stored and recorded; the link is a convenience
        print(f"warning: stage {sp.name}: no MLflow link in Prefect ({e})", file=sys.stderr)


def _cached(result: StageResult) -> State:
    """A Completed state named Cached (what Prefect's own cache hits end in): the UI shows a
    reused stage as cached, not as a stage that ran."""
    return Completed(data=result, name="Cached",
                     message=f"reused: {result.key[:12]} is in the store")


@contextlib.contextmanager
def _forward_log(path: Path, limit: int = 5000) -> Any:
    """Stream the stage child's log lines into this task's Prefect logs while it runs (the
    Prefect UI's task log), at most `limit` lines; the file stays the full record."""
    try:
        from prefect.logging import get_run_logger
        from prefect.logging.handlers import APILogHandler

        run_logger = get_run_logger()
    except Exception:  # not inside a Prefect task run
        yield
        return
    # The run keeps Prefect's loggers at WARNING (a quiet terminal): these lines go to the API
    # alone, through a logger of their own with only Prefect's API handler.
    api = logging.getLogger("posttrain.stage_log")
    api.propagate, api.level = False, logging.INFO
    if not any(isinstance(h, APILogHandler) for h in api.handlers):
        api.addHandler(APILogHandler())
    logger = type(run_logger)(api, run_logger.extra)
    done = threading.Event()

    def tail() -> None:
        sent, pos = 0, path.stat().st_size if path.exists() else 0
        while sent < limit:
            finished = done.is_set()
            try:
                with open(path, errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
            except FileNotFoundError:
                chunk = ""
            for line in chunk.splitlines():
                if line.strip() and sent < limit:
                    logger.info(line[:2000])
                    sent += 1
            if finished:
                return
            done.wait(1.0)

    # In the task's context: the run's Prefect settings (its API URL) are context variables;
    # a bare thread would see none and Prefect would start a server of its own to log to.
    t = threading.Thread(target=contextvars.copy_context().run, args=(tail,), daemon=True,
                         name="posttrain-log-forward")
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(timeout=10)


def _attempt() -> int:
    """1-based attempt number of the running task (1 outside Prefect's engine)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return int(getattr(getattr(ctx, "task_run", None), "run_count", 1) or 1) if ctx else 1


def _interrupted(sp: StagePlan, board: Any, error: str) -> Any:
    """A stage the run's SIGINT / SIGTERM stopped (or kept from starting): a Failed state,
    not an exception, so Prefect neither retries it nor prints a traceback."""
    board.update(sp.name, state="failed", ended=time.time(), error=error)
    return Failed(message=f"stage {sp.name}: {error}")


def _outcome(sp: StagePlan, rc: int, result_file: Path, log: Path) -> StageResult:
    """How the child ended: its result file; else (killed before writing it) its return code."""
    result = None
    try:
        result = StageResult.read(result_file) if result_file.exists() else None
    except StageFileError:
        pass
    if result is not None and (rc == 0 or result.status == "failed"):
        return result
    if rc < 0:
        try:
            error = f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            error = f"killed by signal {-rc}"
    else:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        tail = [ln for ln in lines if ln.strip()][-1:] or ["(no output)"]
        what = "without a result file" if result is None else f"after reporting {result.status}"
        error = f"exit code {rc} {what}: {tail[0]}"
    return StageResult(sp.name, sp.key, "failed", 0.0, error)


def wire(recipe_name: str, plans: list[StagePlan], run: RunContext) -> Any:
    """The flow's body: submit every stage after its parents, collect results and failures."""
    rt = RUNTIME[run.run_id]
    runner: Runner = rt["runner"]
    futures: dict[str, Any] = {}

    def submit(sp: StagePlan) -> None:
        task_ = stage_task.with_options(name=f"{recipe_name}:{sp.name}", retries=sp.retries,
                                        task_run_name=sp.name,
                                        tags={f"recipe:{recipe_name}", f"kind:{sp.kind}",
                                              f"key:{sp.key[:12]}"})
        # A stage read only through snapshots (or deferred schedule phases) is not waited for
        # here: the task waits for what it reads (pipelining, `_await_upstream`).
        parents = [futures[x] for x in sp.spec.waits_for()[0]]
        with runner.submit_options(sp):
            futures[sp.name] = task_.submit(sp, run, after=parents, wait_for=parents)
        runner.track(futures[sp.name])

    _dispatch(plans, futures, submit, runner, run, rt)
    board: Board = rt["board"]
    results: list[StageResult] = []
    failures = []
    for sp in plans:
        fut = futures[sp.name]
        fut.wait()
        state = fut.state
        if state.is_completed():
            results.append(fut.result())
            if runner.mirrors_board:  # the task ran elsewhere: mirror it on our board
                board.update(sp.name, state=results[-1].status, ended=time.time())
            continue
        err = board.get(sp.name).get("error")
        if state.is_failed():
            err = err or _stage_error(sp.name, state)
        if state.is_failed() and err:
            board.update(sp.name, state="failed", error=err)
            failures.append(f"stage {sp.name}: {err}")
        elif runner.stopping:  # stopped elsewhere (a Ray worker), or never started
            started = (board.get(sp.name)["state"] == "running"
                       or (Path(run.run_dir) / f"{sp.name}.log").exists())
            err = f"{'' if started else 'not run: '}interrupted ({runner.stopping})"
            board.update(sp.name, state="failed", error=err)
        else:
            err = "not run: an upstream stage failed"
            board.update(sp.name, state="failed", error=err)
        results.append(StageResult(sp.name, sp.key, "failed", 0.0, err))
        done = Path(run.run_dir) / f"{sp.name}.result.json"
        if not done.exists():  # never started: its pipelined consumers must not wait for it
            results[-1].write(done)
    rt["results"] = results
    _post_artifacts(run.run_id)
    if failures:
        # A Failed state, not an exception: the flow run fails with the stages' own messages,
        # without a Python traceback in the user's terminal.
        return Failed(message="; ".join(failures))
    return results


def _dispatch(plans: list[StagePlan], futures: dict[str, Any], submit: Any, runner: Runner,
              run: RunContext, rt: dict[str, Any]) -> None:
    """Submit every stage's task, in plan order, once it can start at once: its parents done,
    the snapshots it reads published (or their stage ended), and its cores taken here (the
    threads runner), so a task's Prefect duration is its stage's time, not a wait for a CPU
    slot. Stored stages, `use:` pins and stages that will not run (a parent failed, the run
    stops) are submitted without cores. Ray keeps its own slots: everything goes at once."""
    from concurrent.futures import Future

    from artifacts.store import Store

    store, held = Store(run.store), rt.setdefault("held", set())
    pending, checked = list(plans), {}

    def done(name: str) -> bool:  # submitted, and ended (a Ray future: Ray orders them)
        inner = getattr(futures.get(name), "wrapped_future", None)
        return name in futures and (not isinstance(inner, Future) or inner.done())

    def never_ran(name: str) -> bool:
        """The stage ended without completing: failed, or never run because its own parent
        did not complete (Prefect leaves that task Pending "NotReady", not Failed). Its
        descendants will not run either, so they must not take cores: a NotReady task never
        reaches `launch_stage`, which is what gives cores back."""
        inner = getattr(futures.get(name), "wrapped_future", None)
        if isinstance(inner, Future):
            return inner.done() and not futures[name].state.is_completed()
        return futures[name].state.is_failed()  # Ray: still running reads as not completed

    def ready(sp: StagePlan) -> bool:
        whole, snaps = sp.spec.waits_for()
        if not all(done(x) for x in whole):
            return False
        if runner.stopping or sp.status in ("fresh", "waiting") or sp.kind == "use":
            return True
        if any(never_ran(x) for x in whole):
            return True  # never runs: Prefect ends it NotReady
        if snaps and time.monotonic() - checked.get(sp.name, 0.0) < 1.0:
            return False  # a store lookup a second per waiting stage (S3 costs a request)
        checked[sp.name] = time.monotonic()
        for stage, step in snaps:
            key = next(k for _, _, k, ref in _snapshot_inputs(sp) if ref == f"{stage}@{step}")
            if not store.has(key) and not done(stage):
                return False
        return True

    while pending:
        for sp in list(pending):
            if not ready(sp):
                continue
            needs = not (runner.stopping or sp.status in ("fresh", "waiting")
                         or sp.kind == "use"
                         or any(never_ran(x) for x in sp.spec.waits_for()[0]))
            if needs and not runner.try_reserve(sp):
                continue  # wait for cores; a later stage that fits may start meanwhile
            if needs:
                held.add(sp.name)
            submit(sp)
            pending.remove(sp)
        if pending:
            time.sleep(0.1)


# Plain module-level functions under the task and the flow: Ray pickles them by reference (a
# decorated function's name would point at the Task / Flow object, forcing by-value pickling of
# their globals, RUNTIME's locks included). Their parameters are plain values for the same
# reason (a StagePlan, a RunContext); the runner and the board stay in RUNTIME.
stage_task = task(launch_stage, cache_policy=NO_CACHE, persist_result=False)
recipe_flow = flow(wire, name="posttrain", persist_result=False, log_prints=False)


def _launcher(sp: StagePlan) -> list[str]:
    """The command prefix that starts a stage: python, torchrun or accelerate launch.

    The launchers run under flows/loopback.py: their c10d stores, the ranks' rendezvous and
    gloo/NCCL listen on 127.0.0.1 (or POSTTRAIN_BIND_ADDRESS), never on every interface as
    torchrun's `--standalone` store does."""
    n, accelerate = sp.launch.get("processes", 1), sp.launch.get("accelerate")
    if n == 1 and not accelerate:
        return [sys.executable]
    address = loopback.bind_address()
    host = loopback.reach(address)
    start = [sys.executable, "-m", "flows.loopback", address]
    if accelerate:
        return [*start, "accelerate.commands.launch", "--config_file", accelerate,
                "--num_processes", str(n), "--main_process_ip", host,
                "--main_process_port", str(loopback.free_port(host))]
    return [*start, "torch.distributed.run", "--nnodes", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", loopback.host_port(host, 0), "--local-addr", host,
            "--nproc_per_node", str(n)]


def _stage_error(name: str, state: Any) -> str | None:
    """The stage's own message from a failed task state (its StageFailed, raised remotely)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # a returned Failed state holds no result: its message says it
        exc = None
    text = str(exc) if isinstance(exc, BaseException) else (state.message or "")
    prefix = f"stage {name}: "
    text = text[text.index(prefix) + len(prefix):] if prefix in text else text
    return text.strip() or None


def _post_artifacts(run_id: str) -> None:
    """Lineage graph + eval table on the flow run's Artifacts tab (best effort)."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        lineage_md, rows = RUNTIME[run_id]["figures_fn"]()
        if lineage_md:
            create_markdown_artifact(lineage_md, key="posttrain-lineage",
                                     description="Lineage of this run")
        if rows:
            create_table_artifact(rows, key="posttrain-eval", description="Eval per stage")
    except Exception as e:  # never fail a finished run over a picture
        print(f"warning: could not post Prefect artifacts: {e}", file=sys.stderr)


def _quiet_task_failure(record: logging.LogRecord) -> bool:
    """Drop Prefect's ERROR records of a failed stage task (a traceback of our wrapper, then
    its state): the board and the run's `error: stage NAME: ...` line say it once, plainly."""
    return record.levelno < logging.ERROR


def execute(recipe_name: str, plans: list[StagePlan], run: RunContext,
            max_parallel: int) -> Any:
    """Run the flow on `run.runner`; returns the flow's final state.

    RUNTIME[run.run_id] must hold "board" and "figures_fn" () -> (lineage markdown, eval rows)
    beforehand; the StageResults land in RUNTIME[run.run_id]["results"], in plan order.
    """
    logging.getLogger("prefect.task_runs").addFilter(_quiet_task_failure)
    cpus = max(os.cpu_count() or 1, max_parallel)
    runner = RUNNERS[run.runner](cpus, max_parallel)
    RUNTIME[run.run_id]["runner"] = runner
    f = recipe_flow.with_options(task_runner=runner.task_runner(len(plans)),
                                 flow_run_name=run.run_id)
    # SIGINT / SIGTERM stop the runner's stages; the flow then ends by itself, every stage
    # failed or done, and RUNTIME[run.run_id]["interrupted"] says why ("SIGINT").
    with procs.on_signals(runner.stop), procs.prefect_api():
        state = procs.call_in_thread(f, recipe_name, plans, run, return_state=True)
    RUNTIME[run.run_id]["interrupted"] = runner.stopping
    return state
