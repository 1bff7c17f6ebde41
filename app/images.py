"""Saving generated pictures: atomically, with how they were made in the PNG's `parameters` text (AUTOMATIC1111's
"infotext", which A1111, ComfyUI's loaders and model sites read), and reading that text back."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from adapters.errors import UserError
from adapters.formats import write_atomic

# `<lora:name:strength>` as A1111 users write adapters into a prompt (`<lora:name>` is strength 1)
_LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
# one `Key: value` of the settings line; a value holding a comma, colon or newline is a JSON string
_SETTING = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def _quoted(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


@dataclass
class Parameters:
    """How a picture was made, in the terms of AUTOMATIC1111's `parameters` text:

        glowline, a green triangle <lora:neon:0.8>
        Negative prompt: blurry
        Steps: 20, Sampler: DPM++ 2M, CFG scale: 5, Seed: 7, Size: 64x64, Model: builtin, Lora hashes: "neon: 3f…"

    The adapters follow the prompt as A1111's `<lora:name:strength>` tags (A1111 applies them from there), their
    short hashes in `Lora hashes` as A1111 writes them. A field `parse` does not find is None."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    guidance_rescale: float | None = None
    adapters: dict[str, float] = field(default_factory=dict)  # name -> strength, in slot order
    lora_hashes: dict[str, str] = field(default_factory=dict)  # name -> the file's hash, first 12 hex digits

    def text(self) -> str:
        tags = " ".join(f"<lora:{name}:{strength:g}>" for name, strength in self.adapters.items())
        lines = [" ".join(part for part in (self.prompt, tags) if part)]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        settings = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": None if self.cfg_scale is None else f"{self.cfg_scale:g}",
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}" if self.width and self.height else None,
            "Model": self.model,
            "Guidance rescale": f"{self.guidance_rescale:g}" if self.guidance_rescale else None,
            "Lora hashes": ", ".join(f"{n}: {h}" for n, h in self.lora_hashes.items()) or None,
        }
        lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in settings.items() if value is not None))
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> Parameters:
        """Read a `parameters` text back (ours, or one A1111 wrote: unknown settings are left out)."""
        *lines, last = text.strip().split("\n")
        settings = {key: value.strip() for key, value in _SETTING.findall(last)}
        if len(settings) < 3:  # A1111's rule: a last line of fewer than three settings is part of the prompts
            lines, settings = [*lines, last], {}
        prompt, negative, in_negative = [], [], False
        for line in lines:
            if line.startswith("Negative prompt:"):
                in_negative, line = True, line[len("Negative prompt:") :].strip()
            (negative if in_negative else prompt).append(line)
        settings = {key: _unquoted(value) for key, value in settings.items()}
        found = cls(negative_prompt="\n".join(negative))
        for name, strength in _LORA_TAG.findall("\n".join(prompt)):
            if _number(strength or "1", float) is not None:
                found.adapters[name.strip()] = _number(strength or "1", float)
        found.prompt = _LORA_TAG.sub("", "\n".join(prompt)).strip()
        size = re.fullmatch(r"(\d+)x(\d+)", settings.get("Size", ""))
        found.width, found.height = (int(size[1]), int(size[2])) if size else (None, None)
        found.steps = _number(settings.get("Steps"), int)
        found.seed = _number(settings.get("Seed"), int)
        found.cfg_scale = _number(settings.get("CFG scale"), float)
        found.guidance_rescale = _number(settings.get("Guidance rescale", "0"), float)
        found.sampler, found.model = settings.get("Sampler"), settings.get("Model")
        for pair in settings.get("Lora hashes", "").split(","):
            name, sep, digest = pair.partition(":")
            if sep:
                found.lora_hashes[name.strip()] = digest.strip()
        return found

    @classmethod
    def of_file(cls, path: Path) -> Parameters:
        """The `parameters` text of a PNG file; a UserError naming the file when it has none."""
        try:
            with Image.open(path) as image:
                text = image.info.get("parameters", "")
        except OSError as exc:
            raise UserError(f"{Path(path).name} is not a readable picture ({exc})") from None
        if not text:
            raise UserError(f"{Path(path).name} holds no parameters text (it was not made here or by A1111)")
        return cls.parse(text)


def _unquoted(value: str) -> str:
    if len(value) > 1 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            pass
    return value


def _number(text: str | None, kind):
    """`text` as an int or float; None when it is missing or no number."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


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
    rows: list[list[Image.Image]],
    column_labels: list[str],
    row_labels: list[str] | None = None,
    cell: int | tuple[int, int] = 192,
) -> Image.Image:
    """Pictures in a grid, each scaled to `cell` pixels (a square's side, or width and height), with a label over
    each column (and before each row, if given), drawn in Pillow's default font."""
    from PIL import ImageDraw

    cell_w, cell_h = (cell, cell) if isinstance(cell, int) else cell
    pad, top = 6, 22
    left = 0 if not row_labels else 8 * max(len(t) for t in row_labels) // 1 + 2 * pad
    width = left + len(column_labels) * (cell_w + pad) + pad
    height = top + len(rows) * (cell_h + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels):
        draw.text((left + pad + j * (cell_w + pad), 5), label, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = top + i * (cell_h + pad)
        if row_labels:
            draw.text((pad, y + cell_h // 2 - 6), row_labels[i], fill=(0, 0, 0))
        for j, image in enumerate(row):
            resample = Image.Resampling.NEAREST if image.width * 2 <= cell_w else Image.Resampling.LANCZOS
            grid.paste(image.resize((cell_w, cell_h), resample), (left + pad + j * (cell_w + pad), y))
    return grid
