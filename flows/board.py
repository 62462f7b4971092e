"""What `posttrain run` shows while it works: a live table of stage states with a progress bar
per training stage on a terminal, plain timestamped lines otherwise (CI logs, pipes).

Stage tasks update the Board; a display thread renders it, reading each running stage's
progress file (JSON lines written by the stage's child process, flows/stage.py ProgressWriter):
rows `{t, step, total, metrics...}`, and `{t, snapshot: STEP, key}` once a snapshot `STAGE@STEP`
is published. The file is read incrementally; a stage's row lists its published snapshots
(`@80 @160`) and the plain-line mode prints `rl: snapshot @80 published` once per snapshot.

Run: used by ``posttrain run``; nothing to run on its own.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

STATE_STYLE = {"pending": "dim", "running": "cyan", "trained": "green", "reused": "blue",
               "failed": "red"}


class Board:
    def __init__(self, stages: list[str], kinds: dict[str, str]) -> None:
        self.rows: dict[str, dict[str, Any]] = {
            s: {"state": "pending", "kind": kinds[s]} for s in stages}
        self.lock = threading.RLock()
        self.events: list[str] = []
        # per stage: how far its progress file was read, its last progress row, its snapshots
        self._read: dict[str, dict[str, Any]] = {}

    def update(self, stage: str, **fields: Any) -> None:
        with self.lock:
            row = self.rows[stage]
            if fields.get("state", row["state"]) != row["state"]:
                self._poll(stage)  # snapshots published before it ended come first
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
        """The stage's last progress row (None: none yet)."""
        with self.lock:
            return self._poll(stage)["last"]

    def snapshots(self, stage: str) -> list[int]:
        """The steps of the stage's snapshots published so far, in order."""
        with self.lock:
            return list(self._poll(stage)["snapshots"])

    def poll(self) -> None:
        """Read what every stage's progress file gained (events for new snapshots)."""
        with self.lock:
            for stage in self.rows:
                self._poll(stage)

    def _poll(self, stage: str) -> dict[str, Any]:
        path = self.rows[stage].get("progress_file")
        r = self._read.setdefault(stage, {"path": path, "pos": 0, "last": None,
                                          "snapshots": []})
        if r["path"] != path:  # a new file (another attempt): read it from its start
            r.update(path=path, pos=0, last=None)
        if not path:
            return r
        try:
            with open(path, "rb") as f:
                f.seek(r["pos"])
                data = f.read()
        except OSError:
            return r
        end = data.rfind(b"\n") + 1  # whole lines only: the child may be writing one
        r["pos"] += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            if "snapshot" in rec:
                step = rec["snapshot"]
                if step not in r["snapshots"]:
                    r["snapshots"].append(step)
                    self.events.append(f"{stage}: snapshot @{step} published")
            elif "step" in rec and "total" in rec:
                r["last"] = rec
        return r


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
            if snaps := self.board.snapshots(name):
                metrics = " ".join([*(f"@{s}" for s in snaps), metrics]).strip()
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
            self.board.poll()
            for ev in self.board.take_events():
                print(f"[{time.strftime('%H:%M:%S')}] {ev}", file=self.stream, flush=True)
            if stopping:
                return
