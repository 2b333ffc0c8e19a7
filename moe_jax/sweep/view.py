"""The live view of a sweep: a line per point when its state changes (queued, waiting, running at
step s with its latest eval metric, done, failed) and a summary line after each change."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from moe_jax.train.metrics import METRICS_FILE

_TAIL_BYTES = 1 << 16  # enough of a metrics.jsonl's end to hold its last records
PROGRESS_EVERY_S = 15.0  # a running point's step is printed at most this often


def latest_record(point_dir: str, runs: Mapping[str, str]) -> tuple[str, dict[str, Any]] | None:
    """(prefix, last record) of the most recently written `metrics.jsonl` among the point's runs,
    with the last eval metrics seen in the file's tail merged in; None before the first step."""
    paths = [(prefix, os.path.join(point_dir, folder, METRICS_FILE)) for prefix, folder in runs.items()]
    paths = [(prefix, path) for prefix, path in paths if os.path.exists(path)]
    if not paths:
        return None
    prefix, path = max(paths, key=lambda item: os.path.getmtime(item[1]))
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
        lines = f.read().decode("utf-8", "replace").splitlines()
    merged: dict[str, Any] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the tail's cut first line, or a line being written
        if isinstance(record, dict) and "step" in record:
            merged.update(record)
    return (prefix, merged) if merged else None


class SweepView:
    """Prints to `out` what changed; `states` holds every point's state word."""

    def __init__(self, names: list[str], out: TextIO = sys.stdout, metric: str = "eval/accuracy"):
        self.out, self.metric, self.start = out, metric, time.time()
        self.states = dict.fromkeys(names, "queued")
        self._shown: dict[str, tuple[str, str]] = {}
        self._shown_at: dict[str, float] = {}

    def set(self, name: str, state: str, detail: str = "") -> None:
        """Record `name`'s state; print it if it or (for a running point, at most every
        `PROGRESS_EVERY_S`) its detail changed."""
        self.states[name] = state
        shown = self._shown.get(name)
        now = time.time()
        if shown == (state, detail) or (shown and shown[0] == state == "running"
                                        and now - self._shown_at[name] < PROGRESS_EVERY_S):
            return
        self._shown[name], self._shown_at[name] = (state, detail), now
        self.out.write(f"[sweep {self._elapsed()}] {state:<8} {name}{'  ' + detail if detail else ''}\n")
        if shown is None or shown[0] != state:
            self.out.write(self.summary() + "\n")
        self.out.flush()

    def running(self, name: str, point_dir: str, runs: Mapping[str, str]) -> None:
        """A running point's state with its step and latest value of the view's metric."""
        latest = latest_record(point_dir, runs)
        if latest is None:  # still starting: its "running" line stands
            return
        prefix, record = latest
        detail = f"{prefix}step {record['step']}"
        value = record.get(self.metric)
        if isinstance(value, (int, float)):
            detail += f"  {self.metric} {value:.4g}"
        self.set(name, "running", detail)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        order = ("done", "skipped", "running", "waiting", "queued", "stopping", "stopped", "failed")
        parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
        return f"[sweep {self._elapsed()}] {len(self.states)} points: {', '.join(parts)}"

    def _elapsed(self) -> str:
        seconds = int(time.time() - self.start)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
