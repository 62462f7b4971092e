"""The run owns its process tree: every process it starts stops with it.

`posttrain run` starts two kinds of processes: one child per stage (`posttrain stage`, or the
launcher around it: torchrun, accelerate) and, when no Prefect API is configured, a Prefect
server for the run. Each starts in its own session (so a Ctrl-C on the terminal reaches the run
alone, which then stops them in order) and dies with its parent: `PR_SET_PDEATHSIG` (SIGKILL)
on Linux, set between fork and exec. PDEATHSIG fires when the *thread* that forked exits; a
stage child is forked by the task thread that then waits for it, and the server by the main
thread, so neither thread can end first. A stage process also watches its own parent
(`watch_parent`, started by `posttrain stage` when the run set POSTTRAIN_PARENT_PID): the
ranks under torchrun are the launcher's children, not ours, and PDEATHSIG does not reach them.
When the parent is gone the stage kills its own process group, and it checks again right
before publishing (`check_parent`), so an orphan never publishes an artifact.

SIGINT and SIGTERM of the run (`on_signals`): no new stage starts, every running stage's
process group gets SIGTERM, then SIGKILL after a short grace (`Children.stop`). The flow runs
in a worker thread (`call_in_thread`) so that the main thread keeps our handlers: Prefect's
flow engine replaces SIGTERM's handler when it runs in the main thread.

Light to import (no prefect): `posttrain stage` starts its watchdog before heavy imports.

Run: used by ``posttrain run`` and ``posttrain stage``; nothing to run on its own.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PARENT_ENV = "POSTTRAIN_PARENT_PID"  # set for a stage child: it watches its parent
GRACE = 3.0  # seconds between SIGTERM and SIGKILL when the run stops its stages
PR_SET_PDEATHSIG = 1


class Interrupted(RuntimeError):
    """The run is stopping (SIGINT / SIGTERM): no new child process starts."""


class Orphaned(RuntimeError):
    """This stage's parent process died: it must not publish anything."""


def _pdeathsig(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get `sig` when its parent dies (Linux; else None).

    prctl is looked up here, before the fork: the child then only calls into libc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before prctl: the signal would never come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def owned_popen(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen in a new session (its own process group) that dies with this process.

    Call it from a thread that outlives the child (PDEATHSIG follows the forking thread)."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_pdeathsig(), **kw)


def signal_group(pid: int, sig: int) -> None:
    """`sig` to the process group led by `pid` (a child started by `owned_popen`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Children:
    """The live stage processes of one run, each the leader of its own process group: what a
    signal to the run stops. Thread-safe; `stop` returns at once (the SIGKILL is timed)."""

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        self.stopping: str | None = None  # why the run stops ("SIGINT"), once it does
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[Any]] = set()

    def run(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        """Start `cmd` (stdout and stderr appended to `log_path`: a retry's lines follow the
        failed attempt's), wait; its return code. Raises Interrupted instead of starting once
        the run stops."""
        env = dict(env, **{PARENT_ENV: str(os.getpid())})
        with open(log_path, "a") as f:
            with self._lock:
                if self.stopping:
                    raise Interrupted(self.stopping)
                p = owned_popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
                self._live.add(p)
            try:
                return p.wait()
            finally:
                with self._lock:
                    self._live.discard(p)

    def stop(self, why: str) -> None:
        """Stop the run's stages: no new one starts, SIGTERM to every running stage's group
        now, SIGKILL after the grace. Called again (a second Ctrl-C), SIGKILL at once."""
        with self._lock:
            again = self.stopping is not None
            self.stopping = self.stopping or why
            live = [p.pid for p in self._live]
        for pid in live:
            signal_group(pid, signal.SIGKILL if again else signal.SIGTERM)
        if not again:
            t = threading.Timer(self.grace, self._kill)
            t.daemon = True
            t.start()

    def _kill(self) -> None:
        with self._lock:
            live = [p.pid for p in self._live]
        for pid in live:
            signal_group(pid, signal.SIGKILL)


@contextlib.contextmanager
def on_signals(stop: Callable[[str], None]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM call `stop("SIGINT")` (or "SIGTERM") instead of their
    default; outside the main thread (where Python allows no handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def call_in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw) in a worker thread (with this thread's context variables: Prefect's
    settings live there) while this thread waits, free to run signal handlers."""
    box: dict[str, Any] = {}
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            box["value"] = ctx.run(fn, *args, **kw)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="posttrain-flow", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)  # a signal handler runs between two joins
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- in the stage child ------------------------------------------------------------------------
_watched: int | None = None  # the parent pid the stage started under


def _die() -> None:
    """Kill this stage: its whole process group when it leads one (as `owned_popen` and
    torchrun start it), else itself alone (never a group it merely shares, a shell's)."""
    print("error: the parent process of this stage died; stopping it", file=sys.stderr,
          flush=True)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(interval: float = 0.25) -> None:
    """In a stage started by the run (POSTTRAIN_PARENT_PID set): a daemon thread that kills
    this stage's process group as soon as its parent process is gone. By hand, it does nothing
    (a `nohup posttrain stage` outlives its shell on purpose)."""
    global _watched
    if not os.environ.get(PARENT_ENV) or _watched is not None:
        return
    _watched = os.getppid()
    if _watched == 1:  # orphaned already
        _die()

    def loop() -> None:
        while os.getppid() == _watched:  # an orphan is re-parented: the ppid changes
            time.sleep(interval)
        _die()

    threading.Thread(target=loop, name="posttrain-parent-watch", daemon=True).start()


def check_parent() -> None:
    """Raise Orphaned if the process that started this stage has died (before publishing)."""
    if _watched is not None and os.getppid() != _watched:
        raise Orphaned("the run that started this stage died; nothing is published")


# -- Prefect's API for the run -----------------------------------------------------------------
class PrefectServer:
    """A Prefect API server for this process's runs: what Prefect would start by itself when no
    PREFECT_API_URL is set, but in its own session (a Ctrl-C meant for the run does not kill
    it under the flow) and dying with this process (PDEATHSIG). Started once per process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[Any] | None = None
        self.url: str | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float) -> str:
        """Start it (if not running) and wait until it answers; its API URL."""
        if self.alive() and self.url:
            return self.url
        import httpx
        import prefect
        from prefect.settings import get_current_settings

        env = {**os.environ,
               **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        deadline = time.time() + timeout
        for _ in range(3):  # a port taken between our probe and uvicorn's bind: another one
            port = _free_port()
            self.proc = owned_popen(
                [sys.executable, "-m", "uvicorn", "--app-dir",
                 str(Path(prefect.__file__).parent.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                 str(port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdin=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}/api"
            with httpx.Client() as client:
                while time.time() < deadline and self.proc.poll() is None:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{url}/health", timeout=2).status_code == 200:
                            self.url = url
                            if _pdeathsig() is None:  # else it dies with this process, after
                                atexit.register(self.stop)  # Prefect's exit hooks flushed
                            return url
                    time.sleep(0.1)
            if self.proc.poll() is None:
                break
        self.stop()
        raise RuntimeError(f"the Prefect server for this run did not answer within {timeout:.0f}"
                           " s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), or set "
                           "PREFECT_API_URL to a running server (`prefect server start`)")

    def stop(self) -> None:
        """SIGTERM, a short wait, then SIGKILL. Not called at exit where PDEATHSIG works:
        Prefect's exit hooks still flush events and logs to it then."""
        p, self.proc, self.url = self.proc, None, None
        if p is not None and p.poll() is None:
            signal_group(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                signal_group(p.pid, signal.SIGKILL)
                p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER = PrefectServer()


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Prefect's API for a run: the configured one (PREFECT_API_URL, a test harness), else our
    own server (`SERVER`), set as PREFECT_API_URL for this thread and for child processes (Ray
    workers) while inside; the server itself stays up until this process exits."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240"))
    url = SERVER.start(timeout)
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
