"""The procedural world of simple scenes: sampling, captions, rendering, and an analyser that reads pictures back.

The built-in base model is pretrained on this world (`trainer/builtin/pretrain.py`), the demo style set in
`sample_images/` is drawn from it (`trainer/builtin/style_set.py`), and the learning tests score generated
pictures with `analyse`. Rendering is signed-distance based and batched in torch, so the pretraining can draw
its data on the GPU as fast as it trains, and the same code draws the sample images on a laptop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

# Object colours are saturated and far apart in hue; backgrounds are near-grey, so the analyser can tell the
# object from the background by chroma alone, in both the plain and the neon style.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (240, 210, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (145, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (150, 150, 150),
    "beige": (235, 222, 196),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
# Object radius as a fraction of the canvas side; "medium" is never said in a caption.
SIZES: dict[str, tuple[float, float]] = {"small": (0.10, 0.13), "medium": (0.16, 0.20), "large": (0.25, 0.29)}
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
RELATIONS = ("above", "below", "to the left of", "to the right of")
NEON_BACKGROUND = (10, 10, 16)

# (colour, shape) pairs the built-in model never sees in pretraining: its prompt-fidelity score is measured on
# them, so it tests whether the model composes words it learned separately rather than recalling pictures.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("orange", "diamond"),
        ("yellow", "square"),
        ("green", "triangle"),
        ("blue", "diamond"),
        ("purple", "circle"),
    }
)


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain (the built-in tokenizer gives each its own token)."""
    words = {"a", "two", "on", "background", "above", "below", "to", "of", "the", "in", "at"}
    words |= set(COLORS) | set(BACKGROUNDS) | set(SHAPES) | set(PLURALS.values()) | set(SIZES)
    for phrase in list(POSITION_PHRASES.values()) + list(RELATIONS):
        words |= set(phrase.split())
    return sorted(words)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    x: float  # centre, fraction of the canvas width
    y: float  # centre, fraction of the canvas height (down is positive)
    r: float  # radius, fraction of the canvas side


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    caption: str


def _jitter(rng: random.Random, value: float, amount: float) -> float:
    return value + rng.uniform(-amount, amount)


def _pick_pair(rng: random.Random, allowed) -> tuple[str, str]:
    while True:
        pair = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if allowed(pair):
            return pair


def _background_phrase(rng: random.Random, bg: str, keep: float) -> list[str]:
    return ["on", "a", bg, "background"] if rng.random() < keep else []


def sample_scene(rng: random.Random, *, allowed=lambda pair: pair not in HELD_OUT_PAIRS) -> Scene:
    """Draw one scene and a true caption for it; `allowed(colour, shape)` filters which objects may appear.

    Optional phrases (size, position, background) are sometimes left out, so the model also learns what a
    short prompt means: whatever the missing words leave free is drawn at random.
    """
    bg = rng.choice(list(BACKGROUNDS))
    kind = rng.random()
    if kind < 0.6:  # one object
        color, shape = _pick_pair(rng, allowed)
        size = rng.choice(list(SIZES))
        pos = rng.choices(list(POSITIONS), weights=[3, 1, 1, 1, 1])[0]
        px, py = POSITIONS[pos]
        r = rng.uniform(*SIZES[size])
        obj = Obj(shape, color, _jitter(rng, px, 0.05), _jitter(rng, py, 0.05), r)
        words = ["a"] + ([size] if size != "medium" else []) + [color, shape]
        if (pos != "center" and rng.random() < 0.85) or (pos == "center" and rng.random() < 0.4):
            words += POSITION_PHRASES[pos].split()
        words += _background_phrase(rng, bg, 0.7)
        return Scene((obj,), bg, " ".join(words))
    if kind < 0.85:  # two different objects in a relation
        a = _pick_pair(rng, allowed)
        b = _pick_pair(rng, lambda p: allowed(p) and p != a)
        rel = rng.choice(RELATIONS)
        ra, rb = rng.uniform(0.10, 0.17), rng.uniform(0.10, 0.17)
        c, near, far = rng.uniform(0.38, 0.62), _jitter(rng, 0.28, 0.03), _jitter(rng, 0.72, 0.03)
        first, second = {
            "above": ((c, near), (c, far)),
            "below": ((c, far), (c, near)),
            "to the left of": ((near, c), (far, c)),
            "to the right of": ((far, c), (near, c)),
        }[rel]
        objs = (Obj(a[1], a[0], *first, ra), Obj(b[1], b[0], *second, rb))
        words = ["a", a[0], a[1], *rel.split(), "a", b[0], b[1], *_background_phrase(rng, bg, 0.7)]
        return Scene(objs, bg, " ".join(words))
    color, shape = _pick_pair(rng, allowed)  # two of the same
    r = rng.uniform(0.10, 0.16)
    c = rng.uniform(0.38, 0.62)
    if rng.random() < 0.5:
        places = ((_jitter(rng, 0.28, 0.03), c), (_jitter(rng, 0.72, 0.03), c))
    else:
        places = ((c, _jitter(rng, 0.28, 0.03)), (c, _jitter(rng, 0.72, 0.03)))
    objs = tuple(Obj(shape, color, x, y, r) for x, y in places)
    words = ["two", color, PLURALS[shape], *_background_phrase(rng, bg, 0.7)]
    return Scene(objs, bg, " ".join(words))


def single_object_scene(
    rng: random.Random, color: str, shape: str, *, size: str | None = None, position: str | None = None
) -> Scene:
    """One object of the given colour and shape; size and position drawn at random when not given."""
    size = size or rng.choice(list(SIZES))
    position = position or rng.choice(list(POSITIONS))
    bg = rng.choice(list(BACKGROUNDS))
    px, py = POSITIONS[position]
    obj = Obj(shape, color, _jitter(rng, px, 0.04), _jitter(rng, py, 0.04), rng.uniform(*SIZES[size]))
    words = ["a"] + ([size] if size != "medium" else []) + [color, shape]
    if position != "center":
        words += POSITION_PHRASES[position].split()
    return Scene((obj,), bg, " ".join(words))


# --- rendering -------------------------------------------------------------------------------------------------


def _star(points: int, outer: float, inner: float) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        rad = outer if i % 2 == 0 else inner
        ang = -math.pi / 2 + i * math.pi / points
        out.append((rad * math.cos(ang), rad * math.sin(ang)))
    return out


# Unit outlines (radius ~1, y down). The circle is exact; the rest are polygons, sized to look about as big.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.1), (1.05, 0.75), (-1.05, 0.75)],
    "star": _star(5, 1.15, 0.5),
    "diamond": [(0.0, -1.15), (0.8, 0.0), (0.0, 1.15), (-0.8, 0.0)],
}


def _polygon_sdf(p: torch.Tensor, verts: list[tuple[float, float]]) -> torch.Tensor:
    """Signed distance from points p[..., 2] to a closed polygon (negative inside)."""
    v = torch.tensor(verts, dtype=p.dtype, device=p.device)
    d2 = ((p - v[0]) ** 2).sum(-1)
    inside = torch.zeros(p.shape[:-1], dtype=torch.bool, device=p.device)
    n = len(verts)
    for i in range(n):
        vi, vj = v[i], v[i - 1]
        e = vj - vi
        w = p - vi
        t = ((w * e).sum(-1) / (e * e).sum()).clamp(0, 1)
        b = w - e * t[..., None]
        d2 = torch.minimum(d2, (b * b).sum(-1))
        c1 = p[..., 1] >= vi[1]
        c2 = p[..., 1] < vj[1]
        c3 = e[0] * w[..., 1] > e[1] * w[..., 0]
        inside ^= (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
    d = d2.sqrt()
    return torch.where(inside, -d, d)


def unit_sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance, in unit radii, from local points p[..., 2] to the unit shape."""
    if shape == "circle":
        return p.norm(dim=-1) - 1.0
    return _polygon_sdf(p, _POLYGONS[shape])


def _grid(size: int, device) -> torch.Tensor:
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx, yy], -1)  # (H, W, 2)


def _object_distances(scenes: list[Scene], size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scene and object slot: signed distance in pixels (B, K, H, W), colour (B, K, 3), present (B, K)."""
    k = max(len(s.objects) for s in scenes)
    grid = _grid(size, device)
    dist = torch.full((len(scenes), k, size, size), 1e4, device=device)
    color = torch.zeros(len(scenes), k, 3, device=device)
    present = torch.zeros(len(scenes), k, dtype=torch.bool, device=device)
    by_shape: dict[str, list[tuple[int, int, Obj]]] = {}
    for b, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            by_shape.setdefault(o.shape, []).append((b, j, o))
            color[b, j] = torch.tensor(COLORS[o.color], dtype=torch.float32, device=device)
            present[b, j] = True
    for shape, items in by_shape.items():  # one batched distance evaluation per shape kind
        idx_b = torch.tensor([i[0] for i in items], device=device)
        idx_k = torch.tensor([i[1] for i in items], device=device)
        centre = torch.tensor([[i[2].x, i[2].y] for i in items], device=device)
        radius = torch.tensor([i[2].r for i in items], device=device)
        local = (grid[None] - centre[:, None, None]) / radius[:, None, None, None]
        dist[idx_b, idx_k] = unit_sdf(shape, local) * (radius * size)[:, None, None]
    return dist, color, present


def render(
    scenes: list[Scene], size: int = 64, style: str = "plain", device="cpu", backgrounds: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw scenes as uint8 images (B, 3, H, W): flat anti-aliased shapes (`plain`) or glowing outlines (`neon`).

    `backgrounds` (B, 3) in 0..255 overrides each scene's background colour.
    """
    dist, color, present = _object_distances(scenes, size, device)
    scale = size / 64  # line widths and glow are designed at 64 px
    if backgrounds is None:
        rgb = [BACKGROUNDS[s.background] if style == "plain" else NEON_BACKGROUND for s in scenes]
        backgrounds = torch.tensor(rgb, dtype=torch.float32)
    img = backgrounds.to(device=device, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size).clone()
    if style == "plain":
        for j in range(dist.shape[1]):
            alpha = (0.5 - dist[:, j]).clamp(0, 1) * present[:, j, None, None]
            img = img * (1 - alpha[:, None]) + color[:, j, :, None, None] * alpha[:, None]
    elif style == "neon":
        for j in range(dist.shape[1]):
            d = dist[:, j].abs() / scale
            line = (1.6 - d).clamp(0, 1) * present[:, j, None, None]
            glow = 0.55 * torch.exp(-d / 2.5) * present[:, j, None, None]
            core = color[:, j] * 0.7 + 255 * 0.3  # a hot, whitened core; the glow keeps the pure colour
            img = img + glow[:, None] * color[:, j, :, None, None]
            img = img * (1 - line[:, None]) + core[:, :, None, None] * line[:, None]
    else:
        raise ValueError(f"style must be 'plain' or 'neon', got {style!r}")
    return img.clamp(0, 255).round().to(torch.uint8)


# --- analyser ---------------------------------------------------------------------------------------------------


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees of float RGB in [0, 1], (..., 3)."""
    r, g, b = rgb.unbind(-1)
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    c = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / c) % 6, torch.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0


_PALETTE_HUES = {name: float(_hue(torch.tensor(rgb, dtype=torch.float32) / 255)) for name, rgb in COLORS.items()}


@dataclass(frozen=True)
class Reading:
    color: str | None  # the object colour, or None where no coloured object is seen
    shape: str | None
    luminance: float  # mean luminance of the whole picture, 0 (black) to 1 (white)


def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Fill the enclosed holes of a bool mask (H, W): an outline becomes the shape it outlines."""
    outside = torch.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = (
        ~mask[0, :],
        ~mask[-1, :],
        ~mask[:, 0],
        ~mask[:, -1],
    )
    free = ~mask
    while True:
        grown = outside.clone()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def _unit_bbox(shape: str) -> tuple[float, float, float, float]:
    pts = torch.tensor(_POLYGONS.get(shape, [(-1, -1), (1, 1)]))
    return float(pts[:, 0].min()), float(pts[:, 0].max()), float(pts[:, 1].min()), float(pts[:, 1].max())


def _classify_shape(mask: torch.Tensor) -> str | None:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) < 6:
        return None
    size = mask.shape[0]
    x0, x1 = (xs.min().item()) / size, (xs.max().item() + 1) / size
    y0, y1 = (ys.min().item()) / size, (ys.max().item() + 1) / size
    grid = _grid(size, mask.device)
    best, best_iou = None, -1.0
    for shape in SHAPES:
        ux0, ux1, uy0, uy1 = _unit_bbox(shape)
        r = max((x1 - x0) / (ux1 - ux0), (y1 - y0) / (uy1 - uy0))
        cx = (x0 + x1) / 2 - r * (ux0 + ux1) / 2
        cy = (y0 + y1) / 2 - r * (uy0 + uy1) / 2
        local = (grid - torch.tensor([cx, cy])) / r
        template = unit_sdf(shape, local) * r * size < 0
        iou = (template & mask).sum().item() / max(1, (template | mask).sum().item())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def analyse(image) -> Reading:
    """Read back the main object's colour and shape, and the picture's luminance, from one RGB image.

    Takes a PIL image, an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor. Colour is the chroma-weighted mean
    hue of the saturated pixels, named by the nearest palette hue; shape is the template that best overlaps the
    saturated pixels with their holes filled (so neon outlines read as their shapes).
    """
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, dtype=np.uint8))
    if t.shape[0] == 3 and t.shape[-1] != 3:
        t = t.permute(1, 2, 0)
    rgb = t.float() / 255.0
    lum = float((rgb * torch.tensor([0.299, 0.587, 0.114])).sum(-1).mean())
    chroma = rgb.max(-1).values - rgb.min(-1).values
    mask = chroma > 0.25
    if mask.sum() < 6:
        return Reading(None, None, lum)
    hues = _hue(rgb[mask]) * math.pi / 180
    w = chroma[mask]
    mean = math.degrees(math.atan2(float((hues.sin() * w).sum()), float((hues.cos() * w).sum()))) % 360
    color = min(_PALETTE_HUES, key=lambda n: min(abs(_PALETTE_HUES[n] - mean), 360 - abs(_PALETTE_HUES[n] - mean)))
    return Reading(color, _classify_shape(_fill_holes(mask)), lum)
