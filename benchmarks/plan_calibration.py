"""Measure what the plan (trainer/plan.py) estimates: per-phase peak GPU memory, system memory and step time of real
training runs, for several batch sizes, resolutions and gradient-checkpointing settings of one architecture.

    python benchmarks/plan_calibration.py --arch sd15 --json benchmarks/results/plan_sd15_h200.json   # CUDA
    python benchmarks/plan_calibration.py --arch sdxl --json benchmarks/results/plan_sdxl_h200.json
    python benchmarks/plan_calibration.py --arch builtin --device cpu --runs 1:0:off,2:0:off

Each run goes through the real `trainer.loop.train` (random weights of the published architecture, saved once as a
diffusers folder in fp16, bf16 training, rank 8 on attn1 + attn2); its `done` event holds each phase's peak
(trainer/memory.py) and the step time comes from its events after step 10. The results file is rewritten after
every run, so a run cut short keeps what it measured; with --fresh each run has a process of its own.
tests/test_plan.py checks trainer/plan.py's constants against the stored files.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sd15 import build_sd15, matmul_rate, saved_model, write_data  # noqa: E402
from benchmarks.sdxl import build_sdxl  # noqa: E402

DEFAULT_RUNS = {  # batch:resolution:checkpointing[:flags] (0 = the native size; flags: e = eager, p = previews)
    "sd15": "1:0:off,4:0:off,1:0:on,4:0:on,2:0:off,2:768:off,8:0:off,2:0:on",
    "sdxl": "1:0:off,4:0:off,1:0:on,4:0:on,2:0:off,2:0:on,1:768:on",
    "builtin": "1:0:off,2:0:off,4:0:off",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=tuple(DEFAULT_RUNS), required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-studio-bench"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--runs", default=None, help="batch:resolution:checkpointing,... (default: per arch)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=0.0,
        help="each run's --gpu-memory: plan for, and hold the run to, a card of this many GiB (how a smaller card "
        "would fare)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="each run in a process of its own (what a user's run is: no memory left over from the run before)",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # --fresh's child: one run, JSON on stdout
    args = parser.parse_args()
    device = torch.device(args.device)

    from trainer.config import TrainConfig
    from trainer.loop import train
    from trainer.plan import cpu_probe_seconds
    from trainer.runs import read_events, steady_step_seconds

    if args.arch == "builtin":
        from adapters.families import BUILTIN_DIR

        model_dir, native = BUILTIN_DIR, 64
    else:
        build = {"sd15": build_sd15, "sdxl": build_sdxl}[args.arch]
        model_dir = saved_model(args.work / args.arch, lambda: build(False)[0], device)
        native = {"sd15": 512, "sdxl": 1024}[args.arch]
    results = {
        "command": " ".join(["python3", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "card_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__,
        "arch": args.arch,
        "matmul_tflops": matmul_rate(device) / 1e12,
        "cpu_probe_s": cpu_probe_seconds()
        if device.type == "cpu"
        else None,  # trainer/plan.py scales CPU steps by it
        "gpu_memory": args.gpu_memory,
        "fresh": args.fresh,
        "runs": [],
    }
    specs = [args.one] if args.one else (args.runs or DEFAULT_RUNS[args.arch]).split(",")
    for spec in specs:
        if args.fresh:
            child = [sys.executable, __file__, "--arch", args.arch, "--device", args.device, "--work", str(args.work)]
            child += ["--steps", str(args.steps), "--gpu-memory", str(args.gpu_memory), "--one", spec]
            done = subprocess.run(child, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            entry = json.loads(lines[-1]) if lines else {"spec": spec, "error": done.stderr[-2000:]}
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1) + "\n")
            continue
        batch, resolution, checkpointing, flags = (spec + ":").split(":")[:4]
        size = int(resolution) or native
        data = args.work / f"data-{size}"
        write_data(data, size)
        run_dir = args.work / f"plan-{args.arch}-{time.time():.0f}-{spec.replace(':', '_')}"
        config = TrainConfig(
            base_model=str(model_dir),
            data=str(data),
            steps=args.steps,
            batch_size=int(batch),
            resolution=size,
            rank=8,
            mixed_precision="bf16" if device.type == "cuda" else "no",
            gradient_checkpointing=checkpointing,
            cuda_graphs="e" not in flags,
            preview_prompt="a red circle on a blue square" if "p" in flags else "",
            run_dir=str(run_dir),
            output=str(run_dir / "bench.safetensors"),
            gpu_memory=args.gpu_memory,
        )
        entry = {"batch": int(batch), "resolution": size, "gradient_checkpointing": checkpointing, "flags": flags}
        t0, began = time.perf_counter(), time.time()
        try:
            train(config, device=args.device, log_to_terminal=False)
        except Exception as exc:  # an out-of-memory is a measurement too
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        entry["wall_s"] = time.perf_counter() - t0
        events = read_events(run_dir)
        start = next((e for e in events if e["type"] == "start"), {})
        done = next((e for e in events if e["type"] == "done"), {})
        plan = next((e for e in events if e["type"] == "plan"), {})
        entry.update(
            plan={k: plan.get(k) for k in ("gpu_gib", "system_gib", "step_seconds", "turned_on", "fits")},
            step_kind=start.get("step_kind"),
            gradient_checkpointing_on=start.get("gradient_checkpointing"),
            trainable_parameters=start.get("trainable_parameters"),
            memory=done.get("memory"),
            step_s=steady_step_seconds(run_dir) if done else None,
            # seconds from the call to the training start (load + caching) and to the first step
            start_s=start["time"] - began if start else None,
            first_step_s=next((e["time"] - began for e in events if e["type"] == "progress"), None),
        )
        results["runs"].append(entry)
        print(json.dumps(entry), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
