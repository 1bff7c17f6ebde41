"""Fixed CPU training runs -> a digest of each adapter's tensors: a refactor must leave every line unchanged.

    .venv/bin/python benchmarks/same_adapter_check.py    # compare with benchmarks/results/same_adapter_check.txt

Five short runs (the tiny test model with epsilon and v-prediction, LoRA on both attentions and on attn1 only,
caption dropout 0.5; the built-in model on sample_images/ with a trigger word, rank 4, alpha 2). The digest is
sha256 over each tensor's name and bytes, in key order.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"


def digest(path: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    import torch
    from conftest import build_tiny_pipeline, write_scene_folder

    from trainer.config import TrainConfig
    from trainer.loop import train

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    data = write_scene_folder(tmp / "data", count=4)
    runs = {}
    for prediction in ("epsilon", "v_prediction"):
        model = tmp / f"tiny-{prediction}"
        build_tiny_pipeline(prediction).save_pretrained(model, safe_serialization=True)
        for attention in ("both", "self"):
            runs[f"tiny-{prediction}-{attention}"] = TrainConfig(
                base_model=str(model),
                data=str(data),
                steps=6,
                batch_size=2,
                seed=3,
                attention=attention,
                caption_dropout=0.5,
                run_dir=str(tmp / f"run-{prediction}-{attention}"),
            )
    runs["builtin"] = TrainConfig(
        data=str(ROOT / "sample_images"),
        steps=5,
        batch_size=2,
        seed=1,
        trigger_word="glowline",
        rank=4,
        alpha=2,
        run_dir=str(tmp / "run-builtin"),
    )
    for name, config in runs.items():
        print(name, digest(train(config, log_to_terminal=False).adapter), flush=True)


if __name__ == "__main__":
    main()
