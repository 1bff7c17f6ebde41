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

    .venv/bin/python benchmarks/runtime_cpu.py --sd15 [--loaded 0 1 3] [--repeats 7] [--profile] [--out FILE]

`--sd15` times cold loads on the Stable Diffusion 1.5 architecture instead (random weights built from config by
benchmarks/sd15.py, saved into a temporary folder and loaded by `Studio` as a downloaded model would be; fp32, about
4.3 GB of memory; `--tiny`: the small model of the same shape, to check the code path). Each adapter is rank 8 on
attn1 + attn2 (the trainer's default; 128 layers), in the kohya layout the app writes. Written to
benchmarks/results/runtime_cpu_sd15.json unless `--out` says otherwise:
- first_load_ms: `Studio.load` of the first adapter file into the fresh runtime (no LoRA layer in the model yet),
  timed once: the cold load benchmarks/sd15.py times on a GPU.
- cold_load_ms[N]: `Studio.load` (read, attach, strengths, file hash) of a file never loaded before while N others
  are loaded, all switched off, median of `--repeats` loads, each unloaded again afterwards; cold_load_active_ms[N]:
  the same with the N others active at strength 0.5 (as when a picture was just drawn with them);
  cold_load_read_ms[N]: the file reading part (`Studio.read`), median over as many reads of the same files.
- profile[N] (`--profile`): one more such load under cProfile, the functions that took the most time in it
  (cumulative seconds under the profiler, which slows Python code down; for where the time goes, not how much).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.formats import save_adapter, to_kohya, write_atomic  # noqa: E402
from adapters.lora import LoraModule, attention_targets  # noqa: E402
from adapters.runtime import Studio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_cpu.json"
RESULTS_SD15 = RESULTS.with_name("runtime_cpu_sd15.json")


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


def uptime() -> str:
    """What `uptime` says now (its load averages are the figures' context on a shared machine)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def code_revision() -> str:
    """The commit of the code measured (`git describe --always --dirty`: `-dirty` when files differ from it)."""
    try:
        command = ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def profiled(fn, *args, top: int = 15, **kwargs) -> list[dict]:
    """Run `fn(*args, **kwargs)` once under cProfile: the `top` functions by cumulative time (seconds)."""
    profile = cProfile.Profile()
    profile.runcall(fn, *args, **kwargs)
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda item: item[1][3], reverse=True)[:top]
    out = []
    for (file, line, func), (_, calls, _, cumulative, _) in rows:
        file = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        out.append({"function": f"{file}:{line}({func})", "calls": calls, "cumulative_s": round(cumulative, 4)})
    return out


def sd15_cold_loads(args, record: dict) -> None:
    """Cold loads on the SD 1.5 architecture at each count of adapters already loaded (see the module docstring)."""
    from benchmarks.sd15 import build_sd15

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "sd15"
        pipe, _ = build_sd15(tiny=args.tiny)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        del pipe
        studio = Studio(str(model_dir), device="cpu", max_loaded=max(args.loaded) + 2)
        files = iter(range(10**6))

        def adapter_file() -> Path:
            i = next(files)
            path = Path(tmp) / f"a{i}.safetensors"
            save_adapter(path, to_kohya(random_adapter(studio.pipe.unet, i)), {})
            return path

        path = adapter_file()
        t0 = time.perf_counter()
        studio.load(path, name="first")
        record["first_load_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        studio.unload("first")
        record.update(cold_load_ms={}, cold_load_active_ms={}, cold_load_read_ms={}, cold_load_runs_ms={}, profile={})

        def cold_loads(paths: list[Path]) -> list[float]:
            totals = []
            for path in paths:
                t0 = time.perf_counter()
                studio.load(path, name="new")
                totals.append(time.perf_counter() - t0)
                studio.unload("new")
            return totals

        for n in sorted(args.loaded):
            while len(studio.adapters) < n:
                studio.load(adapter_file(), name=f"kept{len(studio.adapters)}")
            paths = [adapter_file() for _ in range(args.repeats)]
            studio.set_strengths({})
            totals, reads = cold_loads(paths), []
            if n:
                studio.set_strengths({name: 0.5 for name in studio.adapters})
                active = cold_loads([adapter_file() for _ in range(args.repeats)])
                record["cold_load_active_ms"][n] = round(statistics.median(active) * 1000, 2)
                studio.set_strengths({})
            for path in paths:
                t0 = time.perf_counter()
                studio.read(path)
                reads.append(time.perf_counter() - t0)
            record["cold_load_ms"][n] = round(statistics.median(totals) * 1000, 2)
            record["cold_load_read_ms"][n] = round(statistics.median(reads) * 1000, 2)
            record["cold_load_runs_ms"][n] = [round(t * 1000, 2) for t in totals]
            if args.profile:
                record["profile"][n] = profiled(studio.load, adapter_file(), name="new")
                studio.unload("new")
            print(
                f"{n} loaded: cold load {record['cold_load_ms'][n]} ms (read {record['cold_load_read_ms'][n]} ms), "
                f"with them active {record['cold_load_active_ms'].get(n)} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=8, help="how many adapters to keep loaded")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per figure (median)")
    parser.add_argument("--repeats-generate", type=int, default=3, help="timed calls per picture figure (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--sd15", action="store_true", help="cold loads on the SD 1.5 architecture (see above)")
    parser.add_argument("--tiny", action="store_true", help="with --sd15: the small model of the same shape")
    parser.add_argument(
        "--loaded", type=int, nargs="+", default=[0, 1, 3], help="with --sd15: adapters already loaded, each count"
    )
    parser.add_argument("--profile", action="store_true", help="with --sd15: where one cold load's time goes")
    parser.add_argument("--out", type=Path, help="JSON file to write the record to (default: see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_revision(),
        "uptime_before": uptime(),
        "load_average_before": os.getloadavg(),
    }
    if args.sd15:
        record["model"] = "SD 1.5 architecture, random weights" + (" (tiny shapes)" if args.tiny else "")
        sd15_cold_loads(args, record)
        write(record, args.out or RESULTS_SD15)
        return
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
    record["results_ms"] = {k: round(v, 2) for k, v in results.items()}
    write(record, args.out or RESULTS)


def write(record: dict, path: Path) -> None:
    record["uptime_after"] = uptime()
    record["load_average_after"] = os.getloadavg()
    text = json.dumps(record, indent=1)
    write_atomic(path, (text + "\n").encode())
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
