"""Where the time of one LoRA training step goes on the SD 1.5 architecture (random weights), on a CUDA machine.

    python benchmarks/step_profile.py --json step_profile.json

Times the bare UNet forward + backward with LoRA on attn1/attn2 (bf16 autocast, as the trainer runs it) at
several batch sizes, the same with channels_last, with CUDA-graph-free torch.compile, one fsync'd event
line, and prints torch.profiler's top CPU-side operators for one step. Numbers, not conclusions: the README
quotes what a run of this printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sd15 import build_sd15, with_lora  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int = 3, repeat: int = 10) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (takes minutes)")
    args = parser.parse_args()
    tiny = not torch.cuda.is_available()  # on a machine without CUDA: the same code path, small, for a check
    device = torch.device("cpu" if tiny else "cuda")
    pipe, size = build_sd15(tiny=tiny)
    dim = pipe.unet.config.cross_attention_dim
    unet, params = with_lora(pipe.unet, device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    name = "cpu (tiny)" if tiny else torch.cuda.get_device_name(device)
    results: dict = {"device": name, "torch": torch.__version__}

    def step_fn(model, batch: int, channels_last: bool = False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        lat = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=torch.bfloat16).to(memory_format=fmt)
        emb = torch.randn(batch, 77, dim, device=device, dtype=torch.bfloat16)
        t = torch.randint(0, 1000, (batch,), device=device)

        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(lat, t, emb).sample.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    for batch in (1, 4, 8):
        results[f"step_s_b{batch}"] = timed(step_fn(unet, batch))
        print(batch, results[f"step_s_b{batch}"], flush=True)
    with torch.no_grad():
        results["forward_only_s_b1"] = timed(lambda: unet(*step_fn_inputs(size, device, dim)).sample)
    unet.to(memory_format=torch.channels_last)
    for batch in (1, 8):
        results[f"step_s_b{batch}_channels_last"] = timed(step_fn(unet, batch, True))
    unet.to(memory_format=torch.contiguous_format)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "e.jsonl"

        def emit():
            with open(path, "a") as f:
                f.write(json.dumps({"type": "progress", "time": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())

        t0 = time.perf_counter()
        for _ in range(50):
            emit()
        results["fsync_event_s"] = (time.perf_counter() - t0) / 50

    from torch.profiler import ProfilerActivity, profile

    run = step_fn(unet, 1)
    run()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        sync()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    averages = prof.key_averages()
    results["cuda_kernels_per_step"] = sum(e.count for e in averages if e.device_type.name == "CUDA")
    results["gpu_busy_s"] = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e6
    results["cpu_ops_per_step"] = sum(e.count for e in averages if e.device_type.name == "CPU")

    if args.compile:
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        step_fn(compiled, 4)()
        sync()
        results["compile_first_step_s"] = time.perf_counter() - t0
        for batch in (1, 4, 8):
            results[f"step_s_b{batch}_compiled"] = timed(step_fn(compiled, batch))
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def step_fn_inputs(size: int, device, dim: int):
    lat = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=torch.bfloat16)
    return lat, torch.tensor([500], device=device), torch.randn(1, 77, dim, device=device, dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
