"""UI logic without a browser: pairing uploads, staging, run folders, the one-job lock, event parsing."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.errors import UserError
from app.jobs import (
    PID_FILE,
    active_run,
    cancel_run,
    delete_run,
    pair_uploads,
    stage_dataset,
    start_run,
    view_run,
)
from trainer.config import TrainConfig
from trainer.runs import EventLog, read_events


def test_uploads_pair_by_name_and_odd_files_are_reported(image_folder, tmp_path):
    (tmp_path / "notes.pdf").write_text("x")
    (tmp_path / "img0.jpg").write_bytes((image_folder / "img0.png").read_bytes())
    (tmp_path / "scan.BMP").write_bytes(b"BM")
    paths = sorted(image_folder.iterdir()) + [tmp_path / "notes.pdf", tmp_path / "img0.jpg", tmp_path / "scan.BMP"]
    uploads, problems = pair_uploads(paths)
    assert {u.path.name: u.caption for u in uploads}["img1.png"] == (image_folder / "img1.txt").read_text()
    assert "notes.pdf: not a .png/.jpg/.jpeg/.webp/.gif image or a .txt caption; remove it" in problems
    assert "scan.BMP: training does not read .bmp pictures; convert it to PNG, or remove it" in problems
    assert any(p.startswith("img0: two images share this name") for p in problems)


def test_staging_uses_typed_captions_and_lists_every_problem(image_folder, tmp_path):
    uploads, _ = pair_uploads(sorted(p for p in image_folder.iterdir() if p.suffix == ".png"))
    assert all(u.caption == "" for u in uploads)
    with pytest.raises(UserError) as err:
        stage_dataset(uploads, into=tmp_path)
    assert str(err.value).count("is missing") == 4
    for u in uploads:
        u.caption = f"typed for {u.path.stem}"
    staged = stage_dataset(uploads, into=tmp_path)
    assert (staged / "img2.txt").read_text().strip() == "typed for img2"
    assert (image_folder / "img2.txt").read_text() != "typed for img2"  # the user's own files are untouched


def test_view_folds_events_and_tolerates_a_torn_line(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    TrainConfig(data="d", name="neon").save(run / "config.json")
    log = EventLog(run)
    log.emit("start", steps=3)
    for step in (1, 2, 3):
        log.emit("progress", step=step, total=3, loss=1.0 / step, steps_per_s=2.0, eta_s=3 - step)
    log.emit("preview", step=3, path=str(run / "s.png"), prompt="neon, a cat", seed=7)
    log.emit("library", name="neon")
    log.emit("done", step=3, adapter=str(run / "adapter.safetensors"))
    with open(run / "events.jsonl", "a") as f:
        f.write('{"type": "progr')  # a writer caught mid-line
    assert len(read_events(run)) == 7
    view = view_run(run)
    assert (view.status, view.step, view.total, view.name, view.library_name) == ("done", 3, 3, "neon", "neon")
    assert view.losses == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert view.previews == [(str(run / "s.png"), 3, "neon, a cat", 7)]
    assert view.problems == []


def test_a_malformed_line_inside_the_log_is_named_not_skipped(tmp_path):
    """Only the last line may be torn; a bad line before it is an error for readers of the log, and the page
    still shows the run with the line named as a problem."""
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    TrainConfig(data="d", name="neon").save(run / "config.json")
    log = EventLog(run)
    log.emit("start", steps=2)
    log.emit("progress", step=1, total=2, loss=0.5, steps_per_s=2.0, eta_s=1)
    with open(run / "events.jsonl", "a") as f:
        f.write('{"type": "progr\n[1, 2]\n')  # line 3: cut short, line 4: JSON but no event
    log.emit("progress", step=2, total=2, loss=0.25, steps_per_s=2.0, eta_s=0)
    log.emit("done", step=2)
    with pytest.raises(UserError, match=r"events\.jsonl line 3: not JSON .*\n.*events\.jsonl line 4: JSON, but not"):
        read_events(run)
    view = view_run(run)
    assert (view.status, view.step, view.losses) == ("done", 2, [(1, 0.5), (2, 0.25)])
    assert [p.split(": ", 1)[0] for p in view.problems] == [f"{run / 'events.jsonl'} line {n}" for n in (3, 4)]


def test_a_dead_trainer_without_a_final_event_reads_interrupted(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    TrainConfig(data="d").save(run / "config.json")
    EventLog(run).emit("start", steps=10)
    (run / PID_FILE).write_text("999999999")
    (run / "train.log").write_text("Traceback...\nMemoryError: out of memory\n")
    view = view_run(run)
    assert view.status == "interrupted" and "MemoryError" in view.message


def test_one_job_at_a_time_and_the_others_wait_in_order(tmp_path, image_folder, monkeypatch):
    """Issue 19, Train page: a run started while a trainer lives waits in the queue, in order; one taken out never
    starts; when the trainer ends, the next waiting run starts (and only that one)."""
    import app.jobs as jobs

    runs = tmp_path / "runs"
    busy = runs / "busy"
    busy.mkdir(parents=True)
    TrainConfig(data="d").save(busy / "config.json")
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"])]

    def spawn(run_dir, args):  # a stand-in trainer: alive, "train" on its command line
        sleepers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"]))
        (run_dir / PID_FILE).write_text(str(sleepers[-1].pid))

    monkeypatch.setattr(jobs, "_spawn", spawn)
    monkeypatch.setattr(jobs, "QUEUE_POLL_S", 0.1)
    try:
        (busy / PID_FILE).write_text(str(sleepers[0].pid))
        assert active_run(runs).run_dir == busy
        queued = []
        for name in ("a", "b", "c"):
            staged = stage_dataset(pair_uploads(sorted(image_folder.iterdir()))[0], into=runs)
            queued.append(start_run(TrainConfig(data="x", name=name), staged, runs, tmp_path / "lib"))
            assert not staged.exists() and (queued[-1] / "data" / "img0.png").is_file()
        assert [(view_run(r).status, view_run(r).queue_position) for r in queued] == [
            ("queued", 1), ("queued", 2), ("queued", 3)
        ]  # fmt: skip
        assert cancel_run(queued[1]) and view_run(queued[1]).status == "cancelled"
        assert view_run(queued[2]).queue_position == 2
        with pytest.raises(UserError, match="waits in the queue; cancel it first"):
            delete_run(queued[0])
        sleepers[0].kill()
        deadline = time.time() + 30
        while not (queued[0] / PID_FILE).is_file() and time.time() < deadline:
            time.sleep(0.1)
        assert view_run(queued[0]).live and view_run(queued[2]).queue_position == 1
        assert not (queued[1] / PID_FILE).exists() and not (queued[2] / PID_FILE).exists()
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    deadline = time.time() + 30  # the last waiting run starts once the one before it ended
    while not (queued[2] / PID_FILE).is_file() and time.time() < deadline:
        time.sleep(0.1)
    sleepers[-1].kill()
    sleepers[-1].wait()
    assert (queued[2] / PID_FILE).is_file() and not (queued[1] / PID_FILE).exists()


def test_a_queue_left_by_a_stopped_app_goes_on_when_the_app_starts(tmp_path, monkeypatch):
    import socket

    import app.jobs as jobs
    from app.ui import launch

    waiting = tmp_path / "runs" / "20260101-waiting"
    waiting.mkdir(parents=True)
    TrainConfig(data="d").save(waiting / "config.json")
    (waiting / jobs.QUEUED_FILE).write_text("1")
    assert view_run(waiting).status == "queued"
    started = []
    monkeypatch.setattr(jobs, "_spawn", lambda run_dir, args: started.append(run_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch("127.0.0.1", port, workspace=str(tmp_path), block=False)
    try:
        deadline = time.time() + 30
        while not started and time.time() < deadline:
            time.sleep(0.1)
    finally:
        app.close()
    assert started == [waiting] and not (waiting / jobs.QUEUED_FILE).exists()


def test_resume_right_after_cancel_waits_for_the_old_trainer_to_exit(tmp_path, monkeypatch):
    """The page shows "Cancelled" as soon as the trainer says so; its process may still be exiting when Resume is
    pressed: Resume waits for it (no second trainer meanwhile), and says so if it does not exit."""
    import app.jobs as jobs
    from app.jobs import resume_run

    runs = tmp_path / "runs"
    run = runs / "r"
    run.mkdir(parents=True)
    TrainConfig(data="d").save(run / "config.json")
    started = []
    monkeypatch.setattr(jobs, "_spawn", lambda run_dir, args: started.append(jobs._trainer_alive(runs)))
    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)", "train"])
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"])
    try:
        (run / PID_FILE).write_text(str(exiting.pid))  # the trainer is started, then says its last word
        EventLog(run).emit("cancelled", step=0)
        resume_run(run, runs)
        assert started == [None]  # started once the old one was gone
        (run / PID_FILE).write_text(str(stuck.pid))
        EventLog(run).emit("cancelled", step=0)
        monkeypatch.setattr(jobs, "EXIT_WAIT_S", 0.5)
        with pytest.raises(UserError, match=r"already in progress \(r\)"):
            resume_run(run, runs)
    finally:
        for proc in (exiting, stuck):
            proc.kill()
            proc.wait()


def test_a_run_is_renamed_by_the_adapter_name_rules_hidden_only_when_failed_and_deleted_without_its_adapter(tmp_path):
    from app.jobs import delete_run, rename_run, set_hidden

    runs, library = tmp_path / "runs", tmp_path / "library"
    done, failed = runs / "20260101-done", runs / "20260101-failed"
    for run, last in ((done, ("done", {"step": 1})), (failed, ("error", {"message": "boom"}))):
        run.mkdir(parents=True)
        TrainConfig(data="d").save(run / "config.json")
        EventLog(run).emit(last[0], **last[1])
    library.mkdir()
    (library / "mine.safetensors").write_bytes(b"kept")
    assert rename_run(runs, done, " my/run.safetensors") == "my_run"
    assert view_run(done).shown_name == "my_run" and done.is_dir()
    for taken in ("my_run", "20260101-done"):
        with pytest.raises(UserError, match=f"another run is already named '{taken}'"):
            rename_run(runs, failed, taken)
    with pytest.raises(UserError, match="has no usable characters"):
        rename_run(runs, failed, "..")
    with pytest.raises(UserError, match="only failed and cancelled runs can be hidden"):
        set_hidden(done, True)
    set_hidden(failed, True)
    assert view_run(failed).hidden
    set_hidden(failed, False)
    assert not view_run(failed).hidden
    delete_run(done)
    assert not done.exists() and (library / "mine.safetensors").read_bytes() == b"kept"


def test_the_log_reads_as_a_terminal_shows_it(tmp_path):
    """The trainer's log on the page: a progress bar redrawn with carriage returns is its last drawing, escape codes
    and the workspace's folder left out, only the newest lines."""
    from app.jobs import read_log

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    assert read_log(run) == ""
    (run / "train.log").write_bytes(
        b"Loading\n\n  0%| 0/2\r 50%| 1/2\x1b[A\r100%| 2/2\nwrote " + str(run).encode() + b"/adapter.safetensors\n"
    )
    assert read_log(run) == "Loading\n\n100%| 2/2\nwrote runs/r/adapter.safetensors"
    (run / "train.log").write_text("".join(f"line {i}\n" for i in range(1000)))
    assert read_log(run, lines=3).split("\n") == ["[earlier lines are in r/train.log]", "line 998", "line 999"]


def test_started_run_survives_the_ui_forgetting_it(tiny_model, image_folder, tmp_path):
    """The trainer is its own process: a UI that restarts (forgets its child) still finds and follows it."""
    import app.jobs as jobs

    staged = stage_dataset(pair_uploads(sorted(image_folder.iterdir()))[0], into=tmp_path / "runs")
    config = TrainConfig(data="x", base_model=str(tiny_model), steps=5, batch_size=2, name="t")
    run = start_run(config, staged, tmp_path / "runs", tmp_path / "lib")
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"] == str((run / "data").resolve()) and saved["library"] == str((tmp_path / "lib").resolve())
    jobs._CHILDREN.clear()  # as after a UI restart: no handle on the child any more
    deadline = time.time() + 120
    while active_run(tmp_path / "runs") is not None and time.time() < deadline:
        time.sleep(0.5)
    view = view_run(run)
    assert view.status == "done", (run / "train.log").read_text()[-2000:]
    assert view.step == 5 and (tmp_path / "lib" / "t.safetensors").is_file()


def test_resume_from_the_page_continues_a_cancelled_run(tiny_model, image_folder, tmp_path):
    from app.jobs import resume_run
    from trainer.loop import Cancelled, train

    run = tmp_path / "runs" / "r"
    calls = []
    config = TrainConfig(
        base_model=str(tiny_model), data=str(image_folder), steps=10, batch_size=2, save_every=3, run_dir=str(run)
    )
    with pytest.raises(Cancelled):
        train(config, should_stop=lambda: calls.append(1) or len(calls) > 5, device="cpu", log_to_terminal=False)
    assert view_run(run).status == "cancelled"
    resume_run(run, tmp_path / "runs")
    deadline = time.time() + 120
    while active_run(tmp_path / "runs") is not None and time.time() < deadline:
        time.sleep(0.5)
    view = view_run(run)
    assert view.status == "done", (run / "train.log").read_text()[-2000:]
    assert [s for s, _ in view.losses] == list(range(1, 11))  # steps 4-5 of the first attempt were replaced
    with pytest.raises(UserError, match="has finished; there is nothing to resume"):
        resume_run(run, tmp_path / "runs")


def test_loss_plot_axes_are_numbers_and_an_empty_run_clears_the_plot():
    """The page's loss plot keeps the axis types of its first data, so a run's losses go as numbers (else every step
    and loss becomes its own category label, an unreadable smear of ticks); a run without a loss yet clears the plot
    (None) instead of sending an empty frame, after which the browser drew no line (tests/test_ui_browser.py)."""
    import gradio as gr

    from app.ui import loss_frame

    plot = gr.LinePlot(x="step", y="loss", color="series")
    assert loss_frame([]) is None and plot.postprocess(loss_frame([])) is None
    losses = [(1, 0.31), (2, 0.29), (3, 0.30)]
    sent = plot.postprocess(loss_frame(losses)).model_dump()
    assert sent["datatypes"] == {"step": "quantitative", "loss": "quantitative", "series": "nominal"}
    assert [row[0] for row in sent["data"]] == [s for s, _ in losses] * 2  # the raw line, then the smoothed


# -- Runs you can trust (issue 19), what a run leaves behind (issue 14) ---------------------------------------------


def _wait_until_stopped(runs, seconds=180):
    deadline = time.time() + seconds
    while active_run(runs) is not None and time.time() < deadline:
        time.sleep(0.5)


def test_cancel_saves_a_checkpoint_and_puts_the_partial_adapter_in_the_library(tiny_model, image_folder, tmp_path):
    """Item 2: a run cancelled before its first 'Save every' checkpoint can still be resumed, and the adapter
    learned so far is in the library (so Generate and Download have it) as `<name>-partial`."""
    from adapters.library import Library
    from app.jobs import resume_run
    from app.ui import status_text
    from trainer.checkpoint import list_checkpoints
    from trainer.loop import Cancelled, train

    runs, library = tmp_path / "runs", tmp_path / "lib"
    run, calls = runs / "r", []
    config = TrainConfig(
        base_model=str(tiny_model), data=str(image_folder), steps=6, batch_size=2, run_dir=str(run), name="neon",
        library=str(library), save_every=200,
    )  # fmt: skip
    with pytest.raises(Cancelled):
        train(config, should_stop=lambda: calls.append(1) or len(calls) > 3, device="cpu", log_to_terminal=False)
    assert [p.name for p in list_checkpoints(run)] == ["step_000003"]
    assert Library(library).get("neon-partial").summary["steps"] == "3"
    text = status_text(view_run(run))
    assert "Cancelled at step 3" in text and "in the library as **neon-partial**" in text
    resume_run(run, runs)
    _wait_until_stopped(runs)
    view = view_run(run)
    assert view.status == "done", (run / "train.log").read_text()[-2000:]
    assert [s for s, _ in view.losses] == list(range(1, 7)) and view.library_name == "neon"
    # the finished adapter supersedes the run's own partial one: one adapter of this run in the library
    assert [e.name for e in Library(library).list()] == ["neon"]
    assert Library(library).get("neon").summary["steps"] == "6"
    assert "It replaces **neon-partial**, the adapter its cancelled attempt put there." in status_text(view)


def test_a_resumed_run_replaces_only_the_partial_adapter_it_put_in_the_library(tiny_model, image_folder, tmp_path):
    """Cancelled twice, a run keeps one partial adapter (the newer in the older's place); a partial adapter a person
    renamed, and an adapter they put under the partial name, both stay when the run is resumed to the end."""
    import dataclasses

    from safetensors.torch import save_file

    from adapters.formats import read_safetensors
    from adapters.library import Library
    from trainer.loop import Cancelled, train

    library = Library(tmp_path / "lib")
    config = TrainConfig(
        base_model=str(tiny_model), data=str(image_folder), steps=6, batch_size=2, run_dir=str(tmp_path / "r"),
        name="neon", library=str(library.root), save_every=200,
    )  # fmt: skip

    def cancelled_at(step, config):  # after `step` steps of this attempt
        calls = []
        with pytest.raises(Cancelled):
            stop = lambda: calls.append(1) or len(calls) > step  # noqa: E731
            train(config, should_stop=stop, device="cpu", log_to_terminal=False)

    cancelled_at(2, config)
    resumed = dataclasses.replace(config, resume="latest")
    cancelled_at(1, resumed)
    assert [(e.name, e.summary["steps"]) for e in library.list()] == [("neon-partial", "3")]
    library.rename("neon-partial", "mine")  # the person keeps the step-3 adapter
    tensors, metadata = read_safetensors(library.get("mine").path)
    save_file({k: v * 2 for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata=metadata)
    library.add(tmp_path / "theirs.safetensors", "neon-partial")  # and makes another under the partial name
    theirs = library.get("neon-partial").path.read_bytes()
    train(resumed, device="cpu", log_to_terminal=False)
    assert sorted(e.name for e in library.list()) == ["mine", "neon", "neon-partial"]
    assert library.get("neon-partial").path.read_bytes() == theirs
    assert view_run(tmp_path / "r").library_replaced == []


def test_a_resumed_run_says_so_and_its_step_counter_does_not_jump(tmp_path):
    """Item 3: while a resumed attempt loads it reads 'Resuming'; once it speaks it is training, resumed from the
    checkpoint's step, and the step shown is that step (not the last one of the stopped attempt)."""
    from app.ui import status_text

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    TrainConfig(data="d", name="neon").save(run / "config.json")
    log = EventLog(run)
    log.emit("start", steps=10)
    for step in range(1, 8):
        log.emit("progress", step=step, total=10, loss=0.5, steps_per_s=2.0, eta_s=1)
    log.emit("cancelled", step=7)
    time.sleep(0.05)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"])
    try:
        (run / PID_FILE).write_text(str(sleeper.pid))
        assert "Resuming: loading the base model" in status_text(view_run(run))
        log.emit("start", steps=10)
        log.emit("resume", step=5, checkpoint=str(run / "checkpoints" / "step_000005"))
        view = view_run(run)
        assert (view.status, view.step, view.resumed_from) == ("running", 5, 5)
        assert "Training… (resumed from step 5)" in status_text(view)
        log.emit("progress", step=6, total=10, loss=0.5, steps_per_s=2.0, eta_s=1)
        assert view_run(run).step == 6 and view_run(run).status == "running"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cancel_while_starting_says_cancelled_before_training_began(tmp_path):
    """Item 5: a trainer stopped by Cancel before it wrote a word is 'Cancelled before training began', not
    'Interrupted'."""
    from app.jobs import cancel_run
    from app.ui import status_text

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    TrainConfig(data="d", name="neon").save(run / "config.json")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"], start_new_session=True)
    try:
        (run / PID_FILE).write_text(str(sleeper.pid))
        assert view_run(run).status == "starting"
        assert cancel_run(run)
        sleeper.wait(timeout=10)
    finally:
        sleeper.kill()
        sleeper.wait()
    view = view_run(run)
    assert view.status == "cancelled"
    assert status_text(view).startswith("**neon**: Cancelled before training began")


def test_a_start_leaves_no_staged_upload_anywhere(image_folder, tmp_path, monkeypatch):
    """Issue 14: the page stages uploads inside the workspace (never the system temp folder), and a start, whether
    it runs, waits in the queue or fails, leaves no staged folder behind."""
    import tempfile

    import app.jobs as jobs

    before = set(Path(tempfile.gettempdir()).iterdir())
    runs = tmp_path / "runs"
    busy = runs / "busy"
    busy.mkdir(parents=True)
    TrainConfig(data="d").save(busy / "config.json")
    staged = stage_dataset(pair_uploads(sorted(image_folder.iterdir()))[0], into=runs)
    assert staged.parent == runs and set(Path(tempfile.gettempdir()).iterdir()) == before
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"])
    try:
        (busy / PID_FILE).write_text(str(sleeper.pid))
        waiting = start_run(TrainConfig(data="x"), staged, runs, tmp_path / "lib")
        assert view_run(waiting).status == "queued"
        assert cancel_run(waiting)
        staged = stage_dataset(pair_uploads(sorted(image_folder.iterdir()))[0], into=runs)
        monkeypatch.setattr(jobs, "new_run_dir", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
        with pytest.raises(RuntimeError, match="disk full"):
            start_run(TrainConfig(data="x"), staged, runs, tmp_path / "lib")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not staged.exists() and sorted(p.name for p in runs.iterdir()) == sorted(["busy", waiting.name])


def test_a_run_cancelled_before_its_first_step_saves_nothing_and_resume_starts_it_over(
    tiny_model, image_folder, tmp_path
):
    """Items 2 and 5: a Cancel that lands while the model loads ends the run at step 0 with nothing saved (no empty
    adapter in the library); the page says so, and Resume starts the run over on the same folder."""
    from app.jobs import resume_run
    from app.ui import status_text
    from trainer.loop import Cancelled, train

    runs, library = tmp_path / "runs", tmp_path / "lib"
    run = runs / "r"
    config = TrainConfig(
        base_model=str(tiny_model), data=str(image_folder), steps=3, batch_size=2, run_dir=str(run), name="neon",
        library=str(library),
    )  # fmt: skip
    with pytest.raises(Cancelled):
        train(config, should_stop=lambda: True, device="cpu", log_to_terminal=False)
    assert not (run / "adapter.safetensors").exists() and not list(library.glob("*.safetensors"))
    assert status_text(view_run(run)).startswith("**neon**: Cancelled before training began")
    resume_run(run, runs)
    _wait_until_stopped(runs)
    view = view_run(run)
    assert view.status == "done", (run / "train.log").read_text()[-2000:]
    assert [s for s, _ in view.losses] == [1, 2, 3] and view.library_name == "neon"


def test_keep_partial_adapter_keeps_a_cancelled_runs_adapter_under_its_own_name(tiny_model, image_folder, tmp_path):
    """Item 2's one click: Keep partial adapter renames `<name>-partial` to `<name>-step<N>`, the status says so,
    and resuming the run to the end adds the finished adapter beside it instead of replacing it."""
    import gradio as gr

    from adapters.library import Library
    from app.jobs import resume_run
    from app.ui import status_text
    from app.ui.train import TrainTab
    from trainer.loop import Cancelled, train

    runs, library = tmp_path / "runs", tmp_path / "lib"
    run, calls = runs / "r", []
    config = TrainConfig(
        base_model=str(tiny_model), data=str(image_folder), steps=6, batch_size=2, run_dir=str(run), name="neon",
        library=str(library), judge=False,
    )  # fmt: skip
    with pytest.raises(Cancelled):
        train(config, should_stop=lambda: calls.append(1) or len(calls) > 3, device="cpu", log_to_terminal=False)
    assert "press **Keep partial adapter**" in status_text(view_run(run))
    with gr.Blocks():
        tab = TrainTab(runs, Library(library), None)
    said = tab.on_keep_partial("r")
    assert (
        said
        == "Kept: **neon-partial** is now **neon-step3** in the library, and resuming the run no longer replaces it."
    )
    assert "in the library as **neon-step3**" in status_text(view_run(run))
    assert tab.on_keep_partial("r").startswith("⚠ Keep partial adapter is for a cancelled run")  # done once
    resume_run(run, runs)
    _wait_until_stopped(runs)
    assert view_run(run).status == "done", (run / "train.log").read_text()[-2000:]
    kept = {e.name: e.summary["steps"] for e in Library(library).list()}
    assert kept == {"neon": "6", "neon-step3": "3"}
