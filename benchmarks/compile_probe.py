"""Does regional torch.compile speed up the training step, with and without a CUDA graph around it? (issue 18)

    python benchmarks/compile_probe.py --json compile_probe.json          # on a CUDA machine, SD 1.5 shapes
    python benchmarks/compile_probe.py --tiny                             # anywhere: the same code, small

The SD 1.5 UNet (random weights, bf16, LoRA rank 8 on attn1 + attn2, fp32 LoRA under bf16 autocast, fused AdamW)
steps on random batches four ways: eager; eager with each repeated block (every BasicTransformerBlock and
ResnetBlock2D) compiled in place (`module.compile()`, regional: blocks of one class and shape share their compiled
code); the forward and backward replayed as a CUDA graph (what the trainer does); and the compiled blocks inside
that graph. Every way runs the LoRA layers as the trainer's step does, without peft's casts of their inputs to
fp32 (`trainer.step.uncast_lora_layers`); `graph_b*_peft_casts_s` is the graph step with them, for comparison.
Each way's seconds per step (steady, after warm-up), the compile time (the first compiled step's extra
seconds) and, for the compiled ways, the relative distance of the LoRA gradients from eager's at the same weights
and batch (two eager passes: `eager_vs_eager_grad_distance`) are written to --json after each measurement. The
LoRA B matrices are made non-zero first (peft starts them at zero, which leaves every A gradient zero), and the
weights and the optimiser are put back after each timing, so that every gradient is taken at the same weights.

An earlier version of this probe took the eager gradients before the timed steps and the compiled ones after them,
at weights 20-odd AdamW steps apart: its "0.84 relative distance" (2026-12-04, CPU, tiny shapes) measured that, not
the compiler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gen_profile import kernel_table  # noqa: E402
from benchmarks.sd15 import build_sd15, with_lora  # noqa: E402
from trainer.step import lora_inputs_uncast, region_classes, room_for_versions, uncast_lora_layers  # noqa: E402
from trainer.step import relative_distance as distance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="the small test shapes, on the CPU if no GPU")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: tracing only, fast)")
    parser.add_argument(
        "--blocks",
        default="both",
        choices=["both", "transformer", "resnet", "models", "unet"],
        help="what to compile: both (the trainer's: every BasicTransformerBlock and ResnetBlock2D), transformer, "
        "resnet, models (larger regions: each Transformer2DModel with its GroupNorm, projections and layout changes, "
        "each ResnetBlock2D, Downsample2D and Upsample2D), unet (the whole UNet as one module, not regional)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="the UNet and the latents in channels_last, in every way timed"
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="also profile one step eagerly (and compiled, without the graph) and record the GPU time's share per "
        "kernel kind (attention, conv, matmul, norm, triton, copy, elementwise) and the 25 costliest kernels",
    )
    parser.add_argument("--fp32", action="store_true", help="frozen UNet in fp32, no autocast (exact comparisons)")
    parser.add_argument(
        "--sdpa",
        action="store_true",
        help="also time the graph step with each attention kernel forced (flash, efficient, cudnn; CUDA only), "
        "and its LoRA gradients' distance from the default kernel's",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="time the compiled blocks (minutes)"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    pipe, size = build_sd15(tiny=args.tiny or not cuda)
    dim = pipe.unet.config.cross_attention_dim
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    unet, params = with_lora(pipe.unet, device, dtype)
    layouts = [torch.channels_last if args.channels_last else torch.contiguous_format]  # [0]: the one in use
    unet.to(memory_format=layouts[0])
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.02)
    snapshot = [p.detach().clone() for p in params]
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert [p for _, p in named] == list(params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

    def restore() -> None:
        """The LoRA weights as they were before any step, a fresh optimiser state."""
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)
        optimizer.state.clear()

    results: dict = {
        "command": " ".join(["python3", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "backend": args.backend,
        "blocks": args.blocks,
        "dtype": str(dtype),
        "channels_last": args.channels_last,
    }

    def save() -> None:
        print(json.dumps(results), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def inputs(batch: int, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        latents = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype, generator=gen)
        latents = latents.contiguous(memory_format=layouts[0])
        emb = torch.randn(batch, 77, dim, device=device, dtype=dtype, generator=gen)
        timesteps = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        return latents, timesteps, emb

    uncast = uncast_lora_layers(unet, dtype)  # as the trainer's step: peft's input casts left out under autocast
    peft_casts = [False]  # True: peft's own way, for `graph_b*_peft_casts_s`

    def forward_backward(latents, timesteps, emb):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)
        with autocast, lora_inputs_uncast([] if peft_casts[0] else uncast):
            loss = unet(latents, timesteps, emb).sample.float().pow(2).mean()
        loss.backward()

    def gradients(batch: int) -> list[torch.Tensor]:
        optimizer.zero_grad(set_to_none=False)
        forward_backward(*inputs(batch, seed=7))
        return [p.grad.detach().clone() for p in params]

    def eager_step(batch: int):
        data = inputs(batch)

        def run():
            optimizer.zero_grad(set_to_none=False)
            forward_backward(*data)
            optimizer.step()

        return run

    def graph_step(batch: int):
        """fwd + bwd captured once as a CUDA graph on static inputs, replayed; the optimiser outside it."""
        static = inputs(batch)
        optimizer.zero_grad(set_to_none=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=False)
                forward_backward(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            forward_backward(*static)

        def run():
            graph.replay()
            optimizer.step()

        return run

    def forced(backend: str):
        """The attention kernel forced to `backend` (torch.nn.attention.SDPBackend's name) while it is open."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, backend))

    def timed(run) -> float:
        for _ in range(3):
            run()
        sync()
        start = time.perf_counter()
        for _ in range(args.repeat):
            run()
        sync()
        seconds = (time.perf_counter() - start) / args.repeat
        restore()
        return seconds

    def kernel_profile(run) -> dict:
        """GPU time of one step by kernel kind and its costliest kernels (`gen_profile.kernel_table`)."""
        table = kernel_table(run, device)
        restore()
        return table

    batches = [int(b) for b in args.batches.split(",")]
    reference = {b: gradients(b) for b in batches}
    again = gradients(batches[0])
    results["eager_vs_eager_grad_distance"] = distance(again, reference[batches[0]])
    for batch in batches:
        results[f"eager_b{batch}_s"] = timed(eager_step(batch))
        save()
        if args.kernels and cuda:
            results[f"kernels_eager_b{batch}"] = kernel_profile(eager_step(batch))
            save()
        if cuda:
            results[f"graph_b{batch}_s"] = timed(graph_step(batch))
            save()
        if cuda and uncast:  # the same graph step with peft's casts of each LoRA layer's input, in this process
            peft_casts[0] = True
            results[f"graph_b{batch}_peft_casts_s"] = timed(graph_step(batch))
            peft_casts[0] = False
            save()
        if cuda and args.channels_last:  # the plain layout's graph step in the same process, for comparison
            layouts[0] = torch.contiguous_format
            unet.to(memory_format=layouts[0])
            results[f"graph_b{batch}_contiguous_s"] = timed(graph_step(batch))
            layouts[0] = torch.channels_last
            unet.to(memory_format=layouts[0])
            save()

    if args.sdpa and cuda:
        for batch in batches:
            for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
                name = backend.split("_")[0].lower()
                try:
                    with forced(backend):  # the kernel is chosen as the graph is captured; replays keep it
                        results[f"graph_b{batch}_sdpa_{name}_s"] = timed(graph_step(batch))
                        results[f"sdpa_{name}_grad_distance_b{batch}"] = distance(gradients(batch), reference[batch])
                except Exception as exc:  # a kernel this GPU or these shapes do not have
                    results[f"graph_b{batch}_sdpa_{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                restore()
                save()
    if not args.compile:
        save()
        return

    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    kinds = {  # "both" and "models": what the trainer compiles for its regions "blocks" and "models"
        "both": region_classes("blocks"),
        "transformer": (BasicTransformerBlock,),
        "models": region_classes("models"),
    }
    if args.blocks == "unet":
        blocks = [unet]
    else:
        blocks = [m for m in unet.modules() if isinstance(m, kinds.get(args.blocks, (ResnetBlock2D,)))]
    for block in blocks:
        block.compile(backend=args.backend)
    room_for_versions(len(blocks))  # as the trainer does; the runs of 2026-12-05 to 07 hit the limit
    results["compiled_blocks"] = len(blocks)
    for batch in batches:
        restore()
        start = time.perf_counter()
        compiled = gradients(batch)
        sync()
        results[f"compile_first_step_b{batch}_s"] = time.perf_counter() - start
        results[f"compiled_grad_distance_b{batch}"] = distance(compiled, reference[batch])
        results[f"compiled_vs_compiled_grad_distance_b{batch}"] = distance(gradients(batch), compiled)
        each = sorted(
            ((distance([c], [r]), name) for (name, _), c, r in zip(named, compiled, reference[batch])), reverse=True
        )
        results[f"compiled_grad_distance_b{batch}_worst"] = [[round(d, 4), n] for d, n in each[:3]]
        results[f"compiled_grad_distance_b{batch}_median_param"] = each[len(each) // 2][0]
        results[f"compiled_b{batch}_s"] = timed(eager_step(batch))
        save()
        if args.kernels and cuda:
            results[f"kernels_compiled_b{batch}"] = kernel_profile(eager_step(batch))
            save()
        if cuda:
            try:
                results[f"compiled_graph_b{batch}_s"] = timed(graph_step(batch))
            except Exception as exc:  # a capture that fails is a finding too
                results[f"compiled_graph_b{batch}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            save()
    save()


if __name__ == "__main__":
    main()
