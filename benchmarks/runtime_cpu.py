"""How long the adapter runtime's verbs take on the built-in model: picture, cold load, strength change, hot swap,
fuse. Writes the numbers with the machine, the command and the date to benchmarks/results/runtime_cpu.json.

    .venv/bin/python benchmarks/runtime_cpu.py [--adapters 8] [--repeats 7] [--out FILE]

What each figure measures (milliseconds; a median over `--repeats` calls after one warm-up call unless said):
- generate_20_steps_no_adapter_ms: one 64x64 picture, 20 steps, from a fresh Studio that has never had an
  adapter loaded (no LoRA layers in the model at all).
- first_load_read_ms, first_load_attach_ms: the process's first adapter load (`Studio.load` = read the file +
  attach), timed once, split into its two parts; it carries one-time costs the later loads do not.
- cold_load_ms, cold_load_read_ms: loading a new adapter file while `--adapters` others are loaded; each of the
  `--repeats` loads is a file never loaded before (written just before, so in the OS file cache) and is unloaded
  again afterwards. The read is timed in the same loads as the total it is part of; no warm-up call.
- strength_change_one_ms / strength_change_all_ms: `set_strengths` on one / all of the loaded adapters.
- hot_swap_ms: new weights into a loaded adapter of the same rank and targets (`swap`).
- fuse_unfuse_ms: `fuse` one adapter at 0.8, then `unfuse`.
- generate_20_steps_one_of_n_active_ms: the picture with `--adapters` loaded, one of them at strength 0.8.
- generate_20_steps_n_loaded_all_off_ms: the picture with `--adapters` loaded, all switched off (layers in place).
The pictures use `--repeats-generate` calls. The machine's load average before and after is recorded: the
figures are only comparable on a machine with nothing else running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.formats import save_adapter, to_kohya, write_atomic  # noqa: E402
from adapters.lora import LoraModule, attention_targets  # noqa: E402
from adapters.runtime import Studio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_cpu.json"


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1000


def random_adapter(unet, seed: int, rank: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"unet.{p}": LoraModule(
            torch.randn(rank, unet.get_submodule(p).in_features, generator=gen) * 0.05,
            torch.randn(unet.get_submodule(p).out_features, rank, generator=gen) * 0.05,
            rank,
        )
        for p in attention_targets(unet, "both")
    }


def load_timed(studio: Studio, path: Path, name: str) -> tuple[float, float]:
    """(read ms, attach ms) of one `Studio.load` of a file not loaded before, done as its two parts."""
    t0 = time.perf_counter()
    lora = studio.read(path)
    t1 = time.perf_counter()
    studio.add(lora, name)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def machine() -> dict:
    import diffusers
    import peft

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=8, help="how many adapters to keep loaded")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per figure (median)")
    parser.add_argument("--repeats-generate", type=int, default=3, help="timed calls per picture figure (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write the record to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": os.getloadavg(),
    }
    n = record["adapters_loaded"] = args.adapters
    studio = Studio("builtin", device="cpu", max_loaded=n + 1)

    def picture(strengths: dict[str, float]) -> None:
        studio.generate("a red circle", strengths=strengths)

    results = {}
    results["generate_20_steps_no_adapter_ms"] = timed(lambda: picture({}), args.repeats_generate)
    with tempfile.TemporaryDirectory() as tmp:

        def adapter_file(i: int) -> Path:
            path = Path(tmp) / f"a{i}.safetensors"
            save_adapter(path, to_kohya(random_adapter(studio.pipe.unet, i)), {})
            return path

        results["first_load_read_ms"], results["first_load_attach_ms"] = load_timed(studio, adapter_file(0), "a0")
        for i in range(1, n):
            studio.load(adapter_file(i), name=f"a{i}")
        names = list(studio.adapters)
        reads, totals = [], []
        for i in range(n, n + args.repeats):
            read, attach = load_timed(studio, adapter_file(i), "new")
            reads.append(read)
            totals.append(read + attach)
            studio.unload("new")
        results["cold_load_ms"], results["cold_load_read_ms"] = statistics.median(totals), statistics.median(reads)
        other = studio.read(adapter_file(n + args.repeats))
        results["strength_change_one_ms"] = timed(
            lambda: studio.set_strengths({"a0": float(torch.rand(1))}), args.repeats
        )
        results["strength_change_all_ms"] = timed(lambda: studio.set_strengths({m: 0.5 for m in names}), args.repeats)
        results["hot_swap_ms"] = timed(lambda: studio.swap("a0", other), args.repeats)
        results["fuse_unfuse_ms"] = timed(lambda: (studio.fuse({"a0": 0.8}), studio.unfuse()), args.repeats)
        results["generate_20_steps_one_of_n_active_ms"] = timed(lambda: picture({"a0": 0.8}), args.repeats_generate)
        results["generate_20_steps_n_loaded_all_off_ms"] = timed(lambda: picture({}), args.repeats_generate)
    record["load_average_after"] = os.getloadavg()
    record["results_ms"] = {k: round(v, 2) for k, v in results.items()}
    text = json.dumps(record, indent=1)
    write_atomic(args.out, (text + "\n").encode())
    print(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
