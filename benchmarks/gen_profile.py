"""Where one generated picture's time goes, and what each lever on the denoising step would save (issue 18: SD 1.5,
512, 30 steps with guidance, goal 0.25 s; SDXL, 1024, goal 1.0 s), measured in one process on one GPU, random weights
of the real shapes.

    python3 benchmarks/gen_profile.py --json out.json [--compile] [--arch sdxl]
    python3 benchmarks/gen_profile.py --tiny --device cpu       # the same path with tiny shapes (checks the script)

Fields:
- picture_30_steps_s: `Studio.generate`, no adapter, median of three; text_encode_ms, vae_decode_ms: those parts
  of a picture alone (the prompt and the empty negative prompt; one 64x64 latent decoded); text_encode_eager_ms:
  the prompts encoded without the runtime's text encoder graphs. With --compile also vae_decode_compiled_ms (the
  decoder through torch.compile, as a compiled studio runs it), vae_compile_s (its first call) and
  vae_compiled_max_levels (its largest difference from the uncompiled picture, in 8-bit levels).
- unet_ms: one UNet call at batch 2 (the two guidance branches), {variant: {"eager": ms, "graphed": ms}}, each the
  median over repeated calls: "default" (what `Studio` runs), "channels_last", "fused_qkv" (diffusers'
  `fuse_qkv_projections`: q, k, v as one product), "sdpa_<backend>" (flash, efficient, cudnn: the attention kernel
  forced), and with --compile "compiled" (the whole UNet through `torch.compile`, then captured; compile_s says
  how long the first call took); then picture_30_steps_compiled_s, a picture as a studio with compiling on draws it
  (median of three after first_compiled_picture_s, the one that compiles).
- kernels: the 25 kernels that took the most GPU time in one eager default call, and the share of GPU time by
  kind (attention, triton, conv, matmul, norm, copy, elementwise, other).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference import PROMPT, median_seconds, sync  # noqa: E402
from benchmarks.sd15 import build_sd15, saved_model  # noqa: E402


def median_ms(call, device, repeats: int) -> float:
    return 1000 * median_seconds(call, device, repeats)


def graphed(call):
    """`call` captured as a CUDA graph as the runtime captures (`adapters.runtime.captured`); returns the replay."""
    from adapters.runtime import captured

    return captured(call)[0].replay


def kind_of(name: str) -> str:
    """A CUDA kernel's kind from its name (cuDNN, cuBLAS, flash-attention and triton naming). Attention first:
    cuDNN's attention kernels are named `..._sdpa_..._fprop_...`."""
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if low.startswith("triton"):
        return "triton"
    if any(k in low for k in ("fprop", "conv", "dgrad", "wgrad", "implicit", "winograd")):
        return "conv"
    if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas", "splitk", "sm90", "sm80")):
        return "matmul"
    if "norm" in low:
        return "norm"
    if any(k in low for k in ("copy", "transpose", "nchw", "nhwc", "memcpy", "memset", "cat")):
        return "copy"
    if any(k in low for k in ("elementwise", "reduce", "vectorized", "foreach", "adam")):
        return "elementwise"
    return "other"


def kernel_table(call, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    call()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        sync(device)
    rows = []
    for e in prof.key_averages():
        gpu = getattr(e, "self_device_time_total", None)
        if gpu is None:
            gpu = getattr(e, "self_cuda_time_total", 0)
        if gpu and getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            rows.append((gpu, e.count, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1.0
    shares: dict[str, float] = {}
    for gpu, _, key in rows:
        shares[kind_of(key)] = shares.get(kind_of(key), 0.0) + gpu / total
    return {
        "gpu_ms": total / 1000,
        "share": {k: round(v, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
        "top": [{"ms": round(g / 1000, 3), "calls": c, "kind": kind_of(k), "name": k[:120]} for g, c, k in rows[:25]],
    }


def compiled_picture(studio, results: dict, device) -> None:
    """A whole picture as `Studio(compile_unet=True)` draws it: the UNet compiled inside its graph, the decoder
    compiled (the first picture compiles the UNet; the decoder was compiled for vae_decode_compiled_ms)."""
    studio.use_compile(True)
    t0 = time.perf_counter()
    studio.generate(PROMPT, sampling_steps=30)
    results["first_compiled_picture_s"] = time.perf_counter() - t0
    results["picture_30_steps_compiled_s"] = (
        median_ms(lambda: studio.generate(PROMPT, sampling_steps=30), device, 3) / 1000
    )
    results["compile_failed"] = studio.compile_failed


def encode(pipe, device):
    """The prompt and its empty negative prompt, as a picture encodes them (SD 1.x: two embeddings; SDXL: also the
    two pooled ones)."""
    return pipe.encode_prompt(
        prompt=PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-studio-gen-profile"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--compile", action="store_true", help="also the whole UNet through torch.compile")
    parser.add_argument(
        "--levers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the UNet call under each lever and list its kernels (--no-levers: the picture, its parts and,"
        " with --compile, the compiled decoder and a compiled studio's picture only)",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from adapters.runtime import Studio

    device = torch.device(args.device)
    results: dict = {
        "script": "gen_profile",
        "command": " ".join(["python3", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": args.arch,
    }

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    if args.arch == "sdxl":
        from benchmarks.sdxl import build_sdxl

        build = build_sdxl
    else:
        build = build_sd15
    folder = f"{args.arch}-tiny" if args.tiny else args.arch
    model_dir = saved_model(args.work / folder, lambda: build(args.tiny)[0], device)
    studio = Studio(str(model_dir), device=args.device)
    pipe, size = studio.pipe, studio.native_size
    studio.generate(PROMPT, sampling_steps=30)
    results["picture_30_steps_s"] = median_ms(lambda: studio.generate(PROMPT, sampling_steps=30), device, 3) / 1000
    with torch.no_grad():  # as in a picture: the runtime's text encoder graphs replay only without gradients
        results["text_encode_ms"] = median_ms(lambda: encode(pipe, device), device, 5)
        for graphs in studio._text_graphs:  # the same without the encoders' graphs (a set `failed` runs them eagerly)
            graphs.failed = "timed eagerly"
        results["text_encode_eager_ms"] = median_ms(lambda: encode(pipe, device), device, 5)
        for graphs in studio._text_graphs:
            graphs.failed = ""
    scale = pipe.vae_scale_factor
    latent = torch.randn(1, 4, size // scale, size // scale, device=device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        results["vae_decode_ms"] = median_ms(lambda: pipe.vae.decode(latent), device, 5)
        if args.compile:  # the decoder as `Studio(compile_unet=True)` runs it
            plain = pipe.vae.decode(latent).sample.float()
            studio._decoder.use_compile(True)
            t0 = time.perf_counter()
            compiled = pipe.vae.decode(latent).sample.float()
            sync(device)
            results["vae_compile_s"] = time.perf_counter() - t0
            results["vae_decode_compiled_ms"] = median_ms(lambda: pipe.vae.decode(latent), device, 5)
            # in 8-bit levels of the picture ([-1, 1] -> 0..255)
            results["vae_compiled_max_levels"] = float((compiled - plain).abs().max()) * 127.5
            studio._decoder.use_compile(False)
    save()

    unet = pipe.unet
    forward = type(unet).forward  # the UNet's own forward, not the runtime's graphs
    with torch.no_grad():
        context = encode(pipe, device)
    states = torch.cat([context[1], context[0]])
    extra = {}  # SDXL's UNet also reads the pooled prompts and the picture's size and crop
    if args.arch == "sdxl":
        pooled = torch.cat([context[3], context[2]])
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=unet.dtype)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    sample = torch.randn(2, 4, size // scale, size // scale, device=device, dtype=unet.dtype)
    timestep = torch.tensor(500, device=device)

    def unet_call(model=unet, x=None):
        x = sample if x is None else x
        return lambda: forward(model, x, timestep, states, return_dict=False, **extra)

    def measure(name: str, call, enter=None) -> None:
        try:
            with torch.no_grad(), enter() if enter else contextlib.nullcontext():
                row = {"eager": median_ms(call, device, args.repeats)}
                if device.type == "cuda":
                    replay = graphed(call)
                    row["graphed"] = median_ms(replay, device, args.repeats)
        except Exception as exc:  # a backend this card or build lacks: recorded, the rest goes on
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        results.setdefault("unet_ms", {})[name] = row
        print(name, row, flush=True)
        save()

    measure("default", unet_call())
    if args.levers:
        with torch.no_grad():
            results["kernels"] = kernel_table(unet_call(), device) if device.type == "cuda" else {}
        save()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            measure(
                f"sdpa_{backend.split('_')[0].lower()}",
                unet_call(),
                lambda b=backend: sdpa_kernel(getattr(SDPBackend, b)),
            )
        unet.fuse_qkv_projections()
        measure("fused_qkv", unet_call())
        unet.unfuse_qkv_projections()
        studio_format = (  # what the studio holds (channels-last on CUDA), put back after the channels-last measure
            torch.channels_last
            if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        unet.to(memory_format=torch.channels_last)
        measure("channels_last", unet_call(x=sample.to(memory_format=torch.channels_last)))
        unet.to(memory_format=studio_format)
        if args.compile:
            compiled = torch.compile(
                lambda x: forward(unet, x, timestep, states, return_dict=False, **extra), fullgraph=True
            )
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(sample)
            sync(device)
            results["compile_s"] = time.perf_counter() - t0
            measure("compiled", lambda: compiled(sample))
    if args.compile:
        compiled_picture(studio, results, device)
    results["complete"] = True
    save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
