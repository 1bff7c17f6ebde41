"""LoRA training and generation on the SDXL base 1.0 architecture (random weights) at 1024x1024.

    python benchmarks/sdxl.py --batch 1 --json sdxl_b1.json                         # on a CUDA machine
    python benchmarks/sdxl.py --batch 1 --gradient-checkpointing on --json ...      # less memory
    python benchmarks/sdxl.py --batch 1 --gpu-memory 8 --gradient-checkpointing auto --generate  # an 8 GB card
    python benchmarks/sdxl.py --batch 1 --no-reference --generate --studio-compile  # and through torch.compile
    python benchmarks/sdxl.py --batch 4 --no-reference --torch-compile on          # train with compiled blocks
    python benchmarks/sdxl.py --tiny --device cpu                                   # the code path, small

It builds an SDXL-shaped pipeline from the published sizes (no download), saves it once as a diffusers folder
in fp16, trains through the real `trainer.loop.train` in bf16 (speed from its events.jsonl after step 10, peak
GPU memory over the whole run: loading, caching and training), times diffusers' SDXL example training step on the
same model and batch (`speedup_vs_script`; benchmarks/reference.py), then optionally 30-step generation. The
--json file is rewritten after each measurement, so a run stopped part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.reference import PROMPT  # noqa: E402
from benchmarks.sd15 import (  # noqa: E402
    Record,
    add_train_arguments,
    compiled_generation,
    run_header,
    saved_model,
    script_reference,
    time_generation,
    train_run,
    write_data,
)


def sdxl_unet_config(tiny: bool) -> dict:
    """UNet2DConditionModel's settings for the SDXL base 1.0 architecture (or a small one of the same shape)."""
    if tiny:
        sizes = dict(
            block_out_channels=(32, 64, 64),
            transformer_layers_per_block=(1, 1, 1),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            layers_per_block=1,
            sample_size=8,
            norm_num_groups=16,
        )
    else:  # the published SDXL base 1.0 shapes
        sizes = dict(
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            layers_per_block=2,
            sample_size=128,
        )
    return dict(
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        addition_embed_type="text_time",
        **sizes,
    )


def build_sdxl(tiny: bool):
    """The SDXL base 1.0 architecture (or a small one of the same shape) with random weights."""
    from diffusers import EulerDiscreteScheduler

    from trainer.builtin.builder import assemble_pipeline

    if tiny:
        te = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        te2 = dict(te, projection_dim=32)
        vae = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64)
        size = 64
    else:  # the published SDXL base 1.0 shapes
        te = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        te2 = dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
        )
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)
        size = 1024
    unet = {k: v for k, v in sdxl_unet_config(tiny).items() if k not in ("in_channels", "out_channels")}
    pipe = assemble_pipeline(
        text=te,
        text_2=te2,
        unet=unet,
        vae=dict(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.13025,
            force_upcast=True,
            **vae,
        ),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        vocab_size=49408,
    )
    return pipe, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes, to check the code path quickly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-studio-bench"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", default="off", choices=("auto", "on", "off"))
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    add_train_arguments(parser)
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=0.0,
        help="the trainer's --gpu-memory: plan for, and hold the training to, a card of this many GiB (0: all)",
    )
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time diffusers' SDXL example training step at the same batch (benchmarks/reference.py)",
    )
    parser.add_argument("--reference-warmup", type=int, default=3, help="reference steps before timing")
    parser.add_argument("--reference-steps", type=int, default=10, help="reference steps timed")
    parser.add_argument("--generate", action="store_true", help="also time 30-step generation at the native size")
    parser.add_argument(
        "--studio-compile",
        action="store_true",
        help="with --generate: also generate with the whole UNet through torch.compile (the first picture compiles)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here (rewritten as they come)")
    args = parser.parse_args()
    device = torch.device(args.device)

    results = Record(args.json, run_header(args, device))
    model_dir = saved_model(
        args.work / ("sdxl-tiny" if args.tiny else "sdxl"), lambda: build_sdxl(args.tiny)[0], device
    )
    size = 64 if args.tiny else 1024
    results.update(resolution=size, gpu_memory=args.gpu_memory)
    data = args.work / f"data-{size}"
    write_data(data, size)
    adapter = train_run(
        args,
        model_dir,
        data,
        device,
        results,
        gradient_checkpointing=args.gradient_checkpointing,
        gpu_memory=args.gpu_memory,
    )
    if args.reference:
        script_reference(args, model_dir, data, size, results)
    if args.generate:
        from adapters.runtime import Studio

        studio = Studio(str(model_dir), device=args.device)
        studio.load(adapter, name="bench")
        results["generate_30_steps_s"] = time_generation(studio, {"bench": 0.7}, device)
        if args.studio_compile:
            plain = np.asarray(studio.generate(PROMPT, sampling_steps=30, seed=0, strengths={"bench": 0.7})[0])
            del studio
            compiled_generation(model_dir, adapter, args.device, results, plain, base=False)
    results.finish()


if __name__ == "__main__":
    main()
