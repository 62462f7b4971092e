"""What `posttrain run` shows while it works: a live table of stage states with a progress bar
per training stage on a terminal, plain timestamped lines otherwise (CI logs, pipes).

Stage tasks update the Board; a display thread renders it, reading each running stage's
progress file (JSON lines written by the stage's child process).

Run: used by ``posttrain run``; nothing to run on its own.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

STATE_STYLE = {"pending": "dim", "running": "cyan", "trained": "green", "reused": "blue",
               "failed": "red"}


class Board:
    def __init__(self, stages: list[str], kinds: dict[str, str]) -> None:
        self.rows: dict[str, dict[str, Any]] = {
            s: {"state": "pending", "kind": kinds[s]} for s in stages}
        self.lock = threading.Lock()
        self.events: list[str] = []

    def update(self, stage: str, **fields: Any) -> None:
        with self.lock:
            row = self.rows[stage]
            if "state" in fields and fields["state"] != row["state"]:
                msg = f"{stage}: {fields['state']}"
                if fields["state"] in ("trained", "failed") and row.get("started"):
                    msg += f" ({time.time() - row['started']:.1f}s)"
                if fields.get("error"):
                    msg += f": {fields['error']}"
                self.events.append(msg)
            row.update(fields)

    def get(self, stage: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.rows[stage])

    def take_events(self) -> list[str]:
        with self.lock:
            ev, self.events = self.events, []
            return ev

    def progress(self, stage: str) -> dict[str, Any] | None:
        path = self.rows[stage].get("progress_file")
        if not path or not Path(path).exists():
            return None
        try:
            lines = Path(path).read_text().strip().splitlines()
            return json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            return None


class Display:
    """Renders a Board until stopped: rich.Live on a TTY, plain lines otherwise."""

    def __init__(self, board: Board, stream: Any = None) -> None:
        self.board, self.stream = board, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Display:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)

    def _table(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        t = Table(box=None, pad_edge=False)
        for col in ("stage", "kind", "state", "progress", "metrics"):
            t.add_column(col)
        for name, row in self.board.rows.items():
            p = self.board.progress(name) if row["state"] == "running" else None
            bar: Any = ""
            metrics = ""
            if p:
                bar = ProgressBar(total=max(p["total"], 1), completed=p["step"], width=24)
                metrics = f"{p['step']}/{p['total']} " + " ".join(
                    f"{k}={v:.3g}" for k, v in p.items() if k not in ("t", "step", "total"))[:60]
            style = STATE_STYLE.get(row["state"], "")
            t.add_row(name, row["kind"], f"[{style}]{row['state']}[/]", bar, metrics)
        return t

    def _loop(self) -> None:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            with Live(self._table(), console=Console(file=self.stream), refresh_per_second=4,
                      transient=False) as live:
                while not self.stop_event.wait(0.25):
                    live.update(self._table())
                live.update(self._table())
            return
        while True:
            stopping = self.stop_event.wait(0.5)
            for ev in self.board.take_events():
                print(f"[{time.strftime('%H:%M:%S')}] {ev}", file=self.stream, flush=True)
            if stopping:
                return
