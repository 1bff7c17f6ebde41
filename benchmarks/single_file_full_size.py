"""Full-size check of single-file checkpoints with the shipped configs (adapters/configs/), for the four published
architectures: SD 1.5, SD 2.1-base (512, epsilon), SD 2.1 (768, v-prediction) and SDXL base 1.0.

For each, a pipeline is built from the shipped configs with random weights, written as one original-layout
.safetensors in fp16 (as published checkpoints are; tests/original_layout.py writes it), and loaded back through
`adapters.base.load_pipeline(file)`, the path `--base-model file.safetensors` takes (diffusers' from_single_file, the
shipped configs, nothing fetched). Recorded per architecture: what diffusers' own detector calls the file (so the key
names are those real files have), the family lora-studio reads from the header, whether every loaded weight equals
the written one, whether both pipelines draw the same picture (fp32, 4 steps, native size), file size, load time.

    HF_HUB_OFFLINE=1 python benchmarks/single_file_full_size.py --out benchmarks/results/single_file_full_size.json

Needs a CUDA GPU with about 25 GB free and 10 GB of disk; takes a few minutes. Not a timed benchmark: the load time
is recorded for scale only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters import single_file  # noqa: E402
from adapters.base import check_base_model, load_pipeline  # noqa: E402
from tests.original_layout import write_checkpoint  # noqa: E402

CASES = [  # (config folder, original layout, header metadata that says the prediction type, published kind)
    ("sd1", "sd1", {}, "v1"),
    ("sd2-512", "sd2", {"modelspec.architecture": "stable-diffusion-v2-512"}, "v2"),
    ("sd2-768-v", "sd2", {"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v2"),
    ("sdxl", "sdxl", {}, "xl_base"),
]


def random_pipeline(folder: Path, device: str):
    """The pipeline the shipped configs describe, random weights, on `device` in fp32."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    with torch.device(device):
        for name, entry in index.items():
            if not isinstance(entry, list) or entry[0] is None or name == "scheduler":
                continue
            library, cls = entry
            if name.startswith("tokenizer"):
                parts[name] = single_file._tokenizer(folder / name)
            elif library == "diffusers":
                model_cls = getattr(diffusers, cls)
                parts[name] = model_cls.from_config(model_cls.load_config(folder / name))
            else:
                model_cls = getattr(transformers, cls)
                parts[name] = model_cls(model_cls.config_class.from_pretrained(folder / name))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    if index["_class_name"] == "StableDiffusionPipeline":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return getattr(diffusers, index["_class_name"])(**parts)


def draw(pipe, size: int) -> np.ndarray:
    generator = torch.Generator(pipe.device).manual_seed(0)
    out = pipe(
        "a photo of a cat", num_inference_steps=4, height=size, width=size, generator=generator, output_type="np"
    )
    return out.images[0]


def check(folder_name: str, layout: str, metadata: dict, kind: str, work: Path, device: str, size: int) -> dict:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    folder = single_file.CONFIGS_DIR / folder_name
    torch.manual_seed(0)
    written = random_pipeline(folder, device).to(torch.float16)  # what a published file holds
    path = work / f"{folder_name}.safetensors"
    write_checkpoint(written.to("cpu"), path, layout, metadata)
    written = written.to(device, torch.float32)
    shapes, _ = single_file.read_header(path)
    detected = infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    family = check_base_model(str(path))[1]
    start = time.perf_counter()
    loaded = load_pipeline(str(path), device=device, dtype=torch.float32)
    load_seconds = time.perf_counter() - start
    components = [
        n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(written, n, None) is not None
    ]
    mismatched = []
    for name in components:
        a, b = getattr(written, name).state_dict(), getattr(loaded, name).state_dict()
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            mismatched.append(name)
    native = loaded.unet.config.sample_size * loaded.vae_scale_factor
    size = size or native
    picture_a, picture_b = draw(written, size), draw(loaded, size)
    result = {
        "configs": f"adapters/configs/{folder_name}",
        "diffusers_detects": detected,
        "expected_kind": kind,
        "family": family.name,
        "modelspec_architecture": family.modelspec_architecture,
        "prediction_type": loaded.scheduler.config.prediction_type,
        "pipeline": type(loaded).__name__,
        "native_size": native,
        "picture_size": size,
        "weights_equal": not mismatched,
        "mismatched_components": mismatched,
        "same_picture": bool(np.array_equal(picture_a, picture_b, equal_nan=True)),
        "picture_max_abs_diff": float(np.nanmax(np.abs(picture_a - picture_b))),
        "file_gb": round(path.stat().st_size / 1e9, 2),
        "load_seconds": round(load_seconds, 1),
        "parameters_millions": round(
            sum(p.numel() for n in components for p in getattr(loaded, n).parameters()) / 1e6, 1
        ),
    }
    path.unlink()
    del written, loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/single_file_full_size.json")
    parser.add_argument("--work", default="/tmp/single_file_full_size", help="where the checkpoints are written")
    parser.add_argument("--only", nargs="*", help="config folders to check (default: all four)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=0, help="picture size in pixels (default: the native size)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "results": {},
    }
    import diffusers
    import transformers

    record.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    for case in CASES:
        if args.only and case[0] not in args.only:
            continue
        record["results"][case[0]] = check(*case, work, args.device, args.size)
        print(json.dumps({case[0]: record["results"][case[0]]}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
