"""The training set: a folder of images with same-named .txt captions, checked all at once, then prepared.

Every problem (an unreadable image, a missing or empty caption) is collected and reported together, one line
per file, so a person fixes the folder once rather than once per error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from adapters.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Example:
    path: Path
    caption: str
    pixels: torch.Tensor  # (3, H, W) float in [-1, 1]


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_folder(folder: str | Path, default_caption: str = "") -> list[tuple[Path, str]]:
    """(image, caption) for every image in `folder`, or one UserError listing every problem found."""
    if not str(folder):
        raise UserError("data (--data) is required: the folder of training images with .txt captions")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist or is not a folder (--data)")
    images = find_images(folder)
    if not images:
        raise UserError(
            f"data folder {folder} has no images: put .png, .jpg, .jpeg or .webp files in it, "
            "each with a .txt caption of the same name"
        )
    problems, pairs = [], []
    for path in images:
        try:
            with Image.open(path) as im:
                im.verify()  # reads the whole file structure without decoding pixels
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            problems.append(f"{path.name}: not a readable image ({exc.__class__.__name__}); replace or remove it")
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
        if not caption:
            if default_caption:
                caption = default_caption
            else:
                what = "is empty" if caption_file.is_file() else "is missing"
                problems.append(
                    f"{path.name}: caption {caption_file.name} {what}; write one, or set a default caption "
                    "(--default-caption)"
                )
                continue
        pairs.append((path, caption))
    if problems:
        raise UserError(f"data folder {folder} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return pairs


def with_trigger(caption: str, trigger_word: str) -> str:
    """Put the trigger word first, unless the caption already contains it."""
    if not trigger_word or trigger_word in caption:
        return caption
    return f"{trigger_word}, {caption}"


def prepare_image(path: Path, resolution: int) -> torch.Tensor:
    """EXIF-rotate, flatten transparency onto white, resize the short side and centre-crop to a square."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.Resampling.LANCZOS)
        array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_examples(
    folder: str | Path, resolution: int, *, default_caption: str = "", trigger_word: str = ""
) -> list[Example]:
    """Check the folder, then load every image at `resolution` with its (trigger-prefixed) caption."""
    pairs = check_folder(folder, default_caption)
    return [Example(p, with_trigger(c, trigger_word), prepare_image(p, resolution)) for p, c in pairs]


def tag_frequency(examples: list[Example], folder: str | Path) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: comma-separated caption tags counted, under the data folder's name."""
    counts = Counter(tag.strip() for e in examples for tag in e.caption.split(",") if tag.strip())
    return {Path(folder).name: dict(counts)}
