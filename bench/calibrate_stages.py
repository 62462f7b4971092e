"""Calibrate the tiny demo: data -> base -> SFT -> one GRPO specialist per domain, with timings.

Calls the stage modules directly (no Prefect, no store), the way the stage runner does, and
writes every artifact under --out (default /tmp/calib): data/, base/, sft/, rl_<domain>/, plus
results.json with held-out accuracy (500 problems per domain) of SFT and of each specialist on
every domain, and seconds per stage. Specialists run `--parallel` at a time, one thread each, as
in the demo. Acceptance: each specialist beats SFT by >= 10 points on its own domain.

The defaults are the calibrated demo (recipes/mimo_tiny.yaml). What the sweep found, on 2 shared
CPU cores (details in the calibration report):

- SFT ending at lr 0 (linear decay) leaves a checkpoint that GRPO's noisy Adam steps wreck:
  specialists gained 0-4 points on their domain and lost 10-40 elsewhere (arith, whose units
  digit is a half-learnt mod-10 table, first). Ending the decay at lr 5e-4 (polynomial, power 1,
  2.5x the RL lr) left a checkpoint every specialist climbs from.
- arith needs ~1,200 SFT steps at weight 6 of 9 before GRPO can move it (at 750 steps it answers
  the tens right and guesses the units digit: 13-16 %, and no GRPO setting moved it).
- GRPO lr >= 3e-4, or 5e-4 constant, collapsed; lower temperature (0.5, 0.7) did not help.
- Outcomes are chaotic in the SFT trajectory (another seed saturated reverse at 94 %), but
  deterministic for a fixed config: 1 and 2 torch threads give bit-identical SFT weights, and a
  GRPO rerun reproduced its evaluation exactly.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/calibrate_stages.py [--stages sft,rl] [--help]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAINS = ["arith", "reverse", "sort", "max"]


def _ref(path: Path, kind: str):  # noqa: ANN202
    from artifacts.refs import ArtifactRef

    return ArtifactRef(key="0" * 64, path=path, kind=kind, stage=kind, recipe="calibrate")


def _say(step: int, total: int, metrics: dict) -> None:
    if step % 50 == 0 or step == total:
        print(
            f"  step {step}/{total} " + " ".join(f"{k}={v:.3g}" for k, v in metrics.items()),
            flush=True,
        )


def stage_data(a: argparse.Namespace) -> dict:
    from artifacts.refs import Inputs
    from tasks import data

    mix = dict(zip(a.domains, (float(x) for x in a.mix.split(":")), strict=True))
    cfg = data.Config(domains=a.domains, mix=mix, size=a.data_size, seed=0)
    return data.run(cfg, Inputs(), a.out / "data", _say)


def stage_rldata(a: argparse.Namespace) -> dict:
    """A separate RL prompt set (equal mix); specialists use it when it exists (else data/)."""
    from artifacts.refs import Inputs
    from tasks import data

    cfg = data.Config(domains=a.domains, size=a.rl_data_size, seed=a.rl_data_seed)
    return data.run(cfg, Inputs(), a.out / "rl_data", _say)


def stage_base(a: argparse.Namespace) -> dict:
    from artifacts.refs import Inputs
    from tasks import base

    return base.run(base.Config(seed=a.seed, eval_n=0), Inputs(), a.out / "base", _say)


def stage_sft(a: argparse.Namespace) -> dict:
    from artifacts.refs import Inputs
    from tasks import sft

    cfg = sft.Config(
        max_steps=a.sft_steps,
        learning_rate=a.sft_lr,
        warmup_steps=a.sft_warmup,
        per_device_train_batch_size=a.sft_batch,
        lr_scheduler_type=a.sft_sched,
        seed=a.seed,
        eval_n=a.eval_n,
        trainer=json.loads(a.sft_trainer),
    )
    ins = Inputs(init=_ref(a.out / "base", "base"), data={"train": _ref(a.out / "data", "data")})
    return sft.run(cfg, ins, a.out / "sft", _say)


def stage_rl_one(a: argparse.Namespace, domain: str) -> dict:
    from artifacts.refs import Inputs
    from tasks import grpo

    cfg = grpo.Config(
        max_steps=a.rl_steps,
        learning_rate=a.rl_lr,
        num_generations=a.rl_g,
        per_device_train_batch_size=a.rl_batch,
        beta=0.0,
        max_completion_length=8,
        temperature=a.rl_temp,
        domains=[domain],
        seed=a.seed,
        eval_n=a.eval_n,
        trainer=json.loads(a.rl_trainer),
    )
    rl_data = a.out / "rl_data" if (a.out / "rl_data").exists() else a.out / "data"
    ins = Inputs(init=_ref(a.out / "sft", "sft"), data={"train": _ref(rl_data, "data")})
    return grpo.run(cfg, ins, a.out / f"rl_{domain}{a.tag}", _say)


def stage_rl(a: argparse.Namespace) -> dict:
    """Specialists as child processes, `parallel` at a time, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    todo, running, done = list(a.domains), [], {}
    while todo or running:
        while todo and len(running) < a.parallel:
            d = todo.pop(0)
            cmd = [sys.executable, __file__, "--rl-one", d, *sys.argv[1:]]
            log = open(a.out / f"rl_{d}{a.tag}.log", "w")  # noqa: SIM115
            running.append(
                (
                    d,
                    subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT),
                    time.perf_counter(),
                )
            )
        time.sleep(1)
        for item in list(running):
            d, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                result = a.out / f"rl_{d}{a.tag}.json"
                done[d] = (
                    json.loads(result.read_text())
                    if result.exists()
                    else {"error": proc.returncode}
                )
                done[d]["wall"] = time.perf_counter() - t0
                print(f"rl_{d}: {done[d].get('eval')} in {done[d]['wall']:.0f}s", flush=True)
    return done


def table(results: dict, tag: str = "", domains: list[str] | None = None) -> str:
    domains = domains or DOMAINS
    sft = results.get("sft", {}).get("eval", {})
    lines = ["| model | " + " | ".join(domains) + " | seconds |", "|---" * (len(domains) + 2) + "|"]
    rows = [("sft", results.get("sft", {}))] + [
        (f"rl_{d}{tag}", results.get("rl" + tag, {}).get(d, {})) for d in domains
    ]
    for name, r in rows:
        ev = r.get("eval", {})
        cells = []
        for d in domains:
            if d not in ev:
                cells.append("-")
                continue
            delta = f" ({100 * (ev[d] - sft[d]):+.1f})" if name != "sft" and d in sft else ""
            cells.append(f"{100 * ev[d]:.1f}{delta}")
        secs = r.get("wall", r.get("train", {}).get("seconds", float("nan")))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/calib"))
    p.add_argument("--stages", default="data,base,sft,rl")
    p.add_argument("--domains", type=lambda s: s.split(","), default=DOMAINS)
    p.add_argument("--mix", default="6:1:1:1", help="weights, in the order of --domains")
    p.add_argument("--data-size", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--threads", type=int, default=2, help="torch threads for data/base/sft")
    p.add_argument("--sft-steps", type=int, default=1200)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sft-warmup", type=int, default=50)
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--sft-sched", default="polynomial")
    p.add_argument(
        "--sft-trainer",
        default='{"lr_scheduler_kwargs": {"lr_end": 5e-4, "power": 1.0}}',
        help="JSON dict passed as sft trainer:",
    )
    p.add_argument("--rl-data-size", type=int, default=20_000)
    p.add_argument("--rl-data-seed", type=int, default=1)
    p.add_argument("--rl-steps", type=int, default=250)
    p.add_argument("--rl-lr", type=float, default=2e-4)
    p.add_argument("--rl-g", type=int, default=8)
    p.add_argument("--rl-temp", type=float, default=1.0)
    p.add_argument("--rl-batch", type=int, default=128)
    p.add_argument("--rl-trainer", default="{}", help="JSON dict passed as grpo trainer:")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the rl_<domain> dirs (sweeps)")
    p.add_argument("--rl-one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if a.rl_one:
        torch.set_num_threads(1)
        res = stage_rl_one(a, a.rl_one)
        (a.out / f"rl_{a.rl_one}{a.tag}.json").write_text(json.dumps(res))
        return
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    results_file = a.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for stage in a.stages.split(","):
        t0 = time.perf_counter()
        fn = {
            "data": stage_data,
            "rldata": stage_rldata,
            "base": stage_base,
            "sft": stage_sft,
            "rl": stage_rl,
        }[stage]
        res = fn(a)
        if stage == "rl":
            results.setdefault("rl" + a.tag, {}).update(res)
        else:
            results[stage] = {**res, "wall": time.perf_counter() - t0}
        print(f"{stage}: {res.get('eval', '')} {time.perf_counter() - t0:.0f}s", flush=True)
        results["args"] = {k: str(v) for k, v in vars(a).items()}
        results_file.write_text(json.dumps(results, indent=1))
    print(table(results, a.tag, a.domains))


if __name__ == "__main__":
    main()
