"""Leases on a remote store (artifacts/lease.py), on ``memory://`` with a short ttl: one holder
at a time, a dead holder taken over after its ttl, a stalled holder that loses its lease
publishes nothing, and `Store.lock` uses a lease for every non-local store.

Run: ``.venv/bin/python -m pytest tests/test_lease.py -q``
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import fsspec
import pytest

from artifacts.lease import Lease, LeaseLost, lease_ttl
from artifacts.store import Store


@pytest.fixture
def mem():
    fs = fsspec.filesystem("memory")
    root = f"/lease-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_one_holder_at_a_time_and_release_hands_over(mem):
    fs, root = mem
    order: list[str] = []
    a = Lease(fs, f"{root}/k", ttl=2.0, on_wait=lambda t: None).acquire()

    def second() -> None:
        with Lease(fs, f"{root}/k", ttl=2.0, poll=0.05, on_wait=lambda t: None):
            order.append("b")

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)  # b is waiting: a's lease is renewed, not expired
    order.append("a")
    a.release()
    t.join(5)
    assert order == ["a", "b"]
    # generations grew, the old ones were deleted, the last one is released
    names = [n.rsplit("/", 1)[-1] for n in fs.ls(f"{root}/k", detail=False)]
    assert names == ["lease.000000000002"]
    assert json.loads(fs.cat(f"{root}/k/lease.000000000002"))["released"] is True


def test_a_dead_holder_is_taken_over_after_its_ttl(mem):
    fs, root = mem
    fs.makedirs(f"{root}/k", exist_ok=True)
    # a holder that died: its lease is never renewed nor released (expires in the future)
    fs.pipe(f"{root}/k/lease.000000000001", json.dumps(
        {"owner": "elsewhere:1:dead", "ttl": 1.0, "beat": 0, "expires": time.time() + 1.0,
         "released": False}).encode())
    said: list[str] = []
    t0 = time.monotonic()
    lease = Lease(fs, f"{root}/k", ttl=1.0, poll=0.05, on_wait=said.append).acquire(timeout=10)
    waited = time.monotonic() - t0
    lease.release()
    assert lease.took_over == "elsewhere:1:dead"
    assert 0.9 < waited < 5, waited
    assert any("held by elsewhere:1:dead" in s for s in said)
    assert any("took over from elsewhere:1:dead" in s for s in said)


def test_a_live_holder_is_not_taken_over(mem):
    fs, root = mem
    a = Lease(fs, f"{root}/k", ttl=0.6, on_wait=lambda t: None).acquire()
    try:
        with pytest.raises(TimeoutError, match="still held"):
            Lease(fs, f"{root}/k", ttl=0.6, poll=0.05, on_wait=lambda t: None).acquire(
                timeout=2.0)  # > 3 ttls: renewals keep it alive
        a.check()
    finally:
        a.release()


def test_a_stalled_holder_loses_the_lease_and_check_refuses_to_publish(mem):
    fs, root = mem
    a = Lease(fs, f"{root}/k", ttl=0.5, on_wait=lambda t: None).acquire()
    a._stop.set()  # a stalled process: no more renewals
    a._thread.join()
    b = Lease(fs, f"{root}/k", ttl=0.5, poll=0.05, on_wait=lambda t: None).acquire(timeout=5)
    with pytest.raises(LeaseLost, match="taken over"):
        a.check()
    a.release()  # marks nothing: b's generation is the newest
    b.check()
    b.release()


def test_store_lock_on_a_remote_store_is_a_lease(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_LEASE_SECONDS", "5")
    store = Store(f"memory://lease-store-{uuid.uuid4().hex}")
    key = "ab" * 32
    with store.lock(key) as held:
        assert isinstance(held, Lease) and held.ttl == 5
        assert store.fs.exists(store._p("locks", key, "lease.000000000001"))
        held.check()


def test_lease_seconds_is_validated(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_LEASE_SECONDS", "soon")
    with pytest.raises(ValueError, match="POSTTRAIN_LEASE_SECONDS='soon'"):
        lease_ttl()
    monkeypatch.setenv("POSTTRAIN_LEASE_SECONDS", "0")
    with pytest.raises(ValueError, match="must be > 0"):
        lease_ttl()
