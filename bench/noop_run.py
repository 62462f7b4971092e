"""A no-op `posttrain run` (every stage fresh) against `posttrain plan` and a bare Prefect flow.

Publishes a small fake artifact under every planned key of the demo recipe
(`recipes/mimo_tiny.yaml`, copied into a temp dir with its data untouched), so every stage is
fresh, then times, each in a fresh process, `--repeats` times, median:

- `posttrain run RECIPE --json` (answers from the plan: no Prefect, no MLflow, no run dir),
- `posttrain plan RECIPE --json` (the floor: keys and the store lookups),
- a bare Prefect flow with as many no-op tasks as the recipe has stages (ephemeral server, as a
  run without PREFECT_API_URL has): what any orchestration of the same DAG costs.

Run: ``.venv/bin/python bench/noop_run.py [--repeats 5]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BARE_FLOW = """
import sys
from prefect import flow, task

@task
def noop(i: int) -> int:
    return i

@flow
def bare(n: int) -> None:
    futures = [noop.submit(i) for i in range(n)]
    for f in futures:
        f.wait()

bare(int(sys.argv[1]))
"""


def _publish_all(recipe: Path, store_dir: Path) -> int:
    from artifacts.store import Store
    from flows.plan import plan
    from flows.recipe import parse

    store = Store(store_dir)
    planned = plan(parse(recipe), store)
    for p in planned:
        staged = store.staging_dir(p.key)
        (staged / "payload.bin").write_bytes(b"\0" * 1024)
        store.publish(p.key, staged, {"recipe": "mimo_tiny", "stage": p.name,
                                      "kind": p.spec.kind, "key": p.key,
                                      "produces": "model", "inputs": p.input_keys})
    return len(planned)


def _time(argv: list[str], env: dict[str, str], cwd: Path, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="posttrain-noop-") as tmp:
        work = Path(tmp)
        recipe = work / "mimo_tiny.yaml"
        shutil.copy(ROOT / "recipes" / "mimo_tiny.yaml", recipe)
        n = _publish_all(recipe, work / "store")
        (work / "bare.py").write_text(BARE_FLOW)
        env = dict(os.environ, PREFECT_HOME=str(work / "prefect"), DO_NOT_TRACK="1",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                   MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
        env.pop("PREFECT_API_URL", None)
        cli = [sys.executable, "-m", "flows.cli"]
        common = ["--store", str(work / "store"), "--state-dir", str(work / "state"), "--json"]
        rows = {
            "posttrain run (no-op)": _time([*cli, "run", str(recipe), *common], env, ROOT,
                                           args.repeats),
            "posttrain plan": _time([*cli, "plan", str(recipe), *common], env, ROOT,
                                    args.repeats),
            f"bare Prefect flow, {n} no-op tasks": _time(
                [sys.executable, str(work / "bare.py"), str(n)], env, work, args.repeats),
        }
        assert not (work / "state" / "runs").exists(), "a no-op run must not create a run dir"
    plan_median = statistics.median(rows["posttrain plan"])
    print(f"{n} stages, every one fresh; medians of {args.repeats} fresh processes")
    print(f"{'':<36}{'median s':>10}{'min s':>9}{'x plan':>9}")
    for name, ts in rows.items():
        med = statistics.median(ts)
        print(f"{name:<36}{med:>10.3f}{min(ts):>9.3f}{med / plan_median:>9.2f}")


if __name__ == "__main__":
    main()
