"""Beyond one machine, on this one: a two-node Ray cluster (`ray start --head` on 127.0.0.2 with
resource `node_a`, a second `ray start` on 127.0.0.3 with `node_b`), an S3 store (moto on
127.0.0.1), MLflow as a server on 127.0.0.1. A recipe whose stages are pinned to the nodes by
`resources: {custom: {...}}` runs end to end, and its artifacts, manifests, lineage and MLflow
records equal (up to timings) those of the same recipe run on one machine with the threads
runner, a local store and a local MLflow.

Ray in cluster mode listens on every interface (it cannot be narrowed to one); the cluster is
started with token authentication (RAY_AUTH_MODE=token, a random token) and is only ever
addressed on loopback addresses. Slow tier: about 3 minutes on 2 cores.

Run: ``.venv/bin/python -m pytest tests/test_cluster_slow.py -q -m slow -s``
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import REPO
from tests.servers import free_port, mlflow_server, s3_server

pytestmark = pytest.mark.slow
pytest.importorskip("prefect_ray")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

POSTTRAIN = [sys.executable, "-m", "flows.cli"]
RAY = str(Path(sys.executable).with_name("ray"))
RECIPE = """\
name: cluster_tiny
vars: {domains: [arith, reverse]}
defaults:
  grpo: {max_steps: 2, num_generations: 2, per_device_train_batch_size: 4,
         max_completion_length: 4, eval_n: 4}
stages:
  data: {kind: data, domains: "${domains}", size: 64, seed: 0,
         resources: {custom: {node_a: 1}}}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: "${domains}", eval_n: 4, resources: {custom: {node_b: 1}}}
  sft: {kind: sft, from: base, data: data, max_steps: 2, per_device_train_batch_size: 8,
        warmup_steps: 0, eval_n: 4, resources: {custom: {node_a: 1}}}
  rl_arith: {kind: grpo, from: sft, data: data, domains: [arith],
             resources: {custom: {node_a: 1}}}
  rl_reverse: {kind: grpo, from: sft, data: data, domains: [reverse],
               resources: {custom: {node_b: 1}}}
  mopd: {kind: mopd, from: sft, teachers: {arith: rl_arith, reverse: rl_reverse}, data: data,
         max_steps: 1, prompts_per_route: 2, eval_n: 4, resources: {custom: {node_b: 1}}}
"""
NODE_OF = {"data": "127.0.0.2", "base": "127.0.0.3", "sft": "127.0.0.2",
           "rl_arith": "127.0.0.2", "rl_reverse": "127.0.0.3", "mopd": "127.0.0.3"}
_VOLATILE = re.compile(r"seconds|per_s$|per_second|runtime|^wall|started|ended")


@contextlib.contextmanager
def ray_cluster(tmp: Path) -> Iterator[dict[str, str]]:
    """Two Ray nodes on this machine; yields the env a driver needs (RAY_ADDRESS, token)."""
    port = free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Ray's Unix sockets live under --temp-dir: a pytest tmp path is too long for them.
    temp = tempfile.mkdtemp(prefix="ptray-", dir="/tmp")
    common = ["--num-cpus", "1", "--disable-usage-stats", "--temp-dir", temp]
    try:
        for argv in (["--head", "--node-ip-address", "127.0.0.2", "--port", str(port),
                      "--include-dashboard", "false", "--resources", '{"node_a": 1}'],
                     ["--address", f"127.0.0.2:{port}", "--node-ip-address", "127.0.0.3",
                      "--resources", '{"node_b": 1}']):
            p = subprocess.run([RAY, "start", *argv, *common], env=env, timeout=120,
                               capture_output=True, text=True)
            assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        yield {k: env[k] for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE",
                                   "RAY_AUTH_TOKEN")} | {"RAY_ADDRESS": f"127.0.0.2:{port}"}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(temp, ignore_errors=True)


def _run(recipe: Path, *args: str, env: dict[str, str]) -> tuple[dict, float, str]:
    t0 = time.monotonic()
    p = subprocess.run([*POSTTRAIN, "run", str(recipe), "--json", "--max-parallel", "2", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    return {r["stage"]: r for r in json.loads(p.stdout)}, wall, p.stderr


def _norm(x):
    """A manifest or metrics dict without what differs between runs of one build: times,
    the run id, the host, the checkout's git state (a commit made between the two runs)."""
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()
                if k not in ("timings", "run_id", "host", "git_commit", "git_dirty")
                and not _VOLATILE.search(k)}
    if isinstance(x, list):
        return [_norm(v) for v in x]
    return x


def _mlflow_stage_runs(uri: str, recipe: str) -> dict[str, dict]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(recipe)
    out = {}
    for r in c.search_runs([exp.experiment_id], "tags.`posttrain.status` = 'trained'"):
        t = r.data.tags
        out[t["posttrain.stage"]] = {
            "key": t["posttrain.key"], "kind": t["posttrain.kind"],
            "params": r.data.params, "metrics": _norm(r.data.metrics),
            "inputs": {k: v for k, v in t.items() if k.startswith("posttrain.input.")}}
    return out


def test_two_node_ray_cluster_on_s3_with_an_mlflow_server_equals_one_machine(
        tmp_path: Path) -> None:
    recipe = tmp_path / "cluster_tiny.yaml"
    recipe.write_text(RECIPE)
    base_env = dict(os.environ, POSTTRAIN_LEASE_SECONDS="20")
    base_env.pop("PREFECT_API_URL", None)  # each run starts its own Prefect server

    single, single_wall, _ = _run(recipe, "--store", str(tmp_path / "local-store"),
                                  "--state-dir", str(tmp_path / "local-state"), env=base_env)
    with s3_server(tmp_path / "moto") as s3, mlflow_server(tmp_path) as mlflow_url, \
            ray_cluster(tmp_path) as ray_env:
        env = dict(base_env, **s3, **ray_env)
        store_uri = f"s3://{s3['S3_BUCKET']}/cluster"
        cluster, cluster_wall, err = _run(
            recipe, "--runner", "ray", "--store", store_uri, "--tracking-uri", mlflow_url,
            "--state-dir", str(tmp_path / "cluster-state"), env=env)
        print(f"\nwall: single machine (threads, local store) {single_wall:.1f} s; two-node Ray "
              f"cluster over S3 + MLflow server {cluster_wall:.1f} s "
              f"({cluster_wall / single_wall:.2f}x)")
        assert {r["status"] for r in cluster.values()} == {"trained"}

        # Each stage ran on the node its `resources` pins it to.
        for stage, ip in NODE_OF.items():
            log = next((tmp_path / "cluster-state").rglob(f"{stage}.log")).read_text()
            assert f"posttrain: on Ray node {ip} " in log, (stage, log[:300])

        remote = Store(store_uri)
        local = Store(tmp_path / "local-store")
        for stage, row in single.items():
            key = row["key"]
            assert cluster[stage]["key"] == key, stage  # same plan, same keys
            assert remote.verify(key) == [], stage
            m_local, m_remote = local.manifest(key), remote.manifest(key)
            assert m_local["files"] == m_remote["files"], stage  # bit-identical payloads
            assert _norm(m_local) == _norm(m_remote), stage

        lineage = []
        for store, state in ((str(tmp_path / "local-store"), "local-state"),
                             (store_uri, "cluster-state")):
            p = subprocess.run([*POSTTRAIN, "lineage", "cluster_tiny:mopd", "--store", store,
                                "--state-dir", str(tmp_path / state), "--json"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr
            lineage.append(_norm(json.loads(p.stdout)))
        assert lineage[0] == lineage[1]

        local_db = f"sqlite:///{tmp_path / 'local-state' / 'mlflow.db'}"
        runs_local = _mlflow_stage_runs(local_db, "cluster_tiny")
        runs_remote = _mlflow_stage_runs(mlflow_url, "cluster_tiny")
        assert set(runs_local) == set(runs_remote) == set(NODE_OF)
        assert runs_local == runs_remote
        # nothing of the cluster run went to a local MLflow database
        assert not list((tmp_path / "cluster-state").rglob("mlflow.db"))
