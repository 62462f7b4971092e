"""What checking a stage's inputs against their manifests costs (artifacts/verify.py).

Before a stage trains, `posttrain stage` checks every input artifact's files against its
manifest: sizes always, sha256 unless the stage says `verify_inputs: size`. This times that
check, through `artifacts.verify.check` on artifacts published with `Store.publish`, at:

- demo size: the base model recipes/mimo_tiny.yaml builds (tasks.models.build_tokenizer /
  build_tiny_model / save_model, with that recipe's `base` config), one input;
- 1 GiB per input: one file of random bytes per input (1 and 2 inputs: the pool hashes files in
  parallel, so 2 inputs cost about 1 on >= 2 free cores), page cache warm (just written) and
  cold (evicted with posix_fadvise DONTNEED before each pass: read from disk);

each in `hash` and `size` mode, side by side with `sha256sum` and `cp` of the same files (the
floor of any content check, and what reading and writing them once costs), printed as a ratio.
Everything lives in one temporary directory that is deleted at the end, errors included.

Run: ``.venv/bin/python bench/verify_inputs.py [--repeats 3] [--gib 1] [--dir /tmp]``
(about a minute on 2 cores; needs 2 x (inputs x GiB) of free disk while it runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from artifacts import verify  # noqa: E402
from artifacts.store import Store  # noqa: E402

MIB = 1 << 20


def _median(fn: Callable[[], Any], repeats: int, before: Callable[[], None] | None = None
            ) -> float:
    """Median wall time of `fn` over `repeats` runs (`before` each, untimed)."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _publish(store: Store, staged: Path, name: str) -> verify.Input:
    import hashlib

    key = hashlib.sha256(name.encode()).hexdigest()
    store.publish(key, staged, {"format": 1, "recipe": "bench", "stage": name, "kind": "base",
                                "produces": "model"})
    return verify.Input(f"input {name}", key, Path(store.object_path(key)), store.manifest(key),
                        "(bench)")


def _demo_model(staged: Path) -> None:
    """The demo's base model, as recipes/mimo_tiny.yaml configures it."""
    import yaml

    from tasks.models import build_tiny_model, build_tokenizer, save_model

    base = yaml.safe_load((ROOT / "recipes" / "mimo_tiny.yaml").read_text())["stages"]["base"]
    shape = {k: base[k] for k in ("hidden_size", "num_layers", "num_heads",
                                  "intermediate_size")}
    tok = build_tokenizer()
    save_model(build_tiny_model(tok, **shape), tok, staged)


def _random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MIB)
            f.write(os.urandom(n))
            left -= n


def _row(label: str, inputs: list[verify.Input], repeats: int, cold: bool, tmp: Path) -> None:
    files = sorted(p for i in inputs for p in i.root.rglob("*") if p.is_file()
                   and p.name not in verify.NOT_PAYLOAD)
    size = sum(p.stat().st_size for p in files)
    before = (lambda: _evict(files)) if cold else None
    t_hash = _median(lambda: verify.check(inputs, "hash"), repeats, before)
    t_size = _median(lambda: verify.check(inputs, "size"), repeats, before)
    t_sum = _median(lambda: subprocess.run(["sha256sum", *map(str, files)], check=True,
                                           stdout=subprocess.DEVNULL), repeats, before)
    dest = tmp / "cp-dest"

    def cp() -> None:  # one cp per file: inputs share file names (model.safetensors)
        dest.mkdir(exist_ok=True)
        for i, f in enumerate(files):
            subprocess.run(["cp", str(f), str(dest / f"{i}.{f.name}")], check=True)

    def clean() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        if before:
            before()

    t_cp = _median(cp, repeats, clean)
    shutil.rmtree(dest, ignore_errors=True)
    print(f"{label:<26} {len(files):>5} {size / MIB:>9.1f} {t_hash * 1e3:>10.1f} "
          f"{t_size * 1e3:>9.2f} {t_sum * 1e3:>11.1f} {t_cp * 1e3:>9.1f} "
          f"{t_hash / t_sum:>11.2f} {t_hash / t_cp:>9.2f} {size / MIB / t_hash:>9.0f}",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.0, help="size of each big input, in GiB")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temp files go")
    args = ap.parse_args()
    print(f"verify_inputs bench: {verify.workers_default()} hashing thread(s), "
          f"{args.repeats} repeats (median), in {args.dir}", flush=True)
    print(f"{'case':<26} {'files':>5} {'MiB':>9} {'hash ms':>10} {'size ms':>9} "
          f"{'sha256sum':>11} {'cp ms':>9} {'hash/sum':>11} {'hash/cp':>9} {'MiB/s':>9}")
    with tempfile.TemporaryDirectory(prefix="posttrain-verify-bench-", dir=args.dir) as d:
        tmp = Path(d)
        store = Store(tmp / "store")
        _demo_model(tmp / "demo")
        demo = [_publish(store, tmp / "demo", "demo_base")]
        _row("demo base model (warm)", demo, args.repeats, False, tmp)
        big = []
        for i in range(2):
            staged = tmp / f"big{i}"
            _random_file(staged / "model.safetensors", int(args.gib * (1 << 30)))
            big.append(_publish(store, staged, f"big{i}"))
        for n in (1, 2):
            for cold in (False, True):
                _row(f"{n} x {args.gib:g} GiB ({'cold' if cold else 'warm'})", big[:n],
                     args.repeats, cold, tmp)
    print(f"(deleted {d})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
