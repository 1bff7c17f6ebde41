"""Presets: named sets of TrainConfig fields for common recipes (`--preset NAME`, the page's *Preset* menu).

A preset only sets fields; flags and config-file values given beside it win. A config file names one with its own
`preset:` key, which takes the place of `--preset` (the command line's `--preset`, if given, wins over it). Picking
one in the page sets the fields it names and puts every other field that some preset names back to its default, so
presets do not mix.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from adapters.errors import UserError


@dataclass(frozen=True)
class Preset:
    about: str  # one line: what it is for
    values: dict  # TrainConfig field -> value


PRESETS = {
    "style-fast": Preset(
        "a first look at a style on SD 1.x or the built-in model: 300 steps at batch 4, a higher learning rate with "
        "cosine decay, min-SNR 5",
        dict(
            steps=300,
            batch_size=4,
            learning_rate=2e-4,
            lr_scheduler="cosine",
            lr_warmup_steps=20,
            min_snr_gamma=5.0,
        ),
    ),
    "style-sdxl-12gb": Preset(
        "SDXL at 1024 on a GPU of about 12 GB: batch 1 with 4 batches accumulated per step, gradient checkpointing "
        "on, cosine decay, min-SNR 5",
        dict(
            resolution=1024,
            batch_size=1,
            gradient_accumulation_steps=4,
            gradient_checkpointing="on",
            steps=600,
            learning_rate=1e-4,
            lr_scheduler="cosine",
            lr_warmup_steps=30,
            min_snr_gamma=5.0,
        ),
    ),
    "prodigy": Preset(
        "Prodigy finds its own step size (pip install prodigyopt): learning rate 1, constant schedule, weight decay "
        "0.01, as its authors advise",
        dict(optimizer="prodigy", learning_rate=1.0, lr_scheduler="constant", weight_decay=0.01),
    ),
}
# Every field some preset names: picking a preset in the page sets each of them (to the preset's value or back to
# its default).
PRESET_FIELDS = tuple(dict.fromkeys(name for p in PRESETS.values() for name in p.values))


def preset_values(name: str, where: str = "preset (--preset)") -> dict:
    """The fields of preset `name`; an unknown name is an error, starting with `where`, listing them (with the
    closest)."""
    if isinstance(name, str) and name in PRESETS:
        return dict(PRESETS[name].values)
    close = difflib.get_close_matches(name, list(PRESETS), n=1) if isinstance(name, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(
        f"{where} {name!r} is not one of {', '.join(PRESETS)}{hint}; `lora-studio train --preset list` says each"
    )


def page_values(name: str) -> dict:
    """What picking preset `name` sets: its own fields, and every other field a preset names back to its default."""
    from trainer.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in PRESET_FIELDS}
    return {**defaults, **preset_values(name)}


def _spelled(values: dict) -> str:
    from trainer.config import flag

    return " ".join(f"{flag(k)} {v:g}" if isinstance(v, float) else f"{flag(k)} {v}" for k, v in values.items())


def listing() -> str:
    """`--preset list`: each preset, what it is for, and the flags it stands for."""
    return "\n".join(f"{name}: {p.about}\n    {_spelled(p.values)}" for name, p in PRESETS.items())


def markdown_table() -> str:
    """The README's table of presets (`python -m trainer.presets`)."""
    rows = ["| preset | for | sets |", "|---|---|---|"]
    rows += [f"| `{name}` | {p.about} | `{_spelled(p.values)}` |" for name, p in PRESETS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
