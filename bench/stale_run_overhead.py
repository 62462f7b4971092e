"""Orchestration overhead of a `posttrain run` that builds stages, with a Prefect server running.

Starts `prefect server start` on 127.0.0.1 (PREFECT_API_URL, as a team with its own server has)
and a small recipe: `data` -> `base` -> `sft` (tiny sizes). Each repeat forces all three
stages (`--force data --force base --force-downstream`, `--no-tracking`: MLflow is not
orchestration) in a fresh process and splits its wall time into

- stages: the sum of the stages' own seconds as the children report them (the build: load
  inputs, train, publish), along the chain,
- children: each stage child's process wall time (its interpreter and torch imports included),
  from the flow's launch to its exit (the `.log` file's mtime minus the `.plan.json`'s),
- overhead = run wall - children: the CLI's imports, plan, Prefect flow and task runs, lock and
  refs,

against a bare Prefect flow of three no-op tasks on the same server (`prefect` imported, a
flow run, three task runs): the floor for any Prefect orchestration of the chain.

Run: ``.venv/bin/python bench/stale_run_overhead.py [--repeats 5]`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """\
name: overhead
stages:
  data: {kind: data, domains: [arith], size: 32, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 2}
  sft: {kind: sft, from: base, data: data, max_steps: 1, per_device_train_batch_size: 4,
        warmup_steps: 0, eval_n: 2}
"""
BARE = """
from prefect import flow, task

@task
def noop(i: int) -> int:
    return i

@flow
def bare() -> None:
    a = noop.submit(0)
    b = noop.submit(1, wait_for=[a])
    noop.submit(2, wait_for=[b]).wait()

bare()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="posttrain-overhead-") as tmp:
        work = Path(tmp)
        port = _port()
        env = dict(os.environ, PREFECT_HOME=str(work / "prefect"), DO_NOT_TRACK="1",
                   PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="WARNING", MLFLOW_DISABLE_TELEMETRY="true",
                   HF_HUB_OFFLINE="1")
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
             "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            recipe = work / "overhead.yaml"
            recipe.write_text(RECIPE)
            (work / "bare.py").write_text(BARE)
            cli = [sys.executable, "-m", "flows.cli", "run", str(recipe), "--store",
                   str(work / "store"), "--state-dir", str(work / "state"), "--json",
                   "--no-tracking", "--max-parallel", "1"]
            subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, check=True)  # warm
            runs, bare = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                p = subprocess.run([*cli, "--force", "data", "--force", "base",
                                    "--force-downstream"], env=env, cwd=ROOT,
                                   capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if p.returncode:
                    raise SystemExit(p.stderr[-3000:])
                rows = json.loads(p.stdout)
                run_dir = max((work / "state" / "runs").iterdir(),
                              key=lambda d: d.stat().st_mtime)
                children = sum((run_dir / f"{r['stage']}.log").stat().st_mtime
                               - (run_dir / f"{r['stage']}.plan.json").stat().st_mtime
                               for r in rows)
                runs.append((wall, sum(r["seconds"] for r in rows), children))
                t0 = time.perf_counter()
                subprocess.run([sys.executable, str(work / "bare.py")], env=env, cwd=work,
                               check=True, capture_output=True)
                bare.append(time.perf_counter() - t0)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    med = statistics.median
    wall, stages, children = (med([r[i] for r in runs]) for i in range(3))
    overhead = med([r[0] - r[2] for r in runs])
    print(f"3 stale stages in a chain, Prefect server running; medians of {args.repeats}")
    print(f"{'posttrain run, wall':<44}{wall:>8.2f} s")
    print(f"{'  stages own seconds (sum)':<44}{stages:>8.2f} s")
    print(f"{'  stage child processes, wall (sum)':<44}{children:>8.2f} s")
    print(f"{'  overhead = wall - children':<44}{overhead:>8.2f} s")
    print(f"{'bare Prefect flow, 3 chained no-op tasks':<44}{med(bare):>8.2f} s")
    print(f"overhead / bare flow: {overhead / med(bare):.2f}x")


if __name__ == "__main__":
    main()
