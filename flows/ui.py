"""`posttrain ui`: the Prefect UI and the MLflow UI over this project's state, on 127.0.0.1.

Starts `prefect server start` (PREFECT_HOME = <state-dir>/prefect: the database local runs
have been writing, UI on) and `mlflow server` (backend <state-dir>/mlflow.db, artifacts
served from <state-dir>/mlartifacts, so experiments it creates record `mlflow-artifacts:/...`,
not this machine's absolute paths; MLflow itself makes a local sqlite client's artifact
locations absolute), prints both URLs, writes <state-dir>/ui.json
({prefect_api_url, prefect_ui_url, mlflow_url, pid}) and waits; Ctrl-C stops both and removes
the file. While it is up, `posttrain run` with the same --state-dir (and no PREFECT_API_URL /
MLFLOW_TRACKING_URI / --tracking-uri of its own) records there (`servers_for`), so a run shows
live in both UIs. Both servers are the projects' own (`prefect server start`, `mlflow server`):
nothing here reimplements a UI.

Run: ``posttrain ui`` then open the two URLs it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

UI_FILE = "ui.json"


def _free(port: int) -> int:
    """`port` if free on 127.0.0.1, else a free one (0: any)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        urllib.request.urlopen(url, timeout=timeout).read()
        return True
    except OSError:
        return False


def servers_for(state_dir: Path) -> dict[str, str] | None:
    """The servers `posttrain ui` runs over `state_dir`, if it is up and both answer."""
    try:
        info = json.loads((Path(state_dir) / UI_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not all(
            isinstance(info.get(k), str) for k in ("prefect_api_url", "mlflow_url")):
        return None
    ok = _healthy(info["prefect_api_url"] + "/health", 1) and _healthy(
        info["mlflow_url"] + "/health", 1)
    return info if ok else None


def use_servers(args: argparse.Namespace) -> str | None:
    """Point this run at `posttrain ui`'s servers when they are up and nothing else was named;
    returns a line saying so (None when not)."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("MLFLOW_TRACKING_URI") or getattr(
            args, "tracking_uri", None):
        return None
    info = servers_for(args.state_dir)
    if info is None:
        return None
    os.environ["PREFECT_API_URL"] = info["prefect_api_url"]
    args.tracking_uri = info["mlflow_url"]
    return (f"posttrain ui is up: recording to {info['mlflow_url']} and "
            f"{info['prefect_ui_url']}")


def cmd_ui(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).absolute()
    state.mkdir(parents=True, exist_ok=True)
    if (up := servers_for(state)) is not None:
        print(f"already up (pid {up.get('pid')}): Prefect {up['prefect_ui_url']}  MLflow "
              f"{up['mlflow_url']}")
        return 0
    p_port, m_port = _free(args.prefect_port), _free(args.mlflow_port)
    if p_port == m_port:
        m_port = _free(0)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PREFECT_HOME=str(state / "prefect"), PREFECT_SERVER_UI_ENABLED="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{p_port}/api"  # else the UI asks :4200
    logs = state / "ui"
    logs.mkdir(exist_ok=True)
    cmds = {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                    "--port", str(p_port)],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                   str(m_port), "--workers", "1", "--backend-store-uri",
                   f"sqlite:///{state / 'mlflow.db'}", "--artifacts-destination",
                   str(state / "mlartifacts")],
    }
    procs: dict[str, subprocess.Popen[Any]] = {}
    info = {"prefect_api_url": f"http://127.0.0.1:{p_port}/api",
            "prefect_ui_url": f"http://127.0.0.1:{p_port}",
            "mlflow_url": f"http://127.0.0.1:{m_port}", "pid": os.getpid()}
    stop = {"why": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["why"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, cmd in cmds.items():
            with open(logs / f"{name}.log", "ab") as log:
                procs[name] = subprocess.Popen(cmd, env=env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True)
        deadline = time.monotonic() + args.timeout
        for name, url in (("prefect", info["prefect_api_url"] + "/health"),
                          ("mlflow", info["mlflow_url"] + "/health")):
            while not _healthy(url):
                if procs[name].poll() is not None or time.monotonic() > deadline or stop["why"]:
                    print(f"error: {name} server did not start (log: {logs / name}.log); "
                          f"free the port or pass --{name}-port", file=sys.stderr)
                    return 2 if not stop["why"] else 130
                time.sleep(0.5)
        (state / UI_FILE).write_text(json.dumps(info, indent=2) + "\n")
        print(f"Prefect UI  {info['prefect_ui_url']}\nMLflow UI   {info['mlflow_url']}\n"
              f"`posttrain run ... --state-dir {args.state_dir}` records there while this "
              "runs; Ctrl-C stops both", flush=True)
        while not stop["why"] and all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            (state / UI_FILE).unlink()
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for s, h in old.items():
            signal.signal(s, h)


def register(sub: Any, add: Any) -> None:
    """The `ui` subcommand (`add` is flows.cli's subcommand factory)."""
    p = add("ui", "serve the Prefect and MLflow UIs over this project's state (127.0.0.1)",
            cmd_ui)
    p.add_argument("--prefect-port", type=int, default=4200, help="default 4200 (or a free one)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="default 5000 (or a free one)")
    p.add_argument("--timeout", type=float, default=240, help="seconds to wait for both servers")
