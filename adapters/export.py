"""Converting an adapter file between the kohya/A1111 layout and the diffusers (peft) layout, alphas kept."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.base import model_modules
from adapters.errors import UserError
from adapters.formats import (
    check_writable,
    model_hash,
    read_lora,
    read_safetensors,
    save_adapter,
    to_diffusers,
    to_kohya,
)

FORMATS = ("kohya", "diffusers")
_KEPT_HEADER = ("ss_", "sshs_", "modelspec.", "lora_studio.")


def export_adapter(
    source: Path, fmt: str, out: Path, *, base_model: str | None = None, overwrite: bool = False
) -> Path:
    """Write `source` to `out` in `fmt`; training metadata is carried over, nothing is overwritten unasked.

    The base model (default: the one named in the file's own header, else the built-in model) is only read
    for its layer names, which the kohya layout writes with '_' for '.'.
    """
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.suffix != ".safetensors":
        raise UserError(f"--output {out} must end in .safetensors")
    if out.exists() and out.resolve() == source.resolve():
        raise UserError(f"--output {out} is the input file itself; choose a new name")
    if out.exists() and not overwrite:
        raise UserError(f"--output {out} already exists; choose another name or pass --overwrite")
    check_writable(out, "--output")
    tensors, metadata = read_safetensors(source)
    if base_model is None and "lora_studio.config" in metadata:
        base_model = json.loads(metadata["lora_studio.config"]).get("base_model")
    modules, family = model_modules(base_model)
    lora = read_lora(tensors, metadata, modules, source=str(source), base_family=family.name)
    kept = {k: v for k, v in metadata.items() if k.startswith(_KEPT_HEADER)}
    if fmt == "kohya":
        new = to_kohya(lora, two_text_encoders="text_encoder_2" in modules)
        header = {**kept, "sshs_model_hash": model_hash(new)}
    else:
        new, header = to_diffusers(lora)
        header = {**kept, **header}
    save_adapter(out, new, header)
    return out
