"""The artifact store: one directory per content key, payload first, `manifest.json` last.

Layout under the store root (any fsspec URL: a local path, ``file://``, ``memory://``, ``s3://``):

    objects/<key>/...payload...        a plain HF model dir or a data set dir
    objects/<key>/manifest.json        written last; no manifest = no artifact
    objects/<key>/mlflow.json          MLflow ids, written after publishing (not in `files`)
    refs/<recipe>/<stage>              text file holding a key (`recipe:stage` names)
    tmp/<key>.<nonce>/                 staging (local stores: renamed or swapped into place)
    tmp/<key>.resume/                  a building stage's resumable state (`resume_every`)
    locks/<key>.lock                   one builder per key across processes (local stores)
    locks/<key>/lease.<generation>     the same on remote stores (artifacts/lease.py)

A directory without a manifest does not exist for anyone (`has`, `manifest`, `iter_manifests`,
`resolve` ignore it) and is replaced by the next build. File hashes are computed once, here,
while publishing, and only re-read by `verify`. Keys read back (ref files, manifests) must be 64
lowercase hex, `recipe:stage` parts must match NAME_RE, and a local store resolves every path
it builds and refuses one outside its root (RefError). A full disk is a NoSpaceError that
names the path and the free space (`guard_space`).

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
# The one name rule for recipes and stages (flows/recipe.py imports it): `recipe:stage` parts
# become path components under refs/, so no "/", no leading "." (".", "..", dotfiles) or "-".
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MANIFEST = "manifest.json"
# Written beside the manifest after publishing: the manifest is immutable once published (its
# `files` hashes would change), and MLflow is mirrored only after the artifact is in place.
SIDECAR = "mlflow.json"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Native writers (safetensors, tokenizers) raise their own types; their text says why.
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28",
                  "os error 122")


class _HeldLock:
    """A held OS file lock: the kernel keeps it until release, so it is never lost."""

    def check(self) -> None:
        pass


class RefError(LookupError):
    """A REF that names nothing (or several things) in the store."""


class NoSpaceError(OSError):
    """A write that failed for want of disk space: a user error (exit 2) that names the path,
    the free space left and the fix, instead of a bare `[Errno 28]` traceback."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_key(value: Any, where: str, fix: str) -> str:
    """`value` if it is a content key (64 lowercase hex), else RefError naming it: a key read
    back from a file or a tag becomes a path under objects/ and must not leave it."""
    if not isinstance(value, str) or not KEY_RE.match(value):
        raise RefError(f"{where}: {str(value)[:80]!r} is not a content key (64 lowercase hex "
                       f"digits); {fix}")
    return value


def check_name(value: Any, what: str, ref: str) -> str:
    """`value` if it is a recipe or stage name (NAME_RE), else RefError naming it: names
    become path components under refs/."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RefError(f"{what} {str(value)[:80]!r} in {ref[:120]!r} is not a name (letters, "
                       "digits, _ - ., not starting with . or -); write REF as recipe:stage, "
                       "e.g. mimo_tiny:sft")
    return value


def _snapshot_base(stage: str) -> str:
    """`rl_arith` of a snapshot's ref name `rl_arith@250` (refs/<recipe>/<stage>@<step>
    names a stage's snapshot); anything else as it is, for check_name to judge.

    >>> _snapshot_base("rl_arith@250"), _snapshot_base("sft"), _snapshot_base("x@y")
    ('rl_arith', 'sft', 'x@y')
    """
    base, sep, step = stage.rpartition("@")
    return base if sep and step.isdigit() and base else stage


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_space(path: str | os.PathLike[str]) -> str:
    """'12.0 MB free on /mnt' for the filesystem holding `path` (its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        return f"{_human(shutil.disk_usage(p).free)} free on {mount}"
    except OSError:
        return f"free space on {mount} unknown"


def is_no_space(e: BaseException) -> bool:
    """Whether `e` is a disk-full / quota error (OSError errno, or a native writer's text)."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return True
    return any(t in str(e).lower() for t in _NO_SPACE_TEXT)


def no_space_error(e: BaseException, path: str | os.PathLike[str],
                   hint: str = "point --store / --state-dir elsewhere") -> NoSpaceError:
    """The NoSpaceError for `e` while writing `path` (the OSError's own file name if it has
    one): `no space left on device writing P (12.0 MB free on /mnt); free space or HINT`."""
    where = getattr(e, "filename", None) or path
    err = e.errno if isinstance(e, OSError) and e.errno in _NO_SPACE else errno.ENOSPC
    return NoSpaceError(err, f"no space left on device writing {where} ({free_space(where)}); "
                        f"free space or {hint}")


@contextlib.contextmanager
def guard_space(path: str | os.PathLike[str],
                hint: str = "point --store / --state-dir elsewhere") -> Iterator[None]:
    """Turn a disk-full error raised inside into a NoSpaceError naming `path` and the fix."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as e:
        if is_no_space(e):
            raise no_space_error(e, path, hint) from None
        raise


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


RESUME_SUFFIX = ".resume"  # tmp/<key>.resume/: resumable state, kept across killed builds


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
        self._real = os.path.realpath(self.root) if self.local else self.root

    # -- paths -------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        """A path under the root. For a local store it is resolved (links, `..`) and refused
        if it leaves the root: no name, key or manifest row may reach a file outside it."""
        path = "/".join([self.root, *parts])
        if self.local and parts:
            real = os.path.realpath(path)
            if os.path.commonpath([real, self._real]) != self._real:
                raise RefError(f"{path} resolves to {real}, outside the store {self.root}; "
                               "remove that link (or file) from the store")
        return path

    def object_path(self, key: str) -> str:
        check_key(key, "artifact", "pass a full key, a key prefix or recipe:stage")
        return self._p("objects", key)

    # -- reading -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether `key` is stored (manifest in place); False for a string that is not a key:
        no path is built from it."""
        return bool(isinstance(key, str) and KEY_RE.match(key)) and self.fs.exists(
            self._p("objects", key, MANIFEST))

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of `key` (None when not stored, or for a string that is not a key),
        checked: its `key` field is its directory's and its input keys are keys."""
        if not (isinstance(key, str) and KEY_RE.match(key)):
            return None
        path = self._p("objects", key, MANIFEST)
        try:
            with self.fs.open(path, "r") as f:
                return _checked(json.load(f), key, path)
        except FileNotFoundError:
            return None

    def mlflow_ids(self, key: str) -> dict[str, Any] | None:
        """{tracking_uri, experiment_id, run_id, model_id} of the MLflow run that recorded
        `key` (the SIDECAR beside its manifest; an older manifest's own `mlflow` field), or
        None: MLflow is mirrored after publishing, so the ids are not in the manifest."""
        if not self.has(key):
            return None
        try:
            with self.fs.open(self._p("objects", key, SIDECAR), "r") as f:
                ids = json.load(f)
            return ids if isinstance(ids, dict) else None
        except (FileNotFoundError, ValueError):
            return (self.manifest(key) or {}).get("mlflow") or None

    def set_mlflow_ids(self, key: str, ids: dict[str, Any]) -> None:
        """Record the MLflow ids of a published `key` in its SIDECAR (atomically): written
        after the mirror, never part of the manifest's `files`."""
        path = self._p("objects", check_key(key, "artifact", "pass a stored key"), SIDECAR)
        text = json.dumps(ids, indent=2, sort_keys=True, default=str) + "\n"
        if self.local:
            _atomic_write(Path(path), text)
        else:
            self.fs.pipe(path, text.encode())

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
        # A cached copy is used only while its manifest is the store's: a key rebuilt since
        # (--force, another store at the same key) is downloaded again, never served stale.
        if _read_json(cache / MANIFEST) != self.manifest(key):
            tmp = cache.with_name(f"{key}.{uuid.uuid4().hex[:8]}")
            self.fs.get(self.object_path(key) + "/", str(tmp), recursive=True)
            if cache.exists():
                trash = cache.with_name(f"{key}.{uuid.uuid4().hex[:8]}.old")
                with contextlib.suppress(OSError):
                    os.replace(cache, trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(tmp, cache)
            except OSError:  # another process put a copy there meanwhile: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        return cache

    # -- refs --------------------------------------------------------------------------------
    def set_ref(self, recipe: str, stage: str, key: str) -> None:
        ref = f"{recipe}:{stage}"
        check_name(recipe, "recipe", ref)
        check_name(_snapshot_base(stage), "stage", ref)
        check_key(key, f"ref {ref}", "point a ref at a content key only")
        path = self._p("refs", recipe, stage)
        if self.local:
            _atomic_write(Path(path), key + "\n")
        else:
            self.fs.pipe(path, (key + "\n").encode())

    def get_ref(self, recipe: str, stage: str) -> str | None:
        """The key `recipe:stage` names, or None; RefError for a bad name or a ref file that
        holds anything but a key (it would become a path under objects/)."""
        ref = f"{recipe}:{stage}"
        check_name(recipe, "recipe", ref)
        check_name(_snapshot_base(stage), "stage", ref)
        path = self._p("refs", recipe, stage)
        try:
            with self.fs.open(path, "r") as f:
                text = f.read(200).strip()
        except FileNotFoundError:
            return None
        if not text:
            return None
        return check_key(text, f"ref {ref} ({path})",
                         f"delete {path} and rebuild the stage (posttrain run RECIPE)")

    def refs(self) -> dict[str, str]:
        """{"recipe:stage": key} for every named ref."""
        out: dict[str, str] = {}
        try:
            recipes = self.fs.ls(self._p("refs"), detail=False)
        except FileNotFoundError:
            return out
        for rdir in recipes:
            recipe = rdir.rstrip("/").rsplit("/", 1)[-1]
            if not NAME_RE.match(recipe):  # a stray file: no `recipe:stage` can name it
                continue
            for sfile in self.fs.ls(rdir, detail=False):
                stage = sfile.rstrip("/").rsplit("/", 1)[-1]
                if not NAME_RE.match(_snapshot_base(stage)):  # atomic_write's temp files
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
            key = self.get_ref(recipe, stage)  # checks both names, and the key it reads
            if key is None or not self.has(key):
                try:
                    names = sorted(self.refs())
                except RefError:  # another ref is corrupt: it has its own error when used
                    names = []
                known = ", ".join(names[:20]) or "none yet"
                raise RefError(f"no ref {ref!r} in {self.uri} (known refs: {known})")
            return key
        if PREFIX_RE.match(ref):
            hits = [k for k in self.keys() if k.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if not hits:
                raise RefError(f"no artifact key starts with {ref!r} in {self.uri}")
            raise RefError(f"key prefix {ref!r} is ambiguous: {', '.join(h[:12] for h in hits)}")
        why = ""
        if re.fullmatch(r"[0-9a-fA-F]+", ref):
            why = (f" (keys are lowercase: {ref.lower()})" if ref != ref.lower() else
                   " (a key prefix needs at least 8 hex digits)" if len(ref) < 8 else
                   " (longer than a key: 64 hex digits)")
        raise RefError(
            f"{ref[:80]!r} is not a key, a key prefix of >= 8 hex digits, or recipe:stage{why}"
            " (keys are 64 lowercase hex digits)"
        )

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[Any]:
        """One builder of `key` at a time, across processes and nodes. Yields a handle whose
        `check()` raises LeaseLost when the key was taken over (call it right before
        publishing). Local stores: an OS file lock (released by the kernel if the holder
        dies). Remote stores: a renewed lease object under locks/<key>/ (artifacts/lease.py),
        taken over once it expires (POSTTRAIN_LEASE_SECONDS)."""
        check_key(key, "lock", "lock a content key")
        if not self.local:
            from artifacts.lease import Lease

            lease = Lease(self.fs, self._p("locks", key))
            with lease:
                yield lease
            return
        from filelock import FileLock

        path = Path(self._p("locks", f"{key}.lock"))
        lock = FileLock(str(path))
        with guard_space(path, "point --store elsewhere"):  # the lock file, not the body
            path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            yield _HeldLock()
        finally:
            lock.release()

    def staging_dir(self, key: str) -> Path:
        """A fresh local directory to build `key`'s payload in (inside the store when local,
        so publishing is a rename, not a copy). Call it holding `lock(key)`."""
        check_key(key, "staging", "build a content key")
        base = Path(self._p("tmp")) if self.local else Path(tempfile.gettempdir()) / "posttrain-tmp"
        with guard_space(base, "point --store elsewhere"):
            base.mkdir(parents=True, exist_ok=True)
            # Builders of `key` hold `lock(key)`: a staging dir of that key left now is dead.
            # Not its resumable state (`resume_dir`), which outlives a killed build on purpose.
            for stale in base.glob(f"{key}.*"):
                if stale.name != f"{key}{RESUME_SUFFIX}":
                    shutil.rmtree(stale, ignore_errors=True)
            d = base / f"{key}.{uuid.uuid4().hex[:8]}"
            d.mkdir()
        return d

    def resume_dir(self, key: str, state_dir: str | os.PathLike[str]) -> Path:
        """A stable local directory for `key`'s resumable training state (tasks/resume.py):
        `tmp/<key>.resume/` in a local store (beside staging, never an artifact), else
        `<state_dir>/resume/<key>/`. The builder removes it once `key` is published."""
        check_key(key, "resume", "build a content key")
        if self.local:
            return Path(self._p("tmp", f"{key}{RESUME_SUFFIX}"))
        return Path(state_dir) / "resume" / key

    def publish(self, key: str, staged: Path, manifest: dict[str, Any],
                before_manifest: Any = None) -> dict[str, Any]:
        """Make `staged` the artifact `key`: manifest.json written last. Returns the manifest.

        Local stores finish the artifact in staging (payload, then manifest) and then make it
        visible in one step: a rename, or for a forced rebuild of an existing key an atomic
        exchange with the old copy, so a rebuild killed at any point leaves the old artifact
        whole. Remote stores upload the payload, then the manifest; a rebuild there uploads the
        new payload beside the old one first (`_publish_remote`). `before_manifest` is a hook
        for fault-injection tests. A full disk is a NoSpaceError naming the path and the free
        space.
        """
        if (staged / SIDECAR).exists():
            raise ValueError(f"{staged / SIDECAR}: {SIDECAR} is reserved for the store's MLflow "
                             "ids; the stage kind must not write a payload file of that name")
        with guard_space(self.object_path(key), "point --store elsewhere"):
            return self._publish(key, staged, manifest, before_manifest)

    def _publish(self, key: str, staged: Path, manifest: dict[str, Any],
                 before_manifest: Any) -> dict[str, Any]:
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
            self._publish_remote(key, staged, manifest, text, before_manifest)
        return manifest

    def _publish_remote(self, key: str, staged: Path, manifest: dict[str, Any], text: str,
                        before_manifest: Any) -> None:
        """Object stores have no rename: a new key is uploaded in place, manifest last. A
        forced rebuild of a stored key uploads the whole new payload beside it first
        (tmp/<key>.<nonce>/), so a rebuild that dies while uploading leaves the old artifact
        whole and readable; only then is the old manifest removed, the new files copied over
        server-side, stale files removed and the new manifest written."""
        dest = self.object_path(key)
        old = self.fs.exists(f"{dest}/{MANIFEST}")
        if not old and self.fs.exists(dest):  # a manifest-less leftover: invisible, replaced
            self.fs.rm(dest, recursive=True)
        upload = self._p("tmp", f"{key}.{uuid.uuid4().hex[:8]}") if old else dest
        for row in manifest["files"]:
            self.fs.put_file(str(staged / row["path"]), f"{upload}/{row['path']}")
        if before_manifest:
            before_manifest()
        if old:
            new_files = {row["path"] for row in manifest["files"]}
            self.fs.rm_file(f"{dest}/{MANIFEST}")  # from here to the new manifest: no artifact
            for row in manifest["files"]:
                self.fs.copy(f"{upload}/{row['path']}", f"{dest}/{row['path']}")
            for path in self.fs.find(dest):
                rel = path.split(f"objects/{key}/", 1)[-1]
                if rel not in new_files and rel not in (MANIFEST, SIDECAR):
                    self.fs.rm_file(path)
            if self.fs.exists(f"{dest}/{SIDECAR}"):  # the old run's MLflow ids
                self.fs.rm_file(f"{dest}/{SIDECAR}")
        self.fs.pipe(f"{dest}/{MANIFEST}", text.encode())
        if old:
            self.fs.rm(upload, recursive=True)
        shutil.rmtree(staged, ignore_errors=True)

    def verify(self, key: str) -> list[str]:
        """Re-hash every payload file against the manifest; returns the problems found."""
        m = self.manifest(key)
        if m is None:
            return [f"{key[:12]}: no manifest"]
        # Read the store itself, never local_path's download cache (it may predate a change),
        # and only inside the artifact's own directory.
        problems = []
        for row in m.get("files", []):
            parts = str(row["path"]).split("/")
            if row["path"].startswith("/") or ".." in parts:  # a row may not leave its object
                problems.append(f"{row['path']}: outside the artifact's directory")
                continue
            p = self._p("objects", key, *parts)
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


def _checked(m: Any, key: str, path: str) -> dict[str, Any]:
    """A manifest read back, refused (RefError) unless its `key` is its directory's and every
    input key is a content key: keys read from files become paths and MLflow filters."""
    fix = f"delete {path.rsplit('/', 1)[0]} and rebuild its stage (posttrain run RECIPE --force)"
    if not isinstance(m, dict):
        raise RefError(f"{path}: not a manifest (a JSON object); {fix}")
    if m.get("key") != key:
        check_key(m.get("key"), f"{path}: field key", fix)
        raise RefError(f"{path}: field key {m['key'][:12]} is not its directory's {key[:12]}; "
                       f"{fix}")
    inputs = m.get("inputs") or {}
    for role, value in (inputs.items() if isinstance(inputs, dict) else [("inputs", inputs)]):
        for v in value.values() if isinstance(value, dict) else [value]:
            if v:
                check_key(v, f"{path}: inputs.{role}", fix)
    return m


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers see the old or the new file, never half; a
    full disk is a NoSpaceError naming `path` and the free space."""
    with guard_space(path):
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
