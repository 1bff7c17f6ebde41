"""LoRA training and generation speed on the Stable Diffusion 1.5 architecture (random weights), against the floor
and against diffusers' own way of doing each, in the same process.

    python3 benchmarks/sd15.py --batch 8 --json sd15_b8.json                    # on a CUDA machine
    python3 benchmarks/sd15.py --no-reference --adapter A.safetensors --diffusers-compile --json sd15_gen.json
    python3 benchmarks/sd15.py --tiny --device cpu                               # the same code path, small

It builds an SD-1.5-shaped pipeline from configs (no download), saves it as a diffusers folder, trains through
the real `trainer.loop.train` at 512x512 in bf16 and reads the step times from the run's events.jsonl, counts
the FLOPs of one training step with torch's FlopCounterMode to give the compute floor at the measured matmul
rate, then times diffusers' example training step on the same model and batch (`speedup_vs_script` = ours over
theirs; benchmarks/reference.py says what that step does). Generation, through `adapters.runtime.Studio`: the
model with no adapter, one and two adapters unfused, one fused and no adapter again (the overheads over the mean of
the two no-adapter timings), a strength
change and a cold adapter load; then diffusers' pipeline with the adapter fused, and with `--diffusers-compile`
its UNet compiled (`gen_vs_compiled_diffusers` = their seconds over ours). The --json file is rewritten after each
measurement (`complete` stays false until the end), so a run stopped part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.reference import PROMPT, sync  # noqa: E402
from trainer.builtin.builder import assemble_pipeline  # noqa: E402


def sd15_unet_config(tiny: bool) -> dict:
    """UNet2DConditionModel's settings for the SD 1.5 architecture (or a small one of the same shape)."""
    if tiny:
        sizes = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, layers_per_block=1, sample_size=8)
    else:  # the published SD 1.5 shapes
        sizes = dict(
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2, sample_size=64
        )
    return dict(
        in_channels=4,
        out_channels=4,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **sizes,
    )


def build_sd15(tiny: bool):
    from diffusers import DDIMScheduler

    if tiny:
        te = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        vae = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16)
        size = 64
    else:  # the published SD 1.5 shapes
        te = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
        size = 512
    unet = {k: v for k, v in sd15_unet_config(tiny).items() if k not in ("in_channels", "out_channels")}
    pipe = assemble_pipeline(
        text=te,
        unet=unet,
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
    """trainer.step.compare_with_eager on this architecture: 30 steps eagerly twice and with CUDA graphs once (with
    --torch-compile on, the graph holds the compiled blocks)."""
    from diffusers import DDPMScheduler

    from adapters.base import load_pipeline
    from adapters.families import SD1
    from trainer.plan import channels_last_choice
    from trainer.step import compare_with_eager

    use_compile_regions(args)
    pipe = load_pipeline(str(model_dir), device=args.device, dtype=torch.bfloat16)
    unet, params = with_lora(pipe.unet, torch.device(args.device))
    result = compare_with_eager(
        unet,
        params,
        random_batches(unet, 30, args.batch, device=args.device),
        family=SD1,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        dtype=torch.bfloat16,
        torch_compile=args.torch_compile == "on",
        # as the trained run's plan resolves it (auto: channels-last where SD 1.x's step compiles)
        channels_last="on"
        if channels_last_choice(args.channels_last, "sd1", args.torch_compile == "on")[0]
        else "off",
    )
    del pipe, unet, params
    torch.cuda.empty_cache()
    return {f"compare_{k}": v for k, v in result.items()}


def time_generation(studio, strengths: dict | None, device: torch.device, steps: int = 30) -> float:
    """Median seconds of three `steps`-step pictures (guidance on) at `strengths`, after one warm-up picture.

    The warm-up draws the same adapters at strength 1, so the timed pictures also show that a strength change
    needs no new graph capture. `strengths` {}: no adapter active; None: leave the studio as it is (fused)."""
    warm = None if strengths is None else dict.fromkeys(strengths, 1.0)
    studio.generate(PROMPT, sampling_steps=steps, strengths=warm)
    times = []
    for seed in range(3):
        sync(device)
        t0 = time.perf_counter()
        studio.generate(PROMPT, sampling_steps=steps, seed=seed, strengths=strengths)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_header(args, device: torch.device) -> dict:
    """What every result file starts with: the command, the date and time, the machine and the run's shape."""
    import diffusers

    return {
        "script": Path(sys.argv[0]).stem,
        "command": " ".join(["python3", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "batch": args.batch,
        "channels_last": getattr(args, "channels_last", "auto"),  # the trainer's setting, as given
    }


class Record(dict):
    """A result dict that is rewritten to `path` (when given) after every update, with `complete` false until
    `finish()`: a run stopped part-way (a timeout, a crash) leaves what it had measured."""

    def __init__(self, path: Path | None, header: dict):
        super().__init__(header, complete=False)
        self.path = path
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            part = self.path.with_name(self.path.name + ".part")
            part.write_text(json.dumps(self, indent=1) + "\n")
            part.replace(self.path)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.save()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self.save()

    def attempt(self, name: str, measure) -> dict:
        """`measure()`'s fields, or `{name}_error` naming what went wrong (a reference failing loses nothing else)."""
        try:
            fields = measure()
        except Exception as exc:  # recorded, and the run goes on
            traceback.print_exc()
            fields = {f"{name}_error": f"{type(exc).__name__}: {exc}"}
        self.update(fields)
        return fields

    def finish(self) -> None:
        self["complete"] = True
        print(json.dumps(self, indent=1))


def saved_model(folder: Path, build, device: torch.device | None = None) -> Path:
    """`folder` holding the pipeline `build()` makes, saved once in fp16 (built on `device`, when given)."""
    if not (folder / "model_index.json").exists():
        with torch.device(device or "cpu"):  # random initialisation on a GPU is minutes faster at SDXL size
            pipe = build()
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        del pipe
        gc.collect()  # the built model leaves the GPU before anything is measured
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return folder


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `train_run` reads beyond a script's own (each script that calls it adds them here)."""
    parser.add_argument(
        "--torch-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="the trainer's --torch-compile (default: %(default)s, what a user gets)",
    )
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="the trainer's --channels-last (default: %(default)s, what a user gets)",
    )
    parser.add_argument(
        "--compile-regions",
        choices=("blocks", "models"),
        default="blocks",
        help="what --torch-compile compiles (trainer.step.COMPILE_REGIONS): blocks, the trainer's own (default), or "
        "models, larger regions to compare; such a result is marked `how` and the summary leaves it out",
    )


def use_compile_regions(args, results: dict | None = None) -> None:
    """Set the trainer's compiled regions for this process from --compile-regions; a result made with regions the
    trainer does not use by default says so (`how`)."""
    import trainer.step

    regions = getattr(args, "compile_regions", "blocks")
    trainer.step.COMPILE_REGIONS = regions
    if results is not None and regions != "blocks":
        results["how"] = f"--compile-regions {regions}: not the trainer's default compiled regions"


def train_run(args, model_dir: Path, data: Path, device: torch.device, results: Record, **options) -> Path:
    """Train through the real `trainer.loop.train`; records its steady speed, step kind and peak memory; returns the
    adapter file."""
    from trainer.config import TrainConfig
    from trainer.loop import train
    from trainer.runs import read_events, steady_step_seconds

    use_compile_regions(args, results)
    run_dir = args.work / f"run-{time.time():.0f}"
    config = TrainConfig(
        base_model=str(model_dir),
        data=str(data),
        steps=args.steps,
        batch_size=args.batch,
        rank=8,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        run_dir=str(run_dir),
        output=str(run_dir / "bench.safetensors"),
        cuda_graphs=args.cuda_graphs,
        torch_compile=args.torch_compile,
        channels_last=args.channels_last,
        **options,
    )
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        results["allocated_before_train_gib"] = torch.cuda.memory_allocated() / 2**30  # 0 unless something lingers
    limit_hits = []  # dynamo's warnings that a block's further shapes run eagerly (its recompile limit)

    class LimitHits(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                limit_hits.append(record.getMessage())

    logging.getLogger("torch._dynamo.convert_frame").addHandler(LimitHits())
    t0 = time.perf_counter()
    train(config, device=args.device, log_to_terminal=False)
    results["train_wall_s"] = time.perf_counter() - t0
    start = next(e for e in read_events(run_dir) if e["type"] == "start")
    notices = [e["message"] for e in read_events(run_dir) if e["type"] == "notice"]
    keys = ("step_kind", "step_why", "torch_compile", "gradient_checkpointing", "gradient_checkpointing_why")
    results.update({k: start[k] for k in keys if k in start}, notices=notices, adapter=config.output)
    if "channels_last" in start:  # the layout the step took (--channels-last auto resolved by the run's plan)
        results["channels_last_used"] = start["channels_last"]
    first = next(e for e in read_events(run_dir) if e["type"] == "progress")
    results["first_step_s"] = first["time"] - start["time"]  # the first step's capture (and compile, if any)
    if start.get("torch_compile"):  # how many block versions were compiled, and how many calls fell back to eager
        counters = torch._dynamo.utils.counters
        results.update(dynamo_frames_ok=counters["frames"]["ok"], dynamo_limit_hits=len(limit_hits))
    steady = steady_step_seconds(run_dir)
    results.update(train_step_s=steady, train_images_per_s=args.batch / steady)
    if device.type == "cuda":  # the run's own per-phase peaks (trainer/memory.py): torch's counters restart per phase
        memory = next(e for e in read_events(run_dir) if e["type"] == "done")["memory"]
        results["train_memory_by_phase"] = memory
        results["train_peak_memory_gib"] = max(memory["gpu_allocated_gib"].values())
        results["train_peak_reserved_gib"] = max(memory["gpu_reserved_gib"].values())
    return Path(config.output)


def script_reference(args, model_dir: Path, data: Path, size: int, results: Record) -> None:
    """diffusers' example training step (benchmarks/reference.py) on the same model and batch, and ours over it."""
    from benchmarks.reference import script_step_speed

    fields = results.attempt(
        "script",
        lambda: script_step_speed(
            model_dir,
            data,
            batch=args.batch,
            size=size,
            device=args.device,
            warmup=args.reference_warmup,
            steps=args.reference_steps,
        ),
    )
    if "script_images_per_s" in fields and "train_images_per_s" in results:
        results["speedup_vs_script"] = results["train_images_per_s"] / fields["script_images_per_s"]


def compiled_generation(
    model_dir: Path, adapter: Path, device_name: str, results: Record, plain_picture: np.ndarray, base: bool = True
) -> None:
    """Ours with the whole UNet through torch.compile, inside the generation graph: the first picture (which
    compiles, or reads the compile cache) with the adapter and (`base`) with none, the pixel distance from the
    uncompiled `plain_picture` (seed 0, strength 0.7), the 30-step time and a strength change."""
    from adapters.runtime import Studio, use_compile_cache
    from benchmarks.reference import free_memory

    device = torch.device(device_name)
    free_memory()
    cache = Path(use_compile_cache())
    results["studio_compile_cache_files_before"] = sum(1 for p in cache.rglob("*") if p.is_file())
    compiled = Studio(str(model_dir), device=device_name, compile_unet=True)
    compiled.load(adapter, name="bench")
    firsts = (("first_picture", {"bench": 0.7}), ("first_base_picture", {}))
    for key, strengths in firsts if base else firsts[:1]:
        t0 = time.perf_counter()
        compiled.generate(PROMPT, sampling_steps=30, strengths=strengths)
        sync(device)
        results[f"studio_compile_{key}_s"] = time.perf_counter() - t0
    results["studio_compile_failed"] = compiled._graphs.compile_failed
    picture = np.asarray(compiled.generate(PROMPT, sampling_steps=30, seed=0, strengths={"bench": 0.7})[0])
    # how far the compiled UNet's picture is from the uncompiled one's, in 8-bit levels (same seed, strength)
    results["compiled_vs_plain_max_diff"] = int(np.abs(picture.astype(int) - plain_picture.astype(int)).max())
    results["compiled_vs_plain_mean_diff"] = float(np.abs(picture.astype(float) - plain_picture).mean())
    results["generate_compiled_30_steps_s"] = time_generation(compiled, {"bench": 0.7}, device)
    if base:
        results["generate_compiled_base_30_steps_s"] = time_generation(compiled, {}, device)
        results["compiled_unfused_overhead"] = (
            results["generate_compiled_30_steps_s"] / results["generate_compiled_base_30_steps_s"] - 1
        )
    compiled.set_strengths({"bench": 0.7})
    sync(device)
    t0 = time.perf_counter()
    compiled.set_strengths({"bench": 0.4})
    sync(device)
    results["compiled_strength_change_ms"] = (time.perf_counter() - t0) * 1000
    del compiled
    free_memory()


def background_generation(
    model_dir: Path,
    adapter: Path,
    device_name: str,
    results: Record,
    plain_picture: np.ndarray,
    limit_s: float,
    gap_s: float = 0.0,
) -> None:
    """Ours with the compile in the background (`Studio(compile_unet=True, background_compile=True)`, what the page
    does on a CUDA GPU): the first picture (seed 0, strength 0.7), then 30-step pictures one after another while
    the worker compiles (each one's seconds; `gap_s` seconds apart, as a person would ask for them), the seconds
    from the first picture's end until the compile is done (at most `limit_s`), then the compiled 30-step time and
    the pixel distance from the uncompiled `plain_picture`."""
    from adapters.runtime import Studio
    from benchmarks.reference import free_memory

    device = torch.device(device_name)
    free_memory()
    studio = Studio(str(model_dir), device=device_name, compile_unet=True, background_compile=True)
    studio.load(adapter, name="bench")
    t0 = time.perf_counter()
    studio.generate(PROMPT, sampling_steps=30, seed=0, strengths={"bench": 0.7})
    sync(device)
    results["background_first_picture_s"] = time.perf_counter() - t0
    started, during = time.perf_counter(), []
    results["background_pictures_during_s"] = during
    while studio.compiling and time.perf_counter() - started < limit_s:
        time.sleep(gap_s)
        t0 = time.perf_counter()
        studio.generate(PROMPT, sampling_steps=30, seed=len(during) + 1, strengths={"bench": 0.7})
        sync(device)
        during.append(time.perf_counter() - t0)
        results["background_pictures_during_s"] = during  # written as it goes
    results["background_compile_ready_s"] = time.perf_counter() - started if not studio.compiling else None
    results["background_compile_failed"] = studio.compile_failed
    if studio.compiling:
        return
    picture = np.asarray(studio.generate(PROMPT, sampling_steps=30, seed=0, strengths={"bench": 0.7})[0])
    results["background_vs_plain_max_diff"] = int(np.abs(picture.astype(int) - plain_picture.astype(int)).max())
    results["generate_background_compiled_30_steps_s"] = time_generation(studio, {"bench": 0.7}, device)
    del studio
    free_memory()


def generation(args, model_dir: Path, adapter: Path, device: torch.device, results: Record) -> None:
    """Our runtime (`adapters.runtime.Studio`) with one adapter, a strength change and a cold load, and (--overheads)
    with no adapter, two unfused and one fused; then diffusers' pipeline with the adapter fused, eager and (with
    --diffusers-compile) compiled. Every picture: 30 steps, guidance, median of three after a warm-up."""
    from adapters.runtime import Studio

    if args.overheads and device.type == "cuda":  # the base model with its weights in the default layout
        plain = Studio(str(model_dir), device=args.device, channels_last=False)
        results["generate_base_contiguous_30_steps_s"] = time_generation(plain, {}, device)
        del plain
    studio = Studio(str(model_dir), device=args.device)
    if args.overheads:
        results["generate_base_30_steps_s"] = time_generation(studio, {}, device)  # no adapter ever loaded
    t0 = time.perf_counter()
    studio.load(adapter, name="bench")
    results["adapter_cold_load_s"] = time.perf_counter() - t0
    results["generate_30_steps_s"] = time_generation(studio, {"bench": 0.7}, device)
    results["lora_forward"] = studio.lora_forward_now  # how the adapter's layers ran ("merged" where they fit)
    changes = []
    for s in (0.1, 0.5, 0.9, 1.3, 0.2):
        sync(device)
        t0 = time.perf_counter()
        studio.set_strengths({"bench": s})
        sync(device)  # the merged weights are rewritten on the GPU: counted
        changes.append(time.perf_counter() - t0)
    results["strength_change_ms"] = 1000 * statistics.median(changes)
    if args.overheads:
        studio.load(adapter, name="second")  # the same file under a second name: two adapters' layers run
        two = time_generation(studio, {"bench": 0.7, "second": 0.5}, device)
        results["generate_two_adapters_30_steps_s"] = two
        for mode in ("packed", "peft"):  # the same two, then one, run packed and through peft's own layers
            studio.use_lora_forward(mode)
            two = time_generation(studio, {"bench": 0.7, "second": 0.5}, device)
            results[f"generate_two_adapters_{mode}_30_steps_s"] = two
            results[f"generate_{mode}_30_steps_s"] = time_generation(studio, {"bench": 0.7}, device)
        studio.use_lora_forward("auto")
        studio.unload("second")
        studio.fuse({"bench": 0.7})
        results["generate_fused_30_steps_s"] = time_generation(studio, None, device)
        studio.unfuse()
        # the base model again, last: the overheads are over the mean of the base's first and last timings, so a
        # card's drift over the minutes between them (clocks, heat) is not counted as an adapter's cost
        results["generate_base_again_30_steps_s"] = time_generation(studio, {}, device)
        base = (results["generate_base_30_steps_s"] + results["generate_base_again_30_steps_s"]) / 2
        results.update(
            unfused_overhead_one=results["generate_30_steps_s"] / base - 1,
            unfused_overhead_two=results["generate_two_adapters_30_steps_s"] / base - 1,
            fused_overhead=results["generate_fused_30_steps_s"] / base - 1,
            packed_overhead_one=results["generate_packed_30_steps_s"] / base - 1,
            packed_overhead_two=results["generate_two_adapters_packed_30_steps_s"] / base - 1,
            peft_overhead_one=results["generate_peft_30_steps_s"] / base - 1,
            peft_overhead_two=results["generate_two_adapters_peft_30_steps_s"] / base - 1,
        )
    plain_picture = np.asarray(studio.generate(PROMPT, sampling_steps=30, seed=0, strengths={"bench": 0.7})[0])
    del studio
    if args.studio_background:
        background_generation(
            model_dir, adapter, args.device, results, plain_picture, args.background_limit, args.background_gap
        )
    if args.studio_compile:
        compiled_generation(model_dir, adapter, args.device, results, plain_picture)
    if device.type == "cuda" and args.eager_generation:  # the same without the runtime's generation graphs
        eager = Studio(str(model_dir), device=args.device, cuda_graphs=False)
        eager.load(adapter, name="bench")
        results["generate_30_steps_eager_s"] = time_generation(eager, {"bench": 0.7}, device)
        del eager
    if not args.diffusers:
        return
    from benchmarks.reference import DiffusersGeneration, free_memory

    free_memory()
    made = []

    def fused():
        made.append(DiffusersGeneration(model_dir, adapter, strength=0.7, device=args.device))
        return {"diffusers_fused_30_steps_s": made[0].seconds()}

    fields = results.attempt("diffusers", fused)
    if "diffusers_fused_30_steps_s" in fields:
        results["gen_vs_diffusers_fused"] = fields["diffusers_fused_30_steps_s"] / results["generate_30_steps_s"]
    if made and args.diffusers_compile:

        def compiled():
            results.update(
                diffusers_compile_mode=args.compile_mode,
                diffusers_compile_first_picture_s=made[0].compile(args.compile_mode),
            )
            return {"diffusers_compiled_30_steps_s": made[0].seconds(warmup=2)}

        fields = results.attempt("diffusers_compiled", compiled)
        if "diffusers_compiled_30_steps_s" in fields:
            theirs = fields["diffusers_compiled_30_steps_s"]
            results["gen_vs_compiled_diffusers"] = theirs / results["generate_30_steps_s"]
            if "generate_compiled_30_steps_s" in results:
                results["gen_compiled_vs_compiled_diffusers"] = theirs / results["generate_compiled_30_steps_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes, to check the code path quickly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-studio-bench"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="write the results here (rewritten as they come)")
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="train with CUDA graphs"
    )
    add_train_arguments(parser)
    parser.add_argument(
        "--compare-graphs",
        action="store_true",
        help=(
            "first train 30 steps eagerly twice and with graphs (compiled with --torch-compile on) once;"
            " report how far apart the adapters are"
        ),
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="time generation with this adapter file (made for this model) instead of training one first",
    )
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time diffusers' example training step at the same batch (benchmarks/reference.py)",
    )
    parser.add_argument("--reference-warmup", type=int, default=5, help="reference steps before timing")
    parser.add_argument("--reference-steps", type=int, default=20, help="reference steps timed")
    parser.add_argument(
        "--flops", action=argparse.BooleanOptionalAction, default=True, help="count the step's FLOPs on the device"
    )
    parser.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True, help="time generation")
    parser.add_argument(
        "--overheads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the model with no adapter, two adapters and one fused (--no-overheads: one adapter only)",
    )
    parser.add_argument(
        "--eager-generation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU, also time our runtime with its generation graphs off",
    )
    parser.add_argument(
        "--diffusers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time diffusers' pipeline with the adapter fused (load_lora_weights + fuse_lora)",
    )
    parser.add_argument(
        "--diffusers-compile",
        action="store_true",
        help="and with its UNet through torch.compile (minutes on a GPU; the first picture timed apart)",
    )
    parser.add_argument(
        "--studio-compile",
        action="store_true",
        help="also time our runtime with the whole UNet through torch.compile (Studio(compile_unet=True)): the first "
        "picture with an adapter and the first without apart (they compile; TORCHINDUCTOR_CACHE_DIR or "
        "~/.cache/lora-studio/torchinductor keeps what is compiled for the next run), then 30-step pictures",
    )
    parser.add_argument(
        "--studio-background",
        action="store_true",
        help="also time our runtime compiling in the background (Studio(background_compile=True), the page's way on "
        "a GPU): the first picture, each picture drawn while it compiles, how long until it is done, then 30-step "
        "pictures",
    )
    parser.add_argument(
        "--background-limit", type=float, default=300.0, help="give the background compile at most this many seconds"
    )
    parser.add_argument(
        "--background-gap", type=float, default=0.0, help="seconds between the pictures drawn while it compiles"
    )
    parser.add_argument(
        "--compile-mode", default="reduce-overhead", help="torch.compile mode for --diffusers-compile"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.adapter is not None and not args.adapter.is_file():
        parser.error(f"--adapter {args.adapter}: no such file; give an adapter file trained for this model")

    results = Record(args.json, run_header(args, device))
    size = 64 if args.tiny else 512
    results.update(resolution=size, cuda_graphs=args.cuda_graphs and device.type == "cuda")
    model_dir = saved_model(
        args.work / ("sd15-tiny" if args.tiny else "sd15"), lambda: build_sd15(args.tiny)[0], device
    )
    data = args.work / "data"
    write_data(data, size)

    adapter = args.adapter
    if adapter is None:  # training through the real loop; speed from its own event log, past the first 10 steps
        if args.compare_graphs:
            results.update(compare_graphs(model_dir, args))
        adapter = train_run(args, model_dir, data, device, results)
        if args.flops:
            flops = step_flops(model_dir, size, args.batch, device)
            rate = matmul_rate(device)
            results.update(
                step_tflop=flops / 1e12,
                matmul_tflops=rate / 1e12,
                floor_step_s=flops / rate,
                fraction_of_floor=(flops / rate) / results["train_step_s"],
            )
        if args.reference:
            script_reference(args, model_dir, data, size, results)
    if args.generate:
        generation(args, model_dir, adapter, device, results)
    results.finish()


if __name__ == "__main__":
    main()
