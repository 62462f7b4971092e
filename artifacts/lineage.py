"""Lineage: the provenance graph of a store, built only from its manifests.

Every manifest lists its inputs by role (artifacts/manifest.py); each becomes an edge parent ->
child labelled ``init``, ``reference``, ``reward_model``, ``teacher:<route>``,
``generator:<route>``, ``candidate:<name>`` (a `select` stage's) or ``data:<name>``.
A snapshot `STAGE@STEP` (its manifest's ``snapshot: {of, step}``) has its stage's inputs, and
one more edge, ``snapshot``, to the stage's final artifact once that is published: the final
weights continued training from it.
Nothing is deduced from directory names or from MLflow, so the graph spans recipes (a stage of
recipe B may consume a key built by recipe A) and stays right when names are reused.

Queries: `ancestors`, `descendants`, `teachers_of` (per route and MOPD round), `students_of`,
`impact` (downstream + refs + MLflow registered versions), `sft_root`. Renderers: `render`
(tree | json | mermaid | html). No mlflow / prefect / torch import here: the CLI stays fast.

Run: ``posttrain lineage mimo_tiny:final_rl --up`` or
``python -c "from artifacts.lineage import *; from artifacts.store import Store;
print(render(ancestors(Store('.posttrain/store'), 'mimo_tiny:final_rl')))"``
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from artifacts.store import RefError, Store

SINGLE_ROLES = ("init", "reference", "reward_model")
# Keyed roles: the manifest holds {name: key}; the edge label is "<prefix>:<name>".
KEYED_ROLES = {"teachers": "teacher", "generators": "generator", "data": "data",
               "candidates": "candidate"}


@dataclass
class Graph:
    """Nodes (key -> node dict) and role-labelled edges, with adjacency in both directions."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: list[dict[str, str]] = field(default_factory=list)
    parents: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    children: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def role_order(role: str) -> tuple[int, str]:
    """init, reference, reward_model, teacher:*, data:*: the order people read a stage's inputs."""
    head = role.split(":", 1)[0]
    rank = {"init": 0, "reference": 1, "reward_model": 2, "teacher": 3, "generator": 4,
            "candidate": 5, "data": 6}
    return rank.get(head, 6), role


def _node(m: dict[str, Any]) -> dict[str, Any]:
    metrics = m.get("metrics") or {}
    return {"key": m["key"], "recipe": m.get("recipe"), "stage": m.get("stage"),
            "kind": m.get("kind"), "produces": m.get("produces"),
            "eval": dict(metrics.get("eval") or {}), "sft_root": m.get("sft_root"),
            "selected": metrics.get("selected"),  # the candidate a `select` stage chose
            "run_id": m.get("run_id"), "ended": (m.get("timings") or {}).get("ended"),
            "missing": False}


def input_edges(m: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(role label, parent key, input_ref) for every input of one manifest."""
    out = []
    refs = m.get("input_refs") or {}
    for role, value in (m.get("inputs") or {}).items():
        if isinstance(value, dict):
            prefix = KEYED_ROLES.get(role, role)
            for name, key in sorted(value.items()):
                ref = (refs.get(role) or {}).get(name) or {}
                out.append((f"{prefix}:{name}", key, ref))
        elif value:
            out.append((role, value, refs.get(role) or {}))
    return out


def build(store: Store) -> Graph:
    """The whole graph of `store`. A parent key without a manifest (another store, a deleted
    artifact) still appears, labelled from the child's input_refs and marked missing."""
    return from_manifests(list(store.iter_manifests()))


def from_manifests(manifests: list[dict[str, Any]]) -> Graph:
    """The graph of these manifests (or manifest-shaped dicts: key, recipe, stage, kind,
    inputs, metrics), as `build` makes it from a store's."""
    g = Graph()
    for m in manifests:
        g.nodes[m["key"]] = _node(m)
    for m in manifests:
        for role, parent, ref in input_edges(m):
            if parent not in g.nodes:
                g.nodes[parent] = {"key": parent, "recipe": ref.get("recipe"),
                                   "stage": ref.get("stage"), "kind": ref.get("kind"),
                                   "produces": None, "eval": {}, "sft_root": None,
                                   "run_id": None, "ended": None, "missing": True}
            e = {"parent": parent, "child": m["key"], "role": role}
            g.edges.append(e)
            g.parents.setdefault(m["key"], []).append(e)
            g.children.setdefault(parent, []).append(e)
        final = (m.get("snapshot") or {}).get("of")
        if final in g.nodes:  # snapshot -> its stage's final artifact (when published)
            e = {"parent": m["key"], "child": final, "role": "snapshot"}
            g.edges.append(e)
            g.parents.setdefault(final, []).append(e)
            g.children.setdefault(m["key"], []).append(e)
    for adj in (g.parents, g.children):  # BFS then meets init before reference, data last
        for lst in adj.values():
            lst.sort(key=lambda e: role_order(e["role"]))
    return g


def _graph(store_or_graph: Store | Graph) -> Graph:
    return store_or_graph if isinstance(store_or_graph, Graph) else build(store_or_graph)


def label(node: dict[str, Any]) -> str:
    return f"{node.get('recipe') or '?'}:{node.get('stage') or '?'}"


def _walk(g: Graph, key: str, up: bool, depth: int | None) -> dict[str, Any]:
    """Breadth-first subgraph from `key`; each node keeps its shortest depth and the role of the
    edge that first reached it (`roles` lists every edge inside the subgraph that touches it)."""
    if key not in g.nodes:
        raise RefError(f"key {key[:12]} is not in the lineage graph")
    adj = g.parents if up else g.children
    seen = {key: 0}
    first_role: dict[str, str | None] = {key: None}
    edges: list[dict[str, str]] = []
    todo = deque([key])
    while todo:
        k = todo.popleft()
        if depth is not None and seen[k] >= depth:
            continue
        for e in adj.get(k, []):
            nxt = e["parent"] if up else e["child"]
            edges.append(e)
            if nxt not in seen:
                seen[nxt] = seen[k] + 1
                first_role[nxt] = e["role"]
                todo.append(nxt)
    roles: dict[str, set[str]] = {}
    for e in edges:
        roles.setdefault(e["parent"] if up else e["child"], set()).add(e["role"])
    nodes = [dict(g.nodes[k], depth=d, role=first_role[k],
                  roles=sorted(roles.get(k, ()), key=role_order))
             for k, d in sorted(seen.items(), key=lambda kv: (kv[1], label(g.nodes[kv[0]])))]
    return {"root": key, "direction": "up" if up else "down", "nodes": nodes, "edges": edges}


def ancestors(store: Store | Graph, key: str, depth: int | None = None) -> dict[str, Any]:
    """Everything `key` was built from: {"root", "direction", "nodes", "edges"}."""
    return _walk(_graph(store), key, True, depth)


def descendants(store: Store | Graph, key: str, depth: int | None = None) -> dict[str, Any]:
    """Everything built from `key`, directly or not (same shape as `ancestors`)."""
    return _walk(_graph(store), key, False, depth)


def sft_root(store: Store | Graph, key: str) -> str | None:
    """Nearest lineage root (an `sft` stage: its manifest's sft_root is its own key) along init
    edges, from the graph. Which kinds start a lineage is the kinds' rule (tasks/kind.py); the
    manifests carry its outcome, so lineage never names a kind."""
    g = _graph(store)
    k: str | None = key
    while k is not None:
        if g.nodes[k].get("sft_root") == k:
            return k
        k = next((e["parent"] for e in g.parents.get(k, []) if e["role"] == "init"), None)
    return None


def _rounds(g: Graph, key: str) -> list[str]:
    """[round 1 key, ..., key]: init edges back through earlier rounds `<base>_r<i>` of the same
    recipe (the recipe names the last round `<base>`, the earlier ones `<base>_r1`...)."""
    node = g.nodes[key]
    base = re.sub(r"_r\d+$", "", node.get("stage") or "")
    chain = [key]
    while True:
        init = next((e["parent"] for e in g.parents.get(chain[0], []) if e["role"] == "init"),
                    None)
        p = g.nodes.get(init) if init else None
        if not p or p.get("recipe") != node.get("recipe") or not re.fullmatch(
                rf"{re.escape(base)}_r\d+", p.get("stage") or ""):
            return chain
        chain.insert(0, init)


def teachers_of(store: Store | Graph, key: str) -> list[dict[str, Any]]:
    """[{round, route, student, teacher}] for every teacher edge of `key` and its earlier
    rounds; `student` and `teacher` are node dicts."""
    g = _graph(store)
    out = []
    for i, k in enumerate(_rounds(g, key), start=1):
        for e in g.parents.get(k, []):
            if e["role"].startswith("teacher:"):
                out.append({"round": i, "route": e["role"].split(":", 1)[1],
                            "student": g.nodes[k], "teacher": g.nodes[e["parent"]]})
    return sorted(out, key=lambda r: (r["round"], r["route"]))


def students_of(store: Store | Graph, key: str) -> list[dict[str, Any]]:
    """Every model fed by `key` (a teacher or a data set), directly or through later rounds and
    stages: node dicts with `via` (the role path from `key`) and `direct`."""
    g = _graph(store)
    sub = _walk(g, key, False, None)
    paths: dict[str, list[str]] = {key: []}
    for n in sub["nodes"][1:]:  # BFS order: a parent's path is known before its children's
        e = next(e for e in g.parents[n["key"]] if e["parent"] in paths)
        paths[n["key"]] = paths[e["parent"]] + [e["role"]]
    return [dict(n, via=paths[n["key"]], direct=len(paths[n["key"]]) == 1)
            for n in sub["nodes"][1:] if n.get("produces") != "dataset"]


def impact(store: Store, key: str, tracker: Any = None) -> dict[str, Any]:
    """What to quarantine if `key` is bad: it and everything downstream (each node with the
    `mlflow` ids of the run that recorded it, from the store, or None), the store refs that
    name any of them, and (with a tracking_lookup.Lookup) MLflow registered versions pointing
    at them."""
    sub = descendants(store, key)
    for n in sub["nodes"]:
        n["mlflow"] = None if n.get("missing") else store.mlflow_ids(n["key"])
    keys = {n["key"] for n in sub["nodes"]}
    refs = [{"ref": r, "key": k} for r, k in sorted(store.refs().items()) if k in keys]
    versions: list[dict[str, Any]] | None = None
    mlflow_error = None
    if tracker is not None:
        versions = tracker.versions_for_keys(keys)
        mlflow_error = getattr(tracker, "last_error", None)
    return {"root": key, "nodes": sub["nodes"], "edges": sub["edges"], "refs": refs,
            "registered_versions": versions, "mlflow_error": mlflow_error}


# -- renderers -------------------------------------------------------------------------------

def headline(node: dict[str, Any]) -> str:
    ev = node.get("eval") or {}
    chose = [f"selected={node['selected']}"] if node.get("selected") else []
    return " ".join(chose + [f"{d}={v:.3f}" if isinstance(v, int | float) else f"{d}={v}"
                             for d, v in ev.items()])


def _line(node: dict[str, Any]) -> str:
    bits = [label(node), node.get("kind") or "?", node["key"][:12], headline(node)]
    if node.get("missing"):
        bits.append("(no manifest in this store)")
    return "  ".join(b for b in bits if b)


def tree(sub: dict[str, Any]) -> str:
    """Indented text tree; a node reached twice is printed once and then referenced."""
    up = sub["direction"] == "up"
    nodes = {n["key"]: n for n in sub["nodes"]}
    adj: dict[str, list[dict[str, str]]] = {}
    for e in sub["edges"]:
        adj.setdefault(e["child"] if up else e["parent"], []).append(e)
    lines = [_line(nodes[sub["root"]])]
    shown = {sub["root"]}

    def rec(k: str, prefix: str) -> None:
        kids = sorted(adj.get(k, []), key=lambda e: role_order(e["role"]))
        for i, e in enumerate(kids):
            last = i == len(kids) - 1
            nxt = e["parent"] if up else e["child"]
            again = nxt in shown
            lines.append(f"{prefix}{'└─' if last else '├─'} {e['role']}: "
                         + (f"{label(nodes[nxt])}  {nxt[:12]}  (shown above)" if again
                            else _line(nodes[nxt])))
            if not again:
                shown.add(nxt)
                rec(nxt, prefix + ("   " if last else "│  "))

    rec(sub["root"], "")
    return "\n".join(lines)


def render(sub: dict[str, Any], fmt: str = "tree") -> str:
    """`sub` from ancestors/descendants/impact as tree | json | mermaid | html."""
    if fmt == "json":
        return json.dumps(sub, indent=2, sort_keys=True, default=str)
    if fmt == "tree":
        return tree(sub)
    from artifacts import pictures

    if fmt == "mermaid":
        return pictures.mermaid(sub)
    if fmt == "html":
        return pictures.html_page(sub)
    raise ValueError(f"unknown format {fmt!r} (tree, json, mermaid, html)")
