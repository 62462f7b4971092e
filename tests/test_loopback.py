"""A run listens on loopback only and writes nothing under $HOME/.prefect.

While a run goes (`--runner ray`, and a stage under `launch: {processes: 2}`), a thread samples
the listening TCP sockets (/proc/net/tcp and tcp6, state 0A) that belong to this test's process
tree every 0.2 s: Ray's GCS, raylet, agents and workers, torchrun's c10d stores, gloo's ranks.
None may listen on 0.0.0.0, :: or an interface's address. Only sockets of our own processes
count, so other programs on the machine do not make the test flaky. Linux only (/proc).

Run: ``.venv/bin/python -m pytest tests/test_loopback.py -q``
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def _address(hex_addr: str) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        text = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(ip, 16)))
    else:  # four little-endian 32-bit words
        words = struct.unpack("<4I", raw)
        text = socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))
    return text, int(port, 16)


def _listening() -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket on the machine."""
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":
                    found[int(cols[9])] = _address(cols[1])
    return found


def _tree(root: int) -> set[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{d}/stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(d))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


def _owned_listeners(root: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of the sockets that `root`'s process tree listens on."""
    owner: dict[int, int] = {}
    for pid in _tree(root):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        owner[int(target[8:-1])] = pid
    out = set()
    for inode, (addr, port) in _listening().items():
        if inode in owner:
            with contextlib.suppress(OSError):
                out.add((addr, port, Path(f"/proc/{owner[inode]}/comm").read_text().strip()))
    return out


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@contextlib.contextmanager
def listeners_during() -> Iterator[set[tuple[str, int, str]]]:
    """Yields a set that fills, every 0.2 s until the block ends, with the NEW sockets that this
    process tree listens on (those listening before the block are left out)."""
    me = os.getpid()
    before = {(a, p) for a, p, _ in _owned_listeners(me)}
    seen: set[tuple[str, int, str]] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(x for x in _owned_listeners(me) if x[:2] not in before)
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join()


def _outside(seen: set[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    return sorted(x for x in seen if not _loopback(x[0]))


def _tiny_recipe(spine: dict, tmp_path: Path, name: str) -> Path:
    """The spine's data -> base -> sft under another recipe name: its stages reuse the spine's
    store, and its lock and refs are its own."""
    text = spine["recipe"].read_text().split("  rl_{domain}:")[0]
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text.replace("name: spine_tiny", f"name: {name}", 1))
    return recipe


def test_two_rank_stage_listens_on_loopback_only(spine, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the run's children look here
    (tmp_path / "home").mkdir()
    recipe = _tiny_recipe(spine, tmp_path, "loopback_ranks")
    with listeners_during() as seen:
        rc, out, err = run_cli(
            "run", str(recipe), "--store", str(spine["store"]), "--state-dir",
            str(tmp_path / "state"), "--json", "--no-tracking",
            "--set", "sft.launch.processes=2", "--force", "sft")
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rc == 0 and rows["sft"]["status"] == "trained", err[-3000:]
    assert any(p == "pt_elastic" or "python" in p for _, _, p in seen), seen  # it did sample
    assert _outside(seen) == [], f"listening beyond loopback: {_outside(seen)}"
    assert not (tmp_path / "home" / ".prefect").exists()


def test_ray_run_listens_on_loopback_only_and_keeps_prefect_home(spine, tmp_path):
    pytest.importorskip("prefect_ray")
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "home"
    home.mkdir()
    # `posttrain run` as a user starts it: its own process, HOME elsewhere, no PREFECT_HOME
    # (the run puts Prefect under its state dir); the harness's Prefect server.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "RAY_ADDRESS")}
    env.update(HOME=str(home), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    recipe = _tiny_recipe(spine, tmp_path, "loopback_ray")
    state = tmp_path / "state"
    with listeners_during() as seen:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(recipe), "--store",
             str(spine["store"]), "--state-dir", str(state), "--json", "--no-tracking",
             "--runner", "ray", "--force", "data"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["stage"]: r for r in json.loads(proc.stdout)}
    assert rows["data"]["status"] == "trained", proc.stderr[-3000:]
    assert any(p in ("raylet", "gcs_server") for _, _, p in seen), seen  # Ray did run
    assert _outside(seen) == [], f"listening beyond loopback: {_outside(seen)}"
    prefect_files = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                           if ".prefect" in p.parts)
    assert prefect_files == [], prefect_files
    assert (state / "prefect").is_dir()


def test_launchers_and_ray_are_told_the_address(monkeypatch):
    from types import SimpleNamespace

    from flows.run import _launcher
    from flows.runners import RayRunner

    monkeypatch.delenv("POSTTRAIN_BIND_ADDRESS", raising=False)
    torchrun = _launcher(SimpleNamespace(launch={"processes": 2}))
    assert torchrun[1:5] == ["-m", "flows.loopback", "127.0.0.1", "torch.distributed.run"]
    assert "--standalone" not in torchrun and "127.0.0.1:0" in torchrun
    acc = _launcher(SimpleNamespace(launch={"processes": 2, "accelerate": "z.yaml"}))
    assert acc[acc.index("--main_process_ip") + 1] == "127.0.0.1"
    assert int(acc[acc.index("--main_process_port") + 1]) > 0
    # the user names another address: the launchers and a local Ray take it
    monkeypatch.setenv("POSTTRAIN_BIND_ADDRESS", "0.0.0.0")
    assert _launcher(SimpleNamespace(launch={"processes": 2}))[3] == "0.0.0.0"
    pytest.importorskip("prefect_ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setenv("POSTTRAIN_BIND_ADDRESS", "192.0.2.7")
    init = RayRunner(2).task_runner(1).init_kwargs
    assert init["_node_ip_address"] == "192.0.2.7" and init["include_dashboard"] is False
    assert init["runtime_env"]["env_vars"]["PREFECT_HOME"] == os.environ["PREFECT_HOME"]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster: only the workers' env
    assert set(RayRunner(2).task_runner(1).init_kwargs) == {"runtime_env", "namespace"}
