"""The Train tab's data check in a real browser: the report appears on upload, and Leave out keeps an image out of
the run that Train starts (never out of the person's folder)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_ui_browser import SAMPLES, Server, browser, message, open_page, set_number, upload, workspace

pytestmark = pytest.mark.browser
__all__ = ["browser", "workspace"]  # the fixtures, used by name


def test_the_report_shows_on_upload_and_leave_out_keeps_an_image_out_of_the_run(browser, workspace, tmp_path):
    mine = tmp_path / "my_style"
    mine.mkdir()
    for path in sorted(SAMPLES.iterdir())[:12]:  # neon_00 to neon_05, with their captions
        shutil.copy(path, mine)
    shutil.copy(mine / "neon_03.png", mine / "neon_03_copy.png")
    (mine / "neon_03_copy.txt").write_text("glowline, the same again")
    (mine / "neon_04.txt").write_text("")  # an empty caption: found too
    server = Server(workspace)
    page = open_page(browser, server.url)
    upload(page, sorted(mine.iterdir()))
    report = page.locator("#data-check")
    report.get_by_text("2 thing(s) to look at").wait_for(timeout=60_000)
    assert "7 images, training at 64 px" in report.inner_text()
    findings = page.locator("#data-findings")
    findings.get_by_text("neon_03_copy.png: looks like the same picture as neon_03.png").wait_for()
    assert "neon_04.png: its caption is empty, so training refuses it" in findings.inner_text()
    assert "Default caption" in findings.inner_text() and "--default-caption" not in findings.inner_text()

    page.get_by_role("button", name="Leave out neon_03_copy.png").click()
    findings.get_by_text("neon_03_copy.png left out of this run").wait_for(timeout=30_000)  # names what was
    assert page.get_by_role("button", name="Put back neon_03_copy.png").count() == 1
    page.get_by_role("button", name="Leave out neon_04.png").click()  # its caption is empty: out of this run too
    page.get_by_role("button", name="Put back neon_04.png").wait_for(timeout=30_000)
    set_number(page, "setting-steps", 2)
    page.locator("#train-button").click()
    page.locator("#train-message").get_by_text("Started run").wait_for(timeout=60_000)
    assert "Left out of this run: neon_03_copy.png, neon_04.png." in message(page)
    run = next((workspace / "runs").iterdir())
    staged = sorted(p.name for p in (run / "data").glob("*.png"))
    assert staged == ["neon_00.png", "neon_01.png", "neon_02.png", "neon_03.png", "neon_05.png"]
    assert (mine / "neon_03_copy.png").is_file() and (mine / "neon_04.png").is_file()  # the person's files stay
    # the run folder keeps the data check as it stood at Train, beside plan.json and judge.json
    checked = json.loads((run / "datacheck.json").read_text())
    assert checked["left_out"] == ["neon_03_copy.png", "neon_04.png"] and checked["kept"] == []
    assert {(f["kind"], f["file"]) for f in checked["findings"]} >= {("duplicate", "neon_03_copy.png")}
