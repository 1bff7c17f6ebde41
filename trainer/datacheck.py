"""The data-set check: what is worth knowing about a set of images and captions before training on it.

    report = check_data(pairs, resolution=64, stride=16, trigger_word="glowline", vae=load_vae("builtin"))
    print("\\n".join(report.lines()))

Pure functions over (image path, caption) pairs, used by `lora-studio train --check-data` and the Train tab. Each
finding names a file and says what to do; nothing here changes or removes a file. What is looked for:

- near-duplicates: the same picture again (a copy, a resize, a re-save), by a DCT perceptual hash; and a crop
  or resize of another picture of the set, found by sliding each picture's VAE latents over every other's at 15
  zooms (1 to 2x) and confirmed on the pixels at the place found (the latents alone also match one small shape
  on black to another; the pixels tell them apart);
- pictures far from the rest of the set in tone and colour: each VAE latent channel's mean and spread, against
  the set's median;
- pictures smaller than what they train at (they are enlarged, and blur), and the aspect-ratio bucket each falls
  in (trainer/dataset.py's buckets, as training picks them);
- captions that are empty, the same as another's, or without the trigger word the others have.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adapters.errors import UserError
from trainer.dataset import (
    bucket_choices,
    caption_file,
    image_problem,
    nearest_bucket,
    read_caption,
    training_images,
    upright_rgb,
    upright_size,
    with_trigger,
)

# A copy, a resize or a re-save of one picture is 0-2 bits of the 63 from it; two different pictures of the demo
# set (one red outline each, at the same place) are 6 apart.
HASH_BITS = 4
# Latent maps hold about FEATURE_SIDE x FEATURE_SIDE latents; each picture is encoded once at twice that (in area,
# keeping its aspect ratio), and shrunk for the zooms: 15 steps of 5% from 1x (a resize) to 2x (half the side).
FEATURE_SIDE = 24
ZOOMS = tuple(1.05**k for k in range(15))
# A crop candidate is a correlation of the latents of at least LATENT_MATCH somewhere in the other picture; it is
# a crop when the pixels there correlate at least PIXEL_MATCH. On the demo set with a crop and a small copy of each
# picture planted, 30 of the 32 are found against their own picture; of the 2 crops that are not, one is named against
# another picture (benchmarks/results/datacheck_thresholds.txt).
LATENT_MATCH = 0.85
PIXEL_MATCH = 0.97
PIXEL_SIDE = 64  # pixels per side (in area) of the pixel check
SAME_ZOOM = 1.08  # a match at a zoom under this is the same picture (a resize), not a crop of it
# A picture is an outlier when its tone and colour are this far from the set's (see _outliers) and this many times
# the set's median distance. In 400 random subsets (5 to 16 pictures) of the demo set: at most 2.65 for its own
# pictures, at least 5.61 for a picture of the plain style added (benchmarks/results/datacheck_thresholds.txt).
OUTLIER_DISTANCE = 4.0
OUTLIER_RATIO = 3.0
MIN_FOR_OUTLIERS = 5  # fewer pictures than this have no "rest of the set" to stand out from


@dataclass(frozen=True)
class Finding:
    """One thing to know about one image: `kind` is duplicate, outlier, small, unreadable or caption; `others` are
    the images it is about besides its own (the picture it duplicates)."""

    kind: str
    file: str
    message: str
    others: tuple[str, ...] = ()

    def line(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class Report:
    """What the check found, the bucket (width, height) each image trains in, and what it could not check."""

    findings: list[Finding]
    buckets: dict[str, tuple[int, int]] = field(default_factory=dict)
    resolution: int = 0
    notes: list[str] = field(default_factory=list)

    def bucket_lines(self) -> list[str]:
        """One line per bucket, largest first: its size and its images (named, unless it holds most of them)."""
        members: dict[tuple[int, int], list[str]] = {}
        for name, size in self.buckets.items():
            members.setdefault(size, []).append(name)
        lines = []
        for (width, height), names in sorted(members.items(), key=lambda item: -len(item[1])):
            listed = f"{len(names)} images" if len(names) > len(self.buckets) / 2 else ", ".join(names)
            lines.append(f"{width}x{height}: {listed}")
        return lines

    def lines(self) -> list[str]:
        """The report as text: the findings, one line each, then the buckets and what was not checked."""
        found = [f.line() for f in self.findings] or [
            "nothing found: no duplicates, outliers, small images or caption problems"
        ]
        return [
            *found,
            "aspect-ratio buckets (width x height):",
            *("  " + b for b in self.bucket_lines()),
            *self.notes,
        ]

    def to_dict(self) -> dict:
        return {
            "findings": [asdict(f) for f in self.findings],
            "buckets": {name: list(size) for name, size in self.buckets.items()},
            "resolution": self.resolution,
            "notes": self.notes,
        }


# -- the pictures --------------------------------------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """63 bits: the signs, against their median, of the lowest 8x8 frequencies (but the constant one) of the
    picture's 32x32 grey version's cosine transform; resizing or re-saving a picture moves few of them."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].flatten()[1:]
    return low > np.median(low)


def _area_size(width: int, height: int, side: float, multiple: int = 1) -> tuple[int, int]:
    """(width, height) of about side x side in area, in the picture's aspect ratio, each a multiple of `multiple`."""
    scale = side / math.sqrt(width * height)
    return (
        max(multiple, round(width * scale / multiple) * multiple),
        max(multiple, round(height * scale / multiple) * multiple),
    )


def _pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    array = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def latent_maps(vae, image: Image.Image) -> list[torch.Tensor]:
    """The picture's VAE latents (the distribution's mean, fp32 on the CPU) at each of ZOOMS, the first about
    FEATURE_SIDE latents square in area: encoded once at twice that and shrunk."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = _area_size(*image.size, 2 * FEATURE_SIDE * factor, factor)
    x = _pixels(image, size)[None].to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.mean.float().cpu()
    height, width = latents.shape[-2] / 2, latents.shape[-1] / 2
    return [
        F.interpolate(
            latents,
            size=(max(1, round(height * z)), max(1, round(width * z))),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        for z in ZOOMS
    ]


def style_statistics(latents: torch.Tensor) -> np.ndarray:
    """A picture's tone and colour in its VAE latents: each latent channel's mean, then each one's spread. (The
    channels' correlations, a Gram matrix, were tried too: on the demo set they changed with the colour of the
    shapes drawn as much as with the style, and made single pictures of the set look like outliers.)"""
    flat = latents.flatten(1).double()
    return torch.cat([flat.mean(1), flat.std(1)]).numpy()


def _unit_templates(maps: list[torch.Tensor]) -> torch.Tensor:
    """Latent maps of one shape as correlation templates: each channel centred, each map of norm 1."""
    t = torch.stack(maps)
    t = t - t.mean(dim=(2, 3), keepdim=True)
    return t / t.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None, None]


def _correlations(big: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """The correlation (each channel centred) of every template with every window of `big` of its size:
    (templates, rows, columns). The templates sum to 0 per channel, so the window's mean drops out of the product
    and is only needed for its norm, a difference of two large sums: in float32 it rounded to almost nothing on a
    plain background, where a crop then scored far above 1 against another picture's black. So float64, and a
    window flat to within rounding (its energy under 1e-10 of its sum of squares) scores 0."""
    h, w = templates.shape[-2:]
    big, templates = big.double(), templates.double()
    numerator = F.conv2d(big[None], templates)[0]
    sums = F.avg_pool2d(big[None], (h, w), stride=1)[0] * (h * w)
    squares = F.avg_pool2d(big[None] ** 2, (h, w), stride=1)[0] * (h * w)
    energy = (squares - sums**2 / (h * w)).sum(0)
    flat = energy <= 1e-10 * squares.sum(0) + 1e-30
    return torch.where(flat, 0.0, numerator / energy.clamp_min(1e-30).sqrt()).float()


def _latent_matches(maps: dict[str, list[torch.Tensor]]) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """For each (small, big) pair of pictures: where `small` whole (its zoom-1 latents) matches `big` best, as
    (correlation, zoom, top, left), top and left as fractions of `big`'s size at that zoom."""
    names = list(maps)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in names:
        by_shape.setdefault(tuple(maps[name][0].shape[1:]), []).append(name)
    templates = {shape: _unit_templates([maps[n][0] for n in group]) for shape, group in by_shape.items()}
    best: dict[tuple[str, str], tuple[float, float, float, float]] = {}
    for big in names:
        for zoom, big_map in zip(ZOOMS, maps[big]):
            for (h, w), group in by_shape.items():
                if big_map.shape[1] < h or big_map.shape[2] < w:
                    continue
                scores = _correlations(big_map, templates[(h, w)])
                values, where = scores.flatten(1).max(1)
                for small, value, index in zip(group, values.tolist(), where.tolist()):
                    if small != big and value > best.get((small, big), (-1.0,))[0]:
                        row, col = divmod(index, scores.shape[2])
                        best[(small, big)] = (value, zoom, row / big_map.shape[1], col / big_map.shape[2])
    return best


def _pixel_match(small: Image.Image, big: Image.Image, zoom: float, top: float, left: float) -> float:
    """The best correlation of `small`'s pixels with `big`'s near the place the latents found (zooms within 8%,
    shifts within 4 pixels of PIXEL_SIDE): about 1 for a crop, lower for a picture that only looks alike."""
    width, height = _area_size(*small.size, PIXEL_SIDE)
    t = _unit_templates([_pixels(small, (width, height))])[0]
    best, pad = -1.0, 4
    for step in np.linspace(-0.08, 0.08, 9):
        big_w, big_h = _area_size(*big.size, PIXEL_SIDE * zoom * (1 + step))
        if big_w < width or big_h < height:
            continue
        y, x = round(top * big_h), round(left * big_w)
        rows, cols = slice(max(0, y - pad), y + height + pad), slice(max(0, x - pad), x + width + pad)
        region = _pixels(big, (big_w, big_h))[:, rows, cols]
        if region.shape[1] < height or region.shape[2] < width:
            continue
        best = max(best, float(_correlations(region, t[None]).max()))
    return best


def picture_findings(
    paths: Sequence[str | Path], names: Sequence[str], vae=None, progress: Callable[[int, int], None] | None = None
) -> tuple[list[Finding], list[str]]:
    """Unreadable images, near-duplicates and style outliers among the pictures; and notes on what was not checked
    (without a `vae`: crops and outliers). `progress(done, total)` is told as pictures are read."""
    findings, notes, pictures = [], [], {}
    for i, (path, name) in enumerate(zip(paths, names)):
        problem = image_problem(path)
        if problem:
            findings.append(Finding("unreadable", name, f"{problem}; training refuses it, so leave it out"))
        else:
            pictures[name] = upright_rgb(Path(path))
        if progress:
            progress(i + 1, len(names))
    hashes = {name: perceptual_hash(im) for name, im in pictures.items()}
    pairs: dict[tuple[str, str], str] = {}  # (contained, container) -> how: "same" or "crop"
    listed = list(pictures)
    for i, a in enumerate(listed):
        for b in listed[i + 1 :]:
            if int((hashes[a] != hashes[b]).sum()) <= HASH_BITS:
                pairs[(b, a)] = "same"
    if vae is None:
        notes.append("crops and style outliers were not checked: the base model's VAE could not be loaded")
    else:
        maps = {name: latent_maps(vae, im) for name, im in pictures.items()}
        crops: dict[str, tuple[float, str]] = {}  # a crop's best container: (pixel correlation, name)
        for (small, big), (score, zoom, top, left) in _latent_matches(maps).items():
            if (small, big) in pairs or (big, small) in pairs or score < LATENT_MATCH:
                continue
            match = _pixel_match(pictures[small], pictures[big], zoom, top, left)
            if match >= PIXEL_MATCH and zoom < SAME_ZOOM:
                pairs[(small, big)] = "same"
            elif match >= PIXEL_MATCH and match > crops.get(small, (0.0, ""))[0]:
                crops[small] = (match, big)  # one small shape can match several pictures: the best one is named
        pairs.update({(small, big): "crop" for small, (_, big) in crops.items() if (big, small) not in pairs})
        if len(pictures) >= MIN_FOR_OUTLIERS:
            findings += _outliers({name: style_statistics(m[0]) for name, m in maps.items()})
        else:
            notes.append(
                f"style outliers were not checked: {len(pictures)} readable pictures, fewer than {MIN_FOR_OUTLIERS}"
            )
    findings += _duplicate_findings(pairs, {name: im.size for name, im in pictures.items()})
    return findings, notes


def _duplicate_findings(pairs: dict[tuple[str, str], str], sizes: dict[str, tuple[int, int]]) -> list[Finding]:
    """One finding per picture to leave out, naming the one to keep: in each group of duplicates, the picture no
    other is a crop of that has the most pixels (then the first name) is kept."""
    groups: dict[str, set[str]] = {}
    for a, b in pairs:
        merged = groups.get(a, {a}) | groups.get(b, {b})
        for name in merged:
            groups[name] = merged
    findings = []
    for group in {frozenset(g) for g in groups.values()}:
        cropped = {small for (small, big), how in pairs.items() if how == "crop" and small in group}
        keep = min(group, key=lambda n: (n in cropped, -sizes[n][0] * sizes[n][1], n))
        for name in sorted(group - {keep}):
            # named against the kept picture when they matched, else against the picture it matched
            partner = (
                keep
                if {(name, keep), (keep, name)} & set(pairs)
                else next(b if a == name else a for a, b in pairs if name in (a, b))
            )
            how = pairs.get((name, partner)) or pairs.get((partner, name))
            (w, h), (pw, ph) = sizes[name], sizes[partner]
            if how == "crop" and (name, partner) in pairs:
                what = f"looks like a crop of {partner}"
            elif how == "crop":
                what = f"looks like a larger picture that {partner} is a crop of"
            elif (w, h) != (pw, ph):
                what = f"looks like the same picture as {partner}, at another size ({w}x{h} px, that one {pw}x{ph})"
            else:
                what = f"looks like the same picture as {partner}"
            findings.append(
                Finding(
                    "duplicate",
                    name,
                    f"{what}: training would see that picture twice and copy it more than the style; leave one out",
                    (partner,),
                )
            )
    return sorted(findings, key=lambda f: f.file)


def outlier_distances(stats: dict[str, np.ndarray]) -> np.ndarray:
    """How far each picture's tone and colour (style_statistics) are from the set's: the distance of its mean latent
    from the set's median, in units of the set's typical spread of the latents within a picture, plus how far its
    own spread is from the set's (log ratio)."""
    x = np.stack(list(stats.values()))
    channels = x.shape[1] // 2
    mean, spread = x[:, :channels], np.maximum(x[:, channels:], 1e-6)
    unit = max(float(np.median(spread)), 1e-6)
    distance = np.linalg.norm(mean - np.median(mean, 0), axis=1) / unit
    return distance + np.linalg.norm(np.log(spread / np.median(spread, 0)), axis=1)


def _outliers(stats: dict[str, np.ndarray]) -> list[Finding]:
    """The pictures whose tone and colour are far from the set's (outlier_distances): at least OUTLIER_DISTANCE away
    and OUTLIER_RATIO times the set's median distance (so a set of varied pictures does not flag each one)."""
    names, distance = list(stats), outlier_distances(stats)
    typical = float(np.median(distance))
    return [
        Finding(
            "outlier",
            name,
            f"its tones and colours are far from the rest of the set (distance {d:.1f}, where the typical picture's "
            f"is {typical:.1f}): if it is not in the style, leave it out, or the adapter learns a mix",
        )
        for name, d in zip(names, distance)
        if d >= OUTLIER_DISTANCE and d >= OUTLIER_RATIO * typical
    ]


# -- sizes and buckets ---------------------------------------------------------------------------------------------


def size_findings(
    sizes: dict[str, tuple[int, int]], resolution: int, stride: int, buckets: bool = True
) -> tuple[list[Finding], dict[str, tuple[int, int]]]:
    """Pictures that training enlarges (smaller than their bucket on a side), and each one's bucket as
    (width, height); `sizes` are the upright (width, height) of each picture."""
    choices = bucket_choices(resolution, stride, buckets)
    findings, bucket_of = [], {}
    for name, (width, height) in sizes.items():
        bucket = nearest_bucket(width, height, choices)
        bucket_of[name] = bucket
        scale = max(bucket[0] / width, bucket[1] / height)  # the resize that covers the bucket (then centre crop)
        if scale > 1.0 + 1e-9:
            findings.append(
                Finding(
                    "small",
                    name,
                    f"is {width}x{height} px, smaller than the {bucket[0]}x{bucket[1]} it trains at: training "
                    f"enlarges it {scale:.2g}x, which blurs it; use a larger copy (at least "
                    f"{math.ceil(width * scale)}x{math.ceil(height * scale)} px) or leave it out",
                )
            )
    return findings, bucket_of


# -- captions ------------------------------------------------------------------------------------------------------


def _first_tag(caption: str) -> str:
    return caption.split(",", 1)[0].strip()


def caption_findings(
    captions: dict[str, str], trigger_word: str = "", default_caption: str = "", missing: Collection[str] = ()
) -> list[Finding]:
    """Captions that are empty (or, for the names in `missing`, have no caption file), the same as another's (as
    training sees them, with the trigger word), or without the trigger word: written in another case; missing where
    other captions have it; or, with no trigger word set, not starting with the first tag most captions start
    with."""
    findings = []
    given = {name: (c or "").strip() for name, c in captions.items()}
    for name, caption in given.items():
        if not caption and not default_caption:
            what = f"its caption file {Path(name).stem}.txt is missing" if name in missing else "its caption is empty"
            findings.append(
                Finding(
                    "caption",
                    name,
                    f"{what}, so training refuses it: write one, or set a default caption (--default-caption)",
                )
            )
    seen: dict[str, str] = {}
    for name, caption in given.items():
        if not caption:
            continue
        key = re.sub(r"\s+", " ", with_trigger(caption, trigger_word).lower())
        if key in seen:
            findings.append(
                Finding(
                    "caption",
                    name,
                    f"its caption is the same as {seen[key]}'s ('{caption}'): say "
                    "what differs in this picture, or the adapter ties that caption to both",
                    (seen[key],),
                )
            )
        else:
            seen[key] = name
    written = {n: c for n, c in given.items() if c}
    if trigger_word:
        pattern = re.compile(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", re.IGNORECASE)
        have = [n for n, c in written.items() if trigger_word in c]
        for name, caption in written.items():
            if trigger_word in caption:
                continue
            other_case = pattern.search(caption)
            if other_case:
                findings.append(
                    Finding(
                        "caption",
                        name,
                        f"writes the trigger word as '{other_case.group(0)}': training "
                        f"looks for '{trigger_word}' as typed and puts it first again; write it so",
                    )
                )
            elif have:
                findings.append(
                    Finding(
                        "caption",
                        name,
                        f"lacks the trigger word '{trigger_word}' that {len(have)} other "
                        f"caption(s) have: training puts it first ('{with_trigger(caption, trigger_word)}"
                        "'); write it where the others have it if that matters",
                    )
                )
    elif len(written) >= 3:
        firsts = [_first_tag(c) for c in written.values()]
        common = max(set(firsts), key=firsts.count)
        count = firsts.count(common)
        if common and count * 2 >= len(written) and count < len(written):
            for name, caption in written.items():
                if _first_tag(caption) != common:
                    findings.append(
                        Finding(
                            "caption",
                            name,
                            f"does not start with '{common}', which {count} of "
                            f"{len(written)} captions start with: add it, or set it as the trigger word "
                            "(--trigger-word; training then puts it first in every caption)",
                        )
                    )
    return findings


# -- all together --------------------------------------------------------------------------------------------------


def check_data(
    pairs: Sequence[tuple[str | Path, str]],
    *,
    resolution: int,
    stride: int,
    buckets: bool = True,
    trigger_word: str = "",
    default_caption: str = "",
    vae=None,
    names: Sequence[str] | None = None,
    missing: Collection[str] = (),
) -> Report:
    """The whole check over (image, caption) pairs; `names` are how the report names the images (default: the file
    names). `resolution` and `stride` are training's (see trainer/dataset.py's buckets)."""
    paths = [Path(p) for p, _ in pairs]
    names = list(names) if names is not None else [p.name for p in paths]
    findings, notes = picture_findings(paths, names, vae)
    unreadable = {f.file for f in findings if f.kind == "unreadable"}
    sizes = {name: upright_size(p) for p, name in zip(paths, names) if name not in unreadable}
    small, bucket_of = size_findings(sizes, resolution, stride, buckets)
    # captions only of the images training would read (one refused above is named once, as unreadable)
    captions = {name: c for name, (_, c) in zip(names, pairs) if name not in unreadable}
    findings += small + caption_findings(captions, trigger_word, default_caption, missing)
    order = {name: i for i, name in enumerate(names)}
    findings.sort(key=lambda f: order.get(f.file, len(order)))
    return Report(findings, bucket_of, resolution, notes)


def model_for_check(
    base_model: str, prediction_type: str | None = None, device=None
) -> tuple[int, tuple[int, int], object | None, list[str]]:
    """What the check needs of a base model: its native size and (VAE scale, UNet levels) from its configs (a bad
    model is a UserError; see trainer/dataset.py's bucket_stride), and its VAE, or None with a note saying why it
    could not be loaded (the rest is still checked)."""
    from adapters.base import load_vae, model_geometry

    native, vae_scale, levels = model_geometry(base_model, prediction_type)
    try:
        return native, (vae_scale, levels), load_vae(base_model, device=device, prediction_type=prediction_type), []
    except UserError as exc:
        return native, (vae_scale, levels), None, [str(exc)]


def folder_pairs(
    folder: str | Path, notes: list[str] | None = None, missing: set[str] | None = None
) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image, caption) for every image training would read from `folder` (its `<N>_name` sub-folders too), and the
    names the report gives them (relative to the folder). What training says of the folder (a `0_name` sub-folder,
    files it passes over) is appended to `notes`, and the names of images with no caption file to `missing`, when
    they are given: the folder is listed once."""
    if not str(folder):  # Path("") would be the current folder
        raise UserError("data (--data) is required: the folder of training images with .txt captions")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist or is not a folder (--data)")
    images, problems, said = training_images(folder)
    if not images:
        raise UserError(f"data folder {folder} has no images: put .png, .jpg, .jpeg, .webp or .gif files in it")
    if notes is not None:
        notes += [*problems, *said]
    pairs, names = [], []
    for path in images:
        text_file, name = caption_file(path), path.relative_to(folder).as_posix()
        pairs.append((path, read_caption(path, text_file)[0]))
        names.append(name)
        if missing is not None and not text_file.is_file():
            missing.add(name)
    return pairs, names
