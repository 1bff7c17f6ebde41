"""What an adapter file is: its key layout, base model family, ranks, alphas, targets, trigger word, training."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from adapters.formats import model_hash, read_safetensors


def detect_layout(keys) -> str:
    """`kohya` (lora_unet_/lora_te_ .lora_down/.lora_up), or `unknown`, judged by the keys, not the file name."""
    keys = list(keys)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) and k.startswith("lora_") for k in keys):
        return "kohya"
    return "unknown"


def _family(metadata: dict[str, str]) -> str:
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    for needle, family in (("builtin", "lora-studio builtin"), ("xl", "SDXL"), ("v2", "SD 2.x"), ("v1", "SD 1.x")):
        if needle in version or needle in arch:
            return family
    return "unknown"


def describe(path: Path) -> dict:
    """A JSON-ready summary of an adapter file (format, family, ranks, alphas, targets, trigger, training, hash)."""
    tensors, metadata = read_safetensors(Path(path))
    layout = detect_layout(tensors)
    ranks = Counter(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(float(t) for k, t in tensors.items() if k.endswith(".alpha"))
    modules = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    targets = Counter()
    for m in modules:
        targets["unet" if m.startswith("lora_unet_") else "text_encoder"] += 1
        found = re.search(r"_(attn1|attn2)_", m)
        if found:
            targets[found.group(1)] += 1
    config = json.loads(metadata["lora_studio.config"]) if "lora_studio.config" in metadata else None
    return {
        "file": str(path),
        "format": layout,
        "base_model": metadata.get("ss_sd_model_name", "unknown"),
        "base_model_family": _family(metadata),
        "ranks": sorted(ranks),
        "alphas": sorted(alphas),
        "modules": len(modules),
        "targets": dict(targets),
        "trigger_word": metadata.get("modelspec.trigger_phrase", ""),
        "training": {
            "steps": metadata.get("ss_steps"),
            "images": metadata.get("ss_num_train_images"),
            "resolution": metadata.get("ss_resolution"),
            "config": config,
        },
        "hash": metadata.get("sshs_model_hash") or model_hash(tensors),
        "metadata": metadata,
    }
