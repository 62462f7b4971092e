"""Provenance subcommands of `posttrain`: lineage, teachers, students, impact, sync, export-dvc,
verify. flows/cli.py calls `register(subparsers)`; each handler returns the exit code.

Subcommands are added through flows/cli_common.py like every other, and user errors (a REF that
names nothing, an unreachable MLflow, a bad recipe) are raised, for flows.cli.main's one guard
to print as one line and exit 2. Only `sync`, `impact` (with an MLflow database) and `models:/`
REFs import mlflow; the rest answers without it.

Run: ``posttrain lineage mimo_tiny:final_rl --up`` or ``posttrain impact mimo_tiny:data``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from artifacts import lineage
from artifacts.store import Store
from artifacts.tracking_lookup import Lookup, resolve_ref
from flows.cli_common import REF_HELP, UsageError, add_command, tracker


def register(subparsers: Any) -> None:
    """Add the provenance subcommands to `posttrain`'s argparse subparsers."""

    def add(name: str, help_: str, example: str, handler: Any, ref: bool = True,
            json_flag: bool = True, tracking: bool = True) -> argparse.ArgumentParser:
        p = add_command(subparsers, name, help_, example, handler, tracking=tracking)
        if ref:
            p.add_argument("ref", metavar="REF", help=REF_HELP)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = add("lineage", "Ancestors (--up, default) or descendants (--down) of an artifact, with "
            "the role of every edge; REF may also be RECIPE.yaml:STAGE, the planned graph "
            "(no compute; built stages show their metrics).",
            "posttrain lineage mimo_tiny:final_rl --up --format html --output lineage.html",
            _lineage)
    way = p.add_mutually_exclusive_group()
    way.add_argument("--up", dest="down", action="store_false", help="ancestors (default)")
    way.add_argument("--down", dest="down", action="store_true", help="descendants")
    p.add_argument("--depth", type=int, default=None, help="stop after N edges")
    p.add_argument("--format", choices=("tree", "json", "mermaid", "html"), default="tree")
    p.add_argument("--output", "-o", default=None, help="write to FILE instead of stdout")
    add("teachers", "Which teachers produced this student, per route and MOPD round.",
        "posttrain teachers mimo_tiny:final_rl", _teachers)
    add("students", "Every model a teacher or data set fed, directly or through later rounds.",
        "posttrain students mimo_tiny:rl_arith", _students)
    add("impact", "Everything downstream of an artifact, with the refs and MLflow registered "
        "versions that point at it: what to quarantine.", "posttrain impact mimo_tiny:data",
        _impact)
    add("sync", "Back-fill MLflow with every stored artifact it does not know yet (and the work "
        "queued while it was unreachable).", "posttrain sync --tracking-uri "
        "http://mlflow:5000", _sync, ref=False)
    p = add("export-dvc", "Write a dvc.yaml whose stages call `posttrain stage` and track small "
            "pointer files, never checkpoints.", "posttrain export-dvc recipes/mimo_tiny.yaml "
            "--output dvc.yaml && dvc dag", _export_dvc, ref=False, json_flag=False,
            tracking=False)
    p.add_argument("recipe", metavar="RECIPE", help="path to the recipe .yaml")
    p.add_argument("--output", "-o", default="dvc.yaml", help="dvc.yaml path ('-': stdout)")
    add("verify", "Re-hash an artifact's files against its manifest.",
        "posttrain verify mimo_tiny:sft", _verify)


def _key(args: argparse.Namespace, store: Store) -> str:
    return resolve_ref(args.ref, store, args.tracking_uri, args.state_dir)


def _emit(text: str, output: str | None = None) -> None:
    if output and output != "-":
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _row(n: dict[str, Any]) -> str:
    return f"{lineage.label(n):32s} {n.get('kind') or '?':8s} {n['key'][:12]}  " \
           f"{lineage.headline(n)}".rstrip()


def _lineage(args: argparse.Namespace) -> int:
    from flows import plan_lineage

    store = Store(args.store)
    if plan_lineage.is_plan_ref(args.ref):  # recipes/x.yaml:STAGE: the plan's graph
        g, key = plan_lineage.resolve(args.ref, store)
    else:
        g = lineage.build(store)
        key = _key(args, store)
    walk = lineage.descendants if args.down else lineage.ancestors
    sub = walk(g, key, args.depth)
    _emit(lineage.render(sub, "json" if args.json else args.format), args.output)
    return 0


def _teachers(args: argparse.Namespace) -> int:
    store = Store(args.store)
    rows = lineage.teachers_of(store, _key(args, store))
    if args.json:
        _emit(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"{args.ref}: no teacher edges (it was not trained from teachers)")
    last = None
    for r in rows:
        if r["round"] != last:
            last = r["round"]
            print(f"round {last}: student {_row(r['student'])}")
        print(f"  {r['route']:12s} <- {_row(r['teacher'])}")
    return 0


def _students(args: argparse.Namespace) -> int:
    store = Store(args.store)
    rows = lineage.students_of(store, _key(args, store))
    if args.json:
        _emit(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"{args.ref}: no model was trained from it in {store.uri}")
    for r in rows:
        print(f"{_row(r)}   via {' -> '.join(r['via'])}")
    return 0


def _impact(args: argparse.Namespace) -> int:
    store = Store(args.store)
    key = _key(args, store)
    mlflow = tracker(args, create=False, warn=False)
    rep = lineage.impact(store, key, Lookup(mlflow) if mlflow else None)
    if args.json:
        _emit(json.dumps(rep, indent=2, default=str))
        return 0
    print(f"{len(rep['nodes'])} artifact(s) built from {args.ref} (itself included):")
    for n in rep["nodes"]:
        run = f"   mlflow run {n['mlflow'].get('run_id')}" if n.get("mlflow") else ""
        print(f"  {_row(n)}" + (f"   via {n['role']}" if n.get("role") else "") + run)
    print(f"{len(rep['refs'])} ref(s) in {store.uri} point at them:")
    for r in rep["refs"]:
        print(f"  {r['ref']:32s} {r['key'][:12]}")
    if rep["registered_versions"] is not None:
        print(f"{len(rep['registered_versions'])} MLflow registered version(s) point at them:")
        for v in rep["registered_versions"]:
            aliases = f"  @{', @'.join(v['aliases'])}" if v["aliases"] else ""
            print(f"  {v['uri']:32s} {v['key'][:12]}{aliases}")
    elif rep["mlflow_error"]:
        print(f"MLflow not consulted: {rep['mlflow_error']}", file=sys.stderr)
    return 0


def _sync(args: argparse.Namespace) -> int:
    mlflow = tracker(args, warn=False)
    if mlflow is None:
        raise UsageError("MLflow tracking is off (POSTTRAIN_TRACKING=off): unset it to sync")
    lookup = Lookup(mlflow)
    n = lookup.sync(Store(args.store))
    if lookup.last_error:
        raise UsageError(f"MLflow at {lookup.uri} is unreachable ({lookup.last_error}); start "
                         "it or pass --tracking-uri, then run `posttrain sync` again")
    if args.json:
        _emit(json.dumps({"recorded": n, "tracking_uri": lookup.uri}))
    else:
        print(f"recorded {n} stage run(s) in MLflow at {lookup.uri}")
    return 0


def _export_dvc(args: argparse.Namespace) -> int:
    from flows import dvc_export
    from flows.recipe import parse

    recipe = parse(args.recipe)
    root = Path.cwd() if args.output == "-" else Path(args.output).absolute().parent
    text = dvc_export.export(args.recipe, dvc_export.stages_from_recipe(recipe), args.store,
                             root=root)
    _emit(text, args.output)
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = Store(args.store)
    key = _key(args, store)
    problems = store.verify(key)
    if args.json:
        _emit(json.dumps({"key": key, "ok": not problems, "problems": problems}))
    elif problems:
        for p in problems:
            print(f"{key[:12]}: {p}", file=sys.stderr)
        print(f"{args.ref}: {len(problems)} problem(s): rebuild its stage with --force",
              file=sys.stderr)
    else:
        n = len((store.manifest(key) or {}).get("files", []))
        print(f"{args.ref} ({key[:12]}): {n} file(s) match the manifest")
    return 1 if problems else 0
