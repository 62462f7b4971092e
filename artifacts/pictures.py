"""Pictures of provenance: a Mermaid lineage graph, a stages x domains eval table, a PNG of
per-domain accuracy by stage, and a static HTML page with the graph drawn as inline SVG.

Inputs are the plain dicts of artifacts/lineage.py (``{"root", "nodes", "edges"}``) and
manifests (or summary rows carrying ``eval``). The HTML page loads nothing from the network (no
CDN script): the layout (columns by depth) is computed here. matplotlib is imported only inside
`accuracy_png`, with its Agg canvas, so importing this module stays cheap and never touches a
display.

Run: ``posttrain lineage mimo_tiny:final_rl --up --format html --output lineage.html``
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def kind_color(kind: str | None, produces: str | None) -> str:
    """Fill colour of a node: datasets pale blue; each model kind a pastel hue derived from its
    name, so a new kind gets a stable colour without a table here to edit.

    >>> kind_color("data", "dataset"), kind_color("sft", "model") == kind_color("sft", "model")
    ('#e8f1fb', True)
    """
    if produces == "dataset":
        return "#e8f1fb"
    if not kind:
        return "#f5f5f5"
    import colorsys
    import hashlib

    hue = int(hashlib.sha256(kind.encode()).hexdigest()[:4], 16) / 0xFFFF
    r, g, b = colorsys.hls_to_rgb(hue, 0.92, 0.6)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _label(n: dict[str, Any]) -> str:
    return f"{n.get('recipe') or '?'}:{n.get('stage') or '?'}"


def _evals(n: dict[str, Any]) -> dict[str, Any]:
    """Eval dict of a lineage node, a manifest, or a summary row."""
    if isinstance(n.get("eval"), dict):
        return n["eval"]
    return dict((n.get("metrics") or {}).get("eval") or {})


def _merged_edges(sub: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """(parent, child) -> roles: one arrow per pair (init + reference often share one)."""
    out: dict[tuple[str, str], list[str]] = {}
    for e in sub["edges"]:
        roles = out.setdefault((e["parent"], e["child"]), [])
        if e["role"] not in roles:
            roles.append(e["role"])
    return out


def mermaid(sub: dict[str, Any]) -> str:
    """A Mermaid flowchart (parents left, children right), one box per recipe."""
    ids = {n["key"]: f"n{i}" for i, n in enumerate(sub["nodes"])}
    lines = ["flowchart LR"]
    recipes: dict[str, list[dict[str, Any]]] = {}
    for n in sub["nodes"]:
        recipes.setdefault(n.get("recipe") or "?", []).append(n)
    for r_i, (recipe, nodes) in enumerate(sorted(recipes.items())):
        lines.append(f'  subgraph r{r_i}["{_q(recipe)}"]')
        for n in nodes:
            ev = " ".join(f"{d} {v:.2f}" for d, v in _evals(n).items()
                          if isinstance(v, int | float))
            text = f"{n.get('stage')}<br/>{n.get('kind')} · {n['key'][:8]}"
            lines.append(f'    {ids[n["key"]]}["{_q(text + ("<br/>" + ev if ev else ""))}"]')
        lines.append("  end")
    for (p, c), roles in _merged_edges(sub).items():
        lines.append(f'  {ids[p]} -->|"{_q(", ".join(roles))}"| {ids[c]}')
    if sub.get("root") in ids:
        lines.append(f"  style {ids[sub['root']]} stroke-width:3px")
    return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    # Mermaid labels are quoted; a double quote inside would end them.
    return str(text).replace('"', "#quot;")


def mermaid_markdown(sub: dict[str, Any], title: str = "Lineage") -> str:
    """Markdown with a fenced mermaid block (for Prefect's create_markdown_artifact)."""
    return f"# {title}\n\n```mermaid\n{mermaid(sub)}```\n"


def eval_table(manifests: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(markdown, rows): one row per stage (in the given order), one column per domain."""
    domains: list[str] = []
    for m in manifests:
        domains += [d for d in _evals(m) if d not in domains]
    rows = []
    for m in manifests:
        ev = _evals(m)
        row: dict[str, Any] = {"stage": m.get("stage"), "recipe": m.get("recipe"),
                               "kind": m.get("kind"), "key": str(m.get("key") or "")[:12]}
        row.update({d: ev.get(d) for d in domains})
        rows.append(row)
    head = ["stage", "kind", "key", *domains]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row[h]) if h in ("stage", "kind", "key") else
                 (f"{row[h]:.3f}" if isinstance(row[h], int | float) else "") for h in head]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n", rows


def accuracy_png(manifests: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Per-domain accuracy by stage as a PNG (None when no stage has an eval)."""
    _, rows = eval_table([m for m in manifests if _evals(m)])
    if not rows:
        return None
    # The Figure + Agg canvas API never selects a global backend (safe in threads, headless).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    domains = [k for k in rows[0] if k not in ("stage", "recipe", "kind", "key")]
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(rows)))
    for d in domains:
        ys = [r[d] if isinstance(r[d], int | float) else float("nan") for r in rows]
        ax.plot(xs, ys, marker="o", label=d)
    ax.set_xticks(xs, [str(r["stage"]) for r in rows], rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.05)  # points at 0 stay visible
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("per-domain accuracy by stage")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _levels(sub: dict[str, Any]) -> dict[str, int]:
    """Column of each node: longest path from a source, so every arrow points right."""
    keys = [n["key"] for n in sub["nodes"]]
    parents: dict[str, set[str]] = {k: set() for k in keys}
    for (p, c) in _merged_edges(sub):
        parents[c].add(p)
    level: dict[str, int] = {}

    def lv(k: str, stack: frozenset[str] = frozenset()) -> int:
        if k not in level:
            # A cycle cannot come from content keys; the guard keeps bad input from recursing.
            ps = [p for p in parents[k] if p not in stack]
            level[k] = 1 + max((lv(p, stack | {k}) for p in ps), default=-1)
        return level[k]

    for k in keys:
        lv(k)
    return level


def _dq(text: str) -> str:
    r"""A Graphviz double-quoted string's body.

    >>> print(_dq('a "b" \\ c'))
    a \"b\" \\ c
    """
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


def dot(sub: dict[str, Any]) -> str:
    """The lineage as Graphviz DOT: parents left, one cluster per recipe, each box its stage,
    kind, key prefix and eval line, each arrow its roles. Graphviz places labels so that none
    is clipped or overlaps (the hand layout of `html_page` is only the fallback)."""
    ids = {n["key"]: f"n{i}" for i, n in enumerate(sub["nodes"])}
    lines = ["digraph lineage {", "  rankdir=LR; nodesep=0.35; ranksep=0.9;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
             '  edge [fontname="Helvetica", fontsize=9, color="#777777"];']
    recipes: dict[str, list[dict[str, Any]]] = {}
    for n in sub["nodes"]:
        recipes.setdefault(n.get("recipe") or "?", []).append(n)
    for r_i, (recipe, nodes) in enumerate(sorted(recipes.items())):
        lines.append(f'  subgraph cluster_{r_i} {{ label="{_dq(recipe)}"; style=dashed; '
                     'color="#999999";')
        for n in nodes:
            ev = " ".join(f"{d} {v:.2f}" for d, v in _evals(n).items()
                          if isinstance(v, int | float))
            text = _dq(f"{n.get('stage')}") + "\\n" + _dq(f"{n.get('kind')} · {n['key'][:8]}")
            if ev:
                text += "\\n" + _dq(ev)
            width = 3 if n["key"] == sub.get("root") else 1
            lines.append(f'    {ids[n["key"]]} [label="{text}", penwidth={width}, '
                         f'fillcolor="{kind_color(n.get("kind"), n.get("produces"))}", '
                         f'tooltip="{n["key"]}"];')
        lines.append("  }")
    for (p, c), roles in _merged_edges(sub).items():
        lines.append(f'  {ids[p]} -> {ids[c]} [label="{_dq(", ".join(roles))}"];')
    return "\n".join(lines) + "\n}\n"


def render(sub: dict[str, Any], fmt: str = "svg") -> bytes | None:
    """The lineage rendered by Graphviz's `dot` (svg, png); None where Graphviz is not
    installed (`make install` installs it). The `dot` program is called directly: the PyPI
    `graphviz` package only wraps it."""
    import shutil
    import subprocess

    exe = shutil.which("dot")
    if exe is None or not sub["nodes"]:
        return None
    p = subprocess.run([exe, f"-T{fmt}"], input=dot(sub).encode(), capture_output=True,
                       timeout=120)
    return p.stdout if p.returncode == 0 else None


def html_page(sub: dict[str, Any], title: str | None = None) -> str:
    """A self-contained HTML page: the graph as inline SVG (laid out by Graphviz when it is
    installed, else by a simple column layout) and a table of the nodes."""
    if (laid := render(sub, "svg")) is not None:
        text = laid.decode()
        svg_text = text[text.find("<svg"):]
    else:
        svg_text = _column_svg(sub)
    return _page(sub, svg_text, title)


def _column_svg(sub: dict[str, Any]) -> str:
    """The fallback layout: one column per depth, boxes in rows (labels may crowd)."""
    bw, bh, gx, gy, pad = 210, 64, 150, 36, 24
    level = _levels(sub)
    cols: dict[int, list[dict[str, Any]]] = {}
    for n in sorted(sub["nodes"], key=lambda n: (_label(n), n["key"])):
        cols.setdefault(level[n["key"]], []).append(n)
    pos = {}
    for c, nodes in cols.items():
        for r, n in enumerate(nodes):
            pos[n["key"]] = (pad + c * (bw + gx), pad + r * (bh + gy))
    width = pad * 2 + (max(cols, default=0) + 1) * (bw + gx) - gx
    height = pad * 2 + max((len(v) for v in cols.values()), default=1) * (bh + gy) - gy
    e = html.escape
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
           'fill="#555"/></marker></defs>']
    edges = _merged_edges(sub)
    ends: dict[tuple[str, str], float] = {}  # arrows into one box spread along its left side
    for c in {c for _, c in edges}:
        ins = sorted((p for p, c2 in edges if c2 == c), key=lambda p: pos[p][1])
        for i, p in enumerate(ins):
            ends[(p, c)] = pos[c][1] + bh * (i + 1) / (len(ins) + 1)
    labels = []
    for (p, c), roles in edges.items():
        x1, y1 = pos[p][0] + bw, pos[p][1] + bh / 2
        x2, y2 = pos[c][0], ends[(p, c)]
        if x2 - x1 > gx:  # skips a column: run along the gap between rows, not through boxes
            lane = pad - gy / 2 + round(((y1 + y2) / 2 - pad) / (bh + gy)) * (bh + gy)
            lane = max(lane, pad / 2)
            d = (f"M{x1},{y1} C{x1 + gx / 2},{y1} {x1 + gx / 2},{lane} {x1 + gx},{lane} "
                 f"L{x2 - gx},{lane} C{x2 - gx / 2},{lane} {x2 - gx / 2},{y2} {x2},{y2}")
        else:
            mx = (x1 + x2) / 2
            d = f"M{x1},{y1} C{mx},{y1} {mx},{y2} {x2},{y2}"
        text = e(", ".join(roles))
        svg.append(f'<path d="{d}" fill="none" stroke="#777" marker-end="url(#arrow)">'
                   f"<title>{text}</title></path>")
        # Labels sit at the arrow head, in the gutter left of the child, drawn over lines.
        labels.append(f'<text x="{x2 - 8}" y="{y2 - 3}" text-anchor="end" fill="#333" '
                      f'font-size="10">{text}</text>')
    for n in sub["nodes"]:
        x, y = pos[n["key"]]
        fill = kind_color(n.get("kind"), n.get("produces"))
        stroke = 3 if n["key"] == sub.get("root") else 1
        ev = " ".join(f"{d} {v:.2f}" for d, v in _evals(n).items() if isinstance(v, int | float))
        svg.append(f'<g><title>{e(n["key"])}</title><rect x="{x}" y="{y}" width="{bw}" '
                   f'height="{bh}" rx="8" fill="{fill}" stroke="#333" stroke-width="{stroke}"/>'
                   f'<text x="{x + 8}" y="{y + 17}" font-weight="bold">{e(_label(n))}</text>'
                   f'<text x="{x + 8}" y="{y + 34}">{e(str(n.get("kind")))} · '
                   f'{e(n["key"][:12])}</text>'
                   f'<text x="{x + 8}" y="{y + 51}" font-size="10">{e(ev[:40])}</text></g>')
    svg += labels + ["</svg>"]
    return "".join(svg)


def _page(sub: dict[str, Any], svg: str, title: str | None) -> str:
    e = html.escape
    _, rows = eval_table(sub["nodes"])
    domains = [k for k in (rows[0] if rows else {}) if k not in ("stage", "recipe", "kind", "key")]
    head = "".join(f"<th>{e(h)}</th>" for h in ["recipe:stage", "kind", "role", "key", *domains])
    body = []
    for n, row in zip(sub["nodes"], rows, strict=True):
        cells = [_label(n), n.get("kind"), n.get("role") or "(root)", n["key"]]
        cells += [f"{row[d]:.3f}" if isinstance(row[d], int | float) else "" for d in domains]
        body.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    root = next((n for n in sub["nodes"] if n["key"] == sub.get("root")), None)
    title = title or (f"Lineage of {_label(root)}" if root else "Lineage")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>body{{font-family:sans-serif;margin:20px}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
            "font-size:12px;text-align:left}.graph{overflow:auto}</style></head><body>"
            f"<h1>{e(title)}</h1><div class=\"graph\">{svg}</div>"
            f"<h2>Stages</h2><table><tr>{head}</tr>{''.join(body)}</table>"
            "</body></html>\n")


def write_run_figures(summary: list[dict[str, Any]], figures: dict[str, Any],
                      out_dir: str | Path) -> list[Path]:
    """The files of a run's report in `out_dir`: summary.json, eval_table.md + accuracy.png
    (from summary rows carrying "eval"), and each figure ({file name: text or a file path})."""
    import json
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    written = [out / "summary.json"]
    with_eval = [r for r in summary if _evals(r)]
    if with_eval:
        (out / "eval_table.md").write_text(eval_table(with_eval)[0])
        written.append(out / "eval_table.md")
        if png := accuracy_png(with_eval, out / "accuracy.png"):
            written.append(png)
    for name, fig in figures.items():
        dest = out / (name if "." in name else f"{name}.md")
        if _is_file(fig):
            shutil.copyfile(fig, dest)
        else:
            dest.write_text(str(fig))
        written.append(dest)
    return written


def _is_file(x: Any) -> bool:
    # A figure is a path or the text itself; a long text is no path (and may not even stat).
    try:
        return isinstance(x, Path | str) and "\n" not in str(x) and Path(x).is_file()
    except OSError:
        return False
