"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode (PyPI `moto[server]`),
one bucket, and the environment that points boto / s3fs at it (`AWS_ENDPOINT_URL`, dummy
credentials). Stopped by the fixture that started it.

Run: used by tests/test_s3_store.py and tests/test_cluster_slow.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
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
