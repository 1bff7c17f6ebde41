"""The training set: a folder of images with same-named .txt captions, checked all at once, then prepared.

Every problem (an unreadable image, a missing or empty caption) is collected and reported together, one line
per file, so a person fixes the folder once rather than once per error.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from adapters.errors import UserError
from trainer.config import decode_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# The decoders a training image is opened with, by content (whatever its name says); Pillow opens the MPO files
# some cameras write as JPEG, then names them MPO.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_KINDS = (*IMAGE_FORMATS, "MPO")
# More pixels than this is refused, not decoded: Pillow's own decompression-bomb limit (about 89 megapixels).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
# kohya_ss's folder convention: a sub-folder named `<N>_<name>` (e.g. `10_mystyle`) repeats its images N times.
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class Example:
    path: Path
    caption: str
    pixels: torch.Tensor  # (3, H, W) float in [-1, 1]
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the upright image on disk
    crop_top_left: tuple[int, int] = (0, 0)  # where the square crop starts, in resized-image pixels (SDXL's time ids)
    repeats: int = 1  # times the image is shown per epoch (--repeats, or its `<N>_name` sub-folder)
    cover: torch.Tensor | None = None  # --crop random: (3, H', W') uint8, resized to cover its bucket, not cut


def find_images(folder: Path, files: list[Path] | None = None) -> list[Path]:
    """The images of `folder` (not of its sub-folders), from its listing `files` when given; macOS's `._name` files
    (metadata a Mac leaves beside each file when it copies to a USB stick or a network drive, named as the image)
    are not images and are passed over."""
    files = _files(folder) if files is None else files
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("._"))


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()]


# picture files people keep that training does not read: said, not passed over in silence
OTHER_PICTURES = (".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".psd", ".tga")


def unread_files(folder: Path, label: str = "", files: list[Path] | None = None) -> list[str]:
    """Notes on the files of `folder` (its listing `files` when given) training passes over: pictures in a format it
    does not read, and captions without an image of their name. `label` goes before each name (a sub-folder's
    "10_neon/")."""
    files = [p for p in (_files(folder) if files is None else files) if not p.name.startswith((".", "._"))]
    images = {p.stem for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    other = sorted(p.name for p in files if p.suffix.lower() in OTHER_PICTURES)
    others = {Path(n).stem for n in other}
    alone = sorted(p.name for p in files if p.suffix.lower() == ".txt" and p.stem not in images | others)
    notes = []
    if other:
        notes.append(
            f"{', '.join(label + n for n in other)}: not read (training reads {'/'.join(IMAGE_EXTENSIONS)}); "
            "convert to PNG to train on them"
        )
    if alone:
        notes.append(f"{', '.join(label + n for n in alone)}: a caption with no image of its name; not used")
    return notes


def caption_file(image: Path) -> Path:
    """The .txt caption file of `image`: same name, `.txt`, or `.TXT` as some cameras and Windows tools write it
    (the lower-case one where the name is free)."""
    image = Path(image)
    lower = image.with_suffix(".txt")
    if lower.is_file() or not image.parent.is_dir():
        return lower
    return next(
        (p for p in image.parent.iterdir() if p.stem == image.stem and p.suffix.lower() == ".txt" and p.is_file()),
        lower,
    )


def repeats_of(path: Path, folder: str | Path, default: int = 1) -> int:
    """How many times an image of the data `folder` is shown per epoch: N for one in a `<N>_name` sub-folder,
    `default` (--repeats) for one at the top."""
    if Path(path).parent == Path(folder):
        return default
    return int(REPEAT_FOLDER.match(Path(path).parent.name).group(1))


def training_images(folder: Path) -> tuple[list[Path], list[str], list[str]]:
    """(images, problems, notes): the folder's own images, then those of each `<N>_name` sub-folder; a sub-folder
    named otherwise is not read (a note says so), one named `0_name` is a problem."""
    entries = list(folder.iterdir())  # each folder is listed once
    files = [p for p in entries if p.is_file()]
    images, problems, notes = find_images(folder, files), [], unread_files(folder, files=files)
    for sub in sorted(p for p in entries if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(sub.name)
        if match and int(match.group(1)) >= 1:
            files = _files(sub)
            images += find_images(sub, files)
            notes += unread_files(sub, f"{sub.name}/", files)
        elif match:
            problems.append(f"{sub.name}/: 0 repeats never shows its images; rename it 1_{match.group(2)} or more")
        elif find_images(sub):
            notes.append(
                f"{sub.name}/: not read; name the sub-folder <repeats>_<name> (e.g. 10_{sub.name}) to train on it"
            )
    return images, problems, notes


def check_folder(
    folder: str | Path, default_caption: str = "", notes: list[str] | None = None
) -> list[tuple[Path, str]]:
    """(image, caption) for every image in `folder`, or one UserError listing every problem found.

    An image is read by its content: one that is empty, truncated, not a PNG/JPEG/WebP/GIF (a TIFF named .png) or
    that declares more than MAX_IMAGE_PIXELS pixels (a decompression bomb) is a problem; what training will do to
    an image that is otherwise fine (the first frame of an animation, a caption read past bad UTF-8) is appended
    to `notes`, one line each, when a list is given.
    """
    if not str(folder):
        raise UserError("data (--data) is required: the folder of training images with .txt captions")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist or is not a folder (--data)")
    images, problems, said = training_images(folder)
    if not images and not problems:
        raise UserError(
            f"data folder {folder} has no images: put .png, .jpg, .jpeg, .webp or .gif files in it (or in "
            "sub-folders named <repeats>_<name>, e.g. 10_mystyle), each with a .txt caption of the same name"
        )
    pairs, not_utf8 = [], []
    for path in images:
        name = path.relative_to(folder).as_posix()
        problem, note = _check_image(path)
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        said += [f"{name}: {note}"] if note else []
        text_file = caption_file(path)
        caption, utf8 = read_caption(path, text_file)
        not_utf8 += [] if utf8 else [text_file.name]
        if not caption:
            if default_caption:
                caption = default_caption
            else:
                what = "is empty" if text_file.is_file() else "is missing"
                problems.append(
                    f"{name}: caption {text_file.name} {what}; write one, or set a default caption "
                    "(--default-caption)"
                )
                continue
        pairs.append((path, caption))
    if problems:
        raise UserError(f"data folder {folder} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    if not_utf8:
        said.append(
            f"caption(s) not in UTF-8, read with \ufffd in place of the bytes that are not: {', '.join(not_utf8)}; "
            "save them as UTF-8 to keep every character"
        )
    if notes is not None:
        notes += said
    return pairs


def read_caption(image: Path, text_file: Path | None = None) -> tuple[str, bool]:
    """The caption of an image, from the same-named .txt file ("" when there is none), and whether that file was
    UTF-8 (when not, the bytes that are not read as \ufffd). `text_file`: its `caption_file`, when already known."""
    text_file = text_file or caption_file(image)
    if not text_file.is_file():
        return "", True
    raw = text_file.read_bytes()
    try:
        return decode_text(raw).strip(), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace").strip(), False


def _check_image(path: Path) -> tuple[str, str]:
    """(problem, note) for one image file; a problem refuses it, a note says what training does to it."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes); replace or remove it", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, not only warn, past the limit
            with Image.open(path) as im:
                kind, frames = im.format, getattr(im, "n_frames", 1)
                if kind in _KINDS:
                    im.verify()  # the file's structure and checksums, without decoding
            if kind not in _KINDS:
                return f"is a {kind} file, whatever its name says; save it as PNG, JPEG, WebP or GIF", ""
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                im.load()  # decodes the (first) frame: a truncated or corrupt file fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"refused, too many pixels to decode safely ({exc}); scale it down or remove it", ""
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        detail = "" if isinstance(exc, UnidentifiedImageError) else f": {exc}"  # its text repeats the path
        return f"not a readable image ({exc.__class__.__name__}{detail}); replace or remove it", ""
    return "", f"animated ({frames} frames); training uses the first frame" if frames > 1 else ""


def image_problem(path: str | Path) -> str:
    """Why training would refuse this image file, read by its content as `check_folder` reads it; "" if none."""
    return _check_image(Path(path))[0]


def with_trigger(caption: str, trigger_word: str) -> str:
    """Put the trigger word first, unless the caption already contains it."""
    if not trigger_word or trigger_word in caption:
        return caption
    return f"{trigger_word}, {caption}"


def shuffled_captions(caption: str, count: int, keep: int, seed: int, trigger_word: str = "") -> list[str]:
    """`count` orders of the caption's comma-separated tags, each shuffled but for the first `keep` tags; the same for
    the same seed and caption (kohya_ss's keep_tokens). The trigger word's tag is never shuffled: outside the kept
    tags it goes first ("a cat, red, glowline" trains as "glowline, red, a cat" or "glowline, a cat, red")."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    holder = next((i for i, tag in enumerate(tags) if trigger_word and trigger_word in tag), None)
    if holder is not None and holder >= keep:  # a tag that would be shuffled: first, and kept there
        tags.insert(0, tags.pop(holder))
        keep += 1
    fixed, rest = tags[:keep], tags[keep:]
    generator = torch.Generator().manual_seed(seed)
    return [
        ", ".join(fixed + [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()])
        for _ in range(count)
    ]


def bucket_sizes(resolution: int, stride: int = 64) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as (width, height): for each side a multiple of `stride`, the longest multiple of
    `stride` for the other that keeps the area within resolution², sides at most 4:1 apart, in both orientations;
    the square (resolution, resolution) is always one of them."""
    area, sizes = resolution * resolution, {(resolution, resolution)}
    for width in range(stride, 4 * resolution + 1, stride):
        height = area // width // stride * stride
        if height >= stride and max(width, height) <= 4 * min(width, height):
            sizes |= {(width, height), (height, width)}  # landscape and portrait alike
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height (on a log scale, so 2:1 and 1:2 are as far from
    square); a square picture always gets the square bucket."""
    return min(sizes, key=lambda size: abs(math.log(width / height) - math.log(size[0] / size[1])))


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the picture as it shows, after its EXIF rotation."""
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn the picture a quarter
            width, height = height, width
    return width, height


def prepare_image(path: Path, resolution: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """EXIF-rotate, flatten transparency onto white, resize to cover and centre-crop to a square of `resolution`
    (or to `size`, (width, height): an aspect-ratio bucket).

    Any mode comes out RGB: 16-bit greyscale is scaled to 8 bits (Pillow's own conversion would clip it to white),
    CMYK and palette images are converted, an animation gives its first frame."""
    im = ImageOps.fit(upright_rgb(path), size or (resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def upright_rgb(path: Path) -> Image.Image:
    """The picture as training sees it before any resize: EXIF-rotated, RGB, transparency flattened onto white."""
    with Image.open(path, formats=IMAGE_FORMATS) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit greyscale PNG: keep the high byte
            im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
        if "A" in im.getbands() or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        return im.convert("RGB")


def prepare_cover(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The picture (as `prepare_image` reads it) resized to just cover `size` (width, height), not cut: (3, H, W)
    uint8, one side equal to the target's, the other at least its. `random_crop` cuts it at each draw."""
    im = upright_rgb(path)
    scale = max(size[0] / im.width, size[1] / im.height)
    cover = (max(size[0], round(im.width * scale)), max(size[1], round(im.height * scale)))
    array = np.asarray(im.resize(cover, Image.Resampling.LANCZOS), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def random_crop(cover: torch.Tensor, size: tuple[int, int], where: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Cut `size` (width, height) out of `cover` at `where` ((2,) uniform draws in [0, 1): down, across), as
    pixels in [-1, 1]; and the crop's top-left corner (what SDXL's time ids describe)."""
    width, height = size
    top = int(where[0] * (cover.shape[1] - height + 1))
    left = int(where[1] * (cover.shape[2] - width + 1))
    pixels = cover[:, top : top + height, left : left + width].float() / 127.5 - 1.0
    return pixels, (top, left)


def crop_geometry(
    path: Path, resolution: int, size: tuple[int, int] | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The upright image's (height, width) and the top-left corner of `prepare_image`'s centre crop to the
    square of `resolution` (or to `size`, (width, height)), measured in the image resized to cover it (what
    SDXL's added time ids describe)."""
    width, height = upright_size(path)
    target_width, target_height = size or (resolution, resolution)
    # the resize that covers the target, and the part of the picture kept (in its own pixels); written so that a
    # square target gives exactly the numbers of the square crop
    if target_width / width >= target_height / height:  # the width fits: the height is cropped
        scale, kept_width, kept_height = target_width / width, width, target_height * width / target_width
    else:
        scale, kept_width, kept_height = target_height / height, target_width * height / target_height, height
    top = round((height - kept_height) / 2 * scale)
    left = round((width - kept_width) / 2 * scale)
    return (height, width), (top, left)


def load_examples(
    folder: str | Path,
    resolution: int,
    *,
    default_caption: str = "",
    trigger_word: str = "",
    notes: list[str] | None = None,
    repeats: int = 1,
    buckets: list[tuple[int, int]] | None = None,
    crop: str = "center",
) -> list[Example]:
    """Check the folder, then load every image at `resolution` with its (trigger-prefixed) caption and its repeats
    (`repeats` at the top, N in a `<N>_name` sub-folder); what the check has to say about the images and captions
    is appended to `notes` (see `check_folder`). With `buckets` ((width, height) sizes), each image is prepared
    at the one nearest its aspect ratio instead of the square. With `crop` random, each also keeps its `cover`."""
    pairs = check_folder(folder, default_caption, notes)
    sizes = [nearest_bucket(*upright_size(p), buckets) if buckets else None for p, _ in pairs]
    return [
        Example(
            p,
            with_trigger(c, trigger_word),
            prepare_image(p, resolution, size),
            *crop_geometry(p, resolution, size),
            repeats_of(p, folder, repeats),
            prepare_cover(p, size or (resolution, resolution)) if crop == "random" else None,
        )
        for (p, c), size in zip(pairs, sizes)
    ]


def bucket_choices(resolution: int, stride: int, buckets: bool = True) -> list[tuple[int, int]]:
    """The (width, height) sizes training chooses each picture's bucket from: `bucket_sizes`, or without `buckets`
    the square alone."""
    return bucket_sizes(resolution, stride) if buckets else [(resolution, resolution)]


def bucket_counts(paths: list[Path], resolution: int, stride: int, buckets: bool = True) -> dict[str, int]:
    """How many of these images each bucket gets, as 'WxH' -> count in size order (the run's own rule: the
    bucket nearest each picture's aspect ratio; without `buckets`, all in the square), read from the headers."""
    sizes = bucket_choices(resolution, stride, buckets)
    found = Counter(nearest_bucket(*upright_size(Path(p)), sizes) for p in paths)
    return {f"{w}x{h}": found[(w, h)] for w, h in sorted(found)}


def bucket_stride(resolution: int, vae_scale: int, unet_levels: int) -> int:
    """The step between bucket sides: 64, or, for a model too small for that (below 256 px), what its VAE and
    UNet divide by (the VAE's scale times the UNet's 2 ** (levels - 1))."""
    return 64 if resolution >= 256 else vae_scale * 2 ** (unet_levels - 1)


def long_captions(examples: list[Example], tokenizer) -> list[str]:
    """One line per caption longer than the text encoder reads (`tokenizer.model_max_length` tokens, start and end
    marks included): training sees it cut there, so the line names the file and how many tokens are dropped."""
    limit = tokenizer.model_max_length
    lines = []
    for ex in examples:
        count = len(tokenizer(ex.caption, truncation=False, verbose=False).input_ids)
        if count > limit:
            lines.append(
                f"{ex.path.name}: its caption is {count - limit} token(s) longer than the {limit} the text encoder "
                "reads; training drops the end (shorten the caption to keep it)"
            )
    return lines


def tag_frequency(examples: list[Example], folder: str | Path) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: comma-separated caption tags counted, under the data folder's name (and each
    `<N>_name` sub-folder's own, as kohya_ss writes it)."""
    counts: dict[str, Counter] = {}
    for e in examples:
        where = Path(folder).name if e.path.parent == Path(folder) else e.path.parent.name
        counts.setdefault(where, Counter()).update(tag.strip() for tag in e.caption.split(",") if tag.strip())
    return {where: dict(c) for where, c in counts.items()}
