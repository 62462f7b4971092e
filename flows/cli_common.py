"""What every `posttrain` subcommand shares, so flows/cli.py and flows/provenance_cli.py register
theirs one way: the common options (one definition: the same spelling, help and default in
every subcommand), `add_command`, the one MLflow `tracker` constructor, UsageError, the
guard's `error_line`, and `version`.

Handlers raise (UsageError, RefError, RecipeError, ...) and never print their own `error:` line:
flows.cli.main is the one guard that turns a user error into one line on stderr and exit 2.

Run: imported by flows/cli.py; ``posttrain --help``
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.store import DEFAULT_STATE, DEFAULT_STORE, NoSpaceError, RefError, Store

if TYPE_CHECKING:
    from artifacts.tracking import Tracker

REF_HELP = ("a key, a unique key prefix (>= 8 hex), recipe:stage, or an MLflow model URI "
            "(models:/NAME@ALIAS, models:/NAME/VERSION)")


class UsageError(ValueError):
    """A bad CLI argument or setting (exit 2): the message names it and the fix."""


def common(sets: bool = False, tracking: bool = False) -> argparse.ArgumentParser:
    """The parent parser of the options subcommands share: --store and --state-dir always,
    --set for commands that read a recipe to build or plan it, --tracking-uri for those that
    talk to MLflow (or resolve a models:/ REF)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", default=DEFAULT_STORE,
                   help="store URI: a path, file://, memory://, s3://... (default %(default)s)")
    p.add_argument("--state-dir", default=DEFAULT_STATE, type=Path,
                   help="local state: Prefect home, MLflow sqlite and its pending queue, run "
                   "logs (default %(default)s)")
    if sets:
        p.add_argument("--set", action="append", default=[], metavar="STAGE.PATH=VALUE",
                       help="override a field, e.g. --set rl_arith.max_steps=120 (repeatable)")
        p.add_argument("--scale", type=float, default=1.0, metavar="F",
                       help="shrink every stage's steps and sizes by F in (0, 1] (each kind's "
                       "`scale` hook), e.g. 0.1 for a CI smoke run; F enters every key and the "
                       "recipe is named NAME-xF (default 1: as written)")
    if tracking:
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default sqlite:///<state-dir>/mlflow.db)")
    return p


def add_command(subparsers: Any, name: str, help_: str, example: str,
                handler: Callable[[argparse.Namespace], int], *, sets: bool = False,
                tracking: bool = False) -> argparse.ArgumentParser:
    """One subcommand with the common options, its help, one example, and its handler."""
    p = subparsers.add_parser(name, parents=[common(sets, tracking)], help=help_,
                              description=help_, epilog=f"example:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=handler)
    return p


def tracker(args: argparse.Namespace, create: bool = True, warn: bool = True) -> Tracker | None:
    """The Tracker of this command's --tracking-uri / --state-dir, or None when tracking is off
    (--no-tracking, POSTTRAIN_TRACKING=off) or, with create=False, when there is no MLflow to
    ask: a query must never create an empty database. warn=False for commands that report
    MLflow being down themselves."""
    if getattr(args, "no_tracking", False) or os.environ.get("POSTTRAIN_TRACKING") == "off":
        return None
    uri = getattr(args, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not create and uri is None and not (Path(args.state_dir) / "mlflow.db").exists():
        return None
    from artifacts.tracking import Tracker

    return Tracker(uri, args.state_dir, warn=warn)


def error_line(e: Exception, store: str) -> str:
    """The one line flows.cli.main prints for a user error: the value and the fix; a REF that
    names nothing in an empty store says the store is why (the usual cause: a wrong --store)."""
    if isinstance(e, NoSpaceError):  # already names the path, the free space and the fix
        return str(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e} (check the path and permissions)"
    if isinstance(e, RefError) and not _has_artifacts(store):
        return f"{e} (the store {store} is empty: run a recipe first or pass --store)"
    return str(e)


def _has_artifacts(store: str) -> bool:
    try:
        return bool(Store(store).keys())
    except Exception:  # an unreachable store: no hint rather than a traceback in the guard
        return True


def version() -> str:
    """The installed version; pyproject's in a checkout that was never pip-installed."""
    from importlib import metadata

    try:
        return metadata.version("posttrain")
    except metadata.PackageNotFoundError:
        import tomllib

        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
