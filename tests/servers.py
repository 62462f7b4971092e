"""Real servers on 127.0.0.1 for tests, each stopped by the context that started it:
`s3_server` (moto in server mode, PyPI `moto[server]`: one bucket, and the environment that
points boto / s3fs at it, `AWS_ENDPOINT_URL` and dummy credentials) and `mlflow_server`
(`mlflow server` over a fresh SQLite file), and `posttrain_ui` (`posttrain ui` over a state dir).

Run: used by tests/test_s3_store.py, tests/test_cluster_slow.py, tests/test_ecosystem.py,
tests/test_ui_slow.py, tests/test_browser_slow.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(log_dir: Path, bucket: str = "posttrain") -> Iterator[dict[str, str]]:
    """Start moto on a free loopback port; yield the env for clients (bucket in S3_BUCKET)."""
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "S3_BUCKET": bucket}
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "moto.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log_dir}/moto.log") from None
                time.sleep(0.1)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"]).mkdir(bucket)
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def mlflow_server(tmp: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over a fresh SQLite file; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp / "mlflow").mkdir(parents=True, exist_ok=True)
    with open(tmp / "mlflow" / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}",
             "--default-artifact-root", str(tmp / "mlflow" / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp / "mlflow" / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(30)


@contextlib.contextmanager
def posttrain_ui(state: Path, cwd: Path) -> Iterator[tuple[dict, dict[str, str]]]:
    """`posttrain ui --state-dir STATE` on free loopback ports, with no PREFECT_API_URL /
    PREFECT_HOME / MLFLOW_TRACKING_URI of the caller's; yield (ui.json's info, that env) once
    both servers are up. On exit Ctrl-C stops it: it must end with 0 and remove ui.json."""
    import json
    import signal

    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--state-dir", str(state),
                           "--prefect-port", str(free_port()), "--mlflow-port",
                           str(free_port())], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (state / "ui.json").exists():
            assert ui.poll() is None and time.monotonic() < deadline, ui.stderr.read()
            time.sleep(0.5)
        yield json.loads((state / "ui.json").read_text()), env
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(60)
    assert ui.returncode == 0
    assert not (state / "ui.json").exists()
