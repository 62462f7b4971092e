"""Every shipped recipe at full tiny scale: wall time, the stages x domains table, and whether
the final model beats its SFT stage (R1-Zero: its base) on mean held-out accuracy (issue 11).

The recipes run one after another into one store, as a team would build them: stages that
recipes share (the same data, base and SFT config, hence the same key) are built once and
reused, so a recipe's wall time is what it costs given the recipes before it in the order
(the line printed says which stages it reused), and what it costs built alone, from every
stage's own build time in its manifest: the sum (one stage at a time) and the critical path (the
longest chain of stages: the wall time given a core for every stage that can run). Each
`posttrain run` is a child process with MLflow off; its stages x domains table is kept in
`<out>/<recipe>.table.txt` and the summary in `<out>/summary.json`. Step counts are the
recipes' own; nothing is picked by held-out score.

Run: ``nice -n 5 .venv/bin/python bench/recipes_full.py [--out DIR] [--scale F] [NAME ...]``
(all thirteen at scale 1: one to two hours on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts.lineage import input_edges  # noqa: E402
from artifacts.store import Store  # noqa: E402
from flows.recipe import scaled_name  # noqa: E402
from tests.test_recipes import FINAL, SYSTEMS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INIT = {"r1_zero": "base", "r1": "cold_sft"}  # the stage the final must beat (default: sft)


def mean_eval(manifest: dict) -> float | None:
    """Mean held-out accuracy over the domains a manifest's eval has (None: no eval)."""
    ev = (manifest.get("metrics") or {}).get("eval") or {}
    vals = [float(v) for v in ev.values() if isinstance(v, int | float)]
    return sum(vals) / len(vals) if vals else None


def from_scratch(store: Store, keys: list[str]) -> dict:
    """What the recipe costs built alone, from its stages' own build times (manifest
    `timings.seconds`, reused stages included): `stage_seconds`, their sum (one stage at a time),
    and `critical_path_seconds`, the longest chain of stages through the DAG (the wall time with
    a core for every stage that can run)."""
    manifests = {k: store.manifest(k) or {} for k in keys}
    secs = {k: float((m.get("timings") or {}).get("seconds") or 0.0) for k, m in manifests.items()}
    done: dict[str, float] = {}

    def path(k: str) -> float:
        if k not in done:
            ups = [u for _, u, _ in input_edges(manifests[k]) if u in manifests]
            done[k] = secs[k] + max((path(u) for u in ups), default=0.0)
        return done[k]

    return {"stage_seconds": round(sum(secs.values()), 1),
            "critical_path_seconds": round(max(map(path, keys), default=0.0), 1)}


def run_one(name: str, store: Path, state: Path, out: Path, scale: float) -> dict:
    cmd = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "recipes" / f"{name}.yaml"),
           "--store", str(store), "--state-dir", str(state), "--no-tracking", "--json",
           "--scale", f"{scale:g}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POSTTRAIN_TRACKING": "off"}
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    (out / f"{name}.log").write_text(p.stderr)
    table = p.stderr[p.stderr.rfind("\nstage "):] if "\nstage " in p.stderr else ""
    (out / f"{name}.table.txt").write_text(table)
    row: dict = {"recipe": name, "wall_s": round(wall, 1), "rc": p.returncode}
    if p.returncode != 0:
        row["error"] = p.stderr[-1500:]
        return row
    rows = json.loads(p.stdout)
    row["trained"] = [r["stage"] for r in rows if r["status"] == "trained"]
    row["reused"] = [r["stage"] for r in rows if r["status"] == "reused"]
    s = Store(store)
    row.update(from_scratch(s, [r["key"] for r in rows if r.get("key")]))
    recipe = scaled_name(name, scale)
    init, final = INIT.get(name, "sft"), FINAL[name]
    row["init"], row["final"] = init, final
    row["init_mean"] = mean_eval(s.manifest(s.resolve(f"{recipe}:{init}")) or {})
    row["final_mean"] = mean_eval(s.manifest(s.resolve(f"{recipe}:{final}")) or {})
    row["final_beats_init"] = (row["init_mean"] is not None and row["final_mean"] is not None
                               and row["final_mean"] > row["init_mean"])
    row["table"] = table.strip()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="recipes to run, in order (default: every one)")
    ap.add_argument("--out", default=".posttrain/bench/recipes_full", help="store, logs, summary")
    ap.add_argument("--scale", type=float, default=1.0, help="--scale for every run")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in a.names or list(SYSTEMS):
        row = run_one(name, out / "store", out / "state", out, a.scale)
        summary[name] = row
        summary_path.write_text(json.dumps(summary, indent=2))
        verdict = (f"FAILED rc={row['rc']}" if row["rc"] else
                   f"{row['init']} {100 * (row['init_mean'] or 0):.1f}% -> {row['final']} "
                   f"{100 * (row['final_mean'] or 0):.1f}% "
                   f"({'beats' if row['final_beats_init'] else 'does NOT beat'} its init)")
        print(f"{name:16s} {row['wall_s']:7.1f} s  {verdict}  "
              f"[trained {len(row.get('trained', []))}, reused {len(row.get('reused', []))}; "
              f"from scratch: {row.get('stage_seconds', 0):.0f} stage-s, critical path "
              f"{row.get('critical_path_seconds', 0):.0f} s]", flush=True)
        if row.get("table"):
            print(row["table"], flush=True)


if __name__ == "__main__":
    main()
