"""Make the README's pictures: a screenshot of each tab after a real training run, and the strength grid.

    .venv/bin/python app/screenshots/make_screenshots.py             # needs /usr/bin/chromium; minutes on a CPU
    .venv/bin/python app/screenshots/make_screenshots.py --generate  # the Generate tab's three only

It starts `lora-studio ui` on a temporary workspace with the sample images preloaded, presses Train with the
default settings, waits for the run to finish and opens the adapter in the library, taking a screenshot of each
tab. The grid shows one prompt and seed at strength 0, 0.5 and 1. The Generate tab's screenshots (Compare
strengths, the History with a picture's settings restored, an X/Y grid of strength x checkpoint) are taken on a
workspace of their own, where the same default run is trained with a checkpoint every 100 steps.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROMPT, SEED = "glowline, a large green triangle", 3


def main() -> None:
    from playwright.sync_api import sync_playwright

    workspace = Path(tempfile.mkdtemp(prefix="lora-studio-shots-"))
    server, url = start_ui(workspace, "--preload", str(ROOT / "sample_images"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_text("glowline, a red circle at the top").first.wait_for(timeout=60_000)  # the caption table
            page.locator("#setting-name textarea, #setting-name input").first.fill("neon")
            load_before, pressed = os.getloadavg()[0], time.time()
            page.locator("#train-button").click()
            page.locator("#train-status").get_by_text("Done").wait_for(timeout=600_000)
            record_first_run(workspace, pressed, load_before)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(HERE / "train.png"), full_page=True)

            page.get_by_role("tab", name="Adapters").click()
            page.locator("#library-pick input").click()
            page.get_by_role("option", name="neon").click()
            page.get_by_text("Download neon.safetensors").wait_for()
            page.screenshot(path=str(HERE / "adapters.png"), full_page=True)
            browser.close()
        strength_grid(workspace / "library" / "neon.safetensors")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workspace, ignore_errors=True)  # the pictures are kept in app/screenshots; the run is not
    generate_shots()


def start_ui(workspace: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`lora-studio ui` on `workspace` on a free port, once it answers: the process and its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("lora-studio")
    server = subprocess.Popen([str(exe), "ui", "--port", str(port), "--workspace", str(workspace), *extra])
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    return server, url


def generate_shots() -> None:
    """generate.png, history.png and grid.png: the default run on the sample images, trained here with a checkpoint
    every 100 steps, then the Generate tab: Compare strengths; a batch of four, then a picture of the History
    clicked (its settings back in the controls); an X/Y grid of strength x the run's checkpoints."""
    from playwright.sync_api import sync_playwright

    from trainer.config import TrainConfig
    from trainer.loop import train

    workspace = Path(tempfile.mkdtemp(prefix="lora-studio-shots-"))
    run = workspace / "runs" / time.strftime("%Y%m%d-%H%M%S-neon")
    config = TrainConfig(
        data=str(ROOT / "sample_images"), name="neon", run_dir=str(run), library=str(workspace / "library")
    )
    config.save_every = 100
    train(config)
    server, url = start_ui(workspace)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Generate").click()
            status = page.locator("#generate-status")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#seed input").fill(str(SEED))
            page.locator("#adapter-0 input").click()
            page.get_by_role("option", name="neon", exact=True).click()
            page.locator("#compare-button").click()
            status.get_by_text("the same for every picture").wait_for(timeout=120_000)
            page.screenshot(path=str(HERE / "generate.png"), full_page=True)

            page.locator("#batch-size input").fill("4")
            page.locator("#generate-button").click()
            status.get_by_text("Seeds 3–6").wait_for(timeout=120_000)
            page.locator("#history img").nth(5).click()  # the Compare's picture at strength 0.5
            status.get_by_text("restored").wait_for(timeout=30_000)
            page.screenshot(path=str(HERE / "history.png"), full_page=True)

            page.get_by_text("Checkpoints of a run: try and download").click()
            page.locator("#checkpoint-run input").click()
            page.get_by_role("option", name=f"{run.name} · 3 checkpoint(s)").click()
            status.get_by_text("3 checkpoint(s) with an adapter").wait_for(timeout=30_000)
            page.locator("#grid-rows").get_by_text("checkpoints", exact=True).click()
            page.locator("#grid-button").click()
            status.get_by_text("X/Y grid").wait_for(timeout=300_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(HERE / "grid.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workspace, ignore_errors=True)


def record_first_run(workspace: Path, pressed: float, load_before: float) -> None:
    """What the README's first run says, measured on this run: Train pressed to adapter done, and steps per second
    (steady, after step 10), written to benchmarks/results/first_run_cpu.json."""
    import json
    import platform

    from trainer.runs import read_events, steady_step_seconds

    run = next((workspace / "runs").iterdir())
    done = next(e for e in read_events(run) if e["type"] == "done")
    record = {
        "command": ".venv/bin/python app/screenshots/make_screenshots.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (browser, app and trainer on the same cores)",
        "train_pressed_to_done_s": round(done["time"] - pressed, 1),
        "steps": done["step"],
        "steps_per_s": round(1 / steady_step_seconds(run), 2),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    (ROOT / "benchmarks" / "results" / "first_run_cpu.json").write_text(json.dumps(record, indent=1) + "\n")


def strength_grid(adapter: Path, seeds=range(4)) -> None:
    """One held-out prompt (green triangles: the style set has neither) at strength 0, 0.5, 1; seeds 0-3, unpicked."""
    from adapters.runtime import Studio
    from app.images import labelled_grid

    studio = Studio("builtin", device="cpu")
    studio.load(adapter, name="neon")
    strengths = (0.0, 0.5, 1.0)
    rows = [[studio.generate(PROMPT, seed=seed, strengths={"neon": s})[0] for s in strengths] for seed in seeds]
    grid = labelled_grid(rows, [f"strength {s:g}" for s in strengths], [f"seed {seed}" for seed in seeds], cell=128)
    grid.save(HERE / "strengths.png")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 2 and sys.argv[1] == "--grid-only":  # redraw the grid from an adapter file
        strength_grid(Path(sys.argv[2]))
    elif sys.argv[1:] == ["--generate"]:
        generate_shots()
    else:
        main()
