"""A real Prefect worker runs a recipe: `prefect server start` on 127.0.0.1, a process work pool,
`prefect deploy` of infra/prefect.yaml's process deployment, `prefect worker start`, and
`prefect deployment run`. The stages land in the store, and the deployment's one flow run holds
the stages as its own task runs (no flow started by a CLI inside the flow). Slow tier: about
2-3 minutes on 2 cores (the server's first start migrates its database).

Run: ``.venv/bin/python -m pytest tests/test_prefect_worker_slow.py -q -m slow -s``
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import RECIPES, REPO
from tests.servers import free_port

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).with_name("prefect"))


@contextlib.contextmanager
def _proc(argv: list[str], env: dict[str, str], log: Path):
    with open(log, "wb") as f:
        p = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                             start_new_session=True)
    try:
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_a_prefect_worker_runs_the_process_deployment(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_LOGGING_LEVEL="INFO", DO_NOT_TRACK="1", POSTTRAIN_DIR=str(REPO),
               HF_HUB_OFFLINE="1")
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    recipe = tmp_path / "spine_tiny.yaml"
    recipe.write_text((RECIPES / "spine_tiny.yaml").read_text())
    store, state = tmp_path / "store", tmp_path / "state"

    def prefect(*argv: str, timeout: float = 300) -> str:
        p = subprocess.run([PREFECT, "--no-prompt", *argv], env=env, cwd=REPO, timeout=timeout,
                           capture_output=True, text=True)
        assert p.returncode == 0, f"prefect {' '.join(argv)}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
        return p.stdout

    with _proc([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
               tmp_path / "server.log") as server:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        prefect("work-pool", "create", "posttrain-process", "--type", "process")
        prefect("deploy", "--prefect-file", "infra/prefect.yaml", "--name", "mimo-tiny-process")
        with _proc([PREFECT, "worker", "start", "--pool", "posttrain-process", "--limit", "1"],
                   env, tmp_path / "worker.log"):
            params = {"recipe": str(recipe), "store": str(store), "state_dir": str(state)}
            out = prefect("deployment", "run", "posttrain-recipe/mimo-tiny-process",
                          "--params", json.dumps(params), "--watch", "--watch-timeout", "600",
                          timeout=700)
        assert "Completed" in out, out[-3000:]

        # every stage of the recipe is in the store, under the refs the run set
        refs = Store(store).refs()
        stages = {"data", "base", "sft", "rl_arith", "rl_reverse", "mopd_r1", "mopd"}
        assert {f"spine_tiny:{s}" for s in stages} <= set(refs), refs
        assert all(Store(store).verify(k) == [] for k in refs.values())

        # one flow run (the deployment's), whose task runs are the stages
        script = (
            "import asyncio, json\n"
            "from prefect.client.orchestration import get_client\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        flows = await c.read_flow_runs()\n"
            "        tasks = await c.read_task_runs()\n"
            "        print(json.dumps({'flows': [[f.name, f.state_name] for f in flows],\n"
            "                          'tasks': sorted({t.name for t in tasks})}))\n"
            "asyncio.run(main())\n")
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        seen = json.loads(p.stdout.strip().splitlines()[-1])
        assert len(seen["flows"]) == 1 and seen["flows"][0][1] == "Completed", seen
        assert stages <= set(seen["tasks"]), seen
