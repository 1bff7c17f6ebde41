"""Data-parallel scaling: images/s on N processes over images/s on 1, same per-process batch, through the CLI.

    python benchmarks/scaling.py --processes 2                    # on a machine with 2 GPUs
    python benchmarks/scaling.py --processes 2 --tiny --steps 30  # the same code path on CPUs (gloo)

It builds the SD-1.5-shaped model of benchmarks/sd15.py (random weights, 512x512, no download), then runs
`lora-studio train --num-processes K` for K = 1 and K = N exactly as a user would (bf16 on GPUs), reads each
run's steady-state speed from its events.jsonl (steps after the first 10), and appends a row to
benchmarks/RESULTS.md: images/s at 1 and N, and scaling efficiency = (images/s at N) / (N x images/s at 1);
--json also writes that row as a file, for benchmarks/summary.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def steady_images_per_s(run_dir: Path, batch: int, processes: int) -> float:
    """Images per second over the run's steps after the first 10 (model loading and warm-up left out)."""
    from trainer.runs import steady_step_seconds

    return batch * processes / steady_step_seconds(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU check of the code path)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-studio-scaling"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the row here, for benchmarks/summary.py")
    args = parser.parse_args()

    from benchmarks.sd15 import build_sd15, write_data

    pipe, size = build_sd15(args.tiny)
    model = args.work / ("sd15-tiny" if args.tiny else "sd15")
    if not (model / "model_index.json").exists():
        pipe.to(torch.float16).save_pretrained(model, safe_serialization=True)
    del pipe
    write_data(args.work / "data", size)
    exe = str(Path(sys.executable).with_name("lora-studio"))
    speeds, kinds = {}, {}
    for k in (1, args.processes):
        run = args.work / f"run-{k}-{time.time():.0f}"
        cmd = [
            exe,
            "train",
            "--base-model",
            str(model),
            "--data",
            str(args.work / "data"),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch),
            "--num-processes",
            str(k),
            "--run-dir",
            str(run),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        speeds[k] = steady_images_per_s(run, args.batch, k)
        kinds[k] = step_kind(run)
    n = args.processes
    if kinds[1] != kinds[n]:  # e.g. --no-cuda-graphs in one of them, or a capture that failed on N GPUs
        print(f"scaling: not like with like: 1 process stepped as {kinds[1]!r}, {n} as {kinds[n]!r}", file=sys.stderr)
    efficiency = speeds[n] / (n * speeds[1])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    row = {
        "script": "scaling",
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tiny": args.tiny,
        "device": device,
        "processes": n,
        "batch_per_process": args.batch,
        "resolution": size,
        "images_per_s_1": round(speeds[1], 2),
        f"images_per_s_{n}": round(speeds[n], 2),
        "efficiency": round(efficiency, 3),
        "step_kind_1": kinds[1],
        f"step_kind_{n}": kinds[n],
        "command": " ".join(sys.argv),
    }
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")
    add_row(
        args.results,
        f"| {time.strftime('%Y-%m-%d')} | {device} | {n} | {args.batch} | {size} | {speeds[1]:.2f} | "
        f"{speeds[n]:.2f} | {efficiency:.1%} | `python {' '.join(sys.argv)}` |",
    )


def step_kind(run_dir: Path) -> str:
    """How the run stepped (`cuda graph` or `eager`), from its start event."""
    from trainer.runs import read_events

    return next(e for e in read_events(run_dir) if e["type"] == "start")["step_kind"]


TABLE_HEAD = "| date | device | processes |"


def add_row(results_md: Path, row: str) -> None:
    """Put `row` under the last row of RESULTS.md's scaling table (the file's last line stays the summary line);
    without that table, at the end."""
    lines = results_md.read_text().splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith(TABLE_HEAD)), None)
    if head is None:
        lines.append(row)
    else:
        end = head
        while end + 1 < len(lines) and lines[end + 1].startswith("|"):
            end += 1
        lines.insert(end + 1, row)
    results_md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
