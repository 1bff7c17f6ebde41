"""The Train tab's runs in a real browser (issue 19, Train page): the trainer's log, the queue, rename, hide, delete,
a past run's settings back in the form, and a reload that keeps the session. One app and one page for them all."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from app.ui.train import SETTINGS_KEY
from tests.test_ui_browser import CHROMIUM, SAMPLES, Server, fill, message, open_page, set_number, settled, upload
from trainer.config import TrainConfig
from trainer.runs import EventLog

pytestmark = pytest.mark.browser


def _run(runs: Path, folder: str, *events: tuple[str, dict], **config) -> Path:
    run = runs / folder
    run.mkdir(parents=True)
    TrainConfig(data="d", **config).save(run / "config.json")
    for kind, fields in events:
        EventLog(run).emit(kind, **fields)
    return run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Past runs as the page would have left them: one done (its adapter in the library), one cancelled, one that
    failed."""
    ws = tmp_path_factory.mktemp("train-page") / "ws"
    runs = ws / "runs"
    _run(
        runs, "20260101-000000-old", ("start", dict(steps=123)), ("library", dict(name="oldstyle")),
        ("done", dict(step=123)), name="oldstyle", steps=123, rank=4, preview_prompt=["zq, a cat", "zq, a dog"],
    )  # fmt: skip
    _run(runs, "20260101-000100-stopped", ("start", dict(steps=50)), ("cancelled", dict(step=0)), name="stopped")
    _run(runs, "20260101-000200-broke", ("start", dict(steps=50)), ("error", dict(message="out of memory")))
    (ws / "library").mkdir()
    (ws / "library" / "oldstyle.safetensors").write_bytes(b"the adapter run 'old' made")
    yield ws
    for pid_file in ws.glob("runs/*/trainer.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def server(workspace):
    server = Server(workspace)
    yield server
    server.kill()
    Server.started.remove(server)


@pytest.fixture(scope="module")
def page(server):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = open_page(browser, server.url)
        page.locator("#native-size").get_by_text("Native size").wait_for(timeout=60_000)  # the page's load is done
        yield page
        page.screenshot(path=str(server.workspace.parent / "last.png"))
        browser.close()


def pick(page, label: str | re.Pattern) -> None:
    """Choose a run in the run list by its label."""
    box = page.locator("#run-picker input")
    pattern = label if isinstance(label, re.Pattern) else re.compile(re.escape(label) + "$")
    if not pattern.search(box.input_value()):  # an option already picked is not clicked again
        box.click()
        page.get_by_role("option", name=pattern).click()
    expect(box).to_have_value(pattern)


def choices(page) -> list[str]:
    """The labels the run list offers now."""
    page.locator("#run-picker input").click()
    options = page.get_by_role("option")
    options.first.wait_for()
    labels = options.all_inner_texts()
    page.keyboard.press("Escape")
    page.locator("#run-picker input").blur()  # the list opens when the box gets the focus
    return [label.strip().splitlines()[-1] for label in labels]  # the picked one is marked with a tick line


def stored_count(page) -> int:
    """How many times the page has written the settings it keeps in the browser's localStorage, counted from the
    first call on this page."""
    return page.evaluate(
        """(key) => {
            if (window.keptCount === undefined) {
                window.keptCount = 0;
                const setItem = Storage.prototype.setItem;
                Storage.prototype.setItem = function (name, value) {
                    if (name === key) window.keptCount++;
                    return setItem.call(this, name, value);
                };
            }
            return window.keptCount;
        }""",
        SETTINGS_KEY,
    )


def choices_once(page, holds, timeout_s: float = 60.0) -> list[str]:
    """The run list's labels once `holds(labels)` (the server answers a checkbox in its own time), or as they are
    when `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not holds(listed := choices(page)) and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    return listed


def status(page):
    return page.locator("#train-status")


def said(page, text: str, timeout: float = 30_000) -> None:
    page.locator("#train-message").get_by_text(text).wait_for(timeout=timeout)


def open_log(page):
    box = page.locator("#train-log textarea")
    if not box.is_visible():
        page.locator("#train-log-box").get_by_text("Trainer log").click()
    return box


def test_a_second_train_queues_and_the_log_follows_the_trainer(page, workspace):
    """Items 1 and 4: Train while a run is live waits in the queue, in order; a waiting run can be taken out;
    when the live run ends (cancelled here), the next one starts. The trainer's own output is shown as it comes."""
    runs = workspace / "runs"
    before = {p.name for p in runs.iterdir()}
    upload(page, sorted(SAMPLES.iterdir()))
    page.locator("#captions").get_by_text("glowline, a red circle at the top").wait_for()
    set_number(page, "setting-steps", 100000)
    page.locator("#train-button").click()
    said(page, "Started run")
    first = next(p for p in runs.iterdir() if p.name not in before)
    page.locator("#train-button").click()
    said(page, "Queued (position 1)")
    page.locator("#train-button").click()
    said(page, "Queued (position 2)")
    second, third = sorted(p for p in runs.iterdir() if p.name not in before and p != first)
    assert "position 2" in message(page) and third.name in message(page)
    status(page).get_by_text("Queued (position 2)").wait_for(timeout=15_000)  # the picker follows the new run
    expect(open_log(page)).to_have_value("Waiting in the queue: its trainer has not started yet.", timeout=30_000)

    page.locator("#cancel-button").click()  # the picked run waits: Cancel takes it out, the live run goes on
    said(page, f"Took {third.name} out of the queue")
    status(page).get_by_text("Cancelled before training began").wait_for(timeout=15_000)
    assert not (third / "trainer.pid").exists()
    pick(page, re.compile(rf"{second.name} · queued$"))
    status(page).get_by_text("Queued (position 1)").wait_for(timeout=15_000)

    pick(page, re.compile(rf"{first.name} · (starting|running)$"))
    log = open_log(page)  # the trainer's own lines, as they come: the model loading, then the data set it read
    expect(log).to_have_value(re.compile("Loading pipeline components"), timeout=120_000)
    expect(log).to_have_value(re.compile(r"lora-studio: \d+ aspect-ratio bucket"), timeout=180_000)
    assert str(workspace) not in log.input_value()

    page.locator("#delete-run").click()  # a live run is not deleted
    page.locator("#confirm-delete-run").click()
    said(page, "is training; cancel it first")
    assert first.is_dir()

    page.locator("#cancel-button").click()
    status(page).get_by_text("Cancelled").wait_for(timeout=120_000)
    pick(page, re.compile(rf"{second.name} · "))  # it started when the first ended
    status(page).get_by_text(re.compile("Starting: loading the base model|Training…")).wait_for(timeout=60_000)
    assert not (second / "queued").exists() and (second / "trainer.pid").is_file()
    page.locator("#cancel-button").click()
    status(page).get_by_text("Cancelled").wait_for(timeout=120_000)
    assert not (third / "trainer.pid").exists()  # taken out of the queue: it never started


def test_runs_are_renamed_with_the_adapter_name_rules(page, workspace):
    """Item 2: Rename gives a run the name the list shows, cleaned as adapter names are; a name another run has is
    refused; the folder and the library keep theirs."""
    pick(page, re.compile(r"20260101-000000-old · done$"))
    fill(page, "run-rename-to", "best/run")
    page.locator("#run-name-note").get_by_text("Shown as best_run").wait_for(timeout=15_000)
    page.locator("#rename-run").click()
    said(page, "Renamed run 20260101-000000-old to best_run")
    expect(page.locator("#run-picker input")).to_have_value("best_run · done", timeout=15_000)
    status(page).get_by_text("best_run: Done").wait_for(timeout=15_000)
    assert (workspace / "runs" / "20260101-000000-old").is_dir()
    assert (workspace / "library" / "oldstyle.safetensors").is_file()
    pick(page, re.compile(r"20260101-000100-stopped · cancelled$"))
    fill(page, "run-rename-to", "best_run")
    page.locator("#run-name-note").get_by_text("another run is already named 'best_run'").wait_for(timeout=15_000)
    page.locator("#rename-run").click()
    said(page, "another run is already named 'best_run'")
    assert "20260101-000100-stopped · cancelled" in choices(page)


def test_typing_in_a_text_field_sends_nothing_once_the_typing_stops(page):
    """Each keystroke in Name, Trigger word, Steps or a run's new name asks the server for its notes, plan and
    command; once the typing stops, the field asks nothing more. With images uploaded, Name's note answered outside
    the queue made the field fire its own change event a few times a second for as long as the page stayed open."""
    import json

    sent: list[tuple[float, object]] = []  # (when, the field whose event it is) for every call the page makes

    def record(request):
        if request.method == "POST" and "/gradio_api/" in request.url and request.post_data:
            try:
                sent.append((time.time(), json.loads(request.post_data).get("trigger_id")))
            except (ValueError, AttributeError):
                pass

    if not page.locator("#captions").get_by_text("neon_03.png").count():  # with an upload the plan takes longer
        upload(page, [SAMPLES / f"neon_0{i}.png" for i in range(4)])
        expect(page.locator("#captions")).to_contain_text("neon_03.png", timeout=30_000)
        settled(page)
    page.on("request", record)
    try:
        for field in ("setting-name", "setting-trigger_word", "setting-steps", "run-rename-to"):
            box = page.locator(f"#{field} textarea, #{field} input").first
            box.click()
            box.press("End")
            start = len(sent)
            box.press_sequentially("12", delay=100)
            page.wait_for_timeout(2_000)  # the answers to the keystrokes come back
            own = {trigger for _, trigger in sent[start:] if trigger is not None}
            assert own, f"typing in {field} asked the server nothing"
            quiet = time.time()
            page.wait_for_timeout(4_000)
            late = [trigger for when, trigger in sent if when > quiet and trigger in own]
            assert not late, f"{field} kept sending requests after the typing stopped: {len(late)} in 4 s"
            box.press("Tab")
    finally:
        page.remove_listener("request", record)


def test_failed_and_cancelled_runs_can_be_hidden_and_shown_again(page):
    """Item 2: Hide leaves a failed or cancelled run out of the list; *Show hidden runs* brings it back; a finished
    run is not hidden."""
    pick(page, re.compile(r"20260101-000100-stopped · cancelled$"))
    page.locator("#hide-run").click()
    said(page, "Hid 20260101-000100-stopped from the run list")
    pick(page, re.compile(r"20260101-000200-broke · error$"))
    page.locator("#hide-run").click()
    said(page, "Hid 20260101-000200-broke")
    listed = choices(page)
    assert not any("stopped" in c or "broke" in c for c in listed) and "best_run · done" in listed
    page.locator("#show-hidden input").check()
    expect(page.locator("#run-picker")).to_be_visible()
    hidden_shown = "20260101-000100-stopped (hidden) · cancelled"
    assert hidden_shown in choices_once(page, lambda labels: hidden_shown in labels)
    pick(page, "20260101-000100-stopped (hidden) · cancelled")
    expect(page.locator("#hide-run")).to_have_text("Unhide", timeout=15_000)
    page.locator("#hide-run").click()
    said(page, "20260101-000100-stopped is back in the run list")
    page.locator("#show-hidden input").uncheck()
    listed = choices_once(page, lambda labels: "20260101-000100-stopped · cancelled" in labels)
    assert "20260101-000100-stopped · cancelled" in listed and not any("broke" in c for c in listed)
    pick(page, "best_run · done")
    page.locator("#hide-run").click()
    said(page, "only failed and cancelled runs can be hidden")


def test_a_past_runs_settings_load_back_into_the_form(page):
    """Item 3: the settings a run was trained with (its config.json) go back into the form."""
    pick(page, "best_run · done")
    page.locator("#load-settings").click()
    said(page, "Loaded the settings of run best_run into the form")
    assert "The library already has oldstyle: change Name before Train" in message(page)
    expect(page.locator("#setting-steps input").first).to_have_value("123")
    expect(page.locator("#setting-rank input").first).to_have_value("4")
    expect(page.locator("#setting-preview_prompt textarea, #setting-preview_prompt input").first).to_have_value(
        "zq, a cat\nzq, a dog"  # one prompt a line
    )
    expect(page.locator("#setting-name textarea, #setting-name input").first).to_have_value("oldstyle")
    page.locator("#name-note").get_by_text("already has an adapter named 'oldstyle'").wait_for(timeout=15_000)


def test_a_run_is_deleted_after_a_confirmation_and_its_adapter_stays(page, workspace):
    """Item 2: Delete asks first; Keep it keeps the run; Yes deletes the folder, never the adapter in the library."""
    run = workspace / "runs" / "20260101-000000-old"
    pick(page, "best_run · done")
    page.locator("#delete-run").click()
    page.locator("#keep-run").click()
    expect(page.locator("#confirm-delete-run")).to_be_hidden(timeout=30_000)
    assert run.is_dir()
    page.locator("#delete-run").click()
    page.locator("#confirm-delete-run").click()
    said(page, "Deleted run best_run. The adapter oldstyle stays in the library.")
    assert not run.exists() and (workspace / "library" / "oldstyle.safetensors").is_file()
    assert not any(c.startswith("best_run") for c in choices(page))


def test_a_reload_keeps_the_uploads_captions_and_settings(page, server):
    """Item 5: after a reload the page holds the same files, the captions typed for them and the settings; an upload
    gradio's cache no longer holds (it deletes them a day after upload) is named, not silently dropped."""
    if page.locator("#upload").get_by_label("Clear").count():  # the upload of an earlier test goes
        page.locator("#upload").get_by_label("Clear").click()
        expect(page.locator("#captions")).not_to_contain_text("neon_15.png", timeout=15_000)
    upload(page, [SAMPLES / "neon_00.png", SAMPLES / "neon_00.txt", SAMPLES / "neon_01.png", SAMPLES / "neon_01.txt"])
    table = page.locator("#captions")
    expect(table.get_by_test_id("cell-1-1")).to_contain_text("neon_01.png", timeout=30_000)
    settled(page)  # what the upload does is done (its captions kept): what is typed now comes after it
    table.get_by_test_id("cell-1-2").dblclick()  # neon_01's caption
    editor = table.get_by_test_id("cell-1-2").locator("textarea, input").first
    editor.fill("glowline, typed before the reload")
    with page.expect_response(lambda r: "/gradio_api/run/" in r.url, timeout=30_000):  # the caption kept
        editor.press("Enter")
    expect(table.get_by_test_id("cell-1-2")).to_contain_text("glowline, typed before the reload", timeout=15_000)
    kept = stored_count(page)  # settings: the browser keeps them itself as they change, a moment later
    set_number(page, "setting-steps", 77)
    page.wait_for_function(f"() => window.keptCount > {kept}", timeout=30_000)
    kept = stored_count(page)
    fill(page, "setting-trigger_word", "zqx")
    page.wait_for_function(f"() => window.keptCount > {kept}", timeout=30_000)
    page.reload()
    page.locator("#train-button").wait_for()
    expect(table.get_by_test_id("cell-1-2")).to_contain_text("glowline, typed before the reload", timeout=30_000)
    expect(table.get_by_test_id("cell-0-2")).to_contain_text((SAMPLES / "neon_00.txt").read_text().strip())
    expect(page.locator("#setting-steps input").first).to_have_value("77", timeout=15_000)
    expect(page.locator("#setting-trigger_word textarea, #setting-trigger_word input").first).to_have_value("zqx")
    expect(page.locator("#upload")).to_contain_text(re.compile(r"neon_01\s*\.txt"))  # the upload box holds them

    gone = next(server.cache.rglob("neon_00.png"))  # as gradio's cache cleaning does a day after the upload
    gone.unlink()
    page.reload()
    page.locator("#train-button").wait_for()
    said(page, "1 file(s) uploaded before the page was reloaded are no longer on the server")
    expect(table).to_contain_text("glowline, typed before the reload", timeout=30_000)
    assert "neon_00.png" not in table.inner_text()


def test_the_settings_outlive_a_restart_of_the_app_on_the_same_workspace(page, tmp_path):
    """Item 5: the settings kept in the browser are read back by a new run of the app on the same workspace and
    port (its files are not: uploads go with the app); another workspace's app does not read them."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    server = Server(workspace)
    context = page.context.browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        first = context.new_page()
        first.goto(server.url)
        first.locator("#native-size").get_by_text("Native size").wait_for(timeout=60_000)
        settled(first)
        kept = stored_count(first)
        set_number(first, "setting-steps", 321)
        first.wait_for_function(f"() => window.keptCount > {kept}", timeout=30_000)
        first.close()
        server.kill()
        server = Server(workspace, port=server.port)  # `make run` again: the same address
        again = context.new_page()
        again.goto(server.url)
        expect(again.locator("#setting-steps input").first).to_have_value("321", timeout=30_000)
        again.close()
        server.kill()
        other = tmp_path / "other"
        other.mkdir()
        server = Server(other, port=server.port)  # another workspace at that address: its own settings
        elsewhere = context.new_page()
        elsewhere.goto(server.url)
        elsewhere.locator("#native-size").get_by_text("Native size").wait_for(timeout=60_000)
        settled(elsewhere)
        expect(elsewhere.locator("#setting-steps input").first).not_to_have_value("321")
    finally:
        context.close()
        server.kill()
