"""LoRA training and generation speed on the Stable Diffusion 1.5 architecture (random weights), against the floor.

    python benchmarks/sd15.py --json benchmarks/sd15.json          # on a CUDA machine
    python benchmarks/sd15.py --tiny --device cpu                  # the same code path, small, for a check

It builds an SD-1.5-shaped pipeline from configs (no download), saves it as a diffusers folder, trains through
the real `trainer.loop.train` at 512x512 in bf16 and reads the step times from the run's events.jsonl, counts
the FLOPs of one training step with torch's FlopCounterMode to give the compute floor at the measured matmul
rate, then times generation, a strength change and a cold adapter load through `adapters.runtime.Studio`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.builtin.builder import assemble_pipeline  # noqa: E402


def build_sd15(tiny: bool):
    from diffusers import DDIMScheduler

    if tiny:
        te = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        unet = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, layers_per_block=1)
        vae = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16)
        size = 64
    else:  # the published SD 1.5 shapes
        te = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        unet = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2)
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
        size = 512
    pipe = assemble_pipeline(
        text=te,
        unet=dict(
            sample_size=size // 8,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            **unet,
        ),
        vae=dict(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=size,
            scaling_factor=0.18215,
            **vae,
        ),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        vocab_size=49408,
    )
    return pipe, size


def with_lora(unet, device, dtype=torch.bfloat16):
    """The UNet frozen in `dtype` on `device`, with rank-8 LoRA on attn1 + attn2 in fp32, as the trainer sets it up.

    Returns the UNet (in train mode) and its LoRA parameters."""
    from adapters.lora import attach, attention_targets, train_in_fp32

    unet = unet.to(device, dtype).requires_grad_(False)
    attach(unet, attention_targets(unet, "both"), 8, 8)
    return unet.train(), train_in_fp32(unet)


def write_data(folder: Path, size: int, count: int = 16) -> None:
    from PIL import Image

    from trainer.builtin.scenes import render, sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(count)]
    for i, (s, px) in enumerate(zip(scenes, render(scenes, size=size, style="neon"))):
        Image.fromarray(px.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(s.caption)


def step_flops(model_dir: Path, size: int, batch: int, device) -> float:
    """FLOPs of one LoRA training step (UNet forward + backward), counted by torch on the real modules."""
    from torch.utils.flop_counter import FlopCounterMode

    from adapters.base import load_pipeline

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(str(model_dir), device=device, dtype=dtype)
    unet, _ = with_lora(pipe.unet, device, dtype)
    lat = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=unet.dtype)
    emb = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        unet(lat, t, emb).sample.float().pow(2).mean().backward()
    del pipe, unet
    return float(counter.get_total_flops())


def matmul_rate(device) -> float:
    """Measured bf16 matmul rate (FLOP/s) on this device: the ceiling the floor is computed against."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000)


def random_batches(unet, count: int, batch: int, seed: int = 0, device="cuda") -> list[dict]:
    """`count` training batches of random latents, noise, timesteps and text embeddings shaped for `unet`."""
    gen = torch.Generator().manual_seed(seed)
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    return [
        {
            "latents": torch.randn(batch, 4, side, side, generator=gen).to(device),
            "noise": torch.randn(batch, 4, side, side, generator=gen).to(device),
            "timesteps": torch.randint(0, 1000, (batch,), generator=gen).to(device),
            "cond": {"text_embeds": torch.randn(batch, 77, width, generator=gen).to(device)},
        }
        for _ in range(count)
    ]


def compare_graphs(model_dir: Path, args) -> dict:
    """trainer.step.compare_with_eager on this architecture: 30 steps eagerly twice and with CUDA graphs once."""
    from diffusers import DDPMScheduler

    from adapters.base import load_pipeline
    from adapters.families import SD1
    from trainer.step import compare_with_eager

    pipe = load_pipeline(str(model_dir), device=args.device, dtype=torch.bfloat16)
    unet, params = with_lora(pipe.unet, torch.device(args.device))
    result = compare_with_eager(
        unet,
        params,
        random_batches(unet, 30, args.batch, device=args.device),
        family=SD1,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        dtype=torch.bfloat16,
    )
    del pipe, unet, params
    torch.cuda.empty_cache()
    return {f"compare_{k}": v for k, v in result.items()}


def time_generation(studio, adapter: str, device: torch.device) -> float:
    """Median seconds of three 30-step pictures (guidance on, the adapter at 0.7), after one warm-up picture."""
    studio.generate("a red circle", sampling_steps=30, strengths={adapter: 1.0})
    times = []
    for seed in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        studio.generate("a red circle", sampling_steps=30, seed=seed, strengths={adapter: 0.7})
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_header(args, device: torch.device) -> dict:
    """What every result file starts with: the command, the date, the machine and the run's shape."""
    return {
        "command": " ".join(["python3", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "batch": args.batch,
    }


def saved_model(folder: Path, build, device: torch.device | None = None) -> Path:
    """`folder` holding the pipeline `build()` makes, saved once in fp16 (built on `device`, when given)."""
    if not (folder / "model_index.json").exists():
        with torch.device(device or "cpu"):  # random initialisation on a GPU is minutes faster at SDXL size
            pipe = build()
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        del pipe
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes, to check the code path quickly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-studio-bench"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="train with CUDA graphs"
    )
    parser.add_argument(
        "--compare-graphs",
        action="store_true",
        help="first train 30 steps eagerly twice and with graphs once; report how far apart the adapters are",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    from adapters.runtime import Studio
    from trainer.config import TrainConfig
    from trainer.loop import train
    from trainer.runs import steady_step_seconds

    results = run_header(args, device)
    size = 64 if args.tiny else 512
    results["resolution"] = size
    results["cuda_graphs"] = args.cuda_graphs and device.type == "cuda"
    model_dir = saved_model(args.work / ("sd15-tiny" if args.tiny else "sd15"), lambda: build_sd15(args.tiny)[0])
    write_data(args.work / "data", size)

    # Training through the real loop; the speed is taken from its own event log, past the first 10 steps.
    run_dir = args.work / f"run-{time.time():.0f}"
    config = TrainConfig(
        base_model=str(model_dir),
        data=str(args.work / "data"),
        steps=args.steps,
        batch_size=args.batch,
        rank=8,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        run_dir=str(run_dir),
        output=str(run_dir / "bench.safetensors"),
        cuda_graphs=args.cuda_graphs,
    )
    if args.compare_graphs:
        results.update(compare_graphs(model_dir, args))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(config, device=args.device, log_to_terminal=False)
    steady = steady_step_seconds(run_dir)
    results["train_step_s"] = steady
    results["train_images_per_s"] = args.batch / steady
    if device.type == "cuda":
        results["train_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    flops = step_flops(model_dir, size, args.batch, device)
    rate = matmul_rate(device)
    results.update(
        step_tflop=flops / 1e12,
        matmul_tflops=rate / 1e12,
        floor_step_s=flops / rate,
        fraction_of_floor=(flops / rate) / steady,
    )

    # Generation: 30 steps, CFG 7.5, median of 3 after a warm-up; strength change; cold adapter load.
    studio = Studio(str(model_dir), device=args.device)
    t0 = time.perf_counter()
    studio.load(config.output, name="bench")
    results["adapter_cold_load_s"] = time.perf_counter() - t0
    results["generate_30_steps_s"] = time_generation(studio, "bench", device)
    if device.type == "cuda":  # the same without the runtime's generation graphs
        eager = Studio(str(model_dir), device=args.device, cuda_graphs=False)
        eager.load(config.output, name="bench")
        results["generate_30_steps_eager_s"] = time_generation(eager, "bench", device)
        del eager
    changes = []
    for s in (0.1, 0.5, 0.9, 1.3, 0.2):
        t0 = time.perf_counter()
        studio.set_strengths({"bench": s})
        changes.append(time.perf_counter() - t0)
    results["strength_change_ms"] = 1000 * statistics.median(changes)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
