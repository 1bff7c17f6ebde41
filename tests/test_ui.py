"""The page's pieces without a browser: the Train tab's status line, the settings form, the Generate request."""

import logging
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from adapters.errors import UserError
from adapters.library import Library
from app.jobs import PID_FILE, view_run
from app.ui import GenerateRequest, status_text
from app.ui.generate import NONE, SLOTS
from app.ui.settings import SettingsForm
from app.ui.train import TrainTab
from tests.conftest import write_scene_folder
from trainer.config import TrainConfig
from trainer.runs import EventLog


def test_the_compile_box_draws_through_a_compiled_unet_and_unticked_draws_without_it(
    tiny_model, tmp_path, monkeypatch, caplog
):
    """The Generate tab's "Compile the UNet" box: ticked, the pictures come through torch.compile (here a backend
    that counts what it is given) and the status line says the first one compiles; unticked, the same studio draws
    uncompiled again, with no reload; the pictures are the same either way. A compiler that fails is named on the
    status line, the pictures are drawn uncompiled, and no later press tries it again."""
    import dataclasses

    import numpy as np
    import torch

    from adapters import runtime
    from app.ui.generate import GenerateTab, Job

    graphs, tries = [], []
    caplog.set_level(logging.WARNING, logger="torch.__trace")  # pytest's capture would take dynamo's trace log
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))
    with gr.Blocks():
        tab = GenerateTab(Library(tmp_path / "library"), str(tiny_model), runs_root=tmp_path / "runs")
    values = [c.value for c in tab.inputs]
    values[0], values[5] = str(tiny_model), 4  # the base model; 4 sampling steps
    request = GenerateRequest.from_inputs(values)
    assert request.compile_unet is False  # the box starts unticked (`lora-studio ui --compile` ticks it)

    def draw(compile_unet: bool):
        asked = dataclasses.replace(request, compile_unet=compile_unet)
        shown = tab.render(asked, [Job({}, "")], lambda: False, lambda *a, **k: None, save=False)
        return np.asarray(shown.pictures[0][0], dtype=float), tab._loaded_and_notes(asked, shown)

    torch._dynamo.reset()
    try:
        plain, _ = draw(False)
        compiled, said = draw(True)
        studio = tab.studios.studio
        assert studio.compile_unet and graphs and np.abs(compiled - plain).max() <= 1
        assert "runs through torch.compile now" in said, said
        count = len(graphs)
        again, said = draw(False)
        assert tab.studios.studio is studio and not studio.compile_unet and tab.studios.loads == 1
        assert np.array_equal(again, plain) and len(graphs) == count and "torch.compile" not in said

        def failing(gm, example_inputs):
            tries.append(gm)
            raise RuntimeError("no compiler here")

        monkeypatch.setattr(runtime, "COMPILE_BACKEND", failing)
        torch._dynamo.reset()
        with gr.Blocks():
            tab = GenerateTab(Library(tmp_path / "library"), str(tiny_model), runs_root=tmp_path / "runs")
        with pytest.warns(UserWarning, match="without torch.compile"):
            broken, said = draw(True)
        assert tries and np.abs(broken - plain).max() <= 1
        assert "torch.compile failed, so pictures are drawn uncompiled" in said and "no compiler here" in said, said
        count = len(tries)
        for _ in range(2):  # the box still ticked: no new try, and the status line keeps saying why
            _, said = draw(True)
            assert len(tries) == count and "torch.compile failed" in said, said
        draw(False)  # unticked and ticked again: still no new try
        _, said = draw(True)
        assert len(tries) == count and "torch.compile failed" in said, said
    finally:
        torch._dynamo.reset()


def test_the_compile_box_compiles_in_the_background_where_the_app_says_so(tiny_model, tmp_path, monkeypatch, caplog):
    """`ui --compile background` (what `auto` means on a CUDA GPU): the box starts ticked, the first picture is
    drawn at once, uncompiled, and the status line says the compile goes on in the background; once it is done,
    pictures come through the compiled code, the same pictures, and the status line says nothing more of it.
    `auto` on a machine without CUDA leaves the box unticked."""
    import threading

    import numpy as np
    import torch

    from adapters import runtime
    from app.ui.generate import GenerateTab, Job, compile_mode

    assert compile_mode("auto") == (torch.cuda.is_available(), True)
    runs = []

    def counting(gm, example_inputs):
        def run(*args):
            runs.append(threading.current_thread() is threading.main_thread())
            return gm.forward(*args)

        return run

    caplog.set_level(logging.WARNING, logger="torch.__trace")
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", counting)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))
    with gr.Blocks():
        tab = GenerateTab(Library(tmp_path / "library"), str(tiny_model), runs_root=tmp_path / "runs")
        background = GenerateTab(
            Library(tmp_path / "library"), str(tiny_model), runs_root=tmp_path / "runs", compile_unet="background"
        )
    assert background.compile_box.value is True and "in the background" in background.compile_box.info

    def draw(page, ticked: bool):
        values = [c.value for c in page.inputs]
        values[0], values[5] = str(tiny_model), 4  # the base model; 4 sampling steps
        request = GenerateRequest.from_inputs(values)
        assert request.compile_unet is ticked
        shown = page.render(request, [Job({}, "")], lambda: False, lambda *a, **k: None, save=False)
        return np.asarray(shown.pictures[0][0], dtype=float), page._loaded_and_notes(request, shown)

    torch._dynamo.reset()
    try:
        plain, _ = draw(tab, False)
        first, said = draw(background, True)
        assert np.array_equal(first, plain) and True not in runs
        assert "being compiled in the background" in said, said
        assert background.studios.studio.wait_for_compile(timeout=300)
        compiled, said = draw(background, True)
        assert np.abs(compiled - plain).max() <= 1 and runs.count(True) >= 2
        assert "torch.compile" not in said and "compiled" not in said, said
    finally:
        torch._dynamo.reset()


def test_a_size_the_model_cannot_draw_well_and_an_empty_prompt_are_said_on_the_status_line(tiny_model, tmp_path):
    """The Generate tab's Width and Height are plain number boxes: a side above 4x the model's own is refused on
    the status line, with the largest side the loaded model takes. An empty prompt draws, with a note."""
    import dataclasses
    from types import SimpleNamespace

    from app.ui.generate import GenerateTab

    with gr.Blocks():
        tab = GenerateTab(Library(tmp_path / "library"), str(tiny_model), runs_root=tmp_path / "runs")
    values = [c.value for c in tab.inputs]
    fields = [f.name for f in dataclasses.fields(GenerateRequest)]
    values[fields.index("base_model")], values[fields.index("height")] = str(tiny_model), 256
    values[fields.index("sampling_steps")] = 1
    answer = tab.on_generate(SimpleNamespace(session_hash="s"), lambda *a, **k: None, *values)
    assert answer[1].startswith("⚠ height 256 is more than 4x the model's native 32 px;")
    assert answer[1].endswith("use at most 128") and not list(tmp_path.glob("**/*.png"))
    values[fields.index("height")], values[fields.index("prompt")] = 32, "  "
    answer = tab.on_generate(SimpleNamespace(session_hash="s"), lambda *a, **k: None, *values)
    assert "The prompt was empty, so these pictures are what the model draws unprompted" in answer[1], answer[1]
    assert len(list(tmp_path.glob("**/*.png"))) == 1  # drawn all the same, as other tools do


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
    # one arrow press on a decimal setting moves it by a tenth of its leading digit, not by 1 (0.0001 became 1)
    lr = one_gpu.controls["learning_rate"]
    assert lr.value == 1e-4 and lr.step == pytest.approx(1e-5)
    assert one_gpu.controls["steps"].step == 1


def test_generate_request_reads_the_slots_in_order_and_leaves_empty_ones_out():
    plain = ["builtin", "a prompt", "", 7.0, False, 20, 5, 0.7, None, 64, "Euler", 2, 3, "0, 1", True]
    names = ["b", NONE, "a", None]
    assert len(names) == SLOTS
    request = GenerateRequest.from_inputs([*plain, *names, 0.5, 1.0, 1.5, 1.0])
    assert request.strengths == {"b": 0.5, "a": 1.5} and list(request.strengths) == ["b", "a"]
    assert (request.seed, request.width, request.height, request.sampling_steps) == (7, 0, 64, 20)
    assert (request.batch_count, request.batch_size, request.random_seed) == (2, 3, False)
    assert request.compile_unet is True
    plain[3] = -1  # A1111's way to ask for a random seed
    assert GenerateRequest.from_inputs([*plain, *names, 0.5, 1.0, 1.5, 1.0]).random_seed
    assert request.compare_values() == [0.0, 1.0]
    with pytest.raises(UserError, match=r"adapter b is picked in 2 slots \(strengths 0.5 and 1.5\); pick it in one"):
        GenerateRequest.from_inputs([*plain, "b", NONE, "b", None, 0.5, 1.0, 1.5, 1.0])  # one would be dropped


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
        picker, shown, _ = tab.refresh_choices(None, [])
        assert picker.value == started.name and [value for _, value in shown] == [started.name]
    finally:
        sleeper.kill()
        sleeper.wait()


# -- Runs you can trust (issue 19) ---------------------------------------------------------------------------------


def _sleeper():
    """A stand-in trainer process: alive, with "train" on its command line, in its own process group."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train"], start_new_session=True)


def _run_folder(runs, name, **config):
    run = runs / name
    run.mkdir(parents=True)
    TrainConfig(data="d", **config).save(run / "config.json")
    return run


def _tab(tmp_path, runs=None):
    with gr.Blocks():
        return TrainTab(runs or tmp_path / "runs", Library(tmp_path / "library"), None)


def test_the_run_list_refresh_never_puts_back_the_run_shown_before_train(tmp_path):
    """Item 1: a tick sent while the old run was picked, answered after Train picked the new one, must not move the
    picker back to the old run; and Cancel stops the running training whatever run the picker shows."""
    runs = tmp_path / "runs"
    old = _run_folder(runs, "20260101-000000-old")
    EventLog(old).emit("done", step=10)
    tab = _tab(tmp_path, runs)
    shown = tab.run_choices()
    new = _run_folder(runs, "20260101-000100-new")
    TrainConfig(data="d", name="my style/v2").save(new / "config.json")  # the name it goes in the library under
    sleeper = _sleeper()
    try:
        (new / PID_FILE).write_text(str(sleeper.pid))
        picker, _, _ = tab.refresh_choices(old.name, shown)
        assert picker.constructor_args.get("value", new.name) == new.name  # the value the browser holds is kept
        message, picked = tab.on_cancel(old.name)
        assert message.startswith(f"Cancelling **{new.name}**") and picked.constructor_args["value"] == new.name
        assert "in the library as **my style_v2-partial**" in message  # the run's own library name, as it will be
        assert sleeper.wait(timeout=10) == -15  # SIGTERM reached the running trainer
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_page_polls_only_while_a_run_is_live(tmp_path):
    """Item 7: the once-a-second refresh stops when nothing runs, and starts when a run is live."""
    runs = tmp_path / "runs"
    done = _run_folder(runs, "20260101-000000-done")
    EventLog(done).emit("done", step=1)
    tab = _tab(tmp_path, runs)
    assert tab.timer.active is False  # an idle page does not poll from the start
    assert tab.poll_state().active is False
    _, shown, timer = tab.refresh_choices(done.name, [])
    assert timer.active is False
    live = _run_folder(runs, "20260101-000100-live")
    sleeper = _sleeper()
    try:
        (live / PID_FILE).write_text(str(sleeper.pid))
        assert tab.poll_state().active is True
        _, shown, timer = tab.refresh_choices(live.name, shown)
        assert timer.active is True
    finally:
        sleeper.kill()
        sleeper.wait()
    _, shown, timer = tab.refresh_choices(live.name, shown)
    assert timer.active is True  # one more tick after the end, so the run's last state is shown
    _, shown, timer = tab.refresh_choices(live.name, shown)
    assert timer.active is False


def test_a_field_that_changes_has_one_listener_on_the_server(tmp_path):
    """Gradio's page holds a change back while the listener it goes to still runs, and once that listener ends sends
    the change again to every listener of the field. Two slow listeners of one change, held back in turn, sent each
    other again without end: typing a trigger word with images uploaded made the page send a few requests a second
    for as long as it stayed open (tests/test_ui_train_browser.py shows it in a browser for four fields). So each
    field's change has one listener on the server; what else it starts runs after it (`.then`)."""
    from app.ui import build_app

    app = build_app(tmp_path)
    listeners: dict[tuple, list[str]] = {}
    for fn in app.fns.values():
        if fn.fn is None:  # the browser's own (the settings kept in its storage): nothing to wait for
            continue
        for block, event in fn.targets:
            if fn.trigger_mode == "always_last" and block in app.blocks:
                field = getattr(app.blocks[block], "elem_id", None) or block
                listeners.setdefault((field, event), []).append(fn.name)
    assert ("setting-trigger_word", "change") in listeners  # the listing holds the fields
    several = {key: names for key, names in listeners.items() if len(names) > 1}
    assert not several


def test_the_tick_that_stops_polling_draws_the_runs_last_state(tmp_path):
    """A cancelled run reads "Cancelled", with its partial adapter, when the page stops polling, however slowly the
    view draws. Gradio skips a listener's tick while its last one still runs: with the view and the timer on
    listeners of their own, the timer stopped while the slow view missed its last tick, and the page kept saying
    "Cancelling" (a CI run). So one listener draws the view and says whether to tick again."""
    from app.ui import build_app

    app = build_app(tmp_path)
    ticks = [fn for fn in app.fns.values() if any(event == "tick" for _, event in fn.targets)]
    assert len(ticks) == 1, [fn.name for fn in ticks]
    outputs = {block.elem_id for block in ticks[0].outputs}
    assert {"train-status", "run-picker"} <= outputs
    assert any(isinstance(block, gr.Timer) for block in ticks[0].outputs)

    runs = tmp_path / "runs"
    run = _run_folder(runs, "20260101-000000-cut", steps=100)
    log = EventLog(run)
    log.emit("progress", step=5, total=100, loss=0.1, steps_per_s=1.0, eta_s=95.0)
    log.emit("library", name="cut-partial", library=str(tmp_path / "library"), partial=True)
    log.emit("cancelled", step=5)
    tab = _tab(tmp_path, runs)
    shown = [(f"{run.name} · running", run.name)]  # as the page last showed it
    for _ in range(3):
        picker, shown, timer, *view, _log = tab.tick(run.name, shown)
        if not timer.active:
            break
    assert not timer.active
    status = view[3]
    assert "Cancelled at step 5" in status and "cut-partial" in status, status


def test_the_adapter_name_is_checked_before_any_work_and_cleaned_as_the_library_does(tmp_path, monkeypatch):
    """Item 4: a taken or unusable name is refused before anything is staged or started; the page says the name
    an adapter will be saved under, by the same rule for Train and Rename, and the run keeps the cleaned name."""
    import app.ui.train as train_tab
    from app.ui.library import name_note

    library = Library(tmp_path / "library")
    (library.root / "neon.safetensors").write_bytes(b"taken")
    assert name_note(library, "a/b\\c") == "Saved in the library as **a_b_c**."
    assert name_note(library, "neon").startswith("⚠ the library already has an adapter named 'neon'")
    assert name_note(library, "..").startswith("⚠ adapter name '..' has no usable characters")
    tab = _tab(tmp_path)
    started = []
    monkeypatch.setattr(train_tab, "start_run", lambda config, staged, *a: started.append(config) or staged)
    files = [str(p) for p in sorted(write_scene_folder(tmp_path / "images").iterdir())]
    values = {name: control.value for name, control in tab.settings.controls.items()}
    for bad in ("neon", ".."):
        message, _ = tab.on_train(files, [], *{**values, "name": bad}.values())
        assert message.startswith("⚠ Nothing started:") and not started
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing staged
    tab.on_train(files, [], *{**values, "name": "a/b\\c"}.values())
    assert started[0].name == "a_b_c"


def test_a_fractional_or_huge_step_count_is_refused_with_the_range():
    """Item 6: the page hands 2.5 on as 2.5 (not rounded to 2), and TrainConfig refuses it and 1e12."""
    import pytest

    from adapters.errors import UserError

    with gr.Blocks():
        form = SettingsForm(gpus=1)
    names = list(form.controls)
    for typed, message in ((2.5, "steps (--steps) must be a whole number, got 2.5"), (1e12, "at most 1000000")):
        values = [c.value for c in form.inputs]
        values[names.index("steps")] = form.controls["steps"].preprocess(typed)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            form.config(values)
    values = [c.value for c in form.inputs]
    values[names.index("steps")] = form.controls["steps"].preprocess(300.0)
    assert form.config(values).steps == 300


def test_messages_speak_the_pages_language():
    """Item 8: settings by their label, files by name, no flags of what the page chooses itself."""
    from app.ui.settings import page_words

    assert page_words("steps (--steps) must be at least 1") == "*Steps* must be at least 1"
    assert (
        page_words("img.png: caption img.txt is missing; write one, or set a default caption (--default-caption)")
        == "img.png: caption img.txt is missing; write one, or set a default caption (*Default caption*)"
    )
    assert page_words("checkpoint /work/ws/runs/r1/checkpoints/step_000004 is at step 4; raise --steps above it") == (
        "checkpoint step_000004 is at step 4; raise *Steps* above it"
    )
    assert page_words("see https://example.com/a/b") == "see https://example.com/a/b"


def test_the_page_uses_only_characters_debians_chromium_can_draw():
    """Item 8: '❌' (U+274C) is in no font of Debian's Chromium install and draws as an empty box. Every non-ASCII
    character in the page's code must be one of these, each found in DejaVu Sans (`fc-list ':charset=HEX'`)."""
    from pathlib import Path

    drawn = set("…·—–⚠×→’“”‘★")
    ui = Path(__file__).resolve().parent.parent / "app" / "ui"
    for path in ui.glob("*.py"):
        odd = {ch for ch in path.read_text() if ord(ch) > 127} - drawn
        assert not odd, f"{path.name} uses {sorted(odd)}"


def test_an_upload_is_checked_in_the_table_and_proposes_a_trigger_word(tmp_path):
    """Items 8 and 10: a text file named .png is flagged in the table as it is uploaded; the first tag every caption
    starts with is offered as the trigger word (an empty box only)."""
    images = write_scene_folder(tmp_path / "images", count=3)
    for i in range(3):
        (images / f"img{i}.txt").write_text(f"glowline, picture {i}")
    (images / "fake.png").write_text("a text file, not a picture")
    (images / "fake.txt").write_text("glowline, fake")
    tab = _tab(tmp_path)
    rows, note, trigger = tab.on_upload([str(p) for p in sorted(images.iterdir())], "")
    checks = {row[1]: row[3] for row in rows}
    assert checks["fake.png"].startswith("⚠ not a readable image") and checks["img0.png"] == ""
    assert "fake.png: not a readable image" in note
    assert trigger.constructor_args["value"] == "glowline" and "**glowline**" in note
    _, _, kept = tab.on_upload([str(p) for p in sorted(images.iterdir())], "mine")
    assert kept == gr.skip()  # a trigger word already typed is left as it is


def test_previews_keep_the_trigger_word_and_the_page_shows_their_prompt(tmp_path, monkeypatch):
    """Item 10: the page's default preview prompt is the first caption with the trigger word, as training sees it;
    the run view shows that prompt."""
    import app.ui.train as train_tab

    tab = _tab(tmp_path)
    started = []
    monkeypatch.setattr(train_tab, "start_run", lambda config, staged, *a: started.append(config) or staged)
    images = write_scene_folder(tmp_path / "images", count=2)
    values = {name: control.value for name, control in tab.settings.controls.items()}
    tab.on_train([str(p) for p in sorted(images.iterdir())], [], *{**values, "trigger_word": "zq"}.values())
    first = (images / "img0.txt").read_text()
    assert started[0].preview_prompt == (f"zq, {first}",)
    typed = tab.settings.config(list({**values, "preview_prompt": "a cat\n\nzq, a dog --d 3\n"}.values()))
    assert typed.preview_prompt == ("a cat", "zq, a dog --d 3")  # one prompt per line of the box
    run = _run_folder(tmp_path / "runs", "r1", preview_prompt="zq, a red circle")
    EventLog(run).emit("start", steps=4)
    *_, shown = tab.refresh(run.name)
    assert shown == "Preview prompt: “zq, a red circle”"


def test_the_loss_curve_is_smoothed_as_tensorboard_does():
    """Issue 14: the raw per-step loss and an EMA line over it (TensorBoard's debiased smoothing), the weight said."""
    from app.ui.train import RAW, SMOOTHED, loss_frame
    from trainer.runs import SMOOTHING, smoothed

    assert smoothed([1.0, 0.0], 0.5) == [1.0, 0.25 / 0.75]  # (0.5*1)/(1-0.5), then (0.5*0.5+0.5*0)/(1-0.25)
    frame = loss_frame([(1, 1.0), (2, 0.0), (3, 1.0)])
    assert list(frame[frame.series == RAW].loss) == [1.0, 0.0, 1.0]
    assert list(frame[frame.series == SMOOTHED].loss) == smoothed([1.0, 0.0, 1.0], SMOOTHING)
    assert f"{SMOOTHING}" in SMOOTHED


def test_the_page_shows_a_runs_images_buckets_and_steps_before_and_after_train(tmp_path):
    """Before Train, the upload's plan by the trainer's own rules (4 images x 3 repeats at batch 2: 6 steps per
    epoch, 66.7 epochs to a tenth; the wide one in the built-in model's 80x48 bucket); the time it leaves out; once
    the run starts, its start event's plan, and each preview captioned with its prompt and seed."""
    from PIL import Image

    from trainer.dataset import bucket_sizes, load_examples

    images = write_scene_folder(tmp_path / "images", count=3)
    Image.open(images / "img0.png").resize((128, 64)).save(images / "wide.png")
    (images / "wide.txt").write_text("a wide picture")
    files = [str(p) for p in sorted(images.iterdir())]
    tab = _tab(tmp_path)
    values = {name: control.value for name, control in tab.settings.controls.items()}
    plan = tab.show_plan(files, *{**values, "repeats": 3, "batch_size": 2}.values())
    assert "| 4 | 12 | 2 | 6 | 400 | 66.7 |" in plan
    wide = next(e for e in load_examples(images, 64, buckets=bucket_sizes(64, 16)) if e.path.name == "wide.png")
    assert tuple(wide.pixels.shape[1:]) == (48, 80)  # what training would cut it to: the plan's bucket
    assert "64×64: 3 · 80×48: 1" in plan and "*Steps* box" not in plan
    by_epochs = tab.show_plan(files, *{**values, "repeats": 3, "batch_size": 2, "epochs": 5}.values())
    assert "| 4 | 12 | 2 | 6 | 30 | 5 |" in by_epochs  # 5 epochs of 6 steps, whatever Steps says
    assert "The steps come from *Epochs* (5 × 6): the *Steps* box (400) is not used" in by_epochs
    # and, beside Train, what it needs on this machine: 400 steps at batch 2 of the built-in model on the CPU
    here = tab.show_machine_plan(files, *{**values, "repeats": 3, "batch_size": 2}.values())
    assert "**On this machine** (the CPU):" in here and "system memory" in here
    assert "a step; previews, judging and saves not counted)" in here
    longer = tab.show_machine_plan(files, *{**values, "repeats": 3, "batch_size": 2, "steps": 4000}.values())
    assert _minutes(longer) > 5 * _minutes(here)
    assert tab.show_machine_plan([], *values.values()).startswith("**On this machine**")  # before any upload
    by_epochs = tab.show_machine_plan([], *{**values, "epochs": 3}.values())
    assert "the steps of *Epochs* are counted from the images (upload them)" in by_epochs  # not 400 steps' time
    eight_bit = tab.show_machine_plan(files, *{**values, "optimizer": "adamw8bit"}.values())  # what Train refuses
    assert eight_bit.startswith("⚠ *Optimizer* adamw8bit needs a CUDA GPU"), eight_bit
    assert tab.show_plan(files, *{**values, "batch_size": 0}.values()).startswith("⚠ *Batch size* must be")
    run = _run_folder(tmp_path / "runs", "r1", preview_prompt=["zq, a red circle", "zq, a star --d 9"])
    log = EventLog(run)
    log.emit("start", steps=30, images=4, repeats=12, batch_size=2, steps_per_epoch=6, epochs=5, buckets={"64x64": 4})
    log.emit("preview", step=6, path=str(run / "a.png"), prompt="zq, a red circle", seed=0)
    log.emit("preview", step=6, path=str(run / "b.png"), prompt="zq, a star", seed=9)
    _, _, pictures, status, _, prompts = tab.refresh(run.name)
    assert "| 4 | 12 | 2 | 6 | 30 | 5 |" in status and "64×64: 4" in status
    captions = [caption for _, caption in pictures]
    assert captions == ["step 6 · #1", "step 6 · #2"]  # short enough for a thumbnail; the prompts listed below
    assert prompts == "Preview prompts: #1 “zq, a red circle”; #2 “zq, a star --d 9”"
    one = _run_folder(tmp_path / "runs", "r2", preview_prompt=["zq, a red circle"])
    EventLog(one).emit("preview", step=6, path=str(one / "a.png"), prompt="zq, a red circle", seed=0)
    _, _, pictures, _, _, prompts = tab.refresh(one.name)
    assert [caption for _, caption in pictures] == ["step 6"] and prompts == "Preview prompt: “zq, a red circle”"


# -- The Train page's session and runs (issue 19, Train page) -------------------------------------------------------


def test_a_reload_puts_back_only_files_in_gradios_upload_folder_and_captions_typed_for_the_same_files(
    tmp_path, monkeypatch
):
    """What the browser keeps is not trusted: a kept path outside gradio's upload folder, or one gradio deleted, is
    not put back (the page says how many are gone); a typed caption comes back for the same image and caption file
    only, so an upload with a new .txt shows the new caption."""
    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    kept = []
    for sha, name in (("a1", "img0.png"), ("b2", "img0.txt"), ("c3", "img1.png")):
        (cache / sha).mkdir(parents=True)
        (cache / sha / name).write_bytes(b"x")
        kept.append(str(cache / sha / name))
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not an upload")
    tab = _tab(tmp_path)
    files, *settings, note = tab.restore(None, {"files": [*kept, str(outside), str(cache / "d4" / "gone.png")]}, {})
    assert files == kept and note.startswith("⚠ 2 file(s) uploaded before the page was reloaded are no longer")
    values = {name: control.value for name, control in tab.settings.controls.items()}
    restored = tab.restore(kept, {"files": kept}, {**values, "steps": 77, "rank": "eight", "gone_field": 1})
    assert restored[0] == gr.skip()  # the same files: left as they are
    steps, rank = (restored[1 + list(tab.settings.controls).index(n)] for n in ("steps", "rank"))
    assert steps == 77 and rank == gr.skip()  # a value that no longer fits its control is left out

    rows = [["", "img0.png", "from the txt", ""], ["", "img1.png", "", ""]]
    state = tab.keep_captions(kept, [["", "img0.png", "typed", ""], ["", "img1.png", "typed too", ""]])
    shown, _ = tab.apply_kept_captions(kept, [list(r) for r in rows], state)
    assert [r[2] for r in shown] == ["typed", "typed too"]
    new_txt = str(cache / "e5" / "img0.txt")
    shown, _ = tab.apply_kept_captions([kept[0], new_txt, kept[2]], [list(r) for r in rows], state)
    assert [r[2] for r in shown] == ["from the txt", "typed too"]


def test_a_run_that_would_not_fit_says_so_before_train_in_the_pages_words():
    """The plan of SDXL at batch 4 without checkpointing for an 8 GiB card, as the page shows it."""
    from app.ui.train import machine_markdown
    from trainer.plan import CONFIGS, estimate

    config = TrainConfig(
        base_model=str(CONFIGS / "sdxl"), batch_size=4, gradient_checkpointing="off", preview_prompt=("a cat",)
    )
    shown = machine_markdown(estimate(config, device="cuda", card_gib=8, tflops=800.0, device_name="a GPU (8.0 GiB)"))
    assert "⚠ Would not fit" in shown and "of 7.5 GiB" in shown
    assert "*Batch size* 1" in shown and "--batch-size" not in shown  # the page's labels, not the flags
    assert "turns on tiled VAE decoding" in shown


def test_a_long_gpu_run_says_beside_train_that_it_compiles_first_and_a_short_one_does_not():
    """A run long enough for --torch-compile auto to compile on an H200: the page says so and what it saves. A
    short run says nothing of compiling."""
    from app.ui.train import machine_markdown
    from trainer.plan import CONFIGS, estimate

    h200 = dict(device="cuda", card_gib=139.8, tflops=805.8, device_name="NVIDIA H200")
    sd1 = dict(base_model=str(CONFIGS / "sd1"), batch_size=8, mixed_precision="bf16", judge=False)
    long = machine_markdown(estimate(TrainConfig(steps=40000, **sd1), **h200))
    assert "compiles the UNet's blocks first (auto: about 97 s of compiling saves about" in long, long
    assert "compil" not in machine_markdown(estimate(TrainConfig(steps=1000, **sd1), **h200))


def test_train_refuses_a_run_its_plan_says_would_not_fit_before_any_work(tmp_path, monkeypatch):
    """Train refuses, in the page's words and before staging or starting anything, a run the plan beside it says
    would not fit (here: planned for a GPU whose memory holds less than the built-in model's run needs)."""
    from app.ui import train as train_tab
    from trainer.plan import estimate

    small_card = dict(device="cuda", card_gib=0.6, tflops=800.0, device_name="a GPU (0.6 GiB)")
    monkeypatch.setattr(train_tab, "estimate", lambda config, **kw: estimate(config, **kw | small_card))
    started = []
    monkeypatch.setattr(train_tab, "start_run", lambda config, staged, *a: started.append(config) or staged)
    tab = _tab(tmp_path)
    files = [str(p) for p in sorted(write_scene_folder(tmp_path / "images").iterdir())]
    values = {name: control.value for name, control in tab.settings.controls.items()}
    message, _ = tab.on_train(files, [], *values.values())
    assert message.startswith("⚠ Nothing started: this run would not fit in the GPU's memory") and not started
    assert "*Batch size*" in message or "*Gradient checkpointing*" in message or "*Resolution*" in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing staged


def test_train_refuses_an_unreadable_image_until_it_is_left_out(tmp_path, monkeypatch):
    """An upload with an image that cannot be read: the plan before Train counts the images that would train and
    names the one left out of its counts with the *Leave out* button; Train refuses before staging anything, naming
    the file; once left out, the run starts without it."""
    from app.ui import train as train_tab

    started = []
    monkeypatch.setattr(train_tab, "start_run", lambda config, staged, *a: started.append(staged) or staged)
    monkeypatch.setattr(train_tab, "view_run", lambda run_dir: type("V", (), {"status": "running"})())
    images = write_scene_folder(tmp_path / "images", count=3)
    (images / "bad.png").write_bytes(b"not a picture")
    (images / "bad.txt").write_text("a broken file")
    files = [str(p) for p in sorted(images.iterdir())]
    tab = _tab(tmp_path)
    values = {name: control.value for name, control in tab.settings.controls.items()}
    plan = tab.show_plan(files, *values.values())
    assert "| 3 | 3 |" in plan, plan
    assert "bad.png cannot be read" in plan and "*Leave out*" in plan
    message, _ = tab.on_train(files, [], *values.values())
    assert message.startswith("⚠ Nothing started: the upload has 1 problem(s)") and not started
    assert "bad.png: not a readable image" in message, message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing staged
    message, _ = tab.on_train(files, [], *values.values(), dropped=["bad.png"])
    assert "Left out of this run: bad.png" in message and len(started) == 1
    assert sorted(p.name for p in started[0].iterdir() if p.suffix == ".png") == ["img0.png", "img1.png", "img2.png"]


def _minutes(plan: str) -> float:
    """The time a plan in the page states, in minutes."""
    import re

    amount, unit = re.search(r"about ([0-9.]+) (s|min|h) \(", plan).groups()
    return float(amount) * {"s": 1 / 60, "min": 1, "h": 60}[unit]


RACE = """
import socket, sys, threading
from app.ui import launch

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
app = launch("127.0.0.1", port, workspace=sys.argv[1], block=False)
errors = []

def use(names):
    try:
        import diffusers
        for name in names:
            getattr(diffusers, name)
    except Exception as e:
        errors.append(repr(e))

wanted = [["StableDiffusionXLPipeline"], ["AutoencoderKL", "DiffusionPipeline", "UNet2DConditionModel"]] * 2
threads = [threading.Thread(target=use, args=(names,)) for names in wanted]
[t.start() for t in threads]
[t.join() for t in threads]
app.close()
print("errors:", errors)
"""


def test_the_page_threads_never_race_on_a_first_diffusers_import(tmp_path):
    """diffusers loads classes lazily and not thread-safely: a page that plans a run (Train tab) while it loads an
    SDXL pipeline (Generate tab) failed with "cannot import name 'AutoencoderKL' from 'diffusers'". The page loads
    them all before it serves: four threads of a fresh page process asking at once all get their classes."""
    out = subprocess.run(
        [sys.executable, "-c", RACE, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=Path.cwd()
    )
    assert "errors: []" in out.stdout, out.stdout + out.stderr[-3000:]
