"""Run folders (`runs/<run-id>/`) and their append-only event log, which the UI tails.

A run folder holds config.json, plan.json, events.jsonl, previews/, checkpoints/, the adapter and, once it ends,
loss.png (and tensorboard/ with --log-with tensorboard).
Events are JSON lines with a `type` (`start`, `resume`, `notice`, `progress`, `preview`, `checkpoint`, `error`,
`cancelled`, `library`, `done`) and a wall-clock `time`.
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
PARTIAL_SUFFIX = "-partial"  # a cancelled run's adapter in the library: <name>-partial (replaced when it finishes)
PLAN = "plan.json"  # what the run was planned to need (trainer/plan.py), written before it starts
LOSS_PNG = "loss.png"  # the run's loss curve, drawn when it ends
TENSORBOARD = "tensorboard"  # the run's TensorBoard logs (--log-with tensorboard), beside events.jsonl
SMOOTHING = 0.9  # weight of the smoothed loss line's moving average (TensorBoard's smoothing slider, same formula)
RAW_COLOR, SMOOTHED_COLOR = (199, 221, 236), (31, 119, 180)  # the raw loss faint, its smoothed line over it


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


def check_log_with(log_with: str) -> None:
    """Refuse --log-with tensorboard, before any model loads, where accelerate finds no TensorBoard writer."""
    from accelerate.utils import is_tensorboard_available

    if log_with == "tensorboard" and not is_tensorboard_available():
        raise UserError(
            "log_with (--log-with) tensorboard needs a TensorBoard writer: pip install tensorboardX (or: pip install "
            "-e '.[tensorboard]'; the tensorboard package works too), or train with --log-with none"
        )


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


def run_losses(events: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every step of a run as it stands: the steps a resume trained again replace the lost ones."""
    losses: list[tuple[int, float]] = []
    for e in events:
        if e["type"] == "progress":
            losses.append((e["step"], e["loss"]))
        elif e["type"] == "resume":
            losses = [(step, loss) for step, loss in losses if step <= e["step"]]
    return losses


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the line starts at the first value
    instead of climbing from 0."""
    out, last = [], 0.0
    for count, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**count))
    return out


def draw_loss_curve(losses: list[tuple[int, float]], path: Path, size: tuple[int, int] = (800, 400)) -> Path:
    """The loss as the page shows it, as a PNG (Pillow only): each step's loss faint, the smoothed line over it."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    from adapters.formats import write_atomic

    width, height = size
    left, right, top, bottom = 70, 20, 36, 44
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    steps, raw = [s for s, _ in losses], [v for _, v in losses]
    first, last = (min(steps), max(steps)) if steps else (0, 1)
    low, high = (min(raw), max(raw)) if raw else (0.0, 1.0)
    last, high = max(last, first + 1), high if high > low else low + 1.0

    def point(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        return x, top + (high - loss) / (high - low) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline=(120, 120, 120))
    for i in range(5):  # four spans on each axis, labelled
        loss, step = high - (high - low) * i / 4, first + (last - first) * i / 4
        y, x = point(first, loss)[1], point(step, low)[0]
        draw.line([left - 4, y, left, y], fill=(120, 120, 120))
        draw.text((left - 6, y), f"{loss:.3g}", fill="black", font=font, anchor="rm")
        draw.line([x, height - bottom, x, height - bottom + 4], fill=(120, 120, 120))
        draw.text((x, height - bottom + 6), f"{step:.0f}", fill="black", font=font, anchor="ma")
    draw.text((width / 2, height - 4), "step", fill="black", font=font, anchor="md")
    title = f"loss: each step (faint) and smoothed (exponential moving average, weight {SMOOTHING})"
    draw.text((left, top / 2), title, fill="black", font=font, anchor="lm")
    for values, colour, line_width in ((raw, RAW_COLOR, 1), (smoothed(raw), SMOOTHED_COLOR, 2)):
        points = [point(s, v) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=line_width)
        elif points:
            draw.point(points, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)
