"""What a user sees in a real browser: headless Chromium (Debian's, driven by Selenium) over the
MLflow UI and the Prefect UI that `posttrain ui` serves on 127.0.0.1, after a tiny recipe ran,
was rerun as a no-op, and was rerun with one stage forced.

Checked from the rendered pages: the recipe run's name; each stage run's Duration within 20 %
of the stage's measured seconds (the manifest's); the registered version shown on the model's
page; the lineage picture (MLflow artifact and Prefect artifact); stage log lines on the flow
run's page; a reused stage shown as Cached; the experiment's chart view plotting training
curves; and that the no-op rerun added no child run. Every page is saved as a screenshot in
the run dir (`<state>/runs/<run id>/screenshots/`) and copied to
$POSTTRAIN_CI_ARTIFACTS/browser (default `.posttrain/ci-artifacts/browser`), CI's artifacts.
Slow tier: two servers, three runs, about four minutes on 2 cores.

Run: ``.venv/bin/python -m pytest tests/test_browser_slow.py -q -m slow``
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.servers import posttrain_ui

pytestmark = pytest.mark.slow
POSTTRAIN = [sys.executable, "-m", "flows.cli"]
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver (make install puts it there)
RECIPE = """\
name: ui_tiny
stages:
  data: {kind: data, domains: [arith], size: 256, seed: 0}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         domains: [arith], eval_n: 4}
  sft: {kind: sft, from: base, data: data, max_steps: 40, per_device_train_batch_size: 8,
        warmup_steps: 0, eval_n: 4}
"""


def _api(url: str, body: dict | None = None) -> Any:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=20).read())


def _seconds(text: str) -> float:
    """MLflow's Duration cell ("37.8s", "30ms", "1.2min", "2.0h") in seconds."""
    m = re.fullmatch(r"([\d.]+)\s*(ms|s|min|h)", text.strip())
    assert m, f"not a duration: {text!r}"
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}[m.group(2)]


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    assert Path(CHROMEDRIVER).exists() and shutil.which("chromium"), (
        "Chromium is missing: `make install` installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    # No background traffic (the machine has no network) and a profile of the test's own.
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
              "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    # Service(path): Selenium Manager would try to download a driver otherwise (no network)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """Open a page, wait until its rendered text passes `ready`, screenshot it."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver, self.shots = driver, shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, url: str, name: str, ready: Callable[[str], bool],
             timeout: float = 60.0) -> str:
        from selenium.webdriver.common.by import By

        self.driver.get(url)
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            text = self.driver.find_element(By.TAG_NAME, "body").text
            if ready(text):
                break
            time.sleep(0.5)
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))
        assert ready(text), f"{name} ({url}) never showed what it should; it shows:\n{text[-3000:]}"
        return text

    def images(self, prefix: str) -> list[Any]:
        """Rendered <img> elements whose src starts with `prefix` (loaded: natural width > 0)."""
        from selenium.webdriver.common.by import By

        return [e for e in self.driver.find_elements(By.TAG_NAME, "img")
                if (e.get_attribute("src") or "").startswith(prefix)
                and int(e.get_attribute("naturalWidth") or 0) > 0]


def _after(text: str, label: str) -> str:
    """The line after `label` on a rendered page (MLflow's "About this run" pairs)."""
    lines = text.splitlines()
    return lines[lines.index(label) + 1] if label in lines else ""


def test_both_uis_show_the_run_in_a_real_browser(tmp_path: Path, browser: Any) -> None:
    state, store = tmp_path / "state", tmp_path / "store"
    try:
        with posttrain_ui(state, REPO) as (info, env):
            _check_both_uis(info, env, tmp_path, state, store, browser)
    finally:
        shots = state / "runs"
        out = Path(os.environ.get("POSTTRAIN_CI_ARTIFACTS") or REPO / ".posttrain" /
                   "ci-artifacts") / "browser"
        for png in shots.glob("*/screenshots/*.png") if shots.exists() else ():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, out / png.name)


def _check_both_uis(info: dict, env: dict, tmp_path: Path, state: Path, store: Path,
                    browser: Any) -> None:
    """The runs, then what each page shows (the module docstring's list)."""
    mlflow, prefect = info["mlflow_url"], info["prefect_ui_url"]
    recipe = tmp_path / "ui_tiny.yaml"
    recipe.write_text(RECIPE)

    def run(*extra: str) -> list[dict]:
        p = subprocess.run([*POSTTRAIN, "run", str(recipe), "--store", str(store),
                            "--state-dir", str(state), "--json", *extra], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)

    def mlflow_runs() -> list[dict]:
        return _api(f"{mlflow}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [eid], "max_results": 1000})["runs"]

    first = run()
    eid = _api(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name"
               "?experiment_name=ui_tiny")["experiment"]["experiment_id"]
    runs = mlflow_runs()
    children = [r for r in runs if "mlflow.parentRunId" in
                {t["key"] for t in r["data"].get("tags", [])}]
    assert len(children) == 3
    run()  # a no-op rerun: a recipe run of its own, and no child run
    assert len([r for r in mlflow_runs() if "mlflow.parentRunId" in
                {t["key"] for t in r["data"].get("tags", [])}]) == 3
    run("--force", "sft")  # data and base are reused: Cached in Prefect
    run_ids = sorted(p.name for p in (state / "runs").iterdir())
    first_id = run_ids[0]
    pages = Pages(browser, state / "runs" / first_id / "screenshots")

    # MLflow: the run list names the recipe run by its run id
    pages.open(f"{mlflow}/#/experiments/{eid}/runs", "mlflow_runs",
               lambda t: first_id in t)
    # the chart view plots the stages' training curves (on the recipe run: `sft/loss`)
    pages.open(f"{mlflow}/#/experiments/{eid}/runs?compareRunsMode=CHART", "mlflow_charts",
               lambda t: "sft/loss" in t)
    keys = {r["stage"]: r["key"] for r in first}
    for stage in ("data", "base", "sft"):
        ids = json.loads((store / "objects" / keys[stage] / "mlflow.json").read_text())
        seconds = json.loads((store / "objects" / keys[stage] / "manifest.json")
                             .read_text())["timings"]["seconds"]
        text = pages.open(f"{mlflow}/#/experiments/{eid}/runs/{ids['run_id']}",
                          f"mlflow_run_{stage}", lambda t: "Duration" in t.splitlines())
        shown = _seconds(_after(text, "Duration"))
        # within 20 % (plus the display's rounding: "10.1s", "30ms")
        assert abs(shown - seconds) <= 0.2 * seconds + 0.05, (stage, shown, seconds)
        if stage == "data":
            continue
        # the LoggedModel page lists its registered version (not "Not registered")
        text = pages.open(f"{mlflow}/#/experiments/{eid}/models/{ids['model_id']}",
                          f"mlflow_model_{stage}",
                          lambda t: "Model versions" in t.splitlines())
        after = text.split("Model versions", 1)[1].splitlines()
        assert f"ui_tiny.{stage}" in after[:4] and "v1" in after[:4], after[:6]
        assert "Not registered" not in text
    parent = next(r["info"]["run_id"] for r in runs if r["info"]["run_name"] == first_id)
    pages.open(f"{mlflow}/#/experiments/{eid}/runs/{parent}/artifacts/lineage.svg",
               "mlflow_lineage", lambda t: "lineage.svg" in t)
    deadline = time.monotonic() + 30
    while not pages.images("blob:") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pages.images("blob:"), "MLflow shows no lineage picture"

    # Prefect: the first flow run's page carries the stages' log lines
    flows = _api(f"{info['prefect_api_url']}/flow_runs/filter",
                 {"sort": "START_TIME_ASC"})
    assert [f["name"] for f in flows][:1] == [first_id]
    pages.open(f"{prefect}/runs/flow-run/{flows[0]['id']}", "prefect_flow_run",
               lambda t: "sft: eval" in t and "base: eval" in t)
    # the forced rerun: reused stages end Cached, as the task's page shows
    last = next(f for f in flows if f["name"] == run_ids[-1])
    tasks = _api(f"{info['prefect_api_url']}/task_runs/filter",
                 {"flow_runs": {"id": {"any_": [last["id"]]}}})
    data_task = next(t for t in tasks if t["name"] == "data")
    pages.open(f"{prefect}/runs/task-run/{data_task['id']}", "prefect_cached_task",
               lambda t: "Cached" in t.splitlines())
    # the lineage artifact is a picture
    arts = _api(f"{info['prefect_api_url']}/artifacts/filter",
                {"artifacts": {"key": {"any_": ["posttrain-lineage"]}}})
    assert arts, "no posttrain-lineage artifact in Prefect"
    pages.open(f"{prefect}/artifacts/artifact/{arts[0]['id']}", "prefect_lineage",
               lambda t: "posttrain-lineage" in t)
    deadline = time.monotonic() + 30
    while not pages.images("data:image/svg+xml") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pages.images("data:image/svg+xml"), "Prefect shows no lineage picture"
