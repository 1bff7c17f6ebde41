"""Run folders (`runs/<run-id>/`) and their append-only event log, which the UI tails.

A run folder holds config.json, events.jsonl, samples/ and the adapter. Events are JSON lines with a `type`
(`start`, `progress`, `sample`, `checkpoint`, `error`, `cancelled`, `done`) and a wall-clock `time`.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

EVENTS = "events.jsonl"
TERMINAL = ("done", "error", "cancelled")


def new_run_dir(root: str | Path = "runs", name: str = "") -> Path:
    """Create and return a fresh `root/<date-time>[-name]` folder (a suffix is added if the name is taken)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40]
    base = datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{slug}" if slug else "")
    for i in range(1000):
        path = root / (base if i == 0 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {root}")


class EventLog:
    """Appends one JSON object per line to `<run>/events.jsonl`; each line is flushed as it is written."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS
        self.enabled = enabled

    def emit(self, type: str, **fields) -> None:
        if not self.enabled:
            return
        line = json.dumps({"type": type, "time": time.time(), **fields}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_events(run_dir: Path) -> list[dict]:
    """All complete events of a run; a torn last line (a writer mid-append) is skipped, not an error."""
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
