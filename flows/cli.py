"""`posttrain`: the command line. Every user error prints one `error:` line naming the place and
the fix and exits 2, with no traceback and nothing written.

Run: ``posttrain --help``; ``posttrain plan recipes/mimo_tiny.yaml``
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from artifacts.refs import StageInputError
from artifacts.store import NoSpaceError, RefError, Store, free_space, guard_space
from artifacts.tracking_lookup import resolve_ref
from flows import cli_common, provenance_cli, runners, ui
from flows.cli_common import REF_HELP, UsageError
from flows.recipe import RecipeError, parse

# Raised for a user's mistake by any command: one `error:` line, exit 2, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (RecipeError, RefError, StageInputError, UsageError,
                                            NoSpaceError)
# Commands that run stage code: there an OSError or ValueError may be a bug in training code,
# whose traceback matters. Elsewhere it is about the user's input (a path, a file): exit 2.
RUNS_STAGE_CODE = ("run", "stage")
PREFECT_MIN_FREE = 32 << 20  # bytes free in PREFECT_HOME before a run starts Prefect's server


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
        # MLflow prints "View run ... at URL" for a tracking server: stdout is the table / JSON
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        url = _profile_api_url()  # the user's own Prefect profile names a server: use it
        if url:
            os.environ["PREFECT_API_URL"] = url
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    home = Path(os.environ["PREFECT_HOME"])
    # Prefect's server keeps a sqlite db here: on a full disk it would retry for minutes and
    # print thousands of lines that never say why, so the space is checked here, in one line.
    with guard_space(home, "point --state-dir elsewhere"):
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".space-probe.{os.getpid()}"
        try:
            probe.write_bytes(bytes(1 << 20))
        finally:
            probe.unlink(missing_ok=True)
    if shutil.disk_usage(home).free < PREFECT_MIN_FREE:
        raise NoSpaceError(errno.ENOSPC, f"too little space for Prefect's database in {home} "
                           f"({free_space(home)}, it needs {PREFECT_MIN_FREE >> 20} MB); free "
                           "space or point --state-dir elsewhere")


def cmd_plan(args: argparse.Namespace) -> int:
    from flows.plan import plan

    recipe = parse(args.recipe, args.set, args.scale)
    planned = plan(recipe, Store(args.store), set(args.force), args.force_downstream,
                   state_dir=args.state_dir, tracking_uri=getattr(args, "tracking_uri", None))
    for p in planned:  # the kinds' plan-time warnings (e.g. route_checks: warn)
        for w in p.spec.warnings:
            print(f"warning: stage {p.name}: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps([p.as_json() for p in planned], indent=2))
        return 0
    for p in planned:
        why = "; ".join(p.reasons) if p.status == "run" else ""
        print(f"{p.status:<6} {p.name:<20} {p.spec.kind:<6} {p.key[:12]}  {why}")
        for step, key in p.snapshots.items():  # published while the stage trains
            state = "fresh" if Store(args.store).has(key) else "run"
            print(f"{state:<6} {p.name + '@' + str(step):<20} {'':<6} {key[:12]}  snapshot")
    sys.stdout.flush()
    n = sum(p.status == "run" for p in planned)
    print(f"{n} of {len(planned)} stages would run", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    session = open_run(args)
    if isinstance(session, int):  # nothing to build: answered from the plan
        return session
    from flows.board import Display
    from flows.run import execute

    with Display(session["board"]):
        execute(session["recipe"].name, session["plans"], session["run"],
                session["max_parallel"])
    return close_run(args, session)


def _profile_api_url() -> str | None:
    """PREFECT_API_URL of the active profile in ~/.prefect/profiles.toml (Prefect's own
    default home), read without importing Prefect: the run keeps its state under --state-dir
    (PREFECT_HOME), which would otherwise hide the user's profile and its server."""
    import tomllib

    path = Path.home() / ".prefect" / "profiles.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or doc.get("active")
    url = ((doc.get("profiles") or {}).get(name) or {}).get("PREFECT_API_URL")
    return str(url) if url else None


def _services_line(args: argparse.Namespace, tracker: Any) -> str:
    """Where this run records: MLflow and Prefect, and why those (the first lines of a run)."""
    if tracker is None:
        mlflow = "MLflow off (--no-tracking)"
    else:
        why = ("--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI"
               if os.environ.get("MLFLOW_TRACKING_URI") else "local fallback")
        mlflow = f"MLflow {tracker.uri} ({why})"
    url = os.environ.get("PREFECT_API_URL")
    prefect = (f"Prefect {url} (PREFECT_API_URL or your profile)" if url else
               "Prefect: a temporary local server (set PREFECT_API_URL or run `posttrain ui`"
               " to keep runs)")
    return f"{mlflow}; {prefect}"


def open_run(args: argparse.Namespace) -> dict[str, Any] | int:
    """Everything of `posttrain run` before the flow: checks, plan, run dir, MLflow parent run,
    the typed stage plans, RUNTIME's board. An int (the exit code) when every stage is fresh
    and the run is answered from the plan (`_noop_run`). `flows/deploy.py` shares it."""
    from flows.plan import plan

    if args.max_parallel is not None and args.max_parallel < 1:
        raise UsageError("--max-parallel must be >= 1, e.g. --max-parallel 2")
    if args.runner not in runners.RUNNERS:
        raise UsageError(f"--runner {args.runner!r}: use {runners.names()}")
    try:
        runners.RUNNERS[args.runner].check()
    except runners.RunnerUnavailable as e:
        raise UsageError(str(e)) from None
    recipe = parse(args.recipe, args.set, args.scale)
    store = Store(args.store)
    planned = plan(recipe, store, set(args.force), args.force_downstream,
                   state_dir=args.state_dir, tracking_uri=args.tracking_uri)
    cpus = os.cpu_count() or 1
    if any(p.status == "run" for p in planned) and (line := ui.use_servers(args)):
        print(line, file=sys.stderr)
    waiting = [p for p in planned if p.status == "waiting"]
    if waiting and not getattr(args, "wait_for_upstream", False):
        raise UsageError("; ".join(f"stage {p.name}: {', '.join(p.reasons)}" for p in waiting)
                         + ": run it with --wait-for-upstream (and --upstream-timeout S) to "
                         "start now and wait for it, or once it is built")
    if getattr(args, "upstream_timeout", None) is not None and args.upstream_timeout <= 0:
        raise UsageError("--upstream-timeout is seconds > 0, e.g. --upstream-timeout 3600")
    todo = [p for p in planned if p.status in ("run", "waiting")]
    if not todo:
        return _noop_run(args, recipe, store, planned)
    max_parallel = args.max_parallel or max(
        1, cpus // max(1, min((p.spec.resources.cpus for p in todo), default=1)))
    _quiet_env(args.state_dir)
    from flows.board import Board
    from flows.run import RUNTIME, RunContext
    from flows.stagefile import StagePlan

    run_id = f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = args.state_dir.absolute() / "runs" / run_id
    with guard_space(run_dir, "point --state-dir elsewhere"):
        run_dir.mkdir(parents=True, exist_ok=True)
    tracker, parent_run = _start_tracking(args, recipe.name, run_id, planned)
    run = RunContext(
        run_id=run_id, runner=args.runner, store=store.uri, run_dir=str(run_dir),
        state_dir=str(args.state_dir.absolute()), tracking_uri=args.tracking_uri,
        parent_run=parent_run, upstream_timeout=getattr(args, "upstream_timeout", None),
        tracking="off" if tracker is None else "upload" if args.upload_weights else "on")
    plans = [StagePlan.from_planned(p, recipe) for p in planned]  # one typed plan per stage
    board = Board([p.name for p in planned], {p.name: p.spec.kind for p in planned})
    RUNTIME[run_id] = {"board": board, "figures_fn": lambda: _figures(store, planned, run_id,
                                                                          picture=True)}
    print(f"run {run_id}: {len(todo)} of {len(planned)} stages to build, "
          f"max {max_parallel} at once", file=sys.stderr)
    print(_services_line(args, tracker), file=sys.stderr)
    return {"recipe": recipe, "store": store, "planned": planned, "plans": plans, "run": run,
            "run_dir": run_dir, "tracker": tracker, "parent_run": parent_run, "board": board,
            "max_parallel": max_parallel}


def close_run(args: argparse.Namespace, session: dict[str, Any]) -> int:
    """Everything of `posttrain run` after the flow: lock, refs, MLflow summary, the table,
    `--json` rows; the exit code."""
    from flows.plan import write_lock
    from flows.run import RUNTIME
    from flows.stagefile import StageResult

    recipe, store, planned = session["recipe"], session["store"], session["planned"]
    tracker, parent_run, run_id = session["tracker"], session["parent_run"], \
        session["run"].run_id
    rt = RUNTIME.pop(run_id)
    stopped: str | None = rt.get("interrupted")  # "SIGINT" / "SIGTERM": the run was stopped
    results: list[StageResult] = rt.get("results") or [
        StageResult(p.name, p.key, "failed", 0.0, "the flow did not start") for p in planned]
    ok = {r.stage for r in results if r.ok}
    write_lock(recipe, planned, ok)
    for p in planned:
        if p.name in ok:
            store.set_ref(recipe.name, p.name, p.key)
    if tracker is not None:
        tracker.log_reused(parent_run, [m for r in results if r.status == "reused"
                                        and (m := store.manifest(r.key))])
        lineage_md, _ = _figures(store, planned, run_id)
        summary = [dict(r.row(), recipe=recipe.name, kind=next(p.spec.kind for p in planned
                                                                if p.name == r.stage),
                        eval=((store.manifest(r.key) or {}).get("metrics") or {}).get("eval"))
                   for r in results]
        from artifacts import pictures

        figures = {"lineage.md": lineage_md}
        if svg := pictures.render(_run_lineage(store, planned), "svg"):  # what MLflow shows
            figures["lineage.svg"] = svg.decode()
        tracker.finish_run(parent_run, "KILLED" if stopped else "FINISHED"
                           if len(ok) == len(results) else "FAILED", summary, figures)
    _print_eval_table(store, planned, ok)
    for r in results:
        if r.status == "failed":
            print(f"error: stage {r.stage}: {r.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.row() for r in results], indent=2))
    session["results"] = results
    if stopped:  # as a shell reports a process killed by it: 130 (SIGINT), 143 (SIGTERM)
        return 128 + signal.Signals[stopped].value
    return _exit_code(results, planned, session["run_dir"])


def _noop_run(args: argparse.Namespace, recipe: Any, store: Store, planned: list[Any]) -> int:
    """Every stage is fresh: answer in the time `plan` takes (no Prefect, no MLflow, no run dir:
    nothing happens, so nothing is recorded), with the table and `--json` rows a run prints."""
    from flows.plan import write_lock
    from flows.stagefile import StageResult

    results = [StageResult(p.name, p.key, "reused", 0.0) for p in planned]
    write_lock(recipe, planned, {p.name for p in planned})
    for p in planned:
        store.set_ref(recipe.name, p.name, p.key)
    print(f"run: every stage of {recipe.name} is in the store ({len(planned)} reused); "
          "nothing to build", file=sys.stderr)
    _print_eval_table(store, planned, {p.name for p in planned})
    if args.json:
        print(json.dumps([r.row() for r in results], indent=2))
    return 0


def _exit_code(results: list[Any], planned: list[Any], run_dir: Path) -> int:
    """0 when every stage is stored; 2 when every failure is the user's to fix (its child's
    result file says `user_error`: a corrupted input, a bad ref or data), a stage not run
    because a parent failed counting as that parent's failure; else 1. The child's file is
    read, not the flow's result: a failed task's result is rebuilt from its error message."""
    from flows.stagefile import StageFileError, StageResult

    failed = {r.stage for r in results if r.status == "failed"}
    parents = {p.name: p.spec.parents() for p in planned}
    user = 0
    for name in sorted(failed):
        path = run_dir / f"{name}.result.json"
        try:
            child = StageResult.read(path) if path.exists() else None
        except StageFileError:
            child = None
        if child is not None and child.status == "failed" and child.user_error:
            user += 1
        elif (child is None or (child.error or "").startswith("not run")) \
                and any(p in failed for p in parents.get(name, ())):
            continue  # not run: an upstream stage failed (its file is for pipelined readers)
        else:
            return 1
    return 2 if user else 0 if not failed else 1


def _start_tracking(args: argparse.Namespace, recipe: str, run_id: str,
                    planned: list[Any]) -> tuple[Any, str | None]:
    """(Tracker, its parent MLflow run id) for this `posttrain run`, or (None, None) when off."""
    tracker = cli_common.tracker(args)
    if tracker is None:
        return None, None
    parent = tracker.start_run(recipe, run_id, {"recipe": recipe, "stages": len(planned),
                                                "sets": " ".join(args.set)})
    return tracker, parent


def _figures(store: Store, planned: list[Any], run_id: str,
             picture: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """(Mermaid lineage markdown, eval rows) of the stages of this run that are stored;
    `picture`: the markdown opens with the Graphviz picture (Prefect's artifact page)."""
    from artifacts import pictures

    sub = _run_lineage(store, planned)
    _, rows = pictures.eval_table([m for p in planned if (m := store.manifest(p.key))])
    md = pictures.mermaid_markdown(sub, f"Lineage of {run_id}") if sub["nodes"] else ""
    if picture and md and (svg := pictures.render(sub, "svg")):  # Prefect's UI shows it inline
        import base64

        md = (f"![Lineage of {run_id}](data:image/svg+xml;base64,"
              f"{base64.b64encode(svg).decode()})\n\n{md}")
    return md, [r for r in rows if any(v is not None for k, v in r.items()
                                       if k not in ("stage", "recipe", "kind", "key"))]


def _run_lineage(store: Store, planned: list[Any]) -> dict[str, Any]:
    """The lineage subgraph of this run's stored stages (pictures' `sub` shape)."""
    from artifacts import lineage

    keys = {p.key for p in planned if store.has(p.key)}
    g = lineage.build(store)
    return {"root": None, "direction": "up",
            "nodes": [dict(n, depth=0, role=None, roles=[]) for k, n in g.nodes.items()
                      if k in keys],
            "edges": [e for e in g.edges if e["parent"] in keys and e["child"] in keys]}


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
    """One stage from a plan file (the flow's) or from RECIPE STAGE (by hand: its ancestors
    are planned, nothing else); rank 0 always writes --result-file, failures included."""
    from flows import procs

    procs.watch_parent()  # started by a run: die with it, whatever it is doing
    from flows import stage as stage_mod
    from flows.stagefile import StageFileError, StagePlan, StageResult

    sp: StagePlan | None = None
    t0 = time.time()
    try:
        if args.plan_file:
            if args.recipe or args.stage or args.set or args.force:
                raise UsageError("posttrain stage --plan-file: the plan file is the whole plan;"
                                 " drop RECIPE, STAGE, --set and --force")
            try:
                sp = StagePlan.read(args.plan_file)
            except StageFileError as e:
                raise UsageError(str(e)) from None
        elif args.recipe and args.stage:
            sp = stage_mod.plan_stage(args.recipe, args.stage, Store(args.store), args.set,
                                      force=args.force, state_dir=args.state_dir,
                                      tracking_uri=args.tracking_uri, scale=args.scale)
        else:
            raise UsageError("posttrain stage takes RECIPE STAGE (e.g. posttrain stage "
                             "recipes/mimo_tiny.yaml sft), or --plan-file FILE")
        result = stage_mod.run_stage(
            sp, args.store, run_id=args.run_id, expect_key=args.expect_key,
            pointer=args.pointer, progress_file=args.progress_file, state_dir=args.state_dir,
            tracking_uri=args.tracking_uri, parent_run=args.parent_run)
    except (Exception, KeyboardInterrupt) as e:
        if args.result_file and stage_mod.rank() == 0:
            msg = (str(e) if isinstance(e, USER_ERRORS) else "interrupted"
                   if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
            StageResult(sp.name if sp else args.stage or "?", sp.key if sp else "", "failed",
                        round(time.time() - t0, 3), msg,
                        user_error=isinstance(e, USER_ERRORS)).write(args.result_file)
        raise
    if result.status != "follower":  # one result per stage, from rank 0
        if args.result_file and stage_mod.rank() == 0:  # (every rank reuses a stored key)
            result.write(args.result_file)
        print(json.dumps(result.row()))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    store = Store(args.store)
    rows = []
    for ref, key, m in dag_order(store):
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


# `show` names an input edge the way lineage, MLflow tags and the recipe's routes do.
ROLE_NAMES = {"teachers": "teacher", "reward_models": "reward_model", "generators": "generator",
              "candidates": "candidate"}


def dag_order(store: Store) -> list[tuple[str, str, dict[str, Any]]]:
    """(ref, key, manifest) of every named artifact, by recipe, then parents before children,
    then by when they were built."""
    named = [(ref, key, store.manifest(key) or {}) for ref, key in store.refs().items()]
    by_key: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for row in named:
        by_key.setdefault(row[1], []).append(row)
    depth: dict[str, int] = {}

    def level(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key not in depth:
            m = by_key[key][0][2] if key in by_key else store.manifest(key) or {}
            parents = [e["key"] for e in input_edges(m) if e["key"] not in seen]
            depth[key] = 1 + max((level(p, seen | {key}) for p in parents), default=-1)
        return depth[key]

    return sorted(named, key=lambda r: (r[0].split(":")[0], level(r[1]),
                                        (r[2].get("timings") or {}).get("started") or "", r[0]))


def input_edges(m: dict[str, Any]) -> list[dict[str, Any]]:
    """A manifest's input edges, flat: single refs and every route of a routed role."""
    out = []
    for v in (m.get("input_refs") or {}).values():
        out.extend([v] if isinstance(v, dict) and "key" in v else
                   [e for e in (v.values() if isinstance(v, dict) else v or [])
                    if isinstance(e, dict) and "key" in e])
    return out


def cmd_show(args: argparse.Namespace) -> int:
    store = Store(args.store)
    key = resolve_ref(args.ref, store, args.tracking_uri, args.state_dir)
    m = store.manifest(key) or {}
    ids = store.mlflow_ids(key)  # beside the manifest: MLflow is mirrored after publishing
    if args.json:
        print(json.dumps(dict(m, mlflow=ids), indent=2, sort_keys=True))
        return 0
    print(f"{m.get('recipe')}:{m.get('stage')}  kind={m.get('kind')}  key={key}")
    if ids:
        print(f"  mlflow: run {ids.get('run_id')}  model {ids.get('model_id') or '-'}  "
              f"({ids.get('tracking_uri')})")
    for role, v in (m.get("input_refs") or {}).items():
        edges = v.items() if isinstance(v, dict) and "key" not in v else [(None, v)]
        for sub, e in edges:
            label = f"{ROLE_NAMES.get(role, role)}:{sub}" if sub else role
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
    "ui": "posttrain ui   # then posttrain run recipes/mimo_tiny.yaml in another terminal",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="posttrain", description="Post-training recipes as content-keyed Prefect DAGs.",
        epilog="example: posttrain plan recipes/mimo_tiny.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"posttrain {cli_common.version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, handler: Any, **common: bool) -> argparse.ArgumentParser:
        return cli_common.add_command(sub, name, help_, EXAMPLES[name], handler, **common)

    for name, help_ in (("run", "build every stage that is not in the store (Prefect flow)"),
                        ("plan", "show what `run` would build and why; runs nothing")):
        p = add(name, help_, cmd_plan if name == "plan" else cmd_run, sets=True, tracking=True)
        p.add_argument("recipe", help="recipe file, e.g. recipes/mimo_tiny.yaml")
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="rebuild this stage even if it is in the store (repeatable)")
        p.add_argument("--force-downstream", action="store_true",
                       help="also rebuild every descendant of the --force stages")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "run":
            p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                           help="stages at once (default: CPU count / stage cpus)")
            p.add_argument("--runner", default="threads",
                           help=f"where stages run: {runners.names()} (default threads)")
            p.add_argument("--no-tracking", action="store_true", help="skip the MLflow mirror")
            p.add_argument("--wait-for-upstream", action="store_true",
                           help="a `use:` of another recipe's stage not built yet (planned "
                           "`waiting`) waits until it is published, instead of refusing")
            p.add_argument("--upstream-timeout", type=float, default=None, metavar="S",
                           help="with --wait-for-upstream: give up after S seconds")
            p.add_argument("--upload-weights", action="store_true",
                           help="also upload each model to MLflow (default: a LoggedModel "
                           "that points at the store, no second copy)")

    p = add("stage", "build exactly one stage in this process (what DVC and cluster jobs call)",
            cmd_stage, sets=True, tracking=True)
    p.add_argument("recipe", nargs="?", help="recipe file (or --plan-file)")
    p.add_argument("stage", nargs="?", help="stage name; its ancestors are planned, no more")
    p.add_argument("--plan-file", default=None, metavar="FILE",
                   help="build exactly this StagePlan (what `posttrain run` writes per stage) "
                   "instead of planning RECIPE STAGE")
    p.add_argument("--result-file", default=None, metavar="FILE",
                   help="write the StageResult here (JSON), also when the stage fails")
    p.add_argument("--force", action="store_true", help="rebuild even if stored")
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--expect-key", default=None, help=argparse.SUPPRESS)
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pointer", default=None, help="write a small JSON pointer file here (DVC)")

    p = add("ls", "list named artifacts (recipe:stage -> key)", cmd_ls)
    p.add_argument("--json", action="store_true")

    p = add("show", "print one artifact's manifest", cmd_show, tracking=True)
    p.add_argument("ref", metavar="REF", help=REF_HELP)
    p.add_argument("--json", action="store_true")

    provenance_cli.register(sub)
    ui.register(sub, add)
    return ap


def main(argv: list[str] | None = None) -> int:
    """`posttrain ARGV`: the one error guard of every subcommand (user errors: exit 2)."""
    args = build_parser().parse_args(argv)
    caught = USER_ERRORS if args.command in RUNS_STAGE_CODE else (*USER_ERRORS, OSError,
                                                                    ValueError)
    try:
        return int(args.func(args) or 0)
    except caught as e:
        print(f"error: {cli_common.error_line(e, args.store)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the console script: the process ends next, and the interpreter's
            gc.freeze()  # last collection of Prefect's and MLflow's heap took seconds (3.5 s)


if __name__ == "__main__":
    sys.exit(main())
