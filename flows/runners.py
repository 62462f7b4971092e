"""Runners: where and how each stage's child process runs, behind one small interface.

A `Runner` gives the Prefect task runner for a run, holds a stage's resources while its task is
submitted (Ray places it by them) or while it runs (threads: CPU slots in this process), and
starts the stage's command (`posttrain stage --plan-file ...`). `RUNNERS` is the one table:
`posttrain run --runner NAME` looks names up there, and `flows/run.py` calls nothing else. A
third runner (say, Kubernetes jobs: `launch` submits the command as a Job and waits for it) is
one new class here and one line in the table.

Light to import (no prefect, no ray): the CLI validates `--runner` before Prefect is loaded.

Run: used by ``posttrain run --runner threads|ray``; nothing to run on its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar, Protocol

from flows import loopback
from flows.procs import Children
from flows.stagefile import StagePlan


class RunnerUnavailable(RuntimeError):
    """The runner cannot be used here (an optional extra is missing): a usage error."""


def cores(sp: StagePlan) -> tuple[int, int]:
    """(CPU cores to hold, ranks) for a planned stage: at least one core per rank."""
    ranks = int(sp.launch.get("processes", 1))
    return max(int(sp.resources.get("cpus", 1)), ranks), ranks


def subprocess_launch(cmd: list[str], env: dict[str, str], log_path: Path,
                      children: Children | None = None) -> int:
    """Run `cmd` here as a child process, stdout and stderr into `log_path`; its return code.

    The child leads its own process group and dies with this process (flows/procs.py);
    `children` is the run's registry of them, what a SIGINT / SIGTERM of the run stops."""
    return (children or Children()).run(cmd, env, log_path)


class Slots:
    """Counting semaphore over CPU threads and concurrent stages. A stage asking for more
    CPUs than the machine has takes them all (it runs alone rather than never)."""

    def __init__(self, cpus: int, stages: int) -> None:
        self.total = cpus
        self.cpus, self.stages = cpus, stages
        self.cond = threading.Condition()

    def take(self, n: int) -> None:
        n = min(n, self.total)
        with self.cond:
            self.cond.wait_for(lambda: self.cpus >= n and self.stages >= 1)
            self.cpus -= n
            self.stages -= 1

    def try_take(self, n: int) -> bool:
        """`take` without waiting: True when taken."""
        n = min(n, self.total)
        with self.cond:
            if self.cpus < n or self.stages < 1:
                return False
            self.cpus -= n
            self.stages -= 1
            return True

    def give(self, n: int, total: int | None = None) -> None:
        with self.cond:
            self.cpus += min(n, self.total)
            self.stages += 1
            self.cond.notify_all()


class Runner(Protocol):
    """What `flows/run.py` asks of a runner. One instance per run, built with the run's CPU
    budget and `--max-parallel`; where a task runs in another process (a Ray worker), the
    task builds a fresh instance from the table, so instances hold nothing that must travel."""

    name: ClassVar[str]
    mirrors_board: ClassVar[bool]  # tasks run elsewhere: the flow mirrors their end states

    def __init__(self, cpus: int = 1, max_parallel: int = 1) -> None: ...

    @classmethod
    def check(cls) -> None:
        """Raise RunnerUnavailable (with the fix) when this runner cannot run here."""

    def task_runner(self, n_stages: int) -> Any:
        """The Prefect task runner for a run of `n_stages` stages."""

    def submit_options(self, sp: StagePlan) -> contextlib.AbstractContextManager[Any]:
        """Held around the task's submission: where the stage's resources are declared."""

    def reserve(self, sp: StagePlan) -> None:
        """Block until the stage's resources are free in this process (before it starts)."""

    def release(self, sp: StagePlan) -> None:
        """Give back what `reserve` took."""

    def try_reserve(self, sp: StagePlan) -> bool:
        """`reserve` without waiting: True when the stage's resources are now held. The flow
        calls it before submitting a stage's task, so the task's Prefect run starts with its
        training, not with a wait for cores."""

    def track(self, future: Any) -> None:
        """A submitted stage task's future: what `stop` cancels where it cannot reach the
        stage's process itself (a Ray worker's child)."""

    def launch(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        """Start the stage's command, wait for it; its return code (-N: killed by signal N).
        Raises Interrupted instead of starting it once `stop` was called."""

    @property
    def stopping(self) -> str | None:
        """Why the run stops ("SIGINT", "SIGTERM") once `stop` was called, else None."""

    def stop(self, why: str) -> None:
        """The run was interrupted: start no stage, stop the running ones (SIGTERM, a short
        grace, SIGKILL) and return at once; called from a signal handler."""


class ThreadsRunner:
    """Every stage task is a thread of the flow process; CPU slots keep the stages that run at
    once within the machine's cores and `--max-parallel`."""

    name: ClassVar[str] = "threads"
    mirrors_board: ClassVar[bool] = False

    def __init__(self, cpus: int = 1, max_parallel: int = 1) -> None:
        self.cpus = cpus
        self.slots = Slots(cpus, max_parallel)
        self.children = Children()

    @classmethod
    def check(cls) -> None:
        pass

    def task_runner(self, n_stages: int) -> Any:
        from prefect.task_runners import ThreadPoolTaskRunner

        # A thread per stage, plus one per task tag (recipe, kind, key): Prefect warns of
        # tag-concurrency deadlocks when a task has as many tags as the pool has threads.
        return ThreadPoolTaskRunner(max_workers=max(n_stages, 1) + 3)

    def submit_options(self, sp: StagePlan) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def reserve(self, sp: StagePlan) -> None:
        self.slots.take(cores(sp)[0])

    def try_reserve(self, sp: StagePlan) -> bool:
        return self.slots.try_take(cores(sp)[0])

    def release(self, sp: StagePlan) -> None:
        self.slots.give(cores(sp)[0], self.cpus)

    def launch(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        return subprocess_launch(cmd, env, log_path, self.children)

    def track(self, future: Any) -> None:
        pass  # `stop` reaches the children themselves

    @property
    def stopping(self) -> str | None:
        return self.children.stopping

    def stop(self, why: str) -> None:
        self.children.stop(why)  # a stage waiting for a slot gets one, then Interrupted


class RayRunner:
    """Every stage task is a Ray task holding the stage's CPUs and GPUs (Ray does the slot
    keeping); a local Ray instance for the run, or the cluster named by RAY_ADDRESS."""

    name: ClassVar[str] = "ray"
    mirrors_board: ClassVar[bool] = True

    def __init__(self, cpus: int = 1, max_parallel: int = 1) -> None:
        self.cpus = cpus
        self._stopping: str | None = None
        self._futures: list[Any] = []  # the run's Ray task futures: what `stop` cancels

    @classmethod
    def check(cls) -> None:
        # Found, not imported: importing it loads Prefect and Ray before the CLI has set
        # PREFECT_HOME (the run would then write ~/.prefect) and Ray's address switch.
        try:
            found = importlib.util.find_spec("prefect_ray") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise RunnerUnavailable("--runner ray needs prefect-ray: pip install "
                                    "'posttrain[ray]' (or run with --runner threads)")

    def task_runner(self, n_stages: int) -> Any:
        # RAY_ADDRESS (or `ray start` on this node) joins a cluster; otherwise a local Ray
        # instance is started for the run, listening on 127.0.0.1 (POSTTRAIN_BIND_ADDRESS),
        # and stopped after it. Either way the workers get the run's Prefect home and quiet
        # settings (flows/cli.py `_quiet_env`), so nothing lands in ~/.prefect.
        init: dict[str, Any] = {"runtime_env": {"env_vars": {
            k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}}}
        if not os.environ.get("RAY_ADDRESS"):
            init.update(include_dashboard=False, num_cpus=self.cpus, log_to_driver=False,
                        **_local_ray_address(loopback.bind_address()))
        from prefect_ray import RayTaskRunner  # optional extra: pip install posttrain[ray]

        return RayTaskRunner(init_kwargs=init)

    def submit_options(self, sp: StagePlan) -> contextlib.AbstractContextManager[Any]:
        from prefect_ray.context import remote_options

        custom = dict(sp.resources.get("custom") or {})  # node pinning: `ray start --resources`
        return remote_options(num_cpus=cores(sp)[0], num_gpus=sp.resources.get("gpus", 0),
                              **({"resources": custom} if custom else {}))

    def reserve(self, sp: StagePlan) -> None:
        pass  # Ray holds the stage's resources from submission (submit_options)

    def try_reserve(self, sp: StagePlan) -> bool:
        return True  # Ray starts the task (and its Prefect run) once its resources are free

    def release(self, sp: StagePlan) -> None:
        pass

    def launch(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)  # on another node, maybe
        with open(log_path, "a") as f:  # which node of the cluster ran it
            f.write(f"posttrain: on Ray node {_ray_node()}\n")
        return subprocess_launch(cmd, env, log_path)

    @property
    def stopping(self) -> str | None:
        return self._stopping

    def track(self, future: Any) -> None:
        self._futures.append(future)
        if self.stopping:  # submitted after the signal
            _ray_cancel([future.wrapped_future])

    def stop(self, why: str) -> None:
        """Cancel the run's Ray tasks, force=True (in a thread: this is a signal handler): Ray
        kills the workers that run them, and each stage child, losing its worker, kills its
        process group (flows/procs.py). The flow then ends; a local Ray instance stops with
        it, as after any run."""
        if self.stopping is None:
            self._stopping = why
            refs = [f.wrapped_future for f in self._futures]
            threading.Thread(target=_ray_cancel, args=(refs,), daemon=True).start()


# What a Ray worker must see of the run's environment (a cluster's workers see none of it).
WORKER_ENV = (
    "PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_SERVER_UI_ENABLED", "PREFECT_LOGGING_LEVEL",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY",
    "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", loopback.BIND_ENV,
    # the store and MLflow as the run sees them (an S3 endpoint, a tracking server)
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE", "MLFLOW_TRACKING_URI",
    "POSTTRAIN_LEASE_SECONDS",
)


def _local_ray_address(address: str) -> dict[str, Any]:
    """ray.init arguments (and the switch) for a local Ray instance that listens on `address`.

    Ray 2.60 ignores `_node_ip_address="127.0.0.1"` (it swaps in the machine's address) and
    then listens on every interface (GCS, raylet, object manager, agents, workers). With
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it takes 127.0.0.1 as the node's address and every
    process listens there; the flag is read when Ray is imported, so it is also set on an
    already imported Ray. Another address is advertised as the node's; Ray then listens on
    every interface (it cannot be narrowed to one)."""
    if not loopback.is_loopback(address):
        return {} if loopback.is_wildcard(address) else {"_node_ip_address": address}
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # raylet, agents, workers
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("0", "false"):
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]
    return {"_node_ip_address": address}


def _ray_node() -> str:
    """'127.0.0.3 (id 2feb633c0efc)': the Ray node this worker runs on."""
    try:
        import ray

        return (f"{ray.util.get_node_ip_address()} "
                f"(id {ray.get_runtime_context().get_node_id()[:12]})")
    except Exception as e:  # informative only
        return f"unknown ({type(e).__name__})"


def _ray_cancel(refs: list[Any]) -> None:
    import ray

    for ref in refs:
        with contextlib.suppress(Exception):  # done already, or Ray is going away
            ray.cancel(ref, force=True)


# name -> runner class: the only table (`--runner` choices and messages come from it).
RUNNERS: dict[str, type[Runner]] = {
    "threads": ThreadsRunner,
    "ray": RayRunner,
}


def names() -> str:
    """'threads or ray' (or 'a, b or c'): the runner names for messages."""
    n = list(RUNNERS)
    return " or ".join(n) if len(n) <= 2 else f"{', '.join(n[:-1])} or {n[-1]}"
