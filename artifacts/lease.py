"""Leases: one builder per content key across processes and nodes, on a remote store.

A local store serialises builders with an OS file lock (`Store.lock`, filelock): the kernel
drops it when its holder dies. An object store has no such lock, so a builder takes a *lease*:

    locks/<key>/lease.<generation>     JSON {owner, host, pid, ttl, beat, expires, released}

- **Take**: list the key's lease objects; if the newest is free (released, or expired), create
  generation + 1 with an *exclusive create* (`fs.open(path, "xb")`: S3 `If-None-Match: *`).
  Of two builders racing for one generation exactly one create succeeds; the other waits.
- **Hold**: a daemon thread rewrites the builder's own object every ttl/3 (`beat` + 1, a new
  `expires`). Only the holder ever writes its generation, so plain overwrites suffice.
- **Expire**: a lease is taken over when its `expires` (holder's clock) is more than `ttl` past,
  or when its content has not changed for `ttl` seconds of the waiter's own monotonic clock
  (robust to clock skew between nodes). A SIGKILLed builder thus blocks a key for at most
  about one `ttl` (POSTTRAIN_LEASE_SECONDS, default 60).
- **Lose**: a holder that finds a newer generation (it stalled past its ttl and was taken
  over) marks the lease lost; `check()` then raises LeaseLost and the builder publishes
  nothing. `check()` is called right before publishing.
- **Give back**: the holder marks its object released; older generations are deleted.

Guarantees by backend (README, "Stores and leases"): s3 (s3fs: AWS S3 since 2024-08, MinIO,
moto) and memory:// (one process) have a real exclusive create; a backend whose `open(..,
"xb")` is not exclusive falls back to create-if-absent (two builders can then race in a window
of one round trip), with a warning that says so.

Run: ``python -c "from artifacts.lease import Lease; help(Lease)"``
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

LEASE_ENV = "POSTTRAIN_LEASE_SECONDS"
DEFAULT_TTL = 60.0
_PREFIX = "lease."


class LeaseLost(RuntimeError):
    """The lease was taken over (the holder stalled past its ttl): publish nothing."""


def lease_ttl() -> float:
    """Seconds a lease lives without a renewal (POSTTRAIN_LEASE_SECONDS, default 60)."""
    raw = os.environ.get(LEASE_ENV, "")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL
    except ValueError:
        raise ValueError(f"{LEASE_ENV}={raw!r} is not a number of seconds; set it to e.g. "
                         "60 or unset it") from None
    if not ttl > 0:
        raise ValueError(f"{LEASE_ENV}={raw!r} must be > 0 seconds")
    return ttl


def _gen(name: str) -> int | None:
    """The generation of a lease object's file name ('lease.000000000003' -> 3), else None.

    >>> _gen("lease.000000000003"), _gen("lease.x"), _gen("other")
    (3, None, None)
    """
    tail = name.rsplit("/", 1)[-1]
    if not tail.startswith(_PREFIX):
        return None
    digits = tail[len(_PREFIX):]
    return int(digits) if digits.isdigit() else None


class Lease:
    """A lease on `dir_path` (a key's folder under locks/) in the fsspec filesystem `fs`."""

    def __init__(self, fs: Any, dir_path: str, ttl: float | None = None,
                 poll: float | None = None, on_wait: Any = None) -> None:
        self.fs, self.dir = fs, dir_path.rstrip("/")
        self.ttl = ttl if ttl is not None else lease_ttl()
        self.poll = poll if poll is not None else min(2.0, self.ttl / 4)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_wait = on_wait or (lambda text: print(text, file=sys.stderr, flush=True))
        self.gen: int | None = None
        self.beat = 0
        self.took_over: str | None = None  # the owner of the expired lease this one replaced
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[int, tuple[str, float]] = {}  # gen -> (content, first seen, monotonic)

    # -- objects ------------------------------------------------------------------------------
    def _path(self, gen: int) -> str:
        return f"{self.dir}/{_PREFIX}{gen:012d}"

    def _generations(self) -> list[int]:
        try:
            names = self.fs.ls(self.dir, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # a backend whose ls takes no `refresh`
            names = self.fs.ls(self.dir, detail=False)
        return sorted(g for g in map(_gen, names) if g is not None)

    def _read(self, gen: int) -> tuple[str, dict[str, Any]] | None:
        """(text, body) of lease `gen`, or None once it is gone. One GET (`cat_file`): an
        open file would refuse to read an object that its holder renewed (s3fs
        `FileExpired`: the ETag changed) or deleted meanwhile; that is retried."""
        for _ in range(20):
            try:
                text = self.fs.cat_file(self._path(gen)).decode()
                break
            except FileNotFoundError:
                return None
            except OSError as e:  # FileExpired (s3fs) and kin: rewritten under us
                if "expired" not in type(e).__name__.lower() and e.errno != 16:
                    raise
                time.sleep(0.05)
        else:
            return None
        try:
            body = json.loads(text)
        except ValueError:
            body = {}
        return text, body if isinstance(body, dict) else {}

    def _body(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "ttl": self.ttl, "beat": self.beat, "renewed": now, "expires": now + self.ttl,
            "released": released}).encode()

    def _create(self, gen: int) -> bool:
        """Exclusive create of generation `gen` with our body; False if it exists."""
        self.fs.makedirs(self.dir, exist_ok=True)
        try:
            with self.fs.open(self._path(gen), "xb") as f:
                f.write(self._body())
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no exclusive create on this backend
            if self.fs.exists(self._path(gen)):
                return False
            print(f"warning: {type(self.fs).__name__} has no exclusive create; the lease on "
                  f"{self.dir} is best effort", file=sys.stderr)
            self.fs.pipe(self._path(gen), self._body())
        return True

    def _free(self, gen: int, body: dict[str, Any], text: str) -> bool:
        """Whether lease `gen` may be taken over: released, or expired by either clock."""
        if body.get("released") or body.get("owner") == self.owner:
            return True
        ttl = float(body.get("ttl") or self.ttl)
        expires = body.get("expires")
        if isinstance(expires, (int, float)) and time.time() > expires + ttl:
            return True  # expired on the holder's clock, with a ttl of margin for skew
        seen = self._seen.get(gen)
        now = time.monotonic()
        if seen is None or seen[0] != text:  # changed (renewed) since last look: live
            self._seen[gen] = (text, now)
            return False
        return now - seen[1] > ttl  # unchanged for a ttl of our own clock

    # -- the lease ----------------------------------------------------------------------------
    def acquire(self, timeout: float | None = None) -> Lease:
        """Block until this process holds the lease (TimeoutError after `timeout` s)."""
        t0, told = time.monotonic(), False
        while True:
            gens = self._generations()
            newest = gens[-1] if gens else 0
            read = self._read(newest) if gens else None
            free = read is None or self._free(newest, read[1], read[0])
            if free and self._create(newest + 1):
                self.gen = newest + 1
                if read and not read[1].get("released"):
                    self.took_over = str(read[1].get("owner"))
                    self.on_wait(f"lease {self.dir}: took over from {self.took_over} "
                                 "(its lease expired)")
                self._cleanup(self.gen)
                self._thread = threading.Thread(target=self._renew, daemon=True,
                                                name="posttrain-lease")
                self._thread.start()
                return self
            if not told and read is not None:
                told = True
                self.on_wait(f"lease {self.dir}: held by {read[1].get('owner', '?')}; waiting "
                             f"(taken over if not renewed within {self.ttl:g} s)")
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"lease {self.dir}: still held after {timeout:g} s")
            time.sleep(self.poll)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.gen is not None and self._generations()[-1:] != [self.gen]:
                    self._lost = (f"lease {self.dir} generation {self.gen} was taken over "
                                  "(this builder stalled past its ttl)")
                    return
                self.beat += 1
                self.fs.pipe(self._path(self.gen), self._body())
            except Exception as e:  # a store hiccup: retried at the next beat, until ttl
                print(f"warning: lease {self.dir}: renewal failed: {e}", file=sys.stderr)

    def check(self) -> None:
        """Raise LeaseLost if another builder took the key over: publish nothing then."""
        if self._lost is None and self.gen is not None and \
                self._generations()[-1:] != [self.gen]:
            self._lost = f"lease {self.dir} generation {self.gen} was taken over"
        if self._lost:
            raise LeaseLost(self._lost + "; run again: the key is built by the other builder")

    def release(self) -> None:
        """Stop renewing and mark the lease released (the next builder takes it at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.gen is not None and self._lost is None:
            try:
                if self._generations()[-1:] == [self.gen]:
                    self.fs.pipe(self._path(self.gen), self._body(released=True))
            except Exception as e:  # it then expires after ttl instead
                print(f"warning: lease {self.dir}: release failed: {e}", file=sys.stderr)
        self.gen = None

    def _cleanup(self, keep: int) -> None:
        for g in self._generations():
            if g < keep:
                try:
                    self.fs.rm(self._path(g))
                except FileNotFoundError:
                    pass

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
