"""The store on S3 (a real S3-compatible server on 127.0.0.1, tests/s3_server.py): two `posttrain
run` of one recipe at once build every stage exactly once, a builder SIGKILLed while holding a
lease is taken over once the lease expires, and a forced rebuild keeps the old copy readable
until the new one is uploaded.

Run: ``.venv/bin/python -m pytest tests/test_s3_store.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import REPO
from tests.servers import s3_server

pytest.importorskip("s3fs")
pytest.importorskip("moto")

POSTTRAIN = [sys.executable, "-m", "flows.cli"]
# data -> base -> sft -> two GRPO specialists in parallel: five stages, real kinds, shrunk.
RECIPE = """\
name: s3_tiny
vars: {domains: [arith, reverse]}
stages:
  data: {kind: data, domains: "${domains}", size: 32, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: "${domains}", eval_n: 2}
  sft: {kind: sft, from: base, data: data, max_steps: 1, per_device_train_batch_size: 4,
        warmup_steps: 0, eval_n: 2}
  rl_{domain}:
    foreach: domains
    kind: grpo
    from: sft
    data: data
    domains: ["{domain}"]
    max_steps: 1
    num_generations: 2
    per_device_train_batch_size: 4
    max_completion_length: 4
    eval_n: 2
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with s3_server(tmp_path_factory.mktemp("moto")) as env:
        yield env


def _env(s3: dict[str, str], **extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, **s3, **extra)
    if PREFECT_API_URL.value():  # the session's Prefect server: no server per run
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    return env


def _start(recipe: Path, store: str, state: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*POSTTRAIN, "run", str(recipe), "--store", store, "--state-dir", str(state), "--json",
         "--no-tracking", "--max-parallel", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_at_once_on_s3_build_every_stage_exactly_once(s3, prefect_harness, tmp_path):
    recipe = tmp_path / "s3_tiny.yaml"
    recipe.write_text(RECIPE)
    store = f"s3://{s3['S3_BUCKET']}/two-runs"
    env = _env(s3)
    runs = [_start(recipe, store, tmp_path / f"state{i}", env) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in runs]
    for p, (_out, err) in zip(runs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    rows = [{r["stage"]: r for r in json.loads(out)} for out, _ in outs]
    assert set(rows[0]) == set(rows[1]) == {"data", "base", "sft", "rl_arith", "rl_reverse"}
    for stage in rows[0]:
        statuses = sorted(r[stage]["status"] for r in rows)
        assert statuses == ["reused", "trained"], (stage, statuses)  # built once, by one run
        assert rows[0][stage]["key"] == rows[1][stage]["key"]
    s = Store(store)
    for stage, row in rows[0].items():
        assert s.verify(row["key"]) == [], stage
        leases = s.fs.ls(s._p("locks", row["key"]), detail=False)
        body = json.loads(s.fs.cat(leases[-1]))
        assert body["released"] is True  # every lease was given back


def test_a_sigkilled_builder_is_taken_over_after_its_lease_expires(s3, prefect_harness,
                                                                     tmp_path):
    recipe = tmp_path / "s3_tiny.yaml"
    recipe.write_text(RECIPE)
    store = f"s3://{s3['S3_BUCKET']}/killed"
    # The sft child is SIGKILLed after uploading its payload, holding the lease (ttl 3 s).
    env = _env(s3, POSTTRAIN_LEASE_SECONDS="3", POSTTRAIN_FAULT="sft:kill-before-manifest")
    p = _start(recipe, store, tmp_path / "state0", env)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1, err[-3000:]
    by = {r["stage"]: r for r in json.loads(out)}
    assert by["sft"]["status"] == "failed" and "SIGKILL" in by["sft"]["error"]
    s = Store(store)
    key = by["sft"]["key"]
    assert not s.has(key)
    leases = s.fs.ls(s._p("locks", key), detail=False)
    assert json.loads(s.fs.cat(leases[-1]))["released"] is False  # the dead child's lease

    env = _env(s3, POSTTRAIN_LEASE_SECONDS="3")
    t0 = time.monotonic()
    p = _start(recipe, store, tmp_path / "state1", env)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    by = {r["stage"]: r for r in json.loads(out)}
    assert by["sft"]["status"] == "trained" and s.has(key) and s.verify(key) == []
    assert time.monotonic() - t0 > 3  # it waited for the lease to expire
    log = (tmp_path / "state1").rglob("sft.log")
    text = "".join(f.read_text() for f in log) + err
    assert "took over from" in text, text[-3000:]


def test_a_forced_rebuild_on_s3_keeps_the_old_copy_readable(s3, tmp_path):
    store = Store(f"s3://{s3['S3_BUCKET']}/rebuild")
    key = "cd" * 32

    def staged(text: str) -> Path:
        d = tmp_path / f"staged-{text}"
        (d / "sub").mkdir(parents=True)
        (d / "weights.bin").write_text(text)
        (d / "sub" / f"only-{text}.txt").write_text(text)
        return d

    store.publish(key, staged("old"), {"stage": "s", "kind": "data"})
    old = store.manifest(key)
    cached = store.local_path(key, tmp_path / "cache")  # a download cache of the old copy
    assert (cached / "weights.bin").read_text() == "old"

    def still_old() -> None:  # the new payload is fully uploaded, the old one untouched
        assert store.manifest(key) == old and store.verify(key) == []
        raise RuntimeError("the builder dies here")

    with pytest.raises(RuntimeError, match="dies here"):
        store.publish(key, staged("new"), {"stage": "s", "kind": "data"},
                      before_manifest=still_old)
    assert store.manifest(key) == old and store.verify(key) == []

    new = store.publish(key, staged("new2"), {"stage": "s", "kind": "data"})
    assert store.manifest(key) == new and store.verify(key) == []
    files = {p.split(f"objects/{key}/", 1)[1] for p in store.fs.find(store.object_path(key))}
    assert files == {"manifest.json", "weights.bin", "sub/only-new2.txt"}  # no stale file
    # the download cache follows the store: the rebuilt key is fetched again, not served stale
    again = store.local_path(key, tmp_path / "cache")
    assert (again / "weights.bin").read_text() == "new2"
    assert not (again / "sub" / "only-old.txt").exists()
