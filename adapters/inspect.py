"""What an adapter file is: layout, base model family, ranks, alphas, targets, trigger word, training, hash.

Works for our files and for foreign ones, from what their keys and header say.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from adapters.families import family_of_adapter
from adapters.formats import detect_layout, model_hash, raw_modules, read_safetensors
from adapters.lora import module_kind


def describe(path: Path) -> dict:
    """A JSON-ready summary of an adapter file; raises UserError for files that are not LoRA safetensors."""
    tensors, metadata = read_safetensors(Path(path))
    layout = detect_layout(tensors)
    modules = list(raw_modules(tensors, metadata, layout, str(path))) if layout != "unknown" else []
    targets: Counter = Counter()  # modules per component, and the UNet's by kind (attn1, ff, resnet conv...)
    for component, name, *_ in modules:
        targets[component] += 1
        if component == "unet":
            targets[module_kind(name)] += 1
    config = json.loads(metadata["lora_studio.config"]) if "lora_studio.config" in metadata else None
    alphas = sorted({alpha for *_, alpha, _ in modules if alpha is not None})
    convs = [down for _, _, down, *_ in modules if down.dim() == 4 and down.shape[2:] != (1, 1)]
    return {
        "file": str(path),
        "format": layout,
        "base_model": metadata.get("ss_sd_model_name", "unknown"),
        "base_model_family": getattr(family_of_adapter(tensors, metadata), "name", "unknown"),
        "ranks": sorted({down.shape[0] for _, _, down, *_ in modules}),
        "conv_ranks": sorted({down.shape[0] for down in convs}),  # of the 3x3 convolutions (LoCon), if any
        "dora": any(magnitude is not None for *_, magnitude in modules),
        "alphas": alphas if alphas else ("not stored (alpha = rank)" if modules else "none"),
        "modules": len(modules),
        "targets": dict(targets),
        "trigger_word": metadata.get("modelspec.trigger_phrase", ""),
        "training": {
            "steps": metadata.get("ss_steps"),
            "images": metadata.get("ss_num_train_images"),
            "resolution": metadata.get("ss_resolution"),
            "date": metadata.get("modelspec.date"),
            "config": config,
        },
        "hash": metadata.get("sshs_model_hash") or model_hash(tensors),
        "metadata": metadata,
    }
