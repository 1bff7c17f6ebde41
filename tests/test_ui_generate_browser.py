"""The Generate tab in a real browser (Debian's Chromium through Playwright), on the built-in model: issue 19's
"Generate like the tools people know". One app and one page serve every test here, in file order."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from playwright.sync_api import expect

from adapters.base import model_modules
from adapters.families import BUILTIN
from adapters.formats import build_metadata, save_adapter, to_kohya
from adapters.lora import LoraModule
from app.cli import main as cli
from app.images import Parameters
from tests.test_ui_browser import CHROMIUM, Server
from trainer.config import TrainConfig

pytestmark = pytest.mark.browser
RUN = "20260101-000000-neon"
LOADED = "() => { const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth > 0 }"


def make_adapter(path: Path, trigger_word: str, seed: int = 0, scale: float = 0.3) -> Path:
    """A random rank-4 LoRA on the built-in model's attention layers, with a library header naming its trigger
    word: strong enough that its strength shows in the picture."""
    shapes = model_modules("builtin")[0]["unet"]
    generator = torch.Generator().manual_seed(seed)
    lora = {
        f"unet.{name}": LoraModule(
            down=torch.randn(4, shapes[name][0], generator=generator) * scale,
            up=torch.randn(shapes[name][1], 4, generator=generator) * scale,
            alpha=4.0,
        )
        for name in shapes
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name)
    }
    tensors = to_kohya(lora)
    metadata = build_metadata(
        tensors=tensors,
        rank=4,
        alpha=4,
        base_model="builtin",
        family=BUILTIN,
        output_name=path.stem,
        resolution=64,
        num_images=1,
        tag_frequency={},
        trigger_word=trigger_word,
        config={},
        steps=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(path, tensors, metadata)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a workspace whose library holds `neon` (trigger word `glowline`) and whose outputs folder holds
    one picture made earlier by `lora-studio generate` (as if by an earlier session of the app)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    workspace = tmp_path_factory.mktemp("generate") / "ws"
    adapter = make_adapter(workspace / "library" / "neon.safetensors", "glowline")
    earlier = workspace / "outputs" / "2020-01-01" / "00001-5.png"
    earlier.parent.mkdir(parents=True)
    command = ["generate", "--prompt", "a red circle", "--negative-prompt", "blurry, dark", "--seed", "5"]
    command += ["--sampling-steps", "3", "--guidance", "4", "--adapter", f"{adapter}:0.8", "--output", str(earlier)]
    assert cli(command) == 0
    run = workspace / "runs" / RUN  # a run whose checkpoints hold their adapters, as the trainer saves them
    run.mkdir(parents=True)
    TrainConfig(data="data", name="neon", trigger_word="glowline").save(run / "config.json")
    for step, seed in ((2, 1), (4, 2)):
        make_adapter(run / "checkpoints" / f"step_{step:06d}" / f"neon-step{step}.safetensors", "glowline", seed)
    server = Server(workspace)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.goto(server.url)
            page.get_by_role("tab", name="Generate").click()
            yield page, workspace
            browser.close()
    finally:
        server.kill()


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def status(page):
    return page.locator("#generate-status")


def shown_files(page, elem_id: str) -> list[str]:
    """The file names of the pictures a gallery shows, in its order."""
    return [src.rsplit("/", 1)[-1] for src in page.locator(f"#{elem_id} img").evaluate_all("e => e.map(i => i.src)")]


def test_pictures_are_saved_with_their_settings_shown_whole_and_restored_from_the_history(app):
    page, workspace = app
    # the history is read from the outputs folder: a picture of an earlier session is there from the start
    expect(page.locator("#history img")).to_have_count(1, timeout=30_000)
    fill(page, "steps", 4)
    page.locator("#generate-button").click()
    day = workspace / "outputs" / time.strftime("%Y-%m-%d")  # the server's day: the same clock
    status(page).get_by_text(f"Saved in outputs/{day.name}/: 00001-7.png").wait_for(timeout=120_000)
    # the file holds its settings as AUTOMATIC1111 writes them
    text = Image.open(day / "00001-7.png").info["parameters"]
    assert text == (
        "glowline, a green triangle\n"
        "Steps: 4, Sampler: DPM++ 2M, CFG scale: 5, Seed: 7, Size: 64x64, Model: builtin, Guidance rescale: 0.7"
    )
    # ... and so does the one `lora-studio generate` wrote, with the adapter as A1111 writes it
    earlier = Image.open(workspace / "outputs" / "2020-01-01" / "00001-5.png").info["parameters"]
    digest = Parameters.parse(earlier).lora_hashes["neon"]
    assert earlier == (
        "a red circle <lora:neon:0.8>\nNegative prompt: blurry, dark\n"
        "Steps: 3, Sampler: DPM++ 2M, CFG scale: 4, Seed: 5, Size: 64x64, Model: builtin, Guidance rescale: 0.7, "
        f'Lora hashes: "neon: {digest}"'
    )
    assert re.fullmatch(r"[0-9a-f]{12}", digest)

    # the picture is whole (contained, not cropped), large enough to see, and on screen without scrolling
    picture = page.locator("#gallery img").first
    page.wait_for_function(LOADED, timeout=30_000)
    box, frame = picture.bounding_box(), page.locator("#gallery").bounding_box()
    assert picture.evaluate("i => getComputedStyle(i).objectFit") == "contain"
    assert picture.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"  # 64 px, enlarged sharp
    assert box["width"] >= 256 and box["height"] >= 256
    assert frame["x"] <= box["x"] and box["x"] + box["width"] <= frame["x"] + frame["width"]
    assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"]
    assert 0 <= box["y"] and box["y"] + box["height"] <= 1000

    # the history, newest first; clicking a picture puts its settings back
    expect(page.locator("#history img")).to_have_count(2)
    assert shown_files(page, "history") == ["00001-7.png", "00001-5.png"]
    page.locator("#history img").nth(1).click()
    status(page).get_by_text("Settings of 00001-5.png restored").wait_for(timeout=30_000)
    expect(page.locator("#gallery img")).to_have_count(1, timeout=30_000)  # the picked picture is the one shown
    assert shown_files(page, "gallery") == ["00001-5.png"]
    assert (value(page, "prompt"), value(page, "negative-prompt")) == ("a red circle", "blurry, dark")
    assert (value(page, "seed"), value(page, "steps"), value(page, "guidance")) == ("5", "3", "4")
    assert (value(page, "width"), value(page, "height")) == ("64", "64")
    assert (value(page, "adapter-0"), value(page, "strength-0")) == ("neon", "0.8")
    page.locator("#history img").nth(0).click()
    status(page).get_by_text("Settings of 00001-7.png restored").wait_for(timeout=30_000)
    assert (value(page, "prompt"), value(page, "seed"), value(page, "steps")) == (
        "glowline, a green triangle",
        "7",
        "4",
    )
    assert value(page, "adapter-0") == "(none)"


def saved_seeds(workspace: Path) -> list[int]:
    """The seeds of today's saved pictures, in the order they were saved."""
    day = workspace / "outputs" / time.strftime("%Y-%m-%d")
    return [Parameters.of_file(p).seed for p in sorted(day.glob("*.png"))]


def test_random_seed_shown_batches_reuse_interrupt_ctrl_enter_and_the_token_counter(app):
    page, workspace = app
    # a 100,000-character prompt: the page says how much of it the text encoder reads, and where it is cut (the
    # built-in model's tokenizer spells glowline in 7 pieces)
    fill(page, "prompt", "glowline, " * 10_000)
    tokens = page.locator("#prompt-tokens")
    tokens.get_by_text("⚠ Prompt: 80000/75 tokens").wait_for(timeout=60_000)
    assert "reads the first 75; the rest, from “" in tokens.inner_text() and "is cut off" in tokens.inner_text()
    fill(page, "prompt", "glowline, a blue circle")
    expect(tokens).to_have_text("Prompt: 11/75 tokens", timeout=30_000)

    # -1 is a random seed; 2 batches of 2 pictures; Ctrl+Enter in the prompt box generates
    before = len(saved_seeds(workspace))
    fill(page, "seed", -1)
    fill(page, "batch-count", 2)
    fill(page, "batch-size", 2)
    fill(page, "steps", 2)
    page.locator("#prompt textarea").press("Control+Enter")
    status(page).get_by_text(re.compile(r"^Seeds \d+–\d+\. base model\. Saved in")).wait_for(timeout=120_000)
    seeds = saved_seeds(workspace)[before:]
    first = seeds[0]
    assert seeds == [first, first + 1, first + 2, first + 3]  # each picture saved with its own seed
    assert status(page).inner_text().startswith(f"Seeds {first}–{first + 3}. base model.")
    expect(page.locator("#gallery img")).to_have_count(4)
    assert value(page, "seed") == str(first)  # the seed drawn is shown ...
    assert page.locator("#random-seed input").is_checked()  # ... and the next press draws a new one

    page.locator("#reuse-seed").click()  # the last pictures' seed, fixed
    expect(page.locator("#random-seed input")).not_to_be_checked(timeout=30_000)
    assert value(page, "seed") == str(first)

    # Interrupt stops between denoising steps: what was finished is kept, the rest is not saved
    fill(page, "batch-size", 1)
    fill(page, "batch-count", 3)
    fill(page, "steps", 100)
    before = len(saved_seeds(workspace))
    page.locator("#generate-button").click()
    page.locator("#gallery").get_by_text(re.compile(r"step \d+/100")).first.wait_for(timeout=120_000)
    page.locator("#interrupt-button").click()
    status(page).get_by_text("Interrupted:").wait_for(timeout=120_000)
    made = int(re.search(r"Interrupted: (\d) of 3 picture\(s\) made", status(page).inner_text()).group(1))
    assert made < 3 and len(saved_seeds(workspace)) - before == made


def drag_strength(page, slot: int, to: float) -> None:
    """Drag a strength slider (-1 to 2) to about `to` with the mouse and let go, as a person does."""
    box = page.locator(f"#strength-{slot} input[type=range]").bounding_box()
    now = float(value(page, f"strength-{slot}"))
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * (now + 1) / 3, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * (to + 1) / 3, y, steps=5)
    page.mouse.up()


def test_picking_an_adapter_offers_its_trigger_word_and_auto_update_redraws_without_reloading(app):
    page, workspace = app
    fill(page, "prompt", "a green triangle")
    fill(page, "seed", 7)
    page.locator("#random-seed input").uncheck()
    fill(page, "batch-count", 1)
    fill(page, "steps", 4)
    page.locator("#adapter-0 input").click()
    page.get_by_role("option", name="neon").click()
    status(page).get_by_text("Added neon's trigger word “glowline” to the prompt").wait_for(timeout=30_000)
    assert value(page, "prompt") == "glowline, a green triangle"

    before = len(saved_seeds(workspace))
    page.locator("#generate-button").click()
    status(page).get_by_text("Seed 7. neon 1. Saved in").wait_for(timeout=120_000)
    day = workspace / "outputs" / time.strftime("%Y-%m-%d")
    at_one = sorted(day.glob("*.png"))[-1]

    page.locator("#auto-update input").check()
    drag_strength(page, 0, 0.0)
    status(page).get_by_text(re.compile(r"^Auto-update: seed 7\. neon -?0\.\d+\. Saved in")).wait_for(timeout=120_000)
    said = status(page).inner_text()
    assert "Loaded" not in said  # the base model and the adapter stayed loaded: only the strength changed
    redrawn = sorted(day.glob("*.png"))[-1]
    assert len(saved_seeds(workspace)) == before + 2
    strength = float(value(page, "strength-0"))
    assert Parameters.of_file(redrawn).adapters == {"neon": strength} and abs(strength) < 0.5
    assert Parameters.of_file(redrawn).seed == 7
    assert list(Image.open(redrawn).getdata()) != list(Image.open(at_one).getdata())

    page.locator("#auto-update input").uncheck()  # off: letting go of a slider draws nothing
    drag_strength(page, 0, 1.0)
    page.locator("#generate-button").click()
    status(page).get_by_text(re.compile(r"^Seed 7\. neon 0\.9\d*|^Seed 7\. neon 1\.")).wait_for(timeout=120_000)
    assert len(saved_seeds(workspace)) == before + 3


def grid_cell(grid: Image.Image, row: int, column: int, labels: list[str], size: int = 128) -> Image.Image:
    """One picture of an X/Y grid file, cut where `app.images.labelled_grid` puts it (rows labelled `labels`)."""
    pad, top, left = 6, 22, 8 * max(len(t) for t in labels) + 12
    x, y = left + pad + column * (size + pad), top + row * (size + pad)
    return grid.crop((x, y, x + size, y + size))


def test_a_runs_checkpoints_are_tried_downloaded_and_drawn_in_x_y_grids(app, tmp_path):
    page, workspace = app
    from adapters.runtime import Studio

    fill(page, "prompt", "glowline, a green triangle")
    fill(page, "steps", 3)
    page.locator("#auto-update input").uncheck()
    page.get_by_text("Checkpoints of a run: try and download").click()
    page.locator("#checkpoint-run input").click()
    page.get_by_role("option", name=f"{RUN} · 2 checkpoint(s)").click()
    status(page).get_by_text(f"Run {RUN}: 2 checkpoint(s) with an adapter").wait_for(timeout=30_000)
    assert value(page, "checkpoint-step") == "step 4"
    # download: the checkpoint's adapter file itself
    with page.expect_download() as download:
        page.get_by_text("Download neon-step4.safetensors").click()
    download.value.save_as(tmp_path / "got.safetensors")
    kept = workspace / "runs" / RUN / "checkpoints" / "step_000004" / "neon-step4.safetensors"
    assert (tmp_path / "got.safetensors").read_bytes() == kept.read_bytes()
    # try: refused on another base model than the run's; then the checkpoint becomes adapter 1 (not in the library)
    fill(page, "generate-base", "stabilityai/sdxl-turbo")
    page.locator("#checkpoint-try").click()
    status(page).get_by_text(f"⚠ run {RUN} was trained on base model 'builtin'").wait_for(timeout=30_000)
    fill(page, "generate-base", "builtin")
    page.locator("#checkpoint-try").click()
    status(page).get_by_text(f"Adapter 1 is now {RUN}-step4").wait_for(timeout=30_000)
    assert value(page, "adapter-0") == f"{RUN}-step4"
    assert [p.name for p in (workspace / "library").iterdir()] == ["neon.safetensors"]
    fill(page, "strength-0", 1)
    fill(page, "seed", 7)
    page.locator("#random-seed input").uncheck()
    fill(page, "batch-count", 1)
    fill(page, "batch-size", 1)
    page.locator("#generate-button").click()
    status(page).get_by_text(f"Seed 7. {RUN}-step4 1. Saved in").wait_for(timeout=120_000)
    day = workspace / "outputs" / time.strftime("%Y-%m-%d")
    assert Parameters.of_file(sorted(day.glob("*.png"))[-1]).adapters == {f"{RUN}-step4": 1.0}

    # X/Y grid, strength x seed: each cell is the picture its seed and strength draw
    page.locator("#adapter-0 input").click()
    page.get_by_role("option", name="neon", exact=True).click()
    fill(page, "compare-strengths", "0, 1")
    fill(page, "grid-seeds", "7, 8")
    pictures = len(list(day.glob("*.png")))
    page.locator("#grid-button").click()
    said = status(page).get_by_text(re.compile(r"^X/Y grid, strength of neon x seed: 2 x 2 pictures"))
    said.wait_for(timeout=180_000)
    grid_file = workspace / "outputs" / "grids" / time.strftime("%Y-%m-%d") / "00001.png"
    assert f"Saved as outputs/grids/{grid_file.parent.name}/00001.png" in status(page).inner_text()
    expect(page.locator("#gallery img")).to_have_count(1)
    page.wait_for_function(LOADED, timeout=30_000)
    # the grid is shown whole and large, and in view at the grid button, far down the page: the results stay put
    box, frame = page.locator("#gallery img").bounding_box(), page.locator("#gallery").bounding_box()
    assert frame["x"] <= box["x"] and box["x"] + box["width"] <= frame["x"] + frame["width"]
    assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"]
    assert box["width"] > 0.6 * frame["width"]
    assert page.evaluate("scrollY") > 500  # the page is scrolled down to the button ...
    assert 0 <= box["y"] and box["y"] + box["height"] <= 1000  # ... and the grid is on screen
    assert len(list(day.glob("*.png"))) == pictures  # the cells are in the grid only
    first = Parameters.of_file(grid_file)  # the grid file says how its first cell was made
    assert (first.prompt, first.seed, first.steps) == ("glowline, a green triangle", 7, 3)
    assert first.adapters == {"neon": 0}
    grid = Image.open(grid_file).convert("RGB")
    labels = ["seed 7", "seed 8"]
    assert grid.crop((0, 0, grid.width, 20)).getextrema() != ((255, 255), (255, 255), (255, 255))  # column labels
    assert grid.crop((0, 22, 40, grid.height)).getextrema() != ((255, 255), (255, 255), (255, 255))  # row labels
    studio = Studio("builtin", device="cpu")
    studio.load(workspace / "library" / "neon.safetensors", name="neon")
    for row, seed in enumerate((7, 8)):
        for column, strength in enumerate((0.0, 1.0)):
            alone = studio.generate(
                "glowline, a green triangle",
                seed=seed,
                sampling_steps=3,
                guidance=5,
                guidance_rescale=0.7,
                strengths={"neon": strength},
            )[0].resize((128, 128), Image.Resampling.NEAREST)
            assert list(grid_cell(grid, row, column, labels).getdata()) == list(alone.getdata()), (seed, strength)

    # X/Y grid, strength x checkpoint: at strength 0 every checkpoint draws the base picture, at 1 each its own
    page.locator("#grid-rows").get_by_text("checkpoints", exact=True).click()
    page.locator("#grid-button").click()
    said = status(page).get_by_text(re.compile(rf"^X/Y grid, strength x checkpoint of run {RUN}: 2 x 2 pictures"))
    said.wait_for(timeout=180_000)
    grid = Image.open(grid_file.with_name("00002.png")).convert("RGB")
    labels = ["step 2", "step 4"]
    cells = [[list(grid_cell(grid, r, c, labels).getdata()) for c in range(2)] for r in range(2)]
    assert cells[0][0] == cells[1][0] and cells[0][1] != cells[1][1] and cells[0][0] != cells[0][1]
