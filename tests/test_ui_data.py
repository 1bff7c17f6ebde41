"""The Train tab's data check without a browser: what the page reports for an upload as the table shows it."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr

import app.ui.data as data
from app.ui.data import DataPanel
from app.ui.train import caption_rows

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def test_the_report_follows_the_table_and_settings_and_looks_at_the_pictures_once(tmp_path, monkeypatch):
    for path in sorted(SAMPLES.iterdir())[:10]:  # neon_00 to neon_04
        shutil.copy(path, tmp_path)
    shutil.copy(tmp_path / "neon_01.png", tmp_path / "neon_01_copy.png")
    paths = [str(p) for p in sorted(tmp_path.iterdir())]
    looked, real = [], data.picture_findings
    monkeypatch.setattr(data, "picture_findings", lambda *a, **k: looked.append(1) or real(*a, **k))
    with gr.Blocks():
        panel = DataPanel()
    rows, _ = caption_rows(paths)
    check = dict(base_model="builtin", resolution=0, buckets=True, default_caption="", dropped=["gone.png"])

    report, summary, dropped = panel.on_check(paths, rows, trigger_word="glowline", **check)
    assert summary.startswith("**Data check** (6 images, training at 64 px): 2 thing(s) to look at")
    assert [(f["file"], f["message"].split(":")[0]) for f in report] == [
        ("neon_01_copy.png", "looks like the same picture as neon_01.png"),
        ("neon_01_copy.png", "its caption is empty, so training refuses it"),
    ]
    assert dropped == []  # a name no longer uploaded is forgotten

    rows[2][2] = "Glowline, a copy"  # the copy's caption, typed in the table; the trigger word in another case
    report, _, _ = panel.on_check(paths, rows, trigger_word="glowline", **check)
    assert [f["message"].split(":")[0] for f in report] == [
        "looks like the same picture as neon_01.png",
        "writes the trigger word as 'Glowline'",
    ]
    report, _, _ = panel.on_check(paths, rows, trigger_word="", **check)
    assert [f["message"].split(",")[0] for f in report] == [
        "looks like the same picture as neon_01.png: training would see that picture twice and copy it more than "
        "the style; leave one out",
        "does not start with 'glowline'",
    ]
    assert len(looked) == 1  # the pictures once per upload and base model; captions and settings re-checked alone

    report, summary, _ = panel.on_check(paths, rows, trigger_word="", **{**check, "base_model": str(tmp_path)})
    assert report == [] and summary.startswith("⚠ The data check needs the base model: base model folder")
