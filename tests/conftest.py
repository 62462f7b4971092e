"""Shared test set-up: offline, quiet, and no state outside a per-session temp dir.

Environment variables are set at import time, before prefect/mlflow are imported anywhere, so
nothing touches ~/.prefect, ~/.cache or the network. One session-scoped Prefect test harness
is shared by every test that runs a flow (`prefect_harness`).
"""

from __future__ import annotations

import os
import tempfile
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
