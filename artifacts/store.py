"""The artifact store: one directory per content key, payload first, `manifest.json` last.

Layout under the store root (any fsspec URL: a local path, ``file://``, ``memory://``, ``s3://``):

    objects/<key>/...payload...        a plain HF model dir or a data set dir
    objects/<key>/manifest.json        written last; no manifest = no artifact
    refs/<recipe>/<stage>              text file holding a key (`recipe:stage` names)
    tmp/<key>.<nonce>/                 staging (local stores: renamed or swapped into place)
    locks/<key>.lock                   one builder per key across processes (local stores)

A directory without a manifest does not exist for anyone (`has`, `manifest`, `iter_manifests`,
`resolve` ignore it) and is replaced by the next build. File hashes are computed once, here,
while publishing, and only re-read by `verify`.

Run: ``python -c "from artifacts.store import Store; print(Store('.posttrain/store').refs())"``
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

# Where a local run keeps its store and its state (Prefect home, MLflow sqlite, run logs).
DEFAULT_STORE = os.environ.get("POSTTRAIN_STORE", ".posttrain/store")
DEFAULT_STATE = os.environ.get("POSTTRAIN_HOME", ".posttrain")
KEY_RE = re.compile(r"^[0-9a-f]{64}$")
PREFIX_RE = re.compile(r"^[0-9a-f]{8,64}$")
MANIFEST = "manifest.json"


class RefError(LookupError):
    """A REF that names nothing (or several things) in the store."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> list[dict[str, Any]]:
    """[{path, size, sha256}] for every file below `root`, sorted (the manifest's `files`)."""
    rows = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rows.append(
                {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                 "sha256": _sha256_file(p)}
            )
    return rows


class Store:
    """An fsspec-backed content-addressed store of stage artifacts."""

    def __init__(self, uri: str | os.PathLike[str] = ".posttrain/store") -> None:
        uri = str(uri)
        self.fs, root = fsspec.core.url_to_fs(uri)
        proto = self.fs.protocol
        self.protocol = proto if isinstance(proto, str) else proto[0]
        self.local = self.protocol in ("file", "local")
        self.root = root.rstrip("/") if root != "/" else root
        self.uri = uri if "://" in uri else str(Path(root).absolute())
        if self.local:
            self.root = str(Path(self.root).absolute())

    # -- paths -------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def object_path(self, key: str) -> str:
        return self._p("objects", key)

    # -- reading -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self.fs.exists(self._p("objects", key, MANIFEST))

    def manifest(self, key: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._p("objects", key, MANIFEST), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def keys(self) -> list[str]:
        try:
            names = self.fs.ls(self._p("objects"), detail=False)
        except FileNotFoundError:
            return []
        keys = [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
        return sorted(k for k in keys if KEY_RE.match(k) and self.has(k))

    def iter_manifests(self) -> Iterator[dict[str, Any]]:
        for key in self.keys():
            m = self.manifest(key)
            if m is not None:
                yield m

    def local_path(self, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local directory with the payload of `key` (downloaded once for remote stores)."""
        if not self.has(key):
            raise RefError(f"artifact {key[:12]} is not in the store {self.uri}")
        if self.local:
            return Path(self.object_path(key))
        cache = Path(cache_dir or Path(tempfile.gettempdir()) / "posttrain-cache") / key
        if not (cache / MANIFEST).exists():
            tmp = cache.with_name(f"{key}.{uuid.uuid4().hex[:8]}")
            self.fs.get(self.object_path(key) + "/", str(tmp), recursive=True)
            if cache.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, cache)
        return cache

    # -- refs --------------------------------------------------------------------------------
    def set_ref(self, recipe: str, stage: str, key: str) -> None:
        path = self._p("refs", recipe, stage)
        if self.local:
            _atomic_write(Path(path), key + "\n")
        else:
            self.fs.pipe(path, (key + "\n").encode())

    def get_ref(self, recipe: str, stage: str) -> str | None:
        try:
            with self.fs.open(self._p("refs", recipe, stage), "r") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def refs(self) -> dict[str, str]:
        """{"recipe:stage": key} for every named ref."""
        out: dict[str, str] = {}
        try:
            recipes = self.fs.ls(self._p("refs"), detail=False)
        except FileNotFoundError:
            return out
        for rdir in recipes:
            recipe = rdir.rstrip("/").rsplit("/", 1)[-1]
            for sfile in self.fs.ls(rdir, detail=False):
                stage = sfile.rstrip("/").rsplit("/", 1)[-1]
                if stage.startswith("."):
                    continue
                key = self.get_ref(recipe, stage)
                if key:
                    out[f"{recipe}:{stage}"] = key
        return out

    def resolve(self, ref: str) -> str:
        """A key from a full key, a unique key prefix (>= 8 hex), or `recipe:stage`."""
        ref = ref.strip()
        if KEY_RE.match(ref):
            if not self.has(ref):
                raise RefError(f"no artifact with key {ref} in {self.uri}")
            return ref
        if ":" in ref and "://" not in ref:
            recipe, stage = ref.split(":", 1)
            key = self.get_ref(recipe, stage)
            if key is None or not self.has(key):
                known = ", ".join(sorted(self.refs())[:20]) or "none yet"
                raise RefError(f"no ref {ref!r} in {self.uri} (known refs: {known})")
            return key
        if PREFIX_RE.match(ref):
            hits = [k for k in self.keys() if k.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if not hits:
                raise RefError(f"no artifact key starts with {ref!r} in {self.uri}")
            raise RefError(f"key prefix {ref!r} is ambiguous: {', '.join(h[:12] for h in hits)}")
        raise RefError(
            f"{ref!r} is not a key, a key prefix of >= 8 hex digits, or recipe:stage"
        )

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Serialise builders of one key across processes (a no-op lock for remote stores)."""
        if not self.local:
            yield
            return
        from filelock import FileLock

        path = Path(self._p("locks", f"{key}.lock"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path)):
            yield

    def staging_dir(self, key: str) -> Path:
        """A fresh local directory to build `key`'s payload in (inside the store when local,
        so publishing is a rename, not a copy). Call it holding `lock(key)`."""
        base = Path(self._p("tmp")) if self.local else Path(tempfile.gettempdir()) / "posttrain-tmp"
        base.mkdir(parents=True, exist_ok=True)
        # Builders of `key` hold `lock(key)`: a staging dir of that key left now is a dead one's.
        for stale in base.glob(f"{key}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        d = base / f"{key}.{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return d

    def publish(self, key: str, staged: Path, manifest: dict[str, Any],
                before_manifest: Any = None) -> dict[str, Any]:
        """Make `staged` the artifact `key`: manifest.json written last. Returns the manifest.

        Local stores finish the artifact in staging (payload, then manifest) and then make it
        visible in one step: a rename, or for a forced rebuild of an existing key an atomic
        exchange with the old copy, so a rebuild killed at any point leaves the old artifact
        whole. Remote stores upload the payload, then the manifest; there a rebuild removes the
        old copy first. `before_manifest` is a hook for fault-injection tests.
        """
        manifest = dict(manifest, key=key, files=file_table(staged))
        text = json.dumps(manifest, indent=2, sort_keys=True)
        dest = self.object_path(key)
        if self.local:
            if before_manifest:
                before_manifest()
            _atomic_write(staged / MANIFEST, text)
            dest_p = Path(dest)
            dest_p.parent.mkdir(parents=True, exist_ok=True)
            if (dest_p / MANIFEST).exists() and _exchange(staged, dest_p):
                shutil.rmtree(staged, ignore_errors=True)  # now the old copy
                return manifest
            if dest_p.exists():  # a manifest-less leftover, or no atomic exchange here
                trash = Path(self._p("tmp")) / f"trash.{key}.{uuid.uuid4().hex[:8]}"
                os.replace(dest_p, trash)
                os.replace(staged, dest_p)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staged, dest_p)
        else:
            if self.fs.exists(dest):
                self.fs.rm(dest, recursive=True)
            for row in manifest["files"]:
                self.fs.put_file(str(staged / row["path"]), f"{dest}/{row['path']}")
            if before_manifest:
                before_manifest()
            self.fs.pipe(f"{dest}/{MANIFEST}", text.encode())
            shutil.rmtree(staged, ignore_errors=True)
        return manifest

    def verify(self, key: str) -> list[str]:
        """Re-hash every payload file against the manifest; returns the problems found."""
        m = self.manifest(key)
        if m is None:
            return [f"{key[:12]}: no manifest"]
        # Read the store itself, never local_path's download cache (it may predate a change).
        root = self.object_path(key)
        problems = []
        for row in m.get("files", []):
            p = f"{root}/{row['path']}"
            if not self.fs.isfile(p):
                problems.append(f"{row['path']}: missing")
                continue
            h = hashlib.sha256()
            with self.fs.open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
            if self.fs.size(p) != row["size"] or h.hexdigest() != row["sha256"]:
                problems.append(f"{row['path']}: content differs from the manifest")
        return problems


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem says no
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


atomic_write = _atomic_write
