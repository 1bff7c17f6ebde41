"""The page's pieces without a browser: the Train tab's status line, the settings form, the Generate request."""

import subprocess
import sys

import gradio as gr

from adapters.library import Library
from app.jobs import PID_FILE, view_run
from app.ui import GenerateRequest, status_text
from app.ui.generate import NONE, SLOTS
from app.ui.settings import SettingsForm
from app.ui.train import TrainTab
from trainer.config import TrainConfig
from trainer.runs import EventLog


def test_run_status_warns_of_unreadable_event_lines(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    TrainConfig(data="d", name="neon").save(run / "config.json")
    log = EventLog(run)
    log.emit("start", steps=2)
    with open(run / "events.jsonl", "a") as f:
        f.write('{"type": "progr\n[1, 2]\n')  # line 2: cut short, line 3: JSON but no event
    log.emit("done", step=2)
    text = status_text(view_run(run))
    assert text.startswith("**neon**: Done.")
    warning = text.split("\n\n", 1)[1]
    assert warning.startswith("⚠ events.jsonl has 2 unreadable line(s), left out of this view: ")
    assert "events.jsonl line 2: not JSON" in warning and "events.jsonl line 3: JSON, but not an event" in warning

    clean = tmp_path / "runs" / "r2"
    clean.mkdir()
    EventLog(clean).emit("done", step=1)
    assert "⚠" not in status_text(view_run(clean))


def test_settings_form_hides_what_the_page_chooses_and_keeps_its_defaults():
    with gr.Blocks():
        one_gpu, two_gpus = SettingsForm(gpus=1), SettingsForm(gpus=2)
    assert not {"data", "output", "run_dir", "library", "overwrite", "resume"} & set(one_gpu.controls)
    assert "num_processes" not in one_gpu.controls and "num_processes" in two_gpus.controls
    config = one_gpu.config([c.value for c in one_gpu.inputs])
    assert (config.preview_every, config.save_every) == (100, 200)  # the page's own defaults, not the CLI's
    assert (config.steps, config.rank) == (TrainConfig.steps, TrainConfig.rank)


def test_generate_request_reads_the_slots_in_order_and_leaves_empty_ones_out():
    plain = ["builtin", "a prompt", "", 7.0, False, 20, 5, 0.7, None, 64, "Euler", "0, 1"]
    names = ["b", NONE, "a", None]
    assert len(names) == SLOTS
    request = GenerateRequest.from_inputs([*plain, *names, 0.5, 1.0, 1.5, 1.0])
    assert request.strengths == {"b": 0.5, "a": 1.5} and list(request.strengths) == ["b", "a"]
    assert (request.seed, request.width, request.height, request.sampling_steps) == (7, 0, 64, 20)
    assert request.compare_values() == [0.0, 1.0]


def test_a_run_list_refresh_sent_before_trains_answer_keeps_the_new_run_picked(tmp_path):
    """The once-a-second run list refresh can carry the picker's value from before Train answered (nothing
    picked); it must not clear the run that was just started, or the page would stop following it."""
    runs = tmp_path / "runs"
    started = runs / "20260101-000000"
    started.mkdir(parents=True)
    TrainConfig(data="d").save(started / "config.json")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"])
    try:
        (started / PID_FILE).write_text(str(sleeper.pid))
        with gr.Blocks():
            tab = TrainTab(runs, Library(tmp_path / "library"), None)
        picker, shown = tab.refresh_choices(None, [])
        assert picker.value == started.name and [value for _, value in shown] == [started.name]
    finally:
        sleeper.kill()
        sleeper.wait()
