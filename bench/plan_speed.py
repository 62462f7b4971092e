"""`posttrain plan` wall time on a cached 12-stage recipe: flat in checkpoint size.

Builds a 12-stage recipe (data, data_hard, base, sft, four GRPO specialists via `foreach`, MOPD
with `rounds: 3`, a final GRPO) and, for each payload size, a store where every stage's key is
already published (through Store.publish: payload, then manifest) with one checkpoint file of
that size per stage, plus the lock. Then it times `posttrain plan --json` (a fresh process each
time, `--repeats` runs, median) and, side by side, what content-hashing the checkpoints costs:

- `dvc status` on an equivalent dvc.yaml whose outs are the same checkpoint directories
  (cache: false, so nothing is copied), warm (DVC's state db already knows every file's
  (inode, mtime, size) -> md5) and cold (state db wiped, as on a fresh clone, a CI runner, or
  after anything touched the files' mtimes);
- one md5 pass over every payload byte (hashlib), the floor of any content hashing.

Sizes: 1 MB per stage (dense), 1 GB per stage (SPARSE: f.truncate, so 12 GB of checkpoints take
no disk; reading them still returns 1 GB of zeros each, so hashers pay the full read), and
100 MB per stage dense (random bytes, 1.2 GB on disk; `--no-dense` skips it).

Run: ``.venv/bin/python bench/plan_speed.py [--repeats 5] [--dvc-repeats 3] [--no-dvc]``
(a few minutes on 2 cores, most of it spent by DVC and by publishing: hashing 12 GB twice).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "artifacts")

RECIPE = """\
# bench/plan_speed.py: 12 stages once expanded
name: bench12
vars:
  domains: [arith, reverse, sort, count]
stages:
  data:
    kind: data
    domains: ${domains}
    size: 1000
  data_hard:
    kind: data
    domains: ${domains}
    size: 1000
    seed: 1
  base:
    kind: base
    domains: ${domains}
  sft: {kind: sft, from: base, data: data}
  rl_{domain}: {foreach: domains, kind: grpo, from: sft, data: data, domains: ["{domain}"]}
  mopd:
    kind: mopd
    from: sft
    teachers: {"{domain}": "rl_{domain}"}
    data: data
    rounds: 3
  final: {kind: grpo, from: mopd, data: data_hard}
"""
MB = 1 << 20
GB = 1 << 30
CKPT = "model.safetensors"


def _human(n: int) -> str:
    return f"{n / GB:.3g} GB" if n >= GB else f"{n / MB:.3g} MB"


def snapshot(dest: Path) -> Path:
    """A frozen copy of the project's code, so edits made meanwhile cannot move the keys."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_")}
    return dict(env, PYTHONPATH=str(project))


def seed_in(project: Path, root: Path, size: int, sparse: bool) -> list[dict]:
    """Run `seed` with `project`'s code (a child process); returns [{name, key, parents}]."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--project", str(project),
           "--seed", str(root), str(size), "1" if sparse else "0"]
    proc = subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seeding {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def seed(root: Path, size: int, sparse: bool) -> list[dict]:
    """Recipe + a store holding every stage (payload of `size` bytes each) + the lock."""
    from artifacts.store import Store
    from flows.plan import plan, write_lock
    from flows.recipe import parse

    root.mkdir(parents=True)
    path = root / "bench12.yaml"
    path.write_text(RECIPE)
    recipe = parse(path)
    store = Store(root / "store")
    planned = plan(recipe, store)
    assert len(planned) == 12, [p.name for p in planned]
    block = os.urandom(MB)
    for p in planned:
        staged = store.staging_dir(p.key)
        (staged / "config.json").write_text(json.dumps({"stage": p.name}))
        with open(staged / CKPT, "wb") as f:
            if sparse:
                f.truncate(size)
            else:
                for _ in range(size // MB):
                    f.write(block)
        store.publish(p.key, staged, {"recipe": recipe.name, "stage": p.name,
                                      "kind": p.spec.kind})
        store.set_ref(recipe.name, p.name, p.key)
    write_lock(recipe, planned, {p.name for p in planned})
    return [{"name": p.name, "key": p.key, "parents": p.spec.parents()} for p in planned]


def _timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
           before: object = None) -> tuple[float, str]:
    if callable(before):
        before()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout + proc.stderr


def time_plan(project: Path, root: Path) -> float:
    """One `posttrain plan --json` in a fresh process; checks that every stage is fresh."""
    cmd = [sys.executable, "-m", "flows.cli", "plan", str(root / "bench12.yaml"), "--json",
           "--store", str(root / "store"), "--state-dir", str(root / "state")]
    wall, out = _timed(cmd, project, _env(project))
    rows = json.loads(out[: out.rindex("]") + 1])
    stale = [r["stage"] for r in rows if r["status"] != "fresh"]
    if len(rows) != 12 or stale:
        raise SystemExit(f"expected 12 fresh stages, got run for {stale}")
    return wall


def write_dvc_yaml(root: Path, planned: list[dict]) -> None:
    """One DVC stage per posttrain stage: deps are the parents' checkpoint dirs, outs its own."""
    key_of = {p["name"]: p["key"] for p in planned}
    lines = ["stages:"]
    for p in planned:
        lines += [f"  {p['name']}:",
                  f"    cmd: posttrain stage bench12.yaml {p['name']}",
                  "    deps:", "      - bench12.yaml"]
        lines += [f"      - store/objects/{key_of[parent]}" for parent in p["parents"]]
        lines += ["    outs:", f"      - store/objects/{p['key']}:", "          cache: false"]
    (root / "dvc.yaml").write_text("\n".join(lines) + "\n")


def time_dvc(root: Path, planned: list[dict], repeats: int) -> dict[str, float]:
    dvc = str(Path(sys.executable).parent / "dvc")
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(root / "dvc-site"))
    site = root / "dvc-site"

    def run(*args: str) -> tuple[float, str]:
        return _timed([dvc, *args], root, env)

    run("init", "--no-scm", "-q")
    run("config", "core.analytics", "false")
    run("config", "core.site_cache_dir", str(site))
    write_dvc_yaml(root, planned)
    commit, _ = run("commit", "-f", "-q")  # hashes every out and dep, writes dvc.lock

    def wipe() -> None:
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(root / ".dvc" / "tmp", ignore_errors=True)

    warm = []
    for _ in range(repeats):
        wall, out = _timed([dvc, "status"], root, env)
        if "up to date" not in out:
            raise SystemExit(f"dvc status is not clean:\n{out[-2000:]}")
        warm.append(wall)
    cold = [_timed([dvc, "status"], root, env, before=wipe)[0] for _ in range(repeats)]
    return {"commit": commit, "warm": statistics.median(warm), "cold": statistics.median(cold)}


def time_md5(root: Path, planned: list[dict]) -> float:
    t0 = time.perf_counter()
    for p in planned:
        h = hashlib.md5()
        with open(root / "store" / "objects" / p["key"] / CKPT, "rb") as f:
            for block in iter(lambda f=f: f.read(8 * MB), b""):
                h.update(block)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="plan runs per size (median)")
    ap.add_argument("--dvc-repeats", type=int, default=3, help="dvc status runs (median)")
    ap.add_argument("--no-dvc", action="store_true", help="skip the DVC baseline")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense 100 MB variant")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to build the stores (default: a temp dir, removed after)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--live", action="store_true",
                    help="plan with the working tree's code, not a frozen snapshot of it")
    ap.add_argument("--project", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seed:  # child mode: seed one store with --project's code
        sys.path.insert(0, str(args.project))
        root, size, sparse = args.seed
        print(json.dumps(seed(Path(root), int(size), sparse == "1")))
        return

    variants = [("1 MB dense", MB, False), ("1 GB sparse", GB, True)]
    if not args.no_dense:
        variants.append(("100 MB dense", 100 * MB, False))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="plan_speed-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        project = ROOT if args.live else snapshot(work / "project")
        stores = []
        for label, size, sparse in variants:
            root = work / label.replace(" ", "_")
            t0 = time.perf_counter()
            planned = seed_in(project, root, size, sparse)
            stores.append((root, planned))
            results.append({"payload": label, "per_stage": size, "total": 12 * size,
                            "seed_s": time.perf_counter() - t0})
            print(f"# {label}: seeded in {results[-1]['seed_s']:.1f} s", file=sys.stderr)
        # plan: one warm-up each (bytecode of the snapshot), then the sizes interleaved, so a
        # neighbour's load on the shared cores hits every size alike
        walls: list[list[float]] = [[] for _ in variants]
        for i in range(args.repeats + 1):
            for v, (root, _) in enumerate(stores):
                wall = time_plan(project, root)
                if i:
                    walls[v].append(wall)
        for row, (root, planned), w in zip(results, stores, walls, strict=True):
            row.update(plan_s=statistics.median(w), plan_all_s=w,
                       md5_s=time_md5(root, planned))
            if not args.no_dvc:
                dvc = time_dvc(root, planned, args.dvc_repeats)
                row.update(dvc_commit_s=dvc["commit"], dvc_warm_s=dvc["warm"],
                           dvc_cold_s=dvc["cold"])
            print(f"# {row['payload']}: plan {row['plan_s']:.3f} s (runs: "
                  f"{', '.join(f'{x:.3f}' for x in w)})", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    cols = [("plan_s", "posttrain plan"), ("md5_s", "md5 payload")]
    if not args.no_dvc:
        cols += [("dvc_warm_s", "dvc status warm"), ("dvc_cold_s", "dvc status cold"),
                 ("dvc_commit_s", "dvc commit")]
    print(f"\ncached 12-stage recipe; plan: median of {args.repeats} fresh processes; "
          f"dvc status: median of {args.dvc_repeats}")
    head = f"{'checkpoint per stage':<22}{'total':>9}" + "".join(f"{c[1]:>18}" for c in cols)
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['payload']:<22}{_human(r['total']):>9}"
              + "".join(f"{r[c]:>16.3f} s" for c, _ in cols))
    small = results[0]
    for r in results[1:]:
        print(f"{'ratio ' + r['payload'] + ' / 1 MB':<31}"
              + "".join(f"{r[c] / small[c]:>17.2f}x" for c, _ in cols))
    print("\n1 GB is a sparse file (f.truncate): no disk used, but every hasher still reads "
          "1 GB of zeros per stage.\n`posttrain plan` never opens a checkpoint: its time is "
          "flat (ratio ~1.0).")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
