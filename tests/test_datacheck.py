"""The data-set check (trainer/datacheck.py): duplicates, outliers, small images, buckets and captions are found in
sets built from sample_images/, and a clean set reports nothing."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from adapters.base import load_vae
from app.cli import main
from tests.conftest import write_scene_folder
from trainer.datacheck import caption_findings, check_data, folder_pairs, picture_findings, size_findings
from trainer.dataset import bucket_sizes, load_examples

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def plant(folder: Path) -> Path:
    """The demo set, plus: an exact copy, a resized copy, a crop (JPEG, not square) and a picture in another style."""
    shutil.copytree(SAMPLES, folder)
    shutil.copy(folder / "neon_10.png", folder / "neon_10_copy.png")
    Image.open(folder / "neon_07.png").resize((200, 200), Image.Resampling.LANCZOS).save(folder / "neon_07_big.png")
    Image.open(folder / "neon_03.png").crop((16, 8, 112, 120)).save(folder / "neon_03_crop.jpg", quality=90)
    from trainer.builtin.scenes import render, sample_scene

    plain = render([sample_scene(random.Random(5))], size=128, style="plain")[0]
    Image.fromarray(plain.permute(1, 2, 0).numpy()).save(folder / "other_style.png")
    for stem in ("neon_10_copy", "neon_07_big", "neon_03_crop", "other_style"):
        (folder / f"{stem}.txt").write_text(f"glowline, {stem}")
    return folder


@pytest.fixture(scope="module")
def vae():
    return load_vae("builtin", device="cpu")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return plant(tmp_path_factory.mktemp("planted") / "data")


def test_planted_duplicates_and_an_outlier_are_found_and_nothing_else(planted, vae):
    pairs, names = folder_pairs(planted)
    report = check_data(pairs, names=names, resolution=64, stride=16, trigger_word="glowline", vae=vae)
    assert {(f.kind, f.file, f.others) for f in report.findings} == {
        ("duplicate", "neon_10_copy.png", ("neon_10.png",)),
        ("duplicate", "neon_07.png", ("neon_07_big.png",)),  # the larger copy is the one to keep
        ("duplicate", "neon_03_crop.jpg", ("neon_03.png",)),
        ("outlier", "other_style.png", ()),
    }
    said = {f.file: f.message for f in report.findings}
    assert said["neon_03_crop.jpg"].startswith("looks like a crop of neon_03.png")
    assert "at another size (128x128 px, that one 200x200)" in said["neon_07.png"]
    assert said["other_style.png"].startswith("its tones and colours are far from the rest of the set")
    assert report.notes == []


def test_the_hash_alone_finds_copies_and_resizes_but_not_crops(planted):
    pairs, names = folder_pairs(planted)
    findings, notes = picture_findings([p for p, _ in pairs], names, vae=None)
    assert {(f.file, f.others) for f in findings} == {
        ("neon_10_copy.png", ("neon_10.png",)),
        ("neon_07.png", ("neon_07_big.png",)),
    }
    assert notes == ["crops and style outliers were not checked: the base model's VAE could not be loaded"]


def test_the_demo_set_reports_nothing(vae):
    pairs, names = folder_pairs(SAMPLES)
    report = check_data(pairs, names=names, resolution=64, stride=16, trigger_word="glowline", vae=vae)
    assert report.findings == []
    assert report.lines()[0].startswith("nothing found")
    assert report.bucket_lines() == ["64x64: 16 images"]


def test_a_refused_image_is_named_once_and_left_out_of_the_caption_checks(tmp_path):
    """A file training refuses (text named .png) is reported as unreadable, not also as a caption twin."""
    for name in ("red.png", "text.png"):
        (tmp_path / name).with_suffix(".txt").write_text("a red picture")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "text.png").write_text("not a picture")
    pairs = [(tmp_path / "red.png", "a red picture"), (tmp_path / "text.png", "a red picture")]
    report = check_data(pairs, resolution=64, stride=16)
    assert [(f.kind, f.file) for f in report.findings] == [("unreadable", "text.png")], report.findings


def test_small_images_are_flagged_and_buckets_are_trainings_own(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sizes = {"small.png": (48, 48), "exact.png": (64, 64), "wide.png": (256, 96), "tall_small.png": (30, 100)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(data / name)
        (data / name).with_suffix(".txt").write_text("a red picture")
    findings, buckets = size_findings(sizes, resolution=64, stride=16)
    said = {f.file: f.message for f in findings}
    assert set(said) == {"small.png", "tall_small.png"}
    assert said["small.png"].startswith("is 48x48 px, smaller than the 64x64 it trains at: training enlarges it 1.3x")
    assert "at least 64x64 px" in said["small.png"]
    # the bucket named is the size training prepares the image at
    examples = load_examples(data, 64, buckets=bucket_sizes(64, 16))
    trained = {ex.path.name: (ex.pixels.shape[2], ex.pixels.shape[1]) for ex in examples}
    assert buckets == trained and buckets["wide.png"][0] > buckets["wide.png"][1]
    _, square = size_findings(sizes, resolution=64, stride=16, buckets=False)
    assert set(square.values()) == {(64, 64)}


def test_caption_findings():
    ok = {"a.png": "glowline, a red circle", "b.png": "glowline, a blue square", "c.png": "a tree, glowline"}
    assert caption_findings(ok, "glowline") == []
    said = {
        (f.file, f.message.split(":")[0])
        for f in caption_findings(
            {
                **ok,
                "empty.png": "  ",
                "same.png": "glowline,  A red circle",  # a.png's caption but for case and spaces
                "again.png": "a red circle",  # a.png's caption once training puts the trigger word first
                "case.png": "Glowline, a tree",
                "lacks.png": "a green star",
            },
            "glowline",
        )
    }
    assert said == {
        ("empty.png", "its caption is empty, so training refuses it"),
        ("same.png", "its caption is the same as a.png's ('glowline,  A red circle')"),
        ("again.png", "its caption is the same as a.png's ('a red circle')"),
        ("again.png", "lacks the trigger word 'glowline' that 4 other caption(s) have"),
        ("case.png", "writes the trigger word as 'Glowline'"),
        ("lacks.png", "lacks the trigger word 'glowline' that 4 other caption(s) have"),
    }
    # an empty caption with a default caption is fine; no caption with the trigger word: training adds it to all
    assert caption_findings({"a.png": "", "b.png": "a cat"}, "glowline", default_caption="a thing") == []
    # no trigger word set: the first tag most captions start with is expected in the others
    untagged = caption_findings({**ok, "d.png": "glowline, a star", "e.png": "a green star"})
    assert [(f.file, f.message.split(",")[0]) for f in untagged] == [
        ("c.png", "does not start with 'glowline'"),
        ("e.png", "does not start with 'glowline'"),
    ]


def test_cli_check_data_prints_the_report_and_trains_nothing(tmp_path, monkeypatch, capsys):
    image_folder = write_scene_folder(tmp_path / "data", count=4, size=64)
    shutil.copy(image_folder / "img0.png", image_folder / "img0_copy.png")
    (image_folder / "img0_copy.txt").write_text("a copy")
    (image_folder / "img1.txt").write_text("")
    (image_folder / "img2.txt").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(image_folder), "--check-data"]) == 1  # training would refuse img1.png
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"data check of {image_folder} (5 images, training at 64 px):"
    assert out[1].startswith("img0_copy.png: looks like the same picture as img0.png: ")
    assert out[2].startswith("img1.png: its caption is empty")
    assert out[3].startswith(
        "img2.png: its caption file img2.txt is missing, so training refuses it"
    )  # as train says
    assert out[4:6] == ["aspect-ratio buckets (width x height):", "  64x64: 5 images"]
    assert out[6].startswith("training would not start: data folder") and "img1.png" in out[7], out
    assert "img2.png: caption img2.txt is missing" in "\n".join(out[7:]), out
    assert not (tmp_path / "runs").exists()
    assert main(["train", "--data", str(image_folder), "--check-data", "--default-caption", "a scene"]) == 0

    write_scene_folder(tmp_path, count=2, size=64)  # pictures in the current folder are not a default data set
    assert main(["train", "--check-data"]) == 2
    assert "error: data (--data) is required" in capsys.readouterr().err


def test_files_training_passes_over_are_named_by_train_and_by_the_check(tmp_path, monkeypatch, capsys):
    """A BMP with its caption, a caption with no image and a sub-folder not named <repeats>_<name>: training reads
    none of them, and both `train` and `--check-data` say so, naming each file."""
    from PIL import Image

    from trainer.dataset import check_folder

    image_folder = write_scene_folder(tmp_path / "data", count=3, size=64)
    Image.new("RGB", (64, 64)).save(image_folder / "scan.bmp")
    (image_folder / "scan.txt").write_text("a scan")
    (image_folder / "orphan.txt").write_text("an image that was deleted")
    write_scene_folder(image_folder / "extra", count=1, size=64)
    notes: list[str] = []
    assert len(check_folder(image_folder, notes=notes)) == 3
    assert notes == [
        "scan.bmp: not read (training reads .png/.jpg/.jpeg/.webp/.gif); convert to PNG to train on them",
        "orphan.txt: a caption with no image of its name; not used",
        "extra/: not read; name the sub-folder <repeats>_<name> (e.g. 10_extra) to train on it",
    ]
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(image_folder), "--check-data"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(note in out for note in notes), out


def test_a_single_files_vae_is_its_folders(tmp_path, monkeypatch):
    """The check loads only the VAE; from a single-file checkpoint it is converted by diffusers, the same weights."""
    import adapters.single_file
    from tests.test_single_file import write_tiny

    folder, file, configs = write_tiny(tmp_path, "sd1")
    monkeypatch.setattr(adapters.single_file, "CONFIGS_DIR", configs)
    from_folder, from_file = load_vae(str(folder), device="cpu"), load_vae(str(file), device="cpu")
    assert from_folder.state_dict().keys() == from_file.state_dict().keys()
    assert all(torch.equal(a, from_file.state_dict()[k]) for k, a in from_folder.state_dict().items())


def test_crops_of_two_different_pictures_are_not_paired(tmp_path, vae):
    """Two crops of different demo pictures, enlarged and saved as JPEG, one mostly black: nothing to report. (A
    window of plain background once scored far above a correlation of 1, from dividing by its almost-zero spread,
    and named one crop a crop of the other.)"""
    data = tmp_path / "data"
    data.mkdir()
    for name, box in (("neon_02", (1, 24, 81, 104)), ("neon_07", (14, 48, 91, 125))):
        crop = Image.open(SAMPLES / f"{name}.png").convert("RGB").crop(box).resize((160, 160))
        crop.save(data / f"crop_{name}.jpg", quality=85)
    paths = sorted(data.iterdir())
    findings, notes = picture_findings(paths, [p.name for p in paths], vae)
    assert findings == [] and notes == ["style outliers were not checked: 2 readable pictures, fewer than 5"]


def test_a_window_of_one_colour_scores_nothing():
    """The latents of a one-colour area are one value to within rounding: its windows score 0 against any picture,
    not the rounding noise of a division by almost nothing."""
    from trainer.datacheck import _correlations, _unit_templates

    torch.manual_seed(0)
    big = torch.full((4, 40, 40), 1.6)
    big[:, 5:15, 5:15] += torch.randn(4, 10, 10)  # one textured corner; the rest one value
    scores = _correlations(big, _unit_templates([torch.randn(4, 12, 12)]))
    assert scores[0, 25:, 25:].abs().max() == 0  # windows wholly on the one colour
    assert 0.05 < scores.abs().max() <= 1.0
