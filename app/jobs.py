"""Training jobs for the UI: stage an upload, start the trainer as a subprocess, watch, cancel, list runs.

The trainer runs as its own process (`python -m app.cli train --config runs/<id>/config.json`) in its own
session, so closing the browser or restarting the UI neither stops nor loses it. Its events.jsonl is the only
channel back; everything the page shows is read from run folders, so a restarted UI finds every run again.

One trainer at a time: a run started while another trainer lives waits in the queue (a `queued` file in its
folder, so a restarted UI finds the queue again), and a thread of the UI starts the oldest waiting run when no
trainer process is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters.errors import UserError
from adapters.formats import write_atomic
from adapters.library import sanitize_name
from trainer.config import TrainConfig
from trainer.dataset import IMAGE_EXTENSIONS, OTHER_PICTURES, check_folder
from trainer.runs import TERMINAL, new_run_dir, run_losses, scan_events

PID_FILE = "trainer.pid"
LOG_FILE = "train.log"
CANCEL_FILE = "cancel-requested"  # written by Cancel: a trainer stopped before it could say so was cancelled
QUEUED_FILE = "queued"  # a run waiting for the trainer before it to end; holds its place in the queue (ns)
LABEL_FILE = "label.txt"  # the name the page shows for a run, given with Rename (the folder keeps its name)
HIDDEN_FILE = "hidden"  # a failed or cancelled run left out of the page's run list
LOG_LINES = 400  # the newest lines of the trainer's log the page shows
EXIT_WAIT_S = 30.0  # how long Resume waits for the run's own trainer to exit after its last event
QUEUE_POLL_S = 1.0  # how often the queue's thread looks whether the trainer ended (only while a run waits)
MAX_UPLOAD_FILES = 1000  # files (images and captions) in one Train upload; `lora-studio ui --max-upload-files`
MAX_FILE_MB = 2048  # the largest single upload (image, caption, adapter to import; SDXL adapters pass 1 GB)


@dataclass
class Upload:
    """One uploaded image and the caption the person gave it (typed in the table or from a .txt file)."""

    path: Path
    caption: str


def pair_uploads(paths: list[str | Path], max_files: int = MAX_UPLOAD_FILES) -> tuple[list[Upload], list[str]]:
    """Match uploaded images with same-stem .txt files. Returns the images and a list of problems (per file); an
    upload of more than `max_files` files is one problem, and nothing of it is read."""
    if len(paths) > max_files:
        return [], [
            f"the upload has {len(paths)} files, more than the {max_files} allowed; upload fewer "
            "(the limit is lora-studio ui --max-upload-files)"
        ]
    images, captions, problems = [], {}, []
    for raw in paths:
        path = Path(raw)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            captions[path.stem] = path.read_text(encoding="utf-8", errors="replace").strip()
        elif suffix in IMAGE_EXTENSIONS:
            images.append(path)
        elif suffix in OTHER_PICTURES:
            problems.append(f"{path.name}: training does not read {suffix} pictures; convert it to PNG, or remove it")
        else:
            problems.append(f"{path.name}: not a .png/.jpg/.jpeg/.webp/.gif image or a .txt caption; remove it")
    stems = [p.stem for p in images]
    for stem in sorted({s for s in stems if stems.count(s) > 1}):
        problems.append(f"{stem}: two images share this name, so one caption cannot tell them apart; rename one")
    return [Upload(p, captions.get(p.stem, "")) for p in sorted(images, key=lambda p: p.name)], problems


def stage_dataset(uploads: list[Upload], default_caption: str = "", into: str | Path | None = None) -> Path:
    """Copy uploads and their captions into a fresh folder and check it; a UserError lists every problem, naming
    "the upload" rather than the folder. The page stages `into` its runs folder (then starting a run is a rename,
    and nothing of ours is left in the system temp folder); the folder is removed when the check fails."""
    if into is not None:
        Path(into).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".upload-" if into is not None else "lora-studio-upload-", dir=into))
    try:
        for up in uploads:
            shutil.copy2(up.path, staging / up.path.name)
            if up.caption.strip():
                (staging / up.path.with_suffix(".txt").name).write_text(up.caption.strip() + "\n", encoding="utf-8")
        if not uploads:
            raise UserError("no images uploaded: drop .png, .jpg or .webp files (and their .txt captions) first")
        check_folder(staging, default_caption)
    except UserError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(str(exc).replace(f"data folder {staging}", "the upload")) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


@dataclass
class RunView:
    """What the page shows for one run, read from its folder."""

    run_dir: Path
    status: str  # starting, running, done, error, cancelled, interrupted
    step: int = 0
    total: int = 0
    steps_per_s: float = 0.0
    eta_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[tuple[str, int, str, int | None]] = field(default_factory=list)  # (image, step, prompt, seed)
    adapter: str | None = None
    library_name: str | None = None
    library_replaced: list[str] = field(default_factory=list)  # its own -partial adapters the library name replaced
    message: str = ""
    name: str = ""
    problems: list[str] = field(default_factory=list)  # malformed lines of events.jsonl, left out of the view
    resumed_from: int | None = None  # the checkpoint step the current attempt went on from
    resuming: bool = False  # a resumed attempt whose process has not spoken yet
    preview_prompt: tuple[str, ...] = ()  # the run's preview prompts, as configured
    plan: dict = field(default_factory=dict)  # its start event: images, repeats, buckets, batch, steps per epoch...
    label: str = ""  # the name given with Rename, else ""
    hidden: bool = False
    queue_position: int = 0  # 1 for the next run to start, while queued

    @property
    def live(self) -> bool:
        return self.status in ("starting", "running")

    @property
    def shown_name(self) -> str:
        """The run's name on the page: the one given with Rename, else the folder's."""
        return self.label or self.run_dir.name


_CHILDREN: dict[int, subprocess.Popen] = {}  # trainers started by this process, reaped as they end


def _pid_alive(run_dir: Path) -> bool:
    try:
        pid = int((run_dir / PID_FILE).read_text())
    except (OSError, ValueError):
        return False
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not stat.exists():
        return True  # no /proc here: trust kill(0)
    if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
        return False
    args = cmdline.read_bytes()
    return not args or b"train" in args  # a reused pid is not our trainer; a process still starting shows none


def view_run(run_dir: str | Path) -> RunView:
    """Fold a run's events (and whether its process lives) into what the page shows; malformed lines of its log
    are left out and listed in `problems`, so a damaged log still shows the run."""
    run_dir = Path(run_dir)
    events, problems = scan_events(run_dir)
    alive = _pid_alive(run_dir)
    view = RunView(run_dir, "starting" if alive else "interrupted", problems=problems)
    try:
        config = TrainConfig.from_file(run_dir / "config.json")
        view.name, view.preview_prompt = config.name or run_dir.name, config.preview_prompt
    except UserError:
        view.name = run_dir.name
    view.losses = run_losses(events)  # the steps after a resumed checkpoint were lost with the old process
    for e in events:
        kind = e["type"]
        if kind == "start":
            view.status, view.total, view.plan = "running", e["steps"], e
        elif kind == "progress":
            view.step, view.total = e["step"], e["total"]
            view.steps_per_s, view.eta_s = e["steps_per_s"], e["eta_s"]
        elif kind in ("preview", "sample"):  # runs made before the rename say "sample"
            view.previews.append((e["path"], e["step"], e.get("prompt", ""), e.get("seed")))
        elif kind == "resume":
            view.previews = [p for p in view.previews if p[1] <= e["step"]]
            view.status, view.message, view.step, view.resumed_from = "running", "", e["step"], e["step"]
        elif kind == "library":
            view.library_name, view.library_replaced = e["name"], e.get("replaced", [])
        elif kind in TERMINAL:
            view.status = kind
            view.adapter = e.get("adapter", view.adapter)
            view.message = e.get("message", "")
            view.step = e.get("step", view.step)
    if view.status in ("running", "starting") and not alive:
        view.status = "interrupted"
    ended = [e["time"] for e in events if e["type"] in TERMINAL]
    begun = [e["time"] for e in events if e["type"] in ("start", "resume")]
    if alive and ended and (run_dir / PID_FILE).stat().st_mtime > ended[-1] and not (begun and begun[-1] > ended[-1]):
        view.status, view.message, view.resuming = "starting", "", True  # a resumed attempt, not speaking yet
    if view.status == "interrupted" and _cancel_asked(run_dir):
        view.status = "cancelled"  # stopped by Cancel before the trainer could say so (it was still loading)
    view.label = _read_label(run_dir)
    view.hidden = (run_dir / HIDDEN_FILE).is_file()
    if view.status == "interrupted" and (run_dir / QUEUED_FILE).is_file() and not events:
        queue = queued_runs(run_dir.parent)
        view.status, view.queue_position = "queued", queue.index(run_dir) + 1 if run_dir in queue else 1
    if view.status == "interrupted":
        log = run_dir / LOG_FILE
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
        view.message = "the trainer stopped without finishing" + (": " + " | ".join(tail) if tail else "")
    return view


def _cancel_asked(run_dir: Path) -> bool:
    """Whether Cancel was pressed for the trainer's current attempt."""
    marker, pid = run_dir / CANCEL_FILE, run_dir / PID_FILE
    return marker.is_file() and (not pid.is_file() or marker.stat().st_mtime >= pid.stat().st_mtime)


def list_runs(runs_root: str | Path) -> list[RunView]:
    """Every run folder under `runs_root`, newest first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if (d / "config.json").is_file()]
    return [view_run(d) for d in sorted(dirs, key=lambda d: d.name, reverse=True)]


def active_run(runs_root: str | Path) -> RunView | None:
    """The run whose trainer process is alive, if any (there is at most one)."""
    return next((v for v in list_runs(runs_root) if v.live), None)


def start_run(config: TrainConfig, staged: Path, runs_root: str | Path, library: str | Path) -> Path:
    """Create `runs/<id>/` (config, data), start the trainer process on it, and return the folder.

    While another trainer lives, or other runs wait, the run joins the end of the queue instead (its folder made
    all the same; `view_run` says "queued" and its place), and starts when the runs before it have ended.
    """
    with _QUEUE_LOCK:
        try:
            run_dir = new_run_dir(runs_root, config.name)
            shutil.move(str(staged), run_dir / "data")
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # moved into the run, or the run never started
        values = config.to_dict()
        values.update(
            data=str((run_dir / "data").resolve()),
            run_dir=str(run_dir.resolve()),
            library=str(Path(library).resolve()),
            output="",
        )
        final = TrainConfig.from_dict(values)
        final.save(run_dir / "config.json")
        if _trainer_alive(runs_root) is None and not queued_runs(runs_root):
            _spawn(run_dir, ["--config", str(run_dir / "config.json")])
            return run_dir
        (run_dir / QUEUED_FILE).write_text(str(time.time_ns()))
    watch_queue(runs_root)
    return run_dir


# -- the queue: one trainer at a time, the others wait in order ----------------------------------------------------

_QUEUE_LOCK = threading.RLock()  # queueing, starting and cancelling a waiting run happen one at a time
_WATCHERS: dict[Path, threading.Thread] = {}


def _run_dirs(runs_root: str | Path) -> list[Path]:
    root = Path(runs_root)
    return [d for d in root.iterdir() if (d / "config.json").is_file()] if root.is_dir() else []


def _trainer_alive(runs_root: str | Path) -> Path | None:
    """The run whose trainer process lives (still saving or exiting after its last event, too), if any."""
    return next((d for d in _run_dirs(runs_root) if _pid_alive(d)), None)


def queued_runs(runs_root: str | Path) -> list[Path]:
    """The runs waiting to start, the next one first."""

    def place(run_dir: Path) -> int:
        try:
            return int((run_dir / QUEUED_FILE).read_text())
        except (OSError, ValueError):
            return 0

    return sorted((d for d in _run_dirs(runs_root) if (d / QUEUED_FILE).is_file()), key=lambda d: (place(d), d.name))


def start_next(runs_root: str | Path) -> Path | None:
    """Start the oldest waiting run if no trainer lives; returns it, or None when nothing started."""
    with _QUEUE_LOCK:
        queue = queued_runs(runs_root)
        if not queue or _trainer_alive(runs_root) is not None:
            return None
        run_dir = queue[0]
        _spawn(run_dir, ["--config", str(run_dir / "config.json")])
        (run_dir / QUEUED_FILE).unlink()  # after the spawn: the run reads "starting", never "interrupted"
        return run_dir


def watch_queue(runs_root: str | Path) -> None:
    """Make sure a thread of this process starts the waiting runs in turn; it ends when the queue is empty. The UI
    calls it when it starts, so a queue left by a UI that stopped goes on."""
    key = Path(runs_root).resolve()

    def watch() -> None:
        while queued_runs(key):
            start_next(key)
            time.sleep(QUEUE_POLL_S)

    with _QUEUE_LOCK:
        if key in _WATCHERS and _WATCHERS[key].is_alive():
            return
        if queued_runs(key):
            _WATCHERS[key] = threading.Thread(target=watch, name=f"queue {key}", daemon=True)
            _WATCHERS[key].start()


def resume_run(run_dir: str | Path, runs_root: str | Path) -> None:
    """Start the trainer again on a stopped run, from its newest checkpoint."""
    run_dir = Path(run_dir)
    with _QUEUE_LOCK:
        _resume(run_dir, runs_root)


def _resume(run_dir: Path, runs_root: str | Path) -> None:
    from trainer.checkpoint import list_checkpoints

    view = view_run(run_dir)
    if view.status == "queued":
        raise UserError(f"run {view.shown_name} is waiting in the queue; it starts when the run before it ends")
    if view.status == "done":
        raise UserError(f"run {run_dir.name} has finished; there is nothing to resume")
    busy = _trainer_alive(runs_root)  # one still saving or exiting after its last event counts too
    if busy == run_dir and view.status in TERMINAL:  # its own trainer said its last word and is exiting
        deadline = time.monotonic() + EXIT_WAIT_S
        while _pid_alive(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        busy = _trainer_alive(runs_root)
    if busy is not None:
        raise UserError(f"a training run is already in progress ({busy.name}); wait for it or cancel it")
    (run_dir / CANCEL_FILE).unlink(missing_ok=True)
    if not list_checkpoints(run_dir):
        if view.losses:  # it trained, then died without a checkpoint (killed, not cancelled: Cancel saves one)
            raise UserError(
                f"run {run_dir.name} stopped before its first checkpoint, so it cannot go on; train it again"
            )
        # it never trained a step: start it over, on the same folder, data and settings
        (run_dir / "events.jsonl").unlink(missing_ok=True)
        _spawn(run_dir, ["--config", str(run_dir / "config.json")])
        return
    _spawn(run_dir, ["--run-dir", str(run_dir), "--resume", "latest"])


def _spawn(run_dir: Path, args: list[str]) -> None:
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "train", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the UI: its own process group and session
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    _CHILDREN[proc.pid] = proc
    (run_dir / PID_FILE).write_text(str(proc.pid))


def cancel_run(run_dir: str | Path) -> bool:
    """Ask a live trainer to stop (SIGTERM): it saves a checkpoint and the adapter learned so far and records
    `cancelled`; one still loading stops at once, and the run reads "cancelled" all the same. A run waiting in
    the queue leaves it and never starts (it reads "cancelled" too)."""
    run_dir = Path(run_dir)
    with _QUEUE_LOCK:
        if (run_dir / QUEUED_FILE).is_file():
            (run_dir / CANCEL_FILE).write_text("queued")
            (run_dir / QUEUED_FILE).unlink()
            return True
    if not _pid_alive(run_dir):
        return False
    pid = int((run_dir / PID_FILE).read_text())
    (run_dir / CANCEL_FILE).write_text(str(pid))
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        os.kill(pid, signal.SIGTERM)
    return True


# -- what the page does to a run folder: rename, hide, delete, read its log ------------------------------------------

FAILED_OR_CANCELLED = ("error", "interrupted", "cancelled")  # the runs that can be hidden


def _read_label(run_dir: Path) -> str:
    try:
        return (run_dir / LABEL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def run_folder(runs_root: str | Path, name: str) -> Path:
    """The folder of run `name` (as the run list names it), checked to be a run folder directly under `runs_root`."""
    root = Path(runs_root)
    run_dir = root / str(name or "")
    if not name or Path(name).name != name or not (run_dir / "config.json").is_file():
        raise UserError(f"there is no run {name!r}; choose one in the run list")
    return run_dir


def new_run_label(runs_root: str | Path, run_dir: Path, typed: str) -> str:
    """The name run `run_dir` would be shown under if renamed to `typed`: cleaned as adapter names are (the same
    `sanitize_name`), and refused when another run already shows that name."""
    label = sanitize_name(typed)
    for other in _run_dirs(runs_root):
        if other != run_dir and label in (other.name, _read_label(other)):
            raise UserError(f"another run is already named {label!r}; choose another name")
    return label


def rename_run(runs_root: str | Path, run_dir: Path, typed: str) -> str:
    """Give a run the name the page shows for it (its folder, its adapter and the library keep theirs); returns the
    cleaned name."""
    label = new_run_label(runs_root, run_dir, typed)
    write_atomic(run_dir / LABEL_FILE, (label + "\n").encode("utf-8"))
    return label


def set_hidden(run_dir: Path, hidden: bool) -> None:
    """Leave a failed or cancelled run out of the run list (`hidden`), or bring it back."""
    if not hidden:
        (run_dir / HIDDEN_FILE).unlink(missing_ok=True)
        return
    view = view_run(run_dir)
    if view.status not in FAILED_OR_CANCELLED:
        raise UserError(
            f"run {view.shown_name} is {view.status}: only failed and cancelled runs can be hidden; Delete removes it"
        )
    (run_dir / HIDDEN_FILE).write_text("")


def delete_run(run_dir: Path) -> None:
    """Delete a run folder (its data copy, checkpoints, previews and its copy of the adapter). The adapter in the
    library is a file of its own, and stays. Refused while the run trains or waits in the queue."""
    with _QUEUE_LOCK:
        view = view_run(run_dir)
        if _pid_alive(run_dir) or view.status == "queued":
            what = "waits in the queue" if view.status == "queued" else "is training"
            raise UserError(f"run {view.shown_name} {what}; cancel it first, then delete it")
        shutil.rmtree(run_dir)


_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # cursor moves and colours of progress bars


def read_log(run_dir: Path, lines: int = LOG_LINES) -> str:
    """The newest `lines` lines the trainer wrote (its stdout and stderr, kept in the run's train.log) as a terminal
    shows them (a progress bar redrawn with carriage returns is its last drawing; escape codes left out), with the
    workspace's own folder left out of paths; "" when it has written nothing yet."""
    path = run_dir / LOG_FILE
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - 200 * lines)  # lines are short: enough for `lines` of them
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace").rstrip("\n")
    except OSError:
        return ""
    kept = text.split("\n")[1 if start else 0 :] if text else []  # the first line read from a tail is cut
    kept = [_TERMINAL_CODES.sub("", line).rstrip("\r").rsplit("\r", 1)[-1] for line in kept]
    if start or len(kept) > lines:
        kept = [f"[earlier lines are in {run_dir.name}/{LOG_FILE}]", *kept[-lines + 1 :]]
    workspace = str(run_dir.resolve().parent.parent) + os.sep
    return "\n".join(kept).replace(workspace, "")
