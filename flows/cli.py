"""`posttrain`: the command line. Every user error prints one `error:` line naming the place and
the fix and exits 2, with no traceback and nothing written.

Run: ``posttrain --help``; ``posttrain plan recipes/mimo_tiny.yaml``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from artifacts.refs import StageInputError
from artifacts.store import DEFAULT_STATE, DEFAULT_STORE, RefError, Store
from flows import provenance_cli
from flows.recipe import RecipeError, parse


class UsageError(ValueError):
    """A bad CLI argument (exit 2)."""


def _quiet_env(state_dir: Path) -> None:
    """Prefect/MLflow state under the project, quiet, no telemetry (before importing them)."""
    state_dir = state_dir.absolute()
    defaults = {
        "PREFECT_HOME": str(state_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def _add_common(p: argparse.ArgumentParser, sets: bool = True) -> None:
    p.add_argument("--store", default=DEFAULT_STORE,
                   help="store URI: a path, file://, memory://, s3://... (default %(default)s)")
    p.add_argument("--state-dir", default=DEFAULT_STATE, type=Path,
                   help="local state: Prefect, MLflow sqlite, run logs (default %(default)s)")
    if sets:
        p.add_argument("--set", action="append", default=[], metavar="STAGE.PATH=VALUE",
                       help="override a field, e.g. --set rl_arith.max_steps=120 (repeatable)")


def cmd_plan(args: argparse.Namespace) -> int:
    from flows.plan import plan

    recipe = parse(args.recipe, args.set)
    planned = plan(recipe, Store(args.store), set(args.force), args.force_downstream,
                   state_dir=args.state_dir, tracking_uri=getattr(args, "tracking_uri", None))
    if args.json:
        print(json.dumps([p.as_json() for p in planned], indent=2))
        return 0
    for p in planned:
        why = "; ".join(p.reasons) if p.status == "run" else ""
        print(f"{p.status:<6} {p.name:<20} {p.spec.kind:<6} {p.key[:12]}  {why}")
    sys.stdout.flush()
    n = sum(p.status == "run" for p in planned)
    print(f"{n} of {len(planned)} stages would run", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.plan import plan, write_lock

    if args.max_parallel is not None and args.max_parallel < 1:
        raise UsageError("--max-parallel must be >= 1, e.g. --max-parallel 2")
    if args.runner not in ("threads", "ray"):
        raise UsageError(f"--runner {args.runner!r}: use threads or ray")
    if args.runner == "ray":
        try:
            import prefect_ray  # noqa: F401
        except ImportError:
            raise UsageError("--runner ray needs prefect-ray: pip install 'posttrain[ray]' "
                             "(or run with --runner threads)") from None
    recipe = parse(args.recipe, args.set)
    store = Store(args.store)
    planned = plan(recipe, store, set(args.force), args.force_downstream,
                   state_dir=args.state_dir, tracking_uri=args.tracking_uri)
    cpus = os.cpu_count() or 1
    todo = [p for p in planned if p.status == "run"]
    max_parallel = args.max_parallel or max(
        1, cpus // max(1, min((p.spec.resources.cpus for p in todo), default=1)))
    _quiet_env(args.state_dir)
    from flows.board import Board, Display
    from flows.run import RUNTIME, execute

    run_id = f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = args.state_dir.absolute() / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker, parent_run = _tracker(args, recipe.name, run_id, planned)
    ctx: dict[str, Any] = {
        "run_id": run_id, "recipe": str(Path(recipe.path).absolute()), "store": store.uri,
        "sets": args.set, "runner": args.runner,
        "run_dir": str(run_dir), "state_dir": str(args.state_dir.absolute()),
        "tracking_uri": args.tracking_uri, "parent_run": parent_run,
        "tracking": "off" if tracker is None else "upload" if args.upload_weights else "on",
        "plan": {p.name: {"key": p.key, "status": p.status, "reasons": p.reasons,
                          "parents": p.spec.parents(), "cpus": p.spec.resources.cpus,
                          "gpus": p.spec.resources.gpus,
                          "launch": asdict(p.spec.launch) if p.spec.launch.distributed
                          else None,
                          "retries": p.spec.retries, "kind": p.spec.kind} for p in planned},
    }
    board = Board([p.name for p in planned], {p.name: p.spec.kind for p in planned})
    RUNTIME[run_id] = {"board": board, "figures_fn": lambda: _figures(store, planned, run_id)}
    print(f"run {run_id}: {len(todo)} of {len(planned)} stages to build, "
          f"max {max_parallel} at once", file=sys.stderr)
    with Display(board):
        execute(recipe.name, ctx, max_parallel, args.runner)
    results = RUNTIME.pop(run_id).get("results") or [
        {"stage": p.name, "key": p.key, "status": "failed", "seconds": 0.0,
         "error": "the flow did not start"} for p in planned]
    ok = {r["stage"] for r in results if r["status"] in ("trained", "reused")}
    write_lock(recipe, planned, ok)
    for p in planned:
        if p.name in ok:
            store.set_ref(recipe.name, p.name, p.key)
    if tracker is not None:
        for r in results:
            if r["status"] == "reused" and (m := store.manifest(r["key"])):
                tracker.log_stage(m, "reused", parent_run, store.uri)
        lineage_md, _ = _figures(store, planned, run_id)
        summary = [dict(r, recipe=recipe.name, kind=next(p.spec.kind for p in planned
                                                          if p.name == r["stage"]),
                        eval=((store.manifest(r["key"]) or {}).get("metrics") or {}).get("eval"))
                   for r in results]
        tracker.finish_run(parent_run, "FINISHED" if len(ok) == len(results) else "FAILED",
                           summary, {"lineage.md": lineage_md})
    _print_eval_table(store, planned, ok)
    for r in results:
        if r["status"] == "failed":
            print(f"error: stage {r['stage']}: {r.get('error')}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if len(ok) == len(results) else 1


def _tracker(args: argparse.Namespace, recipe: str, run_id: str,
             planned: list[Any]) -> tuple[Any, str | None]:
    if args.no_tracking or os.environ.get("POSTTRAIN_TRACKING") == "off":
        return None, None
    from artifacts.tracking import Tracker

    tracker = Tracker(args.tracking_uri, args.state_dir)
    parent = tracker.start_run(recipe, run_id, {"recipe": recipe, "stages": len(planned),
                                                "sets": " ".join(args.set)})
    return tracker, parent


def _figures(store: Store, planned: list[Any], run_id: str) -> tuple[str, list[dict[str, Any]]]:
    """(Mermaid lineage markdown, eval rows) of the stages of this run that are stored."""
    from artifacts import lineage, pictures

    keys = {p.key for p in planned if store.has(p.key)}
    g = lineage.build(store)
    sub = {"root": None, "direction": "up",
           "nodes": [dict(n, depth=0, role=None, roles=[]) for k, n in g.nodes.items()
                     if k in keys],
           "edges": [e for e in g.edges if e["parent"] in keys and e["child"] in keys]}
    _, rows = pictures.eval_table([m for p in planned if (m := store.manifest(p.key))])
    md = pictures.mermaid_markdown(sub, f"Lineage of {run_id}") if sub["nodes"] else ""
    return md, [r for r in rows if any(v is not None for k, v in r.items()
                                       if k not in ("stage", "recipe", "kind", "key"))]


def _print_eval_table(store: Store, planned: list[Any], ok: set[str]) -> None:
    rows = [(p.name, (store.manifest(p.key) or {}).get("metrics", {}).get("eval") or {})
            for p in planned if p.name in ok]
    rows = [(n, e) for n, e in rows if e]
    if not rows:
        return
    domains = sorted({d for _, e in rows for d in e})
    print("\n" + f"{'stage':<16}" + "".join(f"{d:>9}" for d in domains) + f"{'mean':>9}",
          file=sys.stderr)
    for name, ev in rows:
        vals = [ev.get(d) for d in domains]
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        cells = "".join(f"{100 * v:>8.1f}%" if v is not None else f"{'-':>9}" for v in vals)
        print(f"{name:<16}{cells}{100 * mean:>8.1f}%", file=sys.stderr)


def cmd_stage(args: argparse.Namespace) -> int:
    from flows.stage import run_stage

    result = run_stage(args.recipe, args.stage, args.store, args.set, force=args.force,
                       run_id=args.run_id, expect_key=args.expect_key, pointer=args.pointer,
                       progress_file=args.progress_file, state_dir=args.state_dir,
                       tracking_uri=args.tracking_uri, parent_run=args.parent_run)
    if result["status"] != "follower":  # one result line per stage, from rank 0
        print(json.dumps(result))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    store = Store(args.store)
    rows = []
    for ref, key in sorted(store.refs().items()):
        m = store.manifest(key) or {}
        rows.append({"ref": ref, "key": key, "kind": m.get("kind"),
                     "created": m.get("timings", {}).get("ended"),
                     "eval": m.get("metrics", {}).get("eval") or {}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no artifacts in {store.uri} yet: posttrain run RECIPE", file=sys.stderr)
    for r in rows:
        ev = " ".join(f"{d}={a:.2f}" for d, a in r["eval"].items())
        print(f"{r['ref']:<28} {r['kind'] or '?':<6} {r['key'][:12]}  {r['created'] or ''}  {ev}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = Store(args.store)
    key = store.resolve(args.ref)
    m = store.manifest(key) or {}
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    print(f"{m.get('recipe')}:{m.get('stage')}  kind={m.get('kind')}  key={key}")
    for role, v in (m.get("input_refs") or {}).items():
        edges = v.items() if isinstance(v, dict) and "key" not in v else [(None, v)]
        for sub, e in edges:
            label = f"{role}:{sub}" if sub else role
            print(f"  {label:<18} <- {e['recipe']}:{e['stage']} ({e['key'][:12]})")
    took = m.get("timings", {}).get("seconds")
    print(f"  sft_root: {(m.get('sft_root') or '-')[:12]}  took {took}s")
    for d, a in (m.get("metrics", {}).get("eval") or {}).items():
        print(f"  eval {d:<10} {a:.3f}")
    for w in m.get("warnings") or []:
        print(f"  warning: {w}")
    return 0


EXAMPLES = {
    "run": "posttrain run recipes/mimo_tiny.yaml --set rl_arith.max_steps=120 --max-parallel 2",
    "plan": "posttrain plan recipes/mimo_tiny.yaml --set rl_arith.max_steps=120 --json",
    "ls": "posttrain ls --json",
    "show": "posttrain show mimo_tiny:mopd --json",
    "stage": "posttrain stage recipes/mimo_tiny.yaml sft --store .posttrain/store",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="posttrain", description="Post-training recipes as content-keyed Prefect DAGs.",
        epilog="example: posttrain plan recipes/mimo_tiny.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_,
                              epilog=f"example: {EXAMPLES[name]}")

    for name, help_ in (("run", "build every stage that is not in the store (Prefect flow)"),
                        ("plan", "show what `run` would build and why; runs nothing")):
        p = add(name, help_)
        p.add_argument("recipe", help="recipe file, e.g. recipes/mimo_tiny.yaml")
        _add_common(p)
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="rebuild this stage even if it is in the store (repeatable)")
        p.add_argument("--force-downstream", action="store_true",
                       help="also rebuild every descendant of the --force stages")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default sqlite:///<state-dir>/mlflow.db)")
        p.set_defaults(func=cmd_plan if name == "plan" else cmd_run)
        if name == "run":
            p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                           help="stages at once (default: CPU count / stage cpus)")
            p.add_argument("--runner", default="threads", help="threads (default) or ray")
            p.add_argument("--no-tracking", action="store_true", help="skip the MLflow mirror")
            p.add_argument("--upload-weights", action="store_true",
                           help="also upload each model to MLflow (default: a LoggedModel "
                           "that points at the store, no second copy)")

    p = add("stage", "build exactly one stage in this process (what DVC and cluster jobs call)")
    p.add_argument("recipe")
    p.add_argument("stage")
    _add_common(p)
    p.add_argument("--force", action="store_true", help="rebuild even if stored")
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--expect-key", default=None, help=argparse.SUPPRESS)
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pointer", default=None, help="write a small JSON pointer file here (DVC)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.set_defaults(func=cmd_stage)

    p = add("ls", "list named artifacts (recipe:stage -> key)")
    _add_common(p, sets=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = add("show", "print one artifact's manifest")
    p.add_argument("ref", help="key, key prefix (>= 8 hex) or recipe:stage")
    _add_common(p, sets=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    provenance_cli.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RecipeError, RefError, StageInputError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
