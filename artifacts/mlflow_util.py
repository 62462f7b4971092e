"""Small MLflow helpers shared by the tracking modules: paging, flattening params, batching
writes, and how a store is recorded. A leaf module (standard library only), so that
artifacts/tracking.py and artifacts/tracking_snapshots.py can both use them without importing
each other.

Run: imported by artifacts/tracking*.py; ``.venv/bin/python -m pytest tests/test_tracking.py -q``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def pages(fn: Callable[..., Any], *args: Any, **kw: Any) -> list[Any]:
    """Every item of a paged MLflow search (`fn` takes page_token=): one page silently drops
    whatever lies beyond MLflow's page size."""
    out, token = [], None
    while True:
        page = fn(*args, page_token=token, **kw)
        out.extend(page)
        if not (token := page.token):
            return out


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists as JSON; cut to MLflow's key/value limits."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif prefix:
        out[prefix[:-1][:250]] = (d if isinstance(d, str) else json.dumps(d, default=str))[:6000]
    return out


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def portable_store(store_uri: str, state_dir: str | Path) -> str:
    """How MLflow records a store: a local store inside the state dir as a path relative to it
    (`store`), so a copied or shared state dir does not point back at the machine that made
    it; anything else (s3://..., a store elsewhere) as given. Read back by `store_at`."""
    if "://" in store_uri:
        return store_uri
    try:
        return Path(store_uri).absolute().relative_to(Path(state_dir).absolute()).as_posix()
    except ValueError:
        return store_uri


def store_at(recorded: str, tracking_uri: str | None = None) -> str:
    """The store a `portable_store` value names, seen from here: a relative one lies in the
    state dir, which is the directory of a `sqlite:///` MLflow database, else
    $POSTTRAIN_STATE_DIR, else ./.posttrain."""
    if "://" in recorded or Path(recorded).is_absolute():
        return recorded
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri.startswith("sqlite:///"):
        state = Path(uri[len("sqlite:///"):]).parent
    else:
        state = Path(os.environ.get("POSTTRAIN_STATE_DIR") or ".posttrain")
    return str(state / recorded)


def batches(c: Any, rid: str, params: Sequence[Any] = (), metrics: Sequence[Any] = ()) -> None:
    for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params, 1000 metrics
        c.log_batch(rid, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        c.log_batch(rid, metrics=metrics[i:i + 1000])
