"""Check a stage's input artifacts against their manifests before the stage reads them.

A stored artifact's manifest lists every payload file as `{path, size, sha256}` (computed once,
at publish, artifacts/store.py `file_table`). Content keys describe what *should* be there
(parent keys stand in for parent bytes), so a flipped byte in a parent checkpoint, a truncated
copy or a file planted after publishing would otherwise be trained on silently and the new
manifest would cite the clean key. `check` compares each input's payload with its manifest:

- `size` mode: every listed file exists and has its listed size; no unlisted file is present
  (a planted file is an error too: a Hugging Face loader may read it, e.g. an extra shard or a
  `*.py` next to the config);
- `hash` mode (the default): the same, plus each file's sha256.

Hashing is sequential within a file, so it runs in parallel across files (a thread pool over
every file of every input, largest first); each worker reads with one reused 8 MiB buffer, and
hashlib releases the GIL on updates that large, so N threads hash about N files at once.

A mismatch raises `StageInputError` (exit 2) naming, per input, its label, the file, expected
vs found size or hash, and the fix the caller supplies (`posttrain verify KEY`, then rebuild).

Run: ``.venv/bin/python bench/verify_inputs.py`` times it; flows/stage.py calls `check`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from artifacts.refs import StageInputError
from artifacts.store import MANIFEST, SIDECAR

MODES = ("hash", "size")
DEFAULT_MODE = "hash"
# Top-level files of an object dir that are not payload: the manifest, and the MLflow ids the
# store writes beside it after publishing (artifacts/store.py); neither is in `files`.
NOT_PAYLOAD = (MANIFEST, SIDECAR)
BUFFER = 8 << 20  # bytes per read: big enough that hashlib drops the GIL for the whole update
SHOWN = 6  # problems listed per input in the one-line error; the rest are counted


@dataclass(frozen=True)
class Input:
    """One input artifact to check: where its payload is and what its manifest promises."""

    label: str  # how the error names it, e.g. "input init (stage 'sft')"
    key: str
    root: Path  # local payload directory (the store's object dir, or a remote store's cache)
    manifest: Mapping[str, Any]
    fix: str  # what to run when it does not match


def sha256_file(path: str | os.PathLike[str], buffer: int = BUFFER) -> str:
    """sha256 of a file, read into one reused buffer (no per-block allocation)."""
    h = hashlib.sha256()
    buf = bytearray(buffer)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def workers_default() -> int:
    """Threads for hashing: the CPUs this process may use (cgroup/affinity aware), at most 32."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(32, n))


def _safe(rel: Any) -> bool:
    """A manifest path names a file inside the payload: relative, no `..`, not empty."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == rel


def _present(root: Path) -> set[str]:
    """Payload-relative paths of every non-directory entry below `root` (symlinks included,
    a symlink to a directory as one entry: it is not followed), minus NOT_PAYLOAD on top."""
    out: set[str] = set()
    for here, dirs, files in os.walk(root, followlinks=False):
        base = Path(here)
        names = list(files) + [d for d in dirs if (base / d).is_symlink()]
        for name in names:
            rel = (base / name).relative_to(root).as_posix()
            if rel not in NOT_PAYLOAD:
                out.add(rel)
    return out


def _fmt_size(n: int) -> str:
    return f"{n} bytes" if n < 10_000 else f"{n} bytes ({n / (1 << 20):.1f} MiB)"


def check(inputs: list[Input], mode: str = DEFAULT_MODE, *, stage: str = "",
          workers: int | None = None) -> dict[str, Any]:
    """Check every input; return `{"mode", "inputs", "files", "bytes", "seconds"}` (what the
    manifest records as `inputs_verified`), or raise StageInputError listing the mismatches."""
    if mode not in MODES:
        raise ValueError(f"verify_inputs mode {mode!r}: use one of {', '.join(MODES)}")
    t0 = time.perf_counter()
    problems: dict[int, list[str]] = {}
    to_hash: list[tuple[int, Path, str, int]] = []  # (input index, file, expected sha, size)
    n_files = n_bytes = 0
    for i, inp in enumerate(inputs):
        found = problems.setdefault(i, [])
        rows = inp.manifest.get("files")
        if not isinstance(rows, list):
            found.append("its manifest has no `files` table to check against")
            continue
        if not inp.root.is_dir():
            found.append(f"{inp.root}: payload directory missing")
            continue
        present = _present(inp.root)
        listed: set[str] = set()
        for row in rows:
            rel = row.get("path") if isinstance(row, Mapping) else None
            if not _safe(rel):
                found.append(f"manifest entry {rel!r} is not a path inside the payload")
                continue
            listed.add(rel)
            path = inp.root / rel
            if not path.is_file():
                found.append(f"{path}: missing (listed in the manifest)")
                continue
            size, want = path.stat().st_size, row.get("size")
            n_files += 1
            n_bytes += size
            if size != want:
                found.append(f"{path}: size {_fmt_size(size)}, manifest says "
                             f"{_fmt_size(want) if isinstance(want, int) else repr(want)}")
            elif mode == "hash":
                to_hash.append((i, path, str(row.get("sha256")), size))
        for rel in sorted(present - listed):
            found.append(f"{inp.root / rel}: not in the manifest (a file added after publishing)")
    if to_hash:
        to_hash.sort(key=lambda t: -t[3])  # largest first: the pool finishes together
        n = min(len(to_hash), workers or workers_default())
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="verify") as pool:
            digests = list(pool.map(lambda t: sha256_file(t[1]), to_hash))
        for (i, path, want, _), got in zip(to_hash, digests, strict=True):
            if got != want:
                problems[i].append(f"{path}: sha256 {got[:16]}.., manifest says {want[:16]}..")
    bad = [(inputs[i], ps) for i, ps in problems.items() if ps]
    if bad:
        who = f"stage {stage!r}: " if stage else ""
        parts = []
        for inp, ps in bad:
            shown = "; ".join(sorted(ps)[:SHOWN])
            more = f"; and {len(ps) - SHOWN} more" if len(ps) > SHOWN else ""
            parts.append(f"{who}{inp.label} (key {inp.key[:12]}) does not match its manifest "
                         f"({len(ps)} problem(s), checked by {mode}): {shown}{more}; fix: "
                         f"{inp.fix}")
        raise StageInputError(" | ".join(parts))
    return {"mode": mode, "inputs": len(inputs), "files": n_files, "bytes": n_bytes,
            "seconds": round(time.perf_counter() - t0, 3)}
