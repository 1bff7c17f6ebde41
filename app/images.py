"""Saving generated pictures: atomically, with how they were made in the PNG's `parameters` text."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, PngImagePlugin

from adapters.formats import write_atomic


def save_image(image: Image.Image, path: Path, parameters: str = "") -> None:
    """Write `image` to `path` (format from the extension) via a temp file; PNGs carry `parameters`."""
    path = Path(path)
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        image.convert("RGB").save(buf, format=fmt, quality=95)
    write_atomic(path, buf.getvalue())


def labelled_grid(
    rows: list[list[Image.Image]], column_labels: list[str], row_labels: list[str] | None = None, cell: int = 192
) -> Image.Image:
    """Pictures in a grid, each scaled to `cell` pixels, with a label over each column (and row, if given)."""
    from PIL import ImageDraw

    pad, top = 6, 22
    left = 0 if not row_labels else 8 * max(len(t) for t in row_labels) // 1 + 2 * pad
    width = left + len(column_labels) * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels):
        draw.text((left + pad + j * (cell + pad), 5), label, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = top + i * (cell + pad)
        if row_labels:
            draw.text((pad, y + cell // 2 - 6), row_labels[i], fill=(0, 0, 0))
        for j, image in enumerate(row):
            resample = Image.Resampling.NEAREST if image.width * 2 <= cell else Image.Resampling.LANCZOS
            grid.paste(image.resize((cell, cell), resample), (left + pad + j * (cell + pad), y))
    return grid
