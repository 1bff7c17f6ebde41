"""The outputs folder: every picture the Generate tab makes, saved with how it was made; its history read back.

    <workspace>/outputs/2026-11-24/00001-7.png     a picture: number of the day, then its seed
    <workspace>/outputs/grids/2026-11-24/00001.png  an X/Y grid

Each PNG carries its settings in AUTOMATIC1111's `parameters` text (`app.images.Parameters`), so the folder is the
history: it survives restarts, and a picture copied elsewhere still says how it was made. Nothing is overwritten.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from PIL import Image

from app.images import Parameters, save_image

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_NUMBERED = re.compile(r"(\d{5,})(-.*)?\.png")


class Outputs:
    """Save pictures and grids under `root`, list the pictures newest first."""

    _lock = threading.Lock()  # two sessions saving at once never take the same number

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def save(self, image: Image.Image, parameters: Parameters) -> Path:
        """`root/<day>/<NNNNN>-<seed>.png`, with `parameters` in it."""
        return self._save(self.root / time.strftime("%Y-%m-%d"), f"-{parameters.seed}", image, parameters)

    def save_grid(self, image: Image.Image, parameters: Parameters) -> Path:
        """`root/grids/<day>/<NNNNN>.png`, with the parameters of its first picture (as A1111 does)."""
        return self._save(self.root / "grids" / time.strftime("%Y-%m-%d"), "", image, parameters)

    def _save(self, folder: Path, suffix: str, image: Image.Image, parameters: Parameters) -> Path:
        with self._lock:
            taken = [int(m[1]) for p in folder.glob("*.png") if (m := _NUMBERED.fullmatch(p.name))]
            path = folder / f"{max(taken, default=0) + 1:05d}{suffix}.png"
            save_image(image, path, parameters.text())
        return path

    def history(self, limit: int = 100) -> list[Path]:
        """The newest `limit` pictures (grids left out), newest first: by day, then number."""
        if not self.root.is_dir():
            return []
        found = []
        for day in self.root.iterdir():
            if day.is_dir() and _DAY.fullmatch(day.name):
                found += [(day.name, int(m[1]), p) for p in day.glob("*.png") if (m := _NUMBERED.fullmatch(p.name))]
        return [path for *_, path in sorted(found, reverse=True)[:limit]]
