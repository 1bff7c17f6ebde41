"""Adapter files: the kohya / AUTOMATIC1111 key layout we write, its header metadata, and safe reading.

Keys: `lora_unet_<module path with . as _>.lora_down.weight` [r, in], `.lora_up.weight` [out, r], `.alpha`
(0-dim; scale = alpha / rank); text-encoder modules use `lora_te_` (`lora_te1_`/`lora_te2_` on SDXL). diffusers'
`load_lora_weights`, AUTOMATIC1111 and ComfyUI all read this layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from adapters.errors import UserError
from adapters.lora import Lora, LoraModule

FORMAT_VERSION = "1"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_KOHYA_READ_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                        ("lora_te_", "text_encoder"))


def to_kohya(lora: Lora, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors in the kohya layout (nothing else in the dict)."""
    out = {}
    for key, m in sorted(lora.items()):
        component, path = key.split(".", 1)
        name = KOHYA_PREFIXES[component] + path.replace(".", "_")
        out[f"{name}.lora_down.weight"] = m.down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype)
    return out


def from_kohya(tensors: dict[str, torch.Tensor], module_names: dict[str, list[str]], *, source: str) -> Lora:
    """Read kohya-layout tensors against the modules of a loaded model ({component: [module paths]}).

    A missing `.alpha` means alpha = rank (scale 1), as kohya's own loader assumes. Keys that match no module
    of the model are an error naming them, since applying part of an adapter silently gives wrong pictures.
    """
    index = {
        (component, path.replace(".", "_")): path for component, paths in module_names.items() for path in paths
    }
    lora: Lora = {}
    unknown = []
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        for prefix, component in _KOHYA_READ_PREFIXES:
            if name.startswith(prefix):
                path = index.get((component, name[len(prefix) :]))
                break
        else:
            component, path = None, None
        if path is None:
            unknown.append(name)
            continue
        up = tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise UserError(f"{source}: {name} has lora_down but no lora_up weight; the file is incomplete")
        down = tensors[key]
        alpha = tensors.get(f"{name}.alpha")
        lora[f"{component}.{path}"] = LoraModule(
            down=down.float(), up=up.float(), alpha=float(alpha) if alpha is not None else float(down.shape[0])
        )
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} LoRA key(s) match no layer of this base model, e.g. {unknown[:3]}; "
            "the adapter was made for a different model architecture"
        )
    return lora


def model_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data as safetensors lays it out (kohya's `sshs_model_hash`; metadata excluded)."""
    blob = save_bytes(tensors)
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temp file beside `path`, then rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file should read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors adapter atomically; every metadata value must already be a string."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    write_atomic(Path(path), save_bytes(tensors, metadata=metadata))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; anything else (a pickle, a truncated file) is refused.

    Nothing is ever unpickled: the header is parsed as JSON by the safetensors library and tensors are raw bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(
            f"{path} is not a valid safetensors file ({exc}); lora-studio only reads .safetensors adapters "
            "and never unpickles .ckpt/.pt files"
        ) from exc
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{path}: tensor(s) {bad[:3]} contain NaN or Inf values; the adapter is corrupt")
    return tensors, metadata


def architecture_of(base_model: str) -> tuple[str, str, bool]:
    """(kohya ss_base_model_version, modelspec architecture, is SD 2.x) for a base model name."""
    name = base_model.lower()
    if name == "builtin":
        return "lora_studio_builtin", "lora-studio-builtin/lora", False
    if "xl" in name:
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", False
    if "stable-diffusion-2" in name or "sd2" in name or "v2-" in name:
        return "sd_v2", "stable-diffusion-v2/lora", True
    return "sd_v1", "stable-diffusion-v1/lora", False


def build_metadata(
    *,
    tensors: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    base_model: str,
    output_name: str,
    resolution: int,
    num_images: int,
    tag_frequency: dict[str, dict[str, int]],
    trigger_word: str,
    config: dict,
    steps: int,
) -> dict[str, str]:
    """The header: kohya `ss_*` fields, `modelspec.*` fields, and our own (full TrainConfig and format version)."""
    version, architecture, v2 = architecture_of(base_model)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": version,
        "ss_v2": str(v2),
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_images),
        "ss_steps": str(steps),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "sshs_model_hash": model_hash(tensors),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger_word,
        "lora_studio.format_version": FORMAT_VERSION,
        "lora_studio.config": json.dumps(config, sort_keys=True),
    }
