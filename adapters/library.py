"""The adapter library on disk: a folder of `<name>.safetensors` files, each with an optional `<name>.png` sample.

Names are sanitised (no path separators, no `..`, no leading dot); nothing is overwritten unless asked; every
write goes to a temp file renamed into place. Listing reads only the safetensors headers, so it stays fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from adapters.errors import UserError
from adapters.formats import RECOMMENDED_STRENGTH, detect_layout, read_safetensors, write_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9 _.()+-]+")


def sanitize_name(name: str) -> str:
    """A safe file stem from what a person typed: unsafe characters become `_`; empty or dots-only is refused."""
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    stem = _UNSAFE.sub("_", stem).strip(" .")
    stem = re.sub(r"\.{2,}", "_", stem)[:100]
    if not stem or not re.search(r"[A-Za-z0-9]", stem):
        raise UserError(f"adapter name {name!r} has no usable characters; use letters, digits, '-' or '_'")
    return stem


@dataclass
class Entry:
    name: str
    path: Path
    sample: Path | None
    size: int
    metadata: dict[str, str] = field(repr=False)

    @property
    def summary(self) -> dict:
        """What the library shows for an adapter: base model, rank, steps, trigger word, date."""
        m = self.metadata
        return {
            "name": self.name,
            "base_model": m.get("ss_sd_model_name", "unknown"),
            "rank": m.get("ss_network_dim", "?"),
            "alpha": m.get("ss_network_alpha", "?"),
            "steps": m.get("ss_steps", "?"),
            "trigger_word": m.get("modelspec.trigger_phrase", ""),
            # the strength the run's judge recommends for the file; "" when not judged or none qualified
            "recommended_strength": m.get(RECOMMENDED_STRENGTH, ""),
            "date": m.get("modelspec.date", ""),
            "size_kb": round(self.size / 1024),
        }


class Library:
    """List, add (import), rename and delete adapters in one folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, name: str) -> tuple[Path, Path]:
        stem = sanitize_name(name)
        return self.root / f"{stem}.safetensors", self.root / f"{stem}.png"

    def _entry(self, path: Path) -> Entry:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        sample = path.with_suffix(".png")
        return Entry(path.stem, path, sample if sample.is_file() else None, path.stat().st_size, metadata)

    def scan(self) -> tuple[list[Entry], list[tuple[Path, str]]]:
        """`list` and `problems` from one pass over the folder (each alone reads every header again)."""
        entries, problems = [], []
        for path in self.root.glob("*.safetensors"):
            try:
                entries.append((path.stat().st_mtime, self._entry(path)))
            except FileNotFoundError:
                continue  # deleted while we listed: no longer in the library
            except (OSError, SafetensorError) as exc:
                problems.append((path, f"not a readable safetensors file ({exc}); replace or delete it"))
        entries.sort(key=lambda pair: pair[0], reverse=True)
        return [entry for _, entry in entries], sorted(problems)

    def list(self) -> list[Entry]:
        """Every readable adapter, newest first. Unreadable files are left out (see `problems`), never deleted."""
        return self.scan()[0]

    def problems(self) -> list[tuple[Path, str]]:
        """The `*.safetensors` files `list` leaves out because they cannot be read, each with the reason."""
        return self.scan()[1]

    def new_name(self, name: str) -> str:
        """The name an adapter typed as `name` is saved under (cleaned as `sanitize_name` does); a UserError when it
        has no usable characters or an adapter (or an unreadable file) in the library already has it. Training and
        Rename both answer with this, before they do anything."""
        path, _ = self._paths(name)
        if self.taken(path.stem):
            raise UserError(
                f"the library already has an adapter named {path.stem!r}; choose another name (or rename or delete "
                "that one)"
            )
        return path.stem

    def taken(self, name: str) -> bool:
        """Whether a file in the library, readable or not, already holds `name`."""
        return self._paths(name)[0].exists()

    def get(self, name: str) -> Entry:
        path, _ = self._paths(name)
        if not path.is_file():
            raise UserError(f"no adapter named {name!r} in the library {self.root}")
        return self._entry(path)

    def add(self, source: str | Path, name: str | None = None, *, sample=None, overwrite: bool = False) -> Entry:
        """Import an adapter file (checked: safetensors, finite, a LoRA layout) under `name` (default: its stem)."""
        source = Path(source)
        tensors, _ = read_safetensors(source)
        if detect_layout(tensors) == "unknown":
            raise UserError(f"{source.name} holds no LoRA weights in a layout lora-studio knows; not imported")
        path, sample_path = self._paths(name or source.stem)
        if not overwrite:
            self.new_name(path.stem)
        write_atomic(path, source.read_bytes())
        if sample is not None:
            self.set_sample(path.stem, sample)
        return self._entry(path)

    def set_sample(self, name: str, image) -> None:
        """Store a sample picture (a PIL image or an image file) for adapter `name`."""
        import io

        from PIL import Image

        _, sample_path = self._paths(name)
        buf = io.BytesIO()
        (Image.open(image) if isinstance(image, (str, Path)) else image).convert("RGB").save(buf, format="PNG")
        write_atomic(sample_path, buf.getvalue())

    def rename(self, old: str, new: str, *, overwrite: bool = False) -> Entry:
        src, src_sample = self._paths(old)
        dst, dst_sample = self._paths(new)
        if not src.is_file():
            raise UserError(f"no adapter named {old!r} in the library {self.root}")
        if dst != src and not overwrite:
            self.new_name(dst.stem)
        os.replace(src, dst)
        if src_sample.is_file():
            os.replace(src_sample, dst_sample)
        return self._entry(dst)

    def delete(self, name: str) -> None:
        path, sample = self._paths(name)
        if not path.is_file():
            raise UserError(f"no adapter named {name!r} in the library {self.root}")
        path.unlink()
        sample.unlink(missing_ok=True)
