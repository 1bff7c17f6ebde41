"""The web UI in a real browser (Debian's headless Chromium driven by Playwright), on the built-in model."""

from __future__ import annotations

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


class Server:
    """`lora-studio ui` as a user starts it, in its own process, on a workspace folder."""

    started: list[Server] = []

    def __init__(self, workspace: Path):
        self.workspace, self.port = workspace, free_port()
        exe = Path(sys.executable).with_name("lora-studio")
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [str(exe), "ui", "--port", str(self.port), "--workspace", str(workspace)],
            stdout=open(workspace / f"ui-{self.port}.log", "wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
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
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(url)
    page.locator("#train-button").wait_for()
    return page


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def upload(page, paths) -> None:
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in paths])


def message(page) -> str:
    """What the page says about the last button press or upload."""
    return page.locator("#train-message").inner_text()


def test_train_watch_generate_download(browser, workspace, tmp_path):
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, sorted(SAMPLES.iterdir()))
    page.get_by_text("neon_15.png").last.wait_for()  # the upload lists every file
    page.locator("#captions").get_by_text("glowline, a red circle at the top").wait_for()  # the table fills
    set_number(page, "setting-steps", 60)
    set_number(page, "setting-preview_every", 20)
    page.locator("#setting-name textarea, #setting-name input").first.fill("neon")
    page.locator("#train-button").click()
    page.get_by_text("Started run").wait_for(timeout=30_000)

    page.locator("#train-button").click()  # a second Train while the first runs is refused, in the page
    page.get_by_text("already in progress").wait_for(timeout=30_000)
    assert len(list((workspace / "runs").iterdir())) == 1

    # The UI dies mid-run; the trainer does not. A new UI on the same workspace re-attaches to it.
    page.close()
    server.kill()
    server = Server(workspace)
    page = open_page(browser, server.url)
    page.locator("#train-progress-text").get_by_text("step 60/60").wait_for(timeout=240_000)
    page.locator("#train-status").get_by_text("Done").wait_for(timeout=60_000)
    expect(page.locator("#run-picker input")).to_have_value(re.compile(r"· done$"), timeout=15_000)
    assert page.locator("#loss-plot canvas, #loss-plot svg").count() > 0
    page.locator("#previews img").first.wait_for()
    assert page.locator("#previews img").count() >= 3  # steps 20, 40 and the end

    page.get_by_role("tab", name="Generate").click()
    page.locator("#adapter-0 input").click()
    page.get_by_role("option", name="neon").click()
    page.locator("#compare-strengths textarea, #compare-strengths input").first.fill("0, 1")
    page.locator("#compare-button").click()
    page.get_by_text("the same for every picture").wait_for(timeout=120_000)
    gallery = page.locator("#gallery")
    assert gallery.locator("img").count() == 2
    assert "neon strength 0" in gallery.inner_text() and "neon strength 1" in gallery.inner_text()

    page.get_by_role("tab", name="Adapters").click()
    page.locator("#library-pick input").click()
    page.get_by_role("option", name="neon").click()
    page.get_by_text("Download neon.safetensors").wait_for()
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


def test_bad_upload_is_reported_and_nothing_starts(browser, workspace, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is a text file, not a picture")
    (tmp_path / "fake.txt").write_text("a caption")
    shutil.copy(SAMPLES / "neon_00.png", tmp_path / "real.png")
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, [fake, tmp_path / "fake.txt", tmp_path / "real.png"])
    page.get_by_text("real.png").last.wait_for()
    page.locator("#train-button").click()
    page.locator("#train-message").get_by_text("Nothing started").wait_for(timeout=30_000)
    page.wait_for_timeout(3000)  # several refreshes of the run view later, the message is still there to read
    text = message(page)
    assert "fake.png: not a readable image" in text
    assert "real.png: caption real.txt is missing" in text  # every problem at once
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())


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
