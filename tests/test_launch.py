"""`launch: {processes: N}`: a stage as N data-parallel ranks (torchrun, gloo on CPU).

The flow starts the stage under torchrun; rank 0 holds the key's lock and publishes, the other
ranks train beside it and keep nothing. The rank count is part of the content key (N ranks train
on N times the batch), and a stage started with the wrong number of processes is refused.

Run: ``.venv/bin/python -m pytest tests/test_launch.py -q``
"""

from __future__ import annotations

import json

from artifacts.store import Store
from flows import cli
from tests.conftest import run_cli, spine_restored

SETS = ["--set", "sft.launch.processes=2", "--set", "mopd.launch.processes=2"]


def _args(spine: dict, *rest: str) -> list[str]:
    return [str(spine["recipe"]), "--store", str(spine["store"]), "--state-dir",
            str(spine["state"]), *rest]


def test_two_rank_stages_train_and_publish_once(spine):
    with spine_restored(spine):
        rc, out, err = run_cli("plan", *_args(spine, "--json", *SETS))
        planned = {p["stage"]: p for p in json.loads(out)}
        assert planned["sft"]["reasons"] == ["launch changed: processes 1 -> 2"]
        assert planned["mopd"]["status"] == "run" and planned["base"]["status"] == "fresh"
        rc, out, err = run_cli("run", *_args(spine, "--json", "--no-tracking", *SETS))
    assert rc == 0, err[-3000:]
    rows = {r["stage"]: r for r in json.loads(out)}
    assert {s for s, r in rows.items() if r["status"] == "trained"} == {
        "sft", "rl_arith", "rl_reverse", "mopd_r1", "mopd"}
    store = Store(spine["store"])
    man = {s: store.manifest(r["key"]) for s, r in rows.items()}
    assert man["sft"]["launch"] == {"processes": 2, "accelerate": None}
    assert man["mopd"]["launch"]["processes"] == 2 and "launch" not in man["rl_arith"]
    # DDP really ran: TRL counts the tokens of every rank, so step 1 saw about twice the
    # single-process run's tokens (same per-device batch, two data shards).
    first = {r["stage"]: r["key"] for r in spine["first_run"]}
    assert rows["sft"]["key"] != first["sft"]
    single = store.manifest(first["sft"])["metrics"]["history"][0]
    double = man["sft"]["metrics"]["history"][0]
    assert 1.5 < double["num_tokens"] / single["num_tokens"] < 2.5, (single, double)
    assert store.verify(rows["sft"]["key"]) == [] and store.verify(rows["mopd"]["key"]) == []


def test_a_two_rank_stage_started_alone_is_refused(spine, tmp_path, capsys):
    recipe = tmp_path / "spine.yaml"
    recipe.write_text(spine["recipe"].read_text().replace(
        "    max_steps: 2\n", "    max_steps: 5\n    launch: {processes: 2}\n", 1))  # unbuilt
    code = cli.main(["stage", str(recipe), "sft", "--store", str(spine["store"]),
                     "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and "declares launch.processes 2 but runs as 1 process" in err, err
    assert "torchrun --nproc_per_node 2" in err and not (tmp_path / "state").exists()
