"""Run folders (`runs/<run-id>/`) and their append-only event log, which the UI tails.

A run folder holds config.json, events.jsonl, previews/, checkpoints/ and the adapter. Events are JSON lines with
a `type` (`start`, `resume`, `notice`, `progress`, `preview`, `checkpoint`, `error`, `cancelled`, `library`,
`done`) and a wall-clock `time`.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

from adapters.errors import UserError

EVENTS = "events.jsonl"
PREVIEWS = "previews"  # the run folder's preview pictures, step_NNNNNN.png
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


def scan_events(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """A run's events, and one problem per malformed line (left out of the events), naming the file and line.

    An event is a JSON object with a `type`. A torn last line (no newline yet: a writer caught mid-append) is
    skipped without a problem; any other line that is not an event is a problem.
    """
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    events, problems = [], []
    for number, line in enumerate(lines, start=1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            why = f"not JSON ({exc.msg} at column {exc.colno})"
        else:
            why = "" if isinstance(event, dict) and "type" in event else "JSON, but not an event with a type"
        if not why:
            events.append(event)
        elif number < len(lines):  # after the last newline comes "" or a line still being written: no problem
            problems.append(f"{path} line {number}: {why}")
    return events, problems


def read_events(run_dir: str | Path) -> list[dict]:
    """All events of a run; a torn last line (a writer mid-append) is skipped, any other malformed line is a
    UserError naming the file and line (`scan_events` reads past them instead)."""
    events, problems = scan_events(run_dir)
    if problems:
        raise UserError(
            "the run's event log has malformed lines:\n  " + "\n  ".join(problems) + "\nfix or delete those lines"
        )
    return events


def steady_step_seconds(run_dir: Path, skip: int = 10) -> float:
    """Seconds per training step once a run is warm: the progress events after the first `skip` steps (which
    hold model loading, caching and any graph capture)."""
    times = [e["time"] for e in read_events(run_dir) if e["type"] == "progress"]
    if len(times) < skip + 2:
        raise ValueError(f"{run_dir} has {len(times)} progress events; steady speed needs more than {skip + 1}")
    return (times[-1] - times[skip]) / (len(times) - skip - 1)
