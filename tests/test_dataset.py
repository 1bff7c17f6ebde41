"""The training folder: every problem reported at once, per file; images prepared the way users expect."""

import pytest
import torch
from PIL import Image

from adapters.errors import UserError
from trainer.dataset import check_folder, load_examples, prepare_image


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match=r"has no images: put \.png, \.jpg"):
        check_folder(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=r"does not exist"):
        check_folder(tmp_path / "nope")


def test_every_problem_listed_at_once(image_folder):
    (image_folder / "fake.png").write_text("this is text, not a picture")
    (image_folder / "fake.txt").write_text("a caption")
    (image_folder / "img1.txt").unlink()
    (image_folder / "img2.txt").write_text("   \n")
    with pytest.raises(UserError) as err:
        check_folder(image_folder)
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "fake.png: not a readable image" in text
    assert "img1.png: caption img1.txt is missing" in text
    assert "img2.png: caption img2.txt is empty" in text
    assert "--default-caption" in text


def test_a_folder_as_windows_and_macos_leave_it_trains(image_folder):
    """A caption saved as .TXT or by Notepad in UTF-16 is read whole; the `._name.png` files a Mac leaves beside
    each image on a USB stick are passed over, not refused as broken images."""
    (image_folder / "img0.txt").rename(image_folder / "img0.TXT")
    (image_folder / "img1.txt").write_bytes("zq, café in UTF-16".encode("utf-16"))
    (image_folder / "._img2.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    notes = []
    pairs = dict(check_folder(image_folder, notes=notes))
    assert pairs[image_folder / "img0.png"] and pairs[image_folder / "img1.png"] == "zq, café in UTF-16"
    assert not any(p.name.startswith("._") for p in pairs) and not any("UTF-8" in n for n in notes)


def test_default_caption_fills_missing_ones(image_folder):
    (image_folder / "img1.txt").unlink()
    pairs = dict(check_folder(image_folder, default_caption="a picture"))
    assert pairs[image_folder / "img1.png"] == "a picture"
    assert pairs[image_folder / "img0.png"] != "a picture"


def test_trigger_word_prefixed_once(image_folder):
    (image_folder / "img0.txt").write_text("zz, already tagged")
    examples = {e.path.name: e.caption for e in load_examples(image_folder, 16, trigger_word="zz")}
    assert examples["img0.png"] == "zz, already tagged"
    assert examples["img1.png"].startswith("zz, ") and examples["img1.png"].count("zz") == 1


def test_exif_rotation_and_centre_crop(tmp_path):
    # a 40x20 landscape picture, left half red, right half blue, stored with EXIF "rotate 90" (orientation 6)
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    pixels = prepare_image(tmp_path / "r.jpg", 16)
    assert pixels.shape == (3, 16, 16)
    # after rotating 90 deg clockwise the red half is on top: top row red, bottom row blue
    top, bottom = pixels[:, 1, 8], pixels[:, 14, 8]
    assert top[0] > 0.5 and top[2] < -0.5
    assert bottom[2] > 0.5 and bottom[0] < -0.5


def test_transparent_png_flattened_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    pixels = prepare_image(tmp_path / "t.png", 8)
    assert torch.allclose(pixels, torch.ones_like(pixels))
