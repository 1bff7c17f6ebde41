"""The page with an SDXL base: the Train tab shows its native size (1024), the Generate tab draws with the SDXL
pipeline at the model's own size."""

from __future__ import annotations

import re

import pytest

from tests.test_ui_browser import Server, browser, open_page, workspace  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser


def test_generate_with_an_sdxl_base(browser, workspace):  # noqa: F811
    from tests.conftest import build_tiny_sdxl_pipeline

    model = workspace / "models" / "tiny-sdxl"
    build_tiny_sdxl_pipeline().save_pretrained(model, safe_serialization=True)
    server = Server(workspace)
    page = open_page(browser, server.url)
    page.locator("#native-size").get_by_text("64×64 px").wait_for(timeout=30_000)  # the built-in model's
    base = page.locator("#setting-base_model textarea, #setting-base_model input").first
    base.fill(str(workspace / "models" / "none"))
    base.press("Tab")
    page.locator("#native-size").get_by_text("neither an existing folder").wait_for(timeout=30_000)
    sdxl_base = str(workspace / "models" / "sdxl-base")  # the shipped SDXL base configs, as a folder
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parent.parent / "adapters" / "configs" / "sdxl", sdxl_base)
    base.fill(sdxl_base)
    base.press("Tab")
    page.locator("#native-size").get_by_text("1024×1024 px").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Generate").click()
    page.locator("#generate-base textarea, #generate-base input").first.fill(str(model))
    page.locator("#generate-button").click()
    status = page.locator("#generate-status")
    status.get_by_text(re.compile(r"Seed \d+")).wait_for(timeout=120_000)
    picture = page.locator("#gallery img").first
    picture.wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth > 0 }",
        timeout=30_000,
    )
    # the tiny SDXL model's native size: 8 latent pixels x the VAE's 4
    assert page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", picture.element_handle()) == [32, 32]
    log = next(workspace.glob("ui-*.log")).read_text()
    assert "Traceback" not in log
