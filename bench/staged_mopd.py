"""recipes/staged_mopd.yaml measured: (a) wall time pipelined vs MOPD waiting for the final
teachers, (b) progressive vs final-only teachers at equal MOPD steps.

(a) The shared prefix (data, base, sft) is built once into a store that is then copied twice,
so both variants start from the same stored SFT model and build the same specialists:

- pipelined: `posttrain run recipes/staged_mopd.yaml` (MOPD starts on every specialist's
  @80 snapshot while they train, and waits for @160 and the finals at its phase switches);
- waiting: the specialists alone (the recipe without `mopd`), then the whole recipe (only
  `mopd` left to build): MOPD starts once every final teacher is stored.

Both walls are the `posttrain run` processes' own (Prefect start-up included, once for the
pipelined run and twice for the waiting one; the line printed says so). (b) In the pipelined
store, the same MOPD (same seed, steps and data) with final-only teachers
(`teachers: {"{domain}": "rl_{domain}"}`), against the progressive run: per route, the KL of
the student's samples to the teacher that scored them at step 1 and over the first tenth of
the steps (`kl/<route>` in the history; later phases' teachers are not those of step 1), and
the final per-domain accuracy. Step counts are fixed by the recipe (or `--set`), never picked.

`--quick` shrinks everything (for a smoke run: a minute or two); without it the demo sizes run
(about 25 minutes on 2 cores). Always run under `nice` on shared machines.

Run: ``nice -n 10 .venv/bin/python bench/staged_mopd.py [--quick | --scale F] [--out DIR]
[--set ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "staged_mopd.yaml"
PREFIX = ("sft_data", "rl_data", "base", "sft")
QUICK = ["sft_data.size=512", "rl_data.size=512", "base.hidden_size=32", "base.num_layers=1",
         "base.intermediate_size=64", "base.eval_n=20", "sft.max_steps=40",
         "rl_{domain}.max_steps=12", "rl_{domain}.snapshots=[4, 8]",
         "rl_{domain}.per_device_train_batch_size=16", "rl_{domain}.eval_n=20",
         "mopd.max_steps=12", "mopd.prompts_per_route=4", "mopd.eval_n=20",
         'mopd.teachers={"{domain}": ["rl_{domain}@4", "rl_{domain}@8", "rl_{domain}"]}']


def variant(root: Path, name: str, keep: tuple[str, ...] | None = None,
            teachers: Any = None) -> Path:
    """A copy of the shipped recipe named `name`: only the `keep` stages (None: all), or with
    mopd's teachers replaced."""
    doc = yaml.safe_load(RECIPE.read_text())
    doc["name"] = "staged_mopd"  # one recipe name: refs and keys are the shipped recipe's
    if keep is not None:
        doc["stages"] = {k: v for k, v in doc["stages"].items()
                         if k.replace("{domain}", "arith") in keep
                         or (k == "rl_{domain}" and "rl_arith" in keep)}
    if teachers is not None:
        doc["stages"]["mopd"]["teachers"] = teachers
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


SCALE = [1.0]  # --scale, for every run


def run(recipe: Path, store: Path, state: Path, sets: list[str]) -> float:
    """`posttrain run` in a child process; its wall time (s). Exits on failure."""
    cmd = [sys.executable, "-m", "flows.cli", "run", str(recipe), "--store", str(store),
           "--state-dir", str(state), "--no-tracking", "--json", "--scale", f"{SCALE[0]:g}"]
    names = set(yaml.safe_load(recipe.read_text())["stages"])
    for s in sets:  # only those naming a stage of this variant
        if s.split(".", 1)[0] in names:
            cmd += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1", POSTTRAIN_TRACKING="off")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{recipe.name}: posttrain run failed:\n{proc.stderr[-3000:]}")
    return wall


def mopd_figures(store: Path) -> dict[str, Any]:
    from artifacts.store import Store
    from flows.recipe import scaled_name

    s = Store(store)
    m = s.manifest(s.resolve(f"{scaled_name('staged_mopd', SCALE[0])}:mopd")) or {}
    metrics = m.get("metrics") or {}
    hist, train = metrics.get("history") or [], metrics.get("train") or {}
    routes = sorted(k[3:] for k in (hist[0] if hist else {}) if k.startswith("kl/"))
    return {"kl_step1": {r: hist[0].get(f"kl/{r}") for r in routes},
            "kl_first_tenth": {r: train.get(f"kl/{r}/first") for r in routes},
            "kl_last_tenth": {r: train.get(f"kl/{r}/last") for r in routes},
            "eval": metrics.get("eval") or {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shrink everything (smoke run)")
    ap.add_argument("--set", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", default=None, help="keep stores and recipes here (default: temp)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="posttrain run --scale F for every run (steps, sizes; 1: the demo)")
    args = ap.parse_args()
    SCALE[0] = args.scale
    sets = (QUICK if args.quick else []) + args.set
    root = Path(args.out or tempfile.mkdtemp(prefix="staged-mopd-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    prefix = root / "prefix"
    run(variant(root, "prefix", PREFIX), prefix / "store", prefix / "state", sets)
    for v in ("pipelined", "waiting"):
        shutil.copytree(prefix, root / v, dirs_exist_ok=True)
    specialists = tuple(PREFIX) + ("rl_arith",)
    whole = variant(root, "whole")
    pipe = run(whole, root / "pipelined" / "store", root / "pipelined" / "state", sets)
    wait = (run(variant(root, "specialists", specialists), root / "waiting" / "store",
                root / "waiting" / "state", sets)
            + run(whole, root / "waiting" / "store", root / "waiting" / "state", sets))
    progressive = mopd_figures(root / "pipelined" / "store")
    final_only = root / "final_only"
    shutil.copytree(root / "pipelined", final_only, dirs_exist_ok=True)
    run(variant(root, "final_only", teachers={"{domain}": "rl_{domain}"}),
        final_only / "store", final_only / "state",
        [s for s in sets if not s.startswith("mopd.teachers=")])
    final = mopd_figures(final_only / "store")
    print(json.dumps({"sets": sets, "scale": args.scale, "wall_s": {"pipelined": round(pipe, 1),
                                               "waiting_for_final_teachers": round(wait, 1),
                                               "ratio": round(pipe / wait, 3)},
                      "note": "waiting = two posttrain runs (two Prefect start-ups)",
                      "progressive": progressive, "final_only": final}, indent=2))
    print(f"stores and recipes in {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
