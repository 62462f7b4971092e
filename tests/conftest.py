"""Shared test set-up: offline, quiet, and no state outside a per-session temp dir.

Environment variables are set at import time, before prefect/mlflow are imported anywhere, so
nothing touches ~/.prefect, ~/.cache or the network. One session-scoped Prefect test harness
is shared by every test that runs a flow (`prefect_harness`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="posttrain-tests-"))
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_HOME=str(_SESSION_DIR / "hf"),
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PREFECT_HOME=str(_SESSION_DIR / "prefect"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_UI_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240",
    PREFECT_RESULTS_PERSIST_BY_DEFAULT="false",
    DO_NOT_TRACK="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    MPLCONFIGDIR=str(_SESSION_DIR / "mpl"),
    XDG_CACHE_HOME=str(_SESSION_DIR / "cache"),
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = Path(__file__).resolve().parent / "recipes"


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`posttrain ARGV` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def spine(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tests/recipes/spine_tiny.yaml built once (real stages, shrunk) into a session store.

    Tests that use it may add to the store but must leave every spine stage stored.
    """
    import json
    import shutil

    root = tmp_path_factory.mktemp("spine")
    recipe = root / "spine_tiny.yaml"
    shutil.copy(RECIPES / "spine_tiny.yaml", recipe)
    world = {"root": root, "recipe": recipe, "store": root / "store", "state": root / "state"}
    rc, out, err = run_cli("run", str(recipe), "--store", str(world["store"]), "--state-dir",
                           str(world["state"]), "--max-parallel", "2", "--json")
    assert rc == 0, err
    world["first_run"] = json.loads(out)
    return world


@contextlib.contextmanager
def spine_restored(spine: dict) -> Iterator[None]:
    """Run a variant of the spine (--set, other launchers) and put its lock and refs back after,
    so the spine tests that follow compare plans and refs against the default run."""
    from artifacts.store import Store

    lock = spine["recipe"].with_suffix(".lock")
    before = lock.read_text()
    try:
        yield
    finally:
        lock.write_text(before)
        store = Store(spine["store"])
        for row in spine["first_run"]:
            store.set_ref("spine_tiny", row["stage"], row["key"])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test (toy models: threads only add contention on 2 cores);
    a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
