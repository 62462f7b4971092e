"""Keys and names read back stay inside the store; publish first, mirror second; a full disk
is one line naming the path and the free space.

Covers issue 14 items 4 and 5: a planted ref (`../../outside_model`) and `use:
"../../planted:ref"` are refused at plan time and nothing trains; `show
'../../../../../../etc:passwd'` reads nothing outside the store; a lock file or an MLflow
`posttrain.key` tag holding a non-key is refused; key prefixes are >= 8 lowercase hex. On a
small tmpfs store (root only, else skipped) a base model bigger than the disk fails to publish
with the path named and exit 2, MLflow holds a FAILED run with the reason and no registered
version, and no ref points at the missing key; a model that fits is published, then mirrored,
with its MLflow ids beside the manifest.

Run: ``.venv/bin/python -m pytest tests/test_store_safety.py -q``
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from artifacts.store import (
    SIDECAR,
    NoSpaceError,
    RefError,
    Store,
    guard_space,
)
from tests.conftest import run_cli

KEY = "ab" * 32


def fake_artifact(store: Store, tmp: Path, key: str = KEY, **extra: Any) -> str:
    """A published dataset artifact with one file (enough for refs, show and locks)."""
    staged = tmp / f"staged-{key[:8]}"
    staged.mkdir()
    (staged / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    store.publish(key, staged, {"format": 1, "recipe": "mimo", "stage": "data", "kind": "data",
                                "produces": "dataset", "inputs": {}, **extra})
    return key


def planted_outside(tmp: Path, store_root: Path) -> Path:
    """A model directory outside the store that looks like an artifact (what an attacker
    would point a ref at): objects/../../outside_model from the store's objects/ dir."""
    outside = store_root.parent / "outside_model"
    outside.mkdir(parents=True)
    (outside / "manifest.json").write_text(json.dumps({
        "format": 1, "key": "../../outside_model", "recipe": "planted", "stage": "ref",
        "kind": "sft", "produces": "model", "inputs": {}, "files": []}))
    (outside / "config.json").write_text("{}")
    return outside


def test_planted_ref_escape_is_refused_and_nothing_trains(tmp_path: Path) -> None:
    root = tmp_path / "a" / "store"
    store = Store(root)
    planted_outside(tmp_path, root)
    ref_file = root / "refs" / "planted" / "ref"
    ref_file.parent.mkdir(parents=True)
    ref_file.write_text("../../outside_model\n")
    # The ref file's content is not a key: refused wherever it is read.
    with pytest.raises(RefError, match=r"ref planted:ref .*'\.\./\.\./outside_model' is not a "
                       r"content key.*delete"):
        store.resolve("planted:ref")
    with pytest.raises(RefError, match=r"recipe '\.\./\.\./planted' .* is not a name"):
        store.resolve("../../planted:ref")
    recipe = tmp_path / "victim.yaml"
    for use in ("../../planted:ref", "planted:ref"):
        recipe.write_text(
            "name: victim\n"
            "stages:\n"
            "  data: {kind: data, domains: [arith], size: 16, seed: 0}\n"
            f"  teacher: {{use: \"{use}\"}}\n"
            "  rl: {kind: grpo, from: teacher, data: data, max_steps: 1}\n")
        for cmd in ("plan", "run"):
            rc, out, err = run_cli(cmd, str(recipe), "--store", str(root), "--state-dir",
                                   str(tmp_path / "state"), "--no-tracking"
                                   if cmd == "run" else "--json")
            assert rc == 2, (cmd, use, err)
            assert "Traceback" not in err and err.count("error:") == 1
            assert "outside_model" in err or "../../planted" in err
    # Nothing was built, no ref was added, and nothing started a run.
    assert not (root / "objects").exists()
    assert sorted(p.name for p in (root / "refs").iterdir()) == ["planted"]
    assert not (tmp_path / "state" / "runs").exists()


def test_show_etc_passwd_reads_nothing_outside_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    root = tmp_path / "store"
    store = Store(root)
    fake_artifact(store, tmp_path)
    store.set_ref("mimo", "data", KEY)
    opened: list[str] = []
    real_open = builtins.open

    def spy(file: Any, *a: Any, **kw: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            opened.append(os.path.realpath(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    for ref in ("../../../../../../etc:passwd", "mimo:../../../../../../etc/passwd",
                "/etc:passwd", "mimo:.", "..:data"):
        rc, _, err = run_cli("show", ref, "--store", str(root), "--state-dir",
                             str(tmp_path / "state"))
        assert rc == 2, (ref, err)
        assert "is not a name" in err and "Traceback" not in err, err
    monkeypatch.setattr(builtins, "open", real_open)
    real_root = os.path.realpath(root)
    outside = [p for p in opened if not p.startswith(real_root + os.sep)
               and "site-packages" not in p and not p.endswith(".py")]
    assert not [p for p in outside if p.startswith("/etc")], outside
    rc, out, _ = run_cli("show", "mimo:data", "--store", str(root))
    assert rc == 0 and KEY in out


def test_links_out_of_the_store_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    outside = planted_outside(tmp_path, root)
    # A ref directory that is a link out of the store.
    other = tmp_path / "elsewhere"
    (other / "x").mkdir(parents=True)
    (other / "x" / "y").write_text(KEY + "\n")
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "x").symlink_to(other / "x")
    with pytest.raises(RefError, match="outside the store"):
        store.resolve("x:y")
    # An object directory that is a link out of the store.
    (root / "objects").mkdir()
    (root / "objects" / KEY).symlink_to(outside)
    with pytest.raises(RefError, match="outside the store"):
        store.has(KEY)
    # A manifest row may not name a file outside its artifact.
    store2 = Store(tmp_path / "store2")
    fake_artifact(store2, tmp_path)
    path = Path(store2.object_path(KEY)) / "manifest.json"
    m = json.loads(path.read_text())
    m["files"].append({"path": "../../../outside_model/config.json", "size": 2,
                       "sha256": "0" * 64})
    path.write_text(json.dumps(m))
    assert any("outside the artifact" in p for p in store2.verify(KEY))


def test_manifest_and_ref_contents_must_be_keys(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    fake_artifact(store, tmp_path)
    path = Path(store.object_path(KEY)) / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps(dict(m, inputs={"init": "../../outside_model"})))
    with pytest.raises(RefError, match=r"inputs.init: '\.\./\.\./outside_model' is not a content"):
        store.manifest(KEY)
    path.write_text(json.dumps(dict(m, key="cd" * 32)))
    with pytest.raises(RefError, match="is not its directory's"):
        store.manifest(KEY)
    with pytest.raises(RefError, match="is not a content key"):
        store.set_ref("mimo", "data", "../x")
    with pytest.raises(RefError, match="is not a name"):
        store.set_ref("..", "data", KEY)
    # Strays under refs/ (atomic_write temp files, bad names) are not refs.
    (root / "refs" / ".hidden").mkdir(parents=True)
    (root / "refs" / ".hidden" / "s").write_text(KEY)
    assert store.refs() == {}
    assert not store.has("../../outside_model") and store.manifest("nope") is None


@pytest.mark.parametrize("ref,why", [("abc1234", "at least 8 hex digits"),
                                     ("ABCDEF12", "keys are lowercase: abcdef12"),
                                     ("xyz12345", "is not a key"),
                                     ("ab" * 33, "longer than a key")])
def test_key_prefix_rule(tmp_path: Path, ref: str, why: str) -> None:
    root = tmp_path / "store"
    fake_artifact(Store(root), tmp_path)
    rc, _, err = run_cli("show", ref, "--store", str(root))
    assert rc == 2 and why in err and "Traceback" not in err, err
    rc, out, _ = run_cli("show", KEY[:8], "--store", str(root))
    assert rc == 0 and KEY in out


def test_lock_file_with_a_non_key_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "locked.yaml"
    recipe.write_text("name: locked\nstages:\n"
                      "  data: {kind: data, domains: [arith], size: 16, seed: 0}\n")
    store = ["--store", str(tmp_path / "store"), "--state-dir", str(tmp_path / "state")]
    lock = recipe.with_suffix(".lock")
    for entry, where in (({"key": "../../outside_model", "inputs": {}}, "stages.data.key"),
                         ({"key": KEY, "inputs": {"data": {"train": "zz"}}},
                          "stages.data.inputs.data.train")):
        lock.write_text(json.dumps({"format": 1, "recipe": "locked", "stages": {"data": entry}}))
        rc, _, err = run_cli("plan", str(recipe), *store)
        assert rc == 2, err
        assert str(lock) in err and where in err and "delete the lock file" in err, err
        assert "Traceback" not in err
    lock.unlink()
    assert run_cli("plan", str(recipe), *store)[0] == 0


def mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_mlflow_tag_with_a_non_key_is_refused(tmp_path: Path) -> None:
    from artifacts.tracking_lookup import resolve_ref

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = mlflow_client(uri)
    c.create_registered_model("evil.model")
    src = tmp_path / "src"
    src.mkdir()
    mv = c.create_model_version("evil.model", source=str(src),
                                tags={"posttrain.key": "../../outside_model"})
    c.set_registered_model_alias("evil.model", "current", mv.version)
    store = Store(tmp_path / "store")
    for ref in ("models:/evil.model@current", f"models:/evil.model/{mv.version}"):
        with pytest.raises(RefError, match=r"posttrain.key: '\.\./\.\./outside_model' is not a "
                           "content key"):
            resolve_ref(ref, store, uri)
        rc, _, err = run_cli("show", ref, "--store", str(store.root), "--tracking-uri", uri)
        assert rc == 2 and "not a content key" in err and "Traceback" not in err, err


def test_guard_space_names_the_path_and_free_space(tmp_path: Path) -> None:
    target = tmp_path / "x" / "model.safetensors"
    with pytest.raises(NoSpaceError) as e, guard_space(target, "point --store elsewhere"):
        raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing {target} (")
    assert " free on /" in msg and msg.endswith("free space or point --store elsewhere")
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(NoSpaceError, match="writing /q/f "), guard_space(target):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/q/f")
    # Native writers (safetensors) raise their own type with the OS text.
    with pytest.raises(NoSpaceError, match=str(target)), guard_space(target):
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    with pytest.raises(ValueError, match="other"), guard_space(target):
        raise ValueError("other")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only): a disk that a tiny model fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (os.geteuid() != 0)")
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_store_publish_fails_cleanly_and_mlflow_says_failed(
        tmp_path: Path, tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTTRAIN_TRACKING", raising=False)
    recipe = tmp_path / "full.yaml"
    recipe.write_text(
        "name: full\n"
        "stages:\n"
        "  data: {kind: data, domains: [arith], size: 16, seed: 0}\n"
        "  base: {kind: base, hidden_size: 256, num_layers: 2, num_heads: 2,\n"
        "         intermediate_size: 1024, domains: [arith], eval_n: 2}\n")
    store_dir = tmpfs / "store"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--store", str(store_dir), "--state-dir", str(tmp_path / "state"),
              "--tracking-uri", uri]
    rc, out, err = run_cli("plan", str(recipe), "--json", *common)
    assert rc == 0, err
    key = next(p["key"] for p in json.loads(out) if p["stage"] == "base")
    # ~8 MB of fp32 weights into 2 MB: the write fails inside the store's staging dir.
    rc, out, err = run_cli("stage", str(recipe), "base", *common)
    assert rc == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert f"no space left on device writing {store_dir}/" in err and " free on " in err, err
    assert "free space or point --store elsewhere" in err
    store = Store(store_dir)
    assert not store.has(key) and store.refs() == {}
    assert not (store_dir / "objects" / key).exists()
    assert list((store_dir / "tmp").iterdir()) == []  # the staging dir was removed
    c = mlflow_client(uri)
    assert [v for v in c.search_model_versions() if v.tags.get("posttrain.key") == key] == []
    runs = c.search_runs([c.get_experiment_by_name("full").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    tags = runs[0].data.tags
    assert tags["posttrain.planned_key"] == key and "posttrain.key" not in tags
    assert "no space left on device" in tags["posttrain.error"]
    # A model that fits: published, then the ref, then MLflow; its ids beside the manifest.
    small = ["--set", "base.hidden_size=16", "--set", "base.intermediate_size=32",
             "--set", "base.num_layers=1"]
    rc, out, err = run_cli("stage", str(recipe), "base", *small, *common)
    assert rc == 0, err
    key2 = json.loads(out.strip().splitlines()[-1])["key"]
    man = store.manifest(key2)
    assert man is not None and "mlflow" not in man
    assert SIDECAR not in {f["path"] for f in man["files"]} and store.verify(key2) == []
    ids = store.mlflow_ids(key2)
    assert ids and ids["run_id"] and ids["model_id"]
    assert store.refs() == {"full:base": key2}
    mv = c.get_model_version_by_alias("full.base", "current")
    assert mv.tags["posttrain.key"] == key2
    assert c.get_run(ids["run_id"]).info.status == "FINISHED"
    rc, out, _ = run_cli("show", "full:base", *common)
    assert rc == 0 and f"mlflow: run {ids['run_id']}" in out
    rc, out, _ = run_cli("show", "full:base", "--json", *common)
    assert json.loads(out)["mlflow"]["run_id"] == ids["run_id"]
    rc, out, _ = run_cli("impact", "full:base", *common)
    assert rc == 0 and f"mlflow run {ids['run_id']}" in out


def test_full_state_dir_stops_before_prefect(tmp_path: Path, tmpfs: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_HOME")  # restored after the test (the run sets it)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  data: {kind: data, domains: [arith], size: 16, "
                      "seed: 0}\n")
    rc, _, err = run_cli("run", str(recipe), "--store", str(tmp_path / "store"), "--state-dir",
                         str(tmpfs / "state"), "--no-tracking")
    assert rc == 2, err
    assert f"{tmpfs}/state/prefect" in err and " free on " in err, err
    assert "point --state-dir elsewhere" in err and "Traceback" not in err
    assert not (tmp_path / "store" / "objects").exists()
