"""Pictures: Mermaid graph, eval table, accuracy PNG, offline HTML page, run report files.

Run: ``.venv/bin/python -m pytest tests/test_pictures.py -q``
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))  # not ~/.cache

from artifacts import pictures  # noqa: E402

K = {s: (c * 64) for s, c in (("sft", "a"), ("rl", "b"), ("mopd", "c"), ("other", "d"))}
SUB = {
    "root": K["mopd"], "direction": "up",
    "nodes": [
        {"key": K["mopd"], "recipe": "r", "stage": "mopd", "kind": "mopd", "role": None,
         "eval": {"arith": 0.8, "reverse": 0.6}},
        {"key": K["rl"], "recipe": "r", "stage": "rl_arith", "kind": "grpo",
         "role": "teacher:arith", "eval": {"arith": 0.9}},
        {"key": K["sft"], "recipe": "r", "stage": "sft", "kind": "sft", "role": "init",
         "eval": {"arith": 0.5, "reverse": 0.4}},
        {"key": K["other"], "recipe": 'team "b"', "stage": "x", "kind": "sft", "role": "init",
         "eval": {}},
    ],
    "edges": [
        {"parent": K["sft"], "child": K["mopd"], "role": "init"},
        {"parent": K["rl"], "child": K["mopd"], "role": "teacher:arith"},
        {"parent": K["sft"], "child": K["rl"], "role": "init"},
        {"parent": K["sft"], "child": K["rl"], "role": "reference"},
        {"parent": K["other"], "child": K["sft"], "role": "init"},
    ],
}


def test_mermaid() -> None:
    text = pictures.mermaid(SUB)
    assert text.startswith("flowchart LR\n")
    assert text.count('-->|"') == 4  # init + reference between one pair share an arrow
    assert '-->|"init, reference"|' in text
    assert "#quot;b#quot;" in text and 'team "b"' not in text  # quotes cannot break labels
    assert all(n["key"][:8] in text for n in SUB["nodes"])
    md = pictures.mermaid_markdown(SUB)
    assert md.count("```") == 2 and "```mermaid\nflowchart LR" in md


def test_eval_table() -> None:
    manifests = [{"stage": "sft", "kind": "sft", "key": K["sft"],
                  "metrics": {"eval": {"arith": 0.5, "count": 0.25}}},
                 {"stage": "rl", "kind": "grpo", "key": K["rl"], "eval": {"arith": 0.75}}]
    md, rows = pictures.eval_table(manifests)
    assert rows[0] == {"stage": "sft", "recipe": None, "kind": "sft", "key": "a" * 12,
                       "arith": 0.5, "count": 0.25}
    assert rows[1]["count"] is None
    lines = md.splitlines()
    assert lines[0] == "| stage | kind | key | arith | count |"
    assert lines[3] == f"| rl | grpo | {'b' * 12} | 0.750 |  |"
    json.dumps(rows)  # Prefect's create_table_artifact takes these rows as they are


def test_accuracy_png(tmp_path: Path) -> None:
    out = pictures.accuracy_png(SUB["nodes"], tmp_path / "a" / "acc.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pictures.accuracy_png([{"stage": "x", "eval": {}}], tmp_path / "b.png") is None


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz not installed")
def test_html_page_laid_out_by_graphviz() -> None:
    page = pictures.html_page(SUB)
    assert page.startswith("<!doctype html>") and page.count('class="node"') == 4
    assert page.count('class="edge"') == 4 and "init, reference" in page
    assert "team &quot;b&quot;:x" in page or "team &#34;b&#34;:x" in page  # escaped, not raw
    assert not re.search(r"<script|<link|https?://(?!www\.w3\.org/)", page)
    svg = pictures.render(SUB, "png")
    assert svg is not None and svg[:4] == b"\x89PNG"


def test_html_page_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no Graphviz: the column layout
    page = pictures.html_page(SUB)
    assert page.startswith("<!doctype html>") and page.count("<rect") == 4
    assert page.count('marker-end="url(#arrow)"') == 4 and "init, reference" in page
    assert "team &quot;b&quot;:x" in page  # escaped, not raw
    assert not re.search(r"<script|<link|https?://(?!www\.w3\.org/2000/svg)", page)
    # Columns by depth: every arrow points right (parent x < child x).
    xs = {k: float(x) for k, x in re.findall(r'<title>([0-9a-f]{64})</title><rect x="([\d.]+)"',
                                              page)}
    for e in SUB["edges"]:
        assert xs[e["parent"]] < xs[e["child"]]


def test_write_run_figures(tmp_path: Path) -> None:
    extra = tmp_path / "plot.txt"
    extra.write_text("x")
    summary = [{"stage": "sft", "status": "trained", "eval": {"arith": 0.5}},
               {"stage": "rl", "status": "reused"}]
    files = pictures.write_run_figures(summary, {"lineage": pictures.mermaid_markdown(SUB),
                                                 "plot.txt": str(extra)}, tmp_path / "out")
    names = sorted(p.name for p in files)
    assert names == ["accuracy.png", "eval_table.md", "lineage.md", "plot.txt", "summary.json"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
