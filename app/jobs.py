"""Training jobs for the UI: stage an upload, start the trainer as a subprocess, watch, cancel, list runs.

The trainer runs as its own process (`python -m app.cli train --config runs/<id>/config.json`) in its own
session, so closing the browser or restarting the UI neither stops nor loses it. Its events.jsonl is the only
channel back; everything the page shows is read from run folders, so a restarted UI finds every run again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from adapters.errors import UserError
from trainer.config import TrainConfig
from trainer.dataset import IMAGE_EXTENSIONS, check_folder
from trainer.runs import TERMINAL, new_run_dir, run_losses, scan_events

PID_FILE = "trainer.pid"
LOG_FILE = "train.log"
CANCEL_FILE = "cancel-requested"  # written by Cancel: a trainer stopped before it could say so was cancelled
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
    message: str = ""
    name: str = ""
    problems: list[str] = field(default_factory=list)  # malformed lines of events.jsonl, left out of the view
    resumed_from: int | None = None  # the checkpoint step the current attempt went on from
    resuming: bool = False  # a resumed attempt whose process has not spoken yet
    preview_prompt: tuple[str, ...] = ()  # the run's preview prompts, as configured
    plan: dict = field(default_factory=dict)  # its start event: images, repeats, buckets, batch, steps per epoch...

    @property
    def live(self) -> bool:
        return self.status in ("starting", "running")


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
            view.library_name = e["name"]
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

    Refuses while another run's trainer is alive: one GPU job at a time (the staged folder is then removed).
    """
    try:
        busy = active_run(runs_root)
        if busy is not None:
            raise UserError(
                f"a training run is already in progress ({busy.run_dir.name}, step {busy.step}/{busy.total}); "
                "wait for it to finish or cancel it first"
            )
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
    _spawn(run_dir, ["--config", str(run_dir / "config.json")])
    return run_dir


def resume_run(run_dir: str | Path, runs_root: str | Path) -> None:
    """Start the trainer again on a stopped run, from its newest checkpoint."""
    from trainer.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    busy = active_run(runs_root)
    if busy is not None:
        raise UserError(f"a training run is already in progress ({busy.run_dir.name}); wait for it or cancel it")
    view = view_run(run_dir)
    if view.status == "done":
        raise UserError(f"run {run_dir.name} has finished; there is nothing to resume")
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
    `cancelled`; one still loading stops at once, and the run reads "cancelled" all the same."""
    run_dir = Path(run_dir)
    if not _pid_alive(run_dir):
        return False
    pid = int((run_dir / PID_FILE).read_text())
    (run_dir / CANCEL_FILE).write_text(str(pid))
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        os.kill(pid, signal.SIGTERM)
    return True
