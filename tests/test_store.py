"""The artifact store, on a local path and on ``memory://`` (a fresh root per test).

Payload first, manifest.json last; a directory without a manifest does not exist for anyone and
is replaced by the next publish; refs and key resolution; verify; forced republish; staging
clean-up; concurrent publishers; a crash between payload and manifest.

Run: ``.venv/bin/python -m pytest tests/test_store.py -q``
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from artifacts.store import MANIFEST, RefError, Store


def _key(prefix: str = "") -> str:
    """A fresh 64-hex key (random, so the memory store and the download cache never collide)."""
    return (prefix + hashlib.sha256(uuid.uuid4().bytes).hexdigest())[:64]


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "file":
        yield Store(tmp_path / "store")
        return
    root = f"memory://posttrain-test-{uuid.uuid4().hex}"
    s = Store(root)
    try:
        yield s
    finally:
        if s.fs.exists(s.root):
            s.fs.rm(s.root, recursive=True)


def _stage(store: Store, key: str, files: dict[str, bytes]) -> Path:
    staged = store.staging_dir(key)
    for rel, data in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
    return staged


def _publish(store: Store, key: str, files: dict[str, bytes] | None = None,
             stage: str = "sft", **hook: object) -> dict:
    files = {"config.json": b"{}", "model.safetensors": b"\1" * 100} if files is None else files
    staged = _stage(store, key, files)
    return store.publish(key, staged, {"recipe": "r", "stage": stage, "kind": "sft"}, **hook)


def _files(store: Store, key: str) -> set[str]:
    """Payload file names under objects/<key>, manifest included, straight from the fs."""
    root = store.object_path(key)
    if not store.fs.exists(root):
        return set()
    return {p[len(root) + 1:] for p in store.fs.find(root)}


def _staging_left(store: Store) -> list[str]:
    if store.local:
        tmp = Path(store.root) / "tmp"
        return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
    return []


# -- publish ---------------------------------------------------------------------------------

def test_publish_writes_payload_then_manifest(store: Store) -> None:
    key = _key()
    seen: dict[str, object] = {}

    def hook() -> None:  # runs after the payload is complete, before the manifest
        seen["files"] = _files(store, key)
        seen["has"] = store.has(key)

    m = _publish(store, key, {"config.json": b'{"a": 1}', "sub/w.bin": b"\0" * 10},
                 before_manifest=hook)
    # Local stores finish the artifact in staging and rename it into place in one step;
    # remote stores upload the payload first, invisible until the manifest lands.
    landed = set() if store.local else {"config.json", "sub/w.bin"}
    assert seen == {"files": landed, "has": False}
    assert store.has(key)
    assert _files(store, key) == {"config.json", "sub/w.bin", MANIFEST}
    assert store.manifest(key) == m
    assert m["key"] == key and m["stage"] == "sft"
    assert m["files"] == [
        {"path": "config.json", "size": 8, "sha256": hashlib.sha256(b'{"a": 1}').hexdigest()},
        {"path": "sub/w.bin", "size": 10, "sha256": hashlib.sha256(b"\0" * 10).hexdigest()},
    ]
    assert store.keys() == [key]
    assert [x["key"] for x in store.iter_manifests()] == [key]


def test_staging_dirs_are_cleaned(store: Store) -> None:
    key = _key()
    staged = _stage(store, key, {"w.bin": b"x"})
    if store.local:  # staged inside the store, so publishing is a rename
        assert Path(store.root) in staged.parents
    store.publish(key, staged, {"stage": "s"})
    assert not staged.exists()
    assert _staging_left(store) == []
    _publish(store, key)  # a forced republish leaves no trash behind either
    assert _staging_left(store) == []


def test_staging_leftovers_of_a_killed_builder_go_with_the_next_build(store: Store) -> None:
    key, other = _key(), _key()
    dead = _stage(store, key, {"w.bin": b"x"})  # a builder SIGKILLed before its `finally`
    busy = _stage(store, other, {"w.bin": b"y"})
    fresh = store.staging_dir(key)  # the next builder of `key` (it holds lock(key))
    assert not dead.exists() and fresh.exists() and busy.exists()


def test_republish_replaces_the_old_artifact(store: Store) -> None:
    key = _key()
    _publish(store, key, {"old.bin": b"old", "config.json": b"1"})
    m = _publish(store, key, {"config.json": b"2"}, stage="again")
    assert _files(store, key) == {"config.json", MANIFEST}
    assert store.manifest(key) == m and m["stage"] == "again"
    with store.fs.open(store.object_path(key) + "/config.json", "rb") as f:
        assert f.read() == b"2"
    assert store.verify(key) == []


def test_concurrent_publishers_of_different_keys(store: Store) -> None:
    keys = [_key() for _ in range(2)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(keys))

    def work(key: str) -> None:
        try:
            staged = _stage(store, key, {f"{key[:6]}.bin": key.encode() * 1000})
            barrier.wait(timeout=10)
            store.publish(key, staged, {"stage": key[:6]})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert store.keys() == sorted(keys)
    for k in keys:
        assert store.verify(k) == []
        assert _files(store, k) == {f"{k[:6]}.bin", MANIFEST}
    assert _staging_left(store) == []


# -- no manifest, no artifact ----------------------------------------------------------------

def _assert_invisible(store: Store, key: str) -> None:
    assert not store.has(key)
    assert store.manifest(key) is None
    assert key not in store.keys()
    assert all(m["key"] != key for m in store.iter_manifests())
    with pytest.raises(RefError, match="no artifact with key"):
        store.resolve(key)
    with pytest.raises(RefError, match="no artifact key starts with"):
        store.resolve(key[:10])
    with pytest.raises(RefError, match="not in the store"):
        store.local_path(key, cache_dir="/nonexistent")
    assert store.verify(key) == [f"{key[:12]}: no manifest"]


def test_directory_without_manifest_is_invisible_and_replaced(store: Store) -> None:
    key = _key()
    leftover = f"{store.object_path(key)}/model.safetensors"
    store.fs.makedirs(store.object_path(key), exist_ok=True)
    store.fs.pipe(leftover, b"half-written")
    store.set_ref("r", "sft", key)  # even a ref pointing at it does not make it exist
    _assert_invisible(store, key)
    with pytest.raises(RefError, match="no ref 'r:sft'"):
        store.resolve("r:sft")
    _publish(store, key, {"config.json": b"{}"})
    assert _files(store, key) == {"config.json", MANIFEST}  # the leftover is gone
    assert store.resolve("r:sft") == key


def test_crash_between_payload_and_manifest_leaves_nothing_visible(store: Store) -> None:
    key = _key()

    class Killed(Exception):
        pass

    def crash() -> None:
        raise Killed("killed between payload and manifest")

    staged = _stage(store, key, {"model.safetensors": b"\7" * 64, "config.json": b"{}"})
    with pytest.raises(Killed):
        store.publish(key, staged, {"stage": "sft"}, before_manifest=crash)
    shutil.rmtree(staged, ignore_errors=True)  # what the stage runner's `finally` does
    # remote: the payload was uploaded and only its manifest is missing; local: nothing landed
    assert _files(store, key) == (set() if store.local else {"model.safetensors", "config.json"})
    _assert_invisible(store, key)
    assert store.keys() == [] and list(store.iter_manifests()) == []
    # the next build of that stage publishes normally (over the leftover, if any)
    m = _publish(store, key, {"config.json": b"{}"})
    assert store.has(key) and store.manifest(key) == m
    assert _files(store, key) == {"config.json", MANIFEST}
    assert store.verify(key) == []


def test_crash_during_republish(store: Store) -> None:
    """A forced rebuild that dies before its manifest keeps the old artifact whole: a local
    store swaps the new one in atomically or not at all; a remote one uploads the new payload
    beside the old (tmp/) and leaves the old untouched until it is complete."""
    key = _key()
    old = _publish(store, key, {"old.bin": b"old"})

    def crash() -> None:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _publish(store, key, {"new.bin": b"new"}, before_manifest=crash)
    assert store.manifest(key) == old and store.verify(key) == []
    assert _files(store, key) == {"old.bin", MANIFEST}


def test_republish_swaps_atomically(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers of a key being rebuilt see the old or the new artifact, never neither."""
    if not store.local:
        pytest.skip("object stores have no rename")
    from artifacts import store as store_mod

    key = _key()
    _publish(store, key, {"old.bin": b"old"})
    seen: list[set[str]] = []
    used: list[bool] = []
    real_replace, real_exchange = os.replace, store_mod._exchange

    def replace(src: object, dst: object) -> None:
        real_replace(src, dst)
        seen.append(_files(store, key))

    def exchange(a: Path, b: Path) -> bool:
        used.append(real_exchange(a, b))
        seen.append(_files(store, key))
        return used[-1]

    monkeypatch.setattr(store_mod.os, "replace", replace)
    monkeypatch.setattr(store_mod, "_exchange", exchange)
    _publish(store, key, {"new.bin": b"new"})
    assert _files(store, key) == {"new.bin", MANIFEST}
    if used != [True]:
        pytest.skip("no atomic exchange on this filesystem: the fallback renames twice")
    assert seen[-1] == {"new.bin", MANIFEST}
    assert all(s in ({"old.bin", MANIFEST}, {"new.bin", MANIFEST}) for s in seen), seen


# -- refs and resolve --------------------------------------------------------------------------

def test_refs_and_resolve(store: Store) -> None:
    a, b = _key("deadbeef"), _key("deadbeef")
    c = _key("0123456789")
    for k in (a, b, c):
        _publish(store, k)
    store.set_ref("mimo", "sft", a)
    store.set_ref("mimo", "rl_arith", c)
    store.set_ref("other", "sft", b)
    assert store.get_ref("mimo", "sft") == a
    assert store.get_ref("mimo", "nope") is None
    assert store.refs() == {"mimo:sft": a, "mimo:rl_arith": c, "other:sft": b}
    store.set_ref("mimo", "sft", b)  # refs move
    assert store.resolve("mimo:sft") == b
    assert store.resolve(a) == a
    assert store.resolve(f"  {c}\n") == c
    assert store.resolve(c[:8]) == c
    assert store.resolve(a[:20]) == a
    assert store.resolve("other:sft") == b
    with pytest.raises(RefError, match=r"key prefix 'deadbeef' is ambiguous: .*deadbeef"):
        store.resolve("deadbeef")
    with pytest.raises(RefError, match="no artifact key starts with 'ffffffff'"):
        store.resolve("ffffffff")
    with pytest.raises(RefError, match="no artifact with key f{64}"):
        store.resolve("f" * 64)
    with pytest.raises(RefError, match=r"no ref 'mimo:mopd' .*known refs: mimo:rl_arith"):
        store.resolve("mimo:mopd")
    for bad in ("0123456", "not-a-key", "DEADBEEF", ""):
        with pytest.raises(RefError, match="is not a key, a key prefix of >= 8 hex digits, "
                                           "or recipe:stage"):
            store.resolve(bad)


def test_refs_ignore_temp_files_and_empty_store(store: Store) -> None:
    assert store.refs() == {} and store.keys() == []
    with pytest.raises(RefError, match=r"known refs: none yet"):
        store.resolve("r:sft")
    key = _key()
    _publish(store, key)
    store.set_ref("r", "sft", key)
    store.fs.pipe(f"{store.root}/refs/r/.sft.tmp123", b"garbage")  # an atomic write in flight
    assert store.refs() == {"r:sft": key}


# -- verify --------------------------------------------------------------------------------

def test_verify_detects_a_changed_or_missing_file(store: Store, tmp_path: Path) -> None:
    key = _key()
    _publish(store, key, {"model.safetensors": b"\1" * 100, "config.json": b"{}"})
    assert store.verify(key) == []
    # a remote store's download cache must not hide a later change
    store.local_path(key, cache_dir=tmp_path / "cache")
    root = store.object_path(key)
    store.fs.pipe(f"{root}/model.safetensors", b"\2" * 100)  # same size, other bytes
    assert store.verify(key) == ["model.safetensors: content differs from the manifest"]
    store.fs.rm(f"{root}/config.json")
    assert store.verify(key) == ["config.json: missing",
                                 "model.safetensors: content differs from the manifest"]


def test_local_path_of_a_memory_store_is_a_plain_directory(tmp_path: Path) -> None:
    s = Store(f"memory://posttrain-test-{uuid.uuid4().hex}")
    try:
        key = _key()
        _publish(s, key, {"config.json": b'{"x": 1}'})
        local = s.local_path(key, cache_dir=tmp_path / "cache")
        assert (local / "config.json").read_bytes() == b'{"x": 1}'
        assert json.loads((local / MANIFEST).read_text())["key"] == key
        assert s.local_path(key, cache_dir=tmp_path / "cache") == local  # downloaded once
    finally:
        fsspec.filesystem("memory").rm(s.root, recursive=True)
