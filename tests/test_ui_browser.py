"""The web UI in a real browser (Debian's headless Chromium driven by Playwright), on the built-in model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect

from trainer.config import TrainConfig
from trainer.runs import EventLog

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_signals() -> None:
    """Ctrl-C and kill's TERM as a shell gives them to a program (an ignored signal is inherited across exec)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


class Server:
    """`lora-studio ui` as a user starts it, in its own process, on a workspace folder."""

    started: list[Server] = []

    def __init__(self, workspace: Path, port: int | None = None):
        self.workspace, self.port = workspace, port or free_port()  # the same port: the same browser storage
        exe = Path(sys.executable).with_name("lora-studio")
        # gradio's uploads and sent files: `ui` puts them in the workspace as a user runs it (not the system's /tmp)
        env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}  # the suite's own, for in-process pages
        env |= {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env["PYTHONFAULTHANDLER"] = "1"  # a server that will not stop dumps its threads' stacks to the log (stop)
        self.proc = subprocess.Popen(
            [str(exe), "ui", "--port", str(self.port), "--workspace", str(workspace)],
            stdout=open(workspace / f"ui-{self.port}.log", "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_default_signals,  # as from a shell, whatever the test process ignores
        )
        self.cache = workspace / ".gradio-cache" / str(self.proc.pid)
        Server.started.append(self)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError as exc:
                if self.proc.poll() is not None:
                    raise RuntimeError((workspace / f"ui-{self.port}.log").read_text()) from exc
                time.sleep(0.5)
        raise RuntimeError("the UI did not come up in 120 s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        """Stop it as a person does, with Ctrl-C; one still running a minute later fails with its threads' stacks."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # the fault handler writes every thread's stack to the log
            self.proc.wait(timeout=30)
            log = (self.workspace / f"ui-{self.port}.log").read_text(errors="replace")
            raise AssertionError(f"the page did not stop 60 s after Ctrl-C; its log ends:\n{log[-6000:]}") from None


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield b
        b.close()


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    yield ws
    for server in Server.started:  # never leave a UI or a trainer behind, whatever the test did
        if server.proc.poll() is None:
            server.kill()
    Server.started.clear()
    for pid_file in ws.glob("runs/*/trainer.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except OSError:
            pass


def open_page(browser, url):
    """The page as a user sees it once it has loaded: what it restores and reads on load has arrived, so a late
    answer of the load cannot undo what the test does next (on a busy machine it can take seconds)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(url)
    page.locator("#train-button").wait_for()
    page.locator("#native-size").get_by_text("Native size").wait_for(timeout=60_000)  # the load's last step
    settled(page)
    return page


def settled(page, timeout_ms: int = 60_000) -> None:
    """Wait until no event of the page is running: every component's status tracker is hidden."""
    trackers = "[...document.querySelectorAll('[data-testid=status-tracker]')]"
    page.wait_for_function(f"() => {trackers}.every(e => e.classList.contains('hide'))", timeout=timeout_ms)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def assert_label_clear(page, elem_id: str) -> None:
    """A gallery's floating label does not cover its first picture."""
    label = page.locator(f"#{elem_id} [data-testid=block-label]").first.bounding_box()
    picture = page.locator(f"#{elem_id} img").first.bounding_box()
    assert label["y"] + label["height"] <= picture["y"] + 1, (elem_id, label, picture)


def upload(page, paths) -> None:
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in paths])


def message(page) -> str:
    """What the page says about the last button press or upload."""
    return page.locator("#train-message").inner_text()


def fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.press("Tab")


def queue_calls(page) -> list[str]:
    """Every call the page makes to the server's event queue, from now on (one per event it triggers)."""
    calls: list[str] = []
    page.on(
        "request",
        lambda request: calls.append(f"{request.url} {request.post_data}") if "/queue/join" in request.url else None,
    )
    return calls


def test_train_watch_generate_download(browser, workspace, tmp_path):
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, sorted(SAMPLES.iterdir()))
    page.get_by_text("neon_15.png").last.wait_for()  # the upload lists every file
    page.locator("#captions").get_by_text("glowline, a red circle at the top").wait_for()  # the table fills
    set_number(page, "setting-steps", 60)
    set_number(page, "setting-preview_every", 20)
    # what the upload would train, before Train: 16 square images in one bucket, 8 steps per epoch at batch 2
    expect(page.locator("#data-plan")).to_contain_text("64×64: 16", timeout=30_000)
    expect(page.locator("#data-plan")).to_contain_text("7.5", timeout=30_000)  # 60 steps = 7.5 epochs
    expect(page.locator("#machine-plan")).to_contain_text("On this machine (the CPU)", timeout=30_000)  # by Train
    page.locator("#setting-name textarea, #setting-name input").first.fill("neon")
    page.locator("#train-button").click()
    page.get_by_text("Started run").wait_for(timeout=30_000)

    page.locator("#train-button").click()  # a second Train while the first runs waits; Cancel takes it out
    page.locator("#train-message").get_by_text("Queued (position 1)").wait_for(timeout=30_000)
    page.locator("#cancel-button").click()
    page.locator("#train-message").get_by_text("out of the queue").wait_for(timeout=30_000)
    assert len(list((workspace / "runs").iterdir())) == 2

    # The UI dies mid-run; the trainer does not. A new UI on the same workspace re-attaches to it.
    page.close()
    server.kill()
    server = Server(workspace)
    page = open_page(browser, server.url)
    page.locator("#train-progress-text").get_by_text("step 60/60").wait_for(timeout=240_000)
    page.locator("#train-status").get_by_text("Done").wait_for(timeout=60_000)
    expect(page.locator("#run-picker input")).to_have_value(re.compile(r"· done$"), timeout=15_000)
    expect(page.locator("#loss-plot svg .mark-line path[stroke]")).to_have_count(2, timeout=30_000)  # both lines
    expect(page.locator("#previews img").nth(2)).to_be_attached(timeout=30_000)  # steps 20, 40 and the end
    expect(page.locator("#train-status")).to_contain_text("64×64: 16")  # the run's own plan, from its start event
    expect(page.locator("#previews")).to_contain_text("step 20")  # each picture captioned with its step
    assert_label_clear(page, "previews")
    assert "glowline" not in page.locator("#previews").inner_text()  # not a prompt cut to "gl…" in a thumbnail
    expect(page.locator("#preview-prompt")).to_contain_text("Preview prompt: “glowline, ")  # it is listed below
    # the judge's grid (judged at the end, the default): the step at each strength, its pictures served and drawn
    expect(page.locator("#judge table")).to_contain_text("step 60")
    assert page.locator("#judge table tr").first.locator("th").all_inner_texts()[1:] == [
        "0 (base)",
        "0.5",
        "0.75",
        "1",
        "1.25",
    ]
    page.wait_for_function("() => { const i = document.querySelector('#judge img'); return i && i.naturalWidth > 0 }")

    page.get_by_role("tab", name="Generate").click()
    page.locator("#adapter-0 input").click()
    page.get_by_role("option", name="neon").click()
    page.locator("#compare-strengths textarea, #compare-strengths input").first.fill("0, 0.5, 1")
    page.locator("#compare-button").click()
    page.get_by_text("the same for every picture").wait_for(timeout=120_000)
    gallery = page.locator("#gallery")
    expect(gallery.locator("img")).to_have_count(3, timeout=30_000)
    assert all(f"neon strength {s}" in gallery.inner_text() for s in ("0", "0.5", "1"))
    # side by side: the three pictures in one row
    tops = [gallery.locator("img").nth(i).bounding_box()["y"] for i in range(3)]
    assert max(tops) - min(tops) < 2, tops
    for name in ("gallery", "history"):
        assert_label_clear(page, name)

    page.get_by_role("tab", name="Adapters").click()
    page.locator("#library-pick input").click()
    page.get_by_role("option", name="neon").click()
    page.get_by_text("Download neon.safetensors").wait_for()
    table = page.locator("#library-table")
    expect(table).to_contain_text("Recommended strength")  # headings in words, not the file's field names
    assert "recommended_strength" not in table.inner_text() and "Trained (UTC)" in table.inner_text()
    assert re.search(r"\b20\d\d-\d\d-\d\d \d\d:\d\d\b", table.inner_text()), table.inner_text()  # not ISO's T...Z
    with page.expect_download() as download:
        page.locator("#download-button").click()
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in keys if not k.endswith(".alpha")} == {
        "lora_down.weight",
        "lora_up.weight",
    }
    assert meta["ss_network_dim"] == "8" and meta["ss_output_name"] == "neon"
    assert meta["modelspec.architecture"] == "lora-studio-builtin/lora"
    # the strength the judge recommends for this file, in its header as the run's judge.json says
    judged = json.loads(next((workspace / "runs").glob("*/judge.json")).read_text())
    assert meta.get("lora_studio.recommended_strength") == (
        None if judged["latest"]["strength"] is None else f"{judged['latest']['strength']:g}"
    )


def test_bad_upload_is_reported_and_nothing_starts(browser, workspace, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is a text file, not a picture")
    (tmp_path / "fake.txt").write_text("a caption")
    shutil.copy(SAMPLES / "neon_00.png", tmp_path / "real.png")
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, [fake, tmp_path / "fake.txt", tmp_path / "real.png"])
    page.get_by_text("real.png").last.wait_for()
    # flagged in the table as it is uploaded, before any Train (issue 19, item 8)
    page.locator("#captions").get_by_text("⚠ not a readable image").last.wait_for(timeout=30_000)
    assert "fake.png: not a readable image" in message(page)
    page.locator("#train-button").click()
    page.locator("#train-message").get_by_text("Nothing started").wait_for(timeout=30_000)
    page.wait_for_timeout(3000)  # several refreshes of the run view later, the message is still there to read
    text = message(page)
    assert "fake.png: not a readable image" in text
    assert "real.png: caption real.txt is missing" in text  # every problem at once
    assert "*Default caption*" not in text and "Default caption" in text and "--default-caption" not in text
    assert "/tmp" not in text and str(workspace) not in text
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())
    page.close()
    assert {"fake.png", "real.png"} <= {p.name for p in server.cache.rglob("*.png")}  # gradio's copies: here
    server.stop()  # the page's cache folder goes with it: no file or folder of the session is left
    assert not (workspace / ".gradio-cache").exists()


def test_unreadable_files_are_named_not_hidden(browser, workspace):
    """A broken adapter file is named under the library table; a damaged run log is named in the run's status."""
    (workspace / "library").mkdir()
    (workspace / "library" / "broken.safetensors").write_bytes(b"not a safetensors file")
    run = workspace / "runs" / "r1"
    run.mkdir(parents=True)
    TrainConfig(data="d", name="neon").save(run / "config.json")
    log = EventLog(run)
    log.emit("start", steps=2)
    with open(run / "events.jsonl", "a") as f:
        f.write("{oops\n")
    log.emit("done", step=2)
    server = Server(workspace)
    page = open_page(browser, server.url)
    status = page.locator("#train-status")
    status.get_by_text("events.jsonl has 1 unreadable line(s), left out of this view").wait_for(timeout=30_000)
    assert "events.jsonl line 2: not JSON" in status.inner_text()

    page.get_by_role("tab", name="Adapters").click()
    problems = page.locator("#library-problems")
    problems.get_by_text("Not listed: broken.safetensors").wait_for(timeout=30_000)
    assert problems.inner_text().startswith("⚠ Not listed: broken.safetensors — not a readable safetensors file")


def test_cancel_keeps_what_was_made(browser, workspace):
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, sorted(SAMPLES.iterdir()))
    page.get_by_text("neon_15.png").last.wait_for()
    set_number(page, "setting-steps", 100000)
    page.locator("#train-button").click()
    page.get_by_text("Started run").wait_for(timeout=30_000)
    page.locator("#train-progress-text").get_by_text("step 1").first.wait_for(timeout=120_000)
    page.locator("#cancel-button").click()
    page.locator("#train-status").get_by_text("Cancelled at step").wait_for(timeout=60_000)
    run = next((workspace / "runs").iterdir())
    assert (run / "adapter.safetensors").is_file()


LEGIBLE_LOSS_PLOT = """() => {
    const box = document.querySelector('#loss-plot').getBoundingClientRect();
    const parts = [...document.querySelectorAll('#loss-plot .role-legend-label text, #loss-plot p')];
    return parts.length >= 3 && parts.every(e => {
        const r = e.getBoundingClientRect();
        return r.height > 0 && r.top >= box.top && r.bottom <= box.bottom + 1;
    });
}"""


def test_runs_you_can_trust(browser, workspace):
    """Issue 19, items 1-4, 6-8 and 10, and issue 14's loss curve, as a person meets them in one session."""
    (workspace / "library").mkdir()
    (workspace / "library" / "neon.safetensors").write_bytes(b"an adapter already named neon")
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, sorted(SAMPLES.iterdir()))
    page.locator("#captions").get_by_text("glowline, a red circle at the top").wait_for()
    # item 10: every caption starts with "glowline": it is proposed as the trigger word
    expect(page.locator("#setting-trigger_word textarea, #setting-trigger_word input").first).to_have_value(
        "glowline", timeout=15_000
    )
    # item 4: a taken name is said under the box, and Train refuses it before any work
    fill(page, "setting-name", "neon")
    page.locator("#name-note").get_by_text("already has an adapter named 'neon'").wait_for(timeout=15_000)
    page.locator("#train-button").click()
    page.locator("#train-message").get_by_text("Nothing started").wait_for(timeout=30_000)
    assert "already has an adapter named 'neon'" in message(page)
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())  # nothing staged
    fill(page, "setting-name", "a/b\\c")
    page.locator("#name-note").get_by_text("Saved in the library as a_b_c").wait_for(timeout=15_000)
    # item 6: 2.5 steps and 1e12 steps are refused with the setting's page name and the range
    for typed, said in (("2.5", "Steps must be a whole number, got 2.5"), ("1e12", "at most 1000000")):
        set_number(page, "setting-steps", typed)
        page.locator("#train-button").click()
        page.locator("#train-message").get_by_text(said).wait_for(timeout=30_000)
        assert "--steps" not in message(page)  # item 8: the page's words
    # item 1: after refused Trains, the new run is the run the page shows, and Cancel stops it
    set_number(page, "setting-steps", 100000)
    page.locator("#train-button").click()
    page.get_by_text("Started run").wait_for(timeout=30_000)
    assert "saved in the library as a_b_c" in message(page)
    run = next((workspace / "runs").iterdir())
    picker = page.locator("#run-picker input")
    expect(picker).to_have_value(re.compile(rf"^{run.name} · (starting|running)$"), timeout=15_000)
    page.locator("#preview-prompt").get_by_text("Preview prompt: “glowline, ").wait_for(timeout=30_000)  # item 10
    page.locator("#train-progress-text").get_by_text(re.compile(r"step [1-9]")).first.wait_for(timeout=180_000)
    page.wait_for_timeout(3000)  # several ticks later, the page still shows the new run
    expect(picker).to_have_value(re.compile(rf"^{run.name} · running$"), timeout=30_000)
    page.locator("#cancel-button").click()
    page.locator("#train-message").get_by_text(f"Cancelling {run.name}").wait_for(timeout=30_000)
    # item 2: a checkpoint, so Resume goes on (Save every is 200), and the adapter in the library
    status = page.locator("#train-status")
    try:
        status.get_by_text("in the library as a_b_c-partial").wait_for(timeout=120_000)
    except PlaywrightTimeout:  # say what the page showed and what the trainer wrote
        events = (run / "events.jsonl").read_text().splitlines()[-4:] if (run / "events.jsonl").is_file() else []
        pytest.fail(f"the page shows {status.inner_text()!r}; the run's last events: {events}")
    assert (workspace / "library" / "a_b_c-partial.safetensors").is_file() and (run / "loss.png").is_file()
    stopped_at = int(re.search(r"Cancelled at step (\d+)", status.inner_text()).group(1))
    # issue 14: the loss plot says how it is smoothed, and draws both lines in colour (the page showed no data before
    # the run, and a plot that first got an empty frame drew its later lines without a stroke: no curve at all)
    assert "exponential moving average with weight 0.9" in page.locator("#loss-plot").inner_text()
    expect(page.locator("#loss-plot svg .mark-line path[stroke]")).to_have_count(2, timeout=30_000)
    # ... and its key (each line's name) and caption lie inside the plot's box, not cut off below it
    assert page.evaluate(LEGIBLE_LOSS_PLOT), "the loss plot's legend or caption lies outside its box"
    # item 3: Resume says it resumed, from that step
    page.locator("#resume-button").click()
    status.get_by_text(f"Training… (resumed from step {stopped_at})").wait_for(timeout=180_000)
    page.locator("#cancel-button").click()
    status.get_by_text("Cancelled at step").wait_for(timeout=120_000)
    # item 7: with nothing running, the open page stops asking the server (after one last tick): a 4 s window
    # without a call comes within 32 s (a ticking timer calls every second; the server may answer late under load)
    calls = queue_calls(page)
    for _ in range(8):
        seen = len(calls)
        page.wait_for_timeout(4000)
        if len(calls) == seen:
            break
    assert len(calls) == seen, calls[-12:]
    # item 8: no glyph Debian's Chromium cannot draw, no folder of the server
    text = page.locator("body").inner_text()
    assert "❌" not in text and "/tmp/" not in text


def test_cancel_while_starting_says_so_and_resume_starts_over(browser, workspace):
    """Issue 19, item 5: Cancel pressed while the trainer still loads."""
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, sorted(SAMPLES.iterdir()))
    page.locator("#captions").get_by_text("glowline, a red circle at the top").wait_for()
    set_number(page, "setting-steps", 3)
    page.locator("#train-button").click()
    page.get_by_text("Started run").wait_for(timeout=30_000)
    page.locator("#cancel-button").click()
    status = page.locator("#train-status")
    status.get_by_text("Cancelled before training began").wait_for(timeout=60_000)
    assert "Interrupted" not in status.inner_text()
    page.locator("#resume-button").click()
    status.get_by_text("Done.").wait_for(timeout=240_000)
