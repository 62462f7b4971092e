"""Resume: a training stage SIGKILLed mid-run resumes from its last snapshot, bit for bit.

For `sft` and `grpo` (TRL: the HF Trainer's own checkpoints), `mopd` and `ppo` (our own loops'
`state.pt`), at toy size: each stage is first built uninterrupted with resume off (weights W0),
then rebuilt (`posttrain stage --force --set STAGE.resume_every=2`) in a child process that
POSTTRAIN_FAULT="STAGE:kill-at-step-5" SIGKILLs at step 5 of 6: the old artifact stays whole
and the resume dir (`<store>/tmp/<key>.resume/`) holds the step-4 snapshot. The next build
says `resumed from step 4` in its log, records `resumed_from_step: 4` in the manifest, publishes
weights equal to W0 (max absolute difference 0: bit-identical, since weights, optimizer,
scheduler, every RNG and the data position are restored exactly on one CPU thread), and removes
the resume dir.

`rl` and `ppo` learn against a KL to `base` (the reference), so their weights move even when
every sampled reward is 0 at this size, and `mopd` distils from `rl`: a comparison of unchanged
weights would prove nothing. Under a minute on 2 cores.

Run: ``.venv/bin/python -m pytest tests/test_resume.py -x -q``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifacts.store import Store
from tests.conftest import REPO, run_cli

RECIPE = """\
name: resume_tiny
stages:
  data: {kind: data, domains: [arith], size: 64, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 0}
  sft: {kind: sft, from: base, data: data, max_steps: 6, per_device_train_batch_size: 8,
        warmup_steps: 0, eval_n: 0}
  rl: {kind: grpo, from: sft, data: data, reference: base, beta: 0.5, max_steps: 6,
       num_generations: 2, per_device_train_batch_size: 4, max_completion_length: 4, eval_n: 0}
  mopd: {kind: mopd, from: sft, teachers: {arith: rl}, data: data, max_steps: 6,
         prompts_per_route: 2, eval_n: 0}
  ppo: {kind: ppo, from: sft, data: data, reference: base, max_steps: 6, prompts_per_step: 4,
        max_new_tokens: 4, warmup_steps: 0, eval_n: 0}
"""
KILL_AT, EVERY = 5, 2  # killed after step 5: the last snapshot is step 4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Every stage built once, uninterrupted, resume off: the reference weights."""
    root = tmp_path_factory.mktemp("resume")
    recipe = root / "resume_tiny.yaml"
    recipe.write_text(RECIPE)
    before = os.environ.get("POSTTRAIN_TRACKING")
    os.environ["POSTTRAIN_TRACKING"] = "off"  # MLflow is not what is tested here
    w = {"root": root, "recipe": recipe, "store": root / "store", "state": root / "state"}
    try:
        for stage in ("data", "base", "sft", "rl", "mopd", "ppo"):
            rc, _, err = _stage(w, stage)
            assert rc == 0, err
        yield w
    finally:
        if before is None:
            os.environ.pop("POSTTRAIN_TRACKING", None)
        else:
            os.environ["POSTTRAIN_TRACKING"] = before


def _stage(w: dict, stage: str, *extra: str) -> tuple[int, str, str]:
    return run_cli("stage", str(w["recipe"]), stage, "--store", str(w["store"]),
                   "--state-dir", str(w["state"]), *extra)


def _weights(store: Store, key: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(store.local_path(key) / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage", ["sft", "rl", "mopd", "ppo"])
def test_killed_stage_resumes_and_publishes_the_uninterrupted_weights(world: dict,
                                                                       stage: str) -> None:
    store = Store(world["store"])
    key = store.get_ref("resume_tiny", stage)
    assert key
    w0, first = _weights(store, key), store.manifest(key)
    assert first["resumed_from_step"] is None
    parent = {"sft": "base", "rl": "sft", "mopd": "sft", "ppo": "sft"}[stage]
    moved = _max_diff(w0, _weights(store, store.get_ref("resume_tiny", parent)))
    assert moved > 0, f"{stage} did not move its weights: the comparison would prove nothing"

    resume = store.resume_dir(key, world["state"])
    args = [str(world["recipe"]), stage, "--store", str(world["store"]), "--state-dir",
            str(world["state"]), "--force", "--set", f"{stage}.resume_every={EVERY}"]
    env = {**os.environ, "POSTTRAIN_FAULT": f"{stage}:kill-at-step-{KILL_AT}",
           "POSTTRAIN_TRACKING": "off", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "flows.cli", "stage", *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert store.manifest(key) == first  # nothing published: the old artifact is whole
    assert resume.is_dir() and any(resume.iterdir()), "no resumable state was left"

    rc, out, err = _stage(world, stage, "--force", "--set", f"{stage}.resume_every={EVERY}")
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["status"] == "trained"
    step = KILL_AT - KILL_AT % EVERY  # the last snapshot before the kill
    assert f"resumed from step {step} (resume dir {resume})" in err
    man = store.manifest(key)
    assert man["resumed_from_step"] == step
    assert man["metrics"]["train"]["steps"] == 6
    diff = _max_diff(w0, _weights(store, key))
    print(f"{stage}: max |W_resumed - W0| = {diff} (weights moved {moved:.3g} in training)")
    assert diff == 0.0
    assert not resume.exists(), "the resumable state outlived the publish"
    steps = [h["step"] for h in man["metrics"]["history"]]
    assert steps == [h["step"] for h in first["metrics"]["history"]]  # the whole curve, kept


def test_staging_cleanup_keeps_the_resume_dir(tmp_path: Path) -> None:
    """A new staging dir wipes the key's dead staging dirs, never its resumable state."""
    store, key = Store(tmp_path / "store"), "a" * 64
    resume = store.resume_dir(key, tmp_path / "state")
    (resume / "checkpoint-2").mkdir(parents=True)
    dead = store.staging_dir(key)
    fresh = store.staging_dir(key)
    assert not dead.exists() and fresh.is_dir() and (resume / "checkpoint-2").is_dir()
    remote = Store("memory://resume-test").resume_dir(key, tmp_path / "state")
    assert remote == tmp_path / "state" / "resume" / key


def test_torn_checkpoint_is_skipped_for_the_last_whole_one(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A kill while the Trainer writes checkpoint-N (trainer_state.json is written last) leaves
    a folder without it: resume uses the previous whole checkpoint and removes the torn one."""
    from tasks import resume as R

    res = R.Resume(tmp_path, 2)
    assert R.last_checkpoint(res) is None and R.load(res) is None
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"half")
    assert R.last_checkpoint(res) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists()
    assert R.resumed_step(str(tmp_path / "checkpoint-2")) == 2
    assert "resumed from step 2" in capsys.readouterr().err
    assert [R.due(res, s, 6) for s in range(1, 7)] == [False, True, False, True, False, False]
