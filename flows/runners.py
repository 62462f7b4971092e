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
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, ClassVar, Protocol

from flows.stagefile import StagePlan


class RunnerUnavailable(RuntimeError):
    """The runner cannot be used here (an optional extra is missing): a usage error."""


def cores(sp: StagePlan) -> tuple[int, int]:
    """(CPU cores to hold, ranks) for a planned stage: at least one core per rank."""
    ranks = int(sp.launch.get("processes", 1))
    return max(int(sp.resources.get("cpus", 1)), ranks), ranks


def subprocess_launch(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run `cmd` here as a child process, stdout and stderr into `log_path`; its return code."""
    with open(log_path, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


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

    def launch(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        """Start the stage's command, wait for it; its return code (-N: killed by signal N)."""


class ThreadsRunner:
    """Every stage task is a thread of the flow process; CPU slots keep the stages that run at
    once within the machine's cores and `--max-parallel`."""

    name: ClassVar[str] = "threads"
    mirrors_board: ClassVar[bool] = False

    def __init__(self, cpus: int = 1, max_parallel: int = 1) -> None:
        self.cpus = cpus
        self.slots = Slots(cpus, max_parallel)

    @classmethod
    def check(cls) -> None:
        pass

    def task_runner(self, n_stages: int) -> Any:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max(n_stages, 1))

    def submit_options(self, sp: StagePlan) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def reserve(self, sp: StagePlan) -> None:
        self.slots.take(cores(sp)[0])

    def release(self, sp: StagePlan) -> None:
        self.slots.give(cores(sp)[0], self.cpus)

    def launch(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        return subprocess_launch(cmd, env, log_path)


class RayRunner:
    """Every stage task is a Ray task holding the stage's CPUs and GPUs (Ray does the slot
    keeping); a local Ray instance for the run, or the cluster named by RAY_ADDRESS."""

    name: ClassVar[str] = "ray"
    mirrors_board: ClassVar[bool] = True

    def __init__(self, cpus: int = 1, max_parallel: int = 1) -> None:
        self.cpus = cpus

    @classmethod
    def check(cls) -> None:
        try:
            import prefect_ray  # noqa: F401
        except ImportError:
            raise RunnerUnavailable("--runner ray needs prefect-ray: pip install "
                                    "'posttrain[ray]' (or run with --runner threads)") from None

    def task_runner(self, n_stages: int) -> Any:
        from prefect_ray import RayTaskRunner  # optional extra: pip install posttrain[ray]

        # RAY_ADDRESS (or `ray start` on this node) joins a cluster; otherwise a local Ray
        # instance is started for the run and stopped after it.
        joins = bool(os.environ.get("RAY_ADDRESS"))
        return RayTaskRunner(init_kwargs={} if joins else {
            "include_dashboard": False, "num_cpus": self.cpus, "log_to_driver": False})

    def submit_options(self, sp: StagePlan) -> contextlib.AbstractContextManager[Any]:
        from prefect_ray.context import remote_options

        return remote_options(num_cpus=cores(sp)[0], num_gpus=sp.resources.get("gpus", 0))

    def reserve(self, sp: StagePlan) -> None:
        pass  # Ray holds the stage's resources from submission (submit_options)

    def release(self, sp: StagePlan) -> None:
        pass

    def launch(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)  # on another node, maybe
        return subprocess_launch(cmd, env, log_path)


# name -> runner class: the only table (`--runner` choices and messages come from it).
RUNNERS: dict[str, type[Runner]] = {
    "threads": ThreadsRunner,
    "ray": RayRunner,
}


def names() -> str:
    """'threads or ray' (or 'a, b or c'): the runner names for messages."""
    n = list(RUNNERS)
    return " or ".join(n) if len(n) <= 2 else f"{', '.join(n[:-1])} or {n[-1]}"
