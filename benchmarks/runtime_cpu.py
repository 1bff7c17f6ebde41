"""How long the adapter runtime's verbs take on the built-in model: strength change, hot swap, cold load, fuse.

    .venv/bin/python benchmarks/runtime_cpu.py [--adapters 8]

Each figure is the median of repeated calls after a warm-up, on whatever machine runs it (the README names it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.formats import save_adapter, to_kohya  # noqa: E402
from adapters.lora import LoraModule, attention_targets  # noqa: E402
from adapters.runtime import Studio  # noqa: E402


def timed(fn, repeats: int = 7) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=8, help="how many adapters to keep loaded")
    args = parser.parse_args()
    torch.set_num_threads(2)
    studio = Studio("builtin", device="cpu", max_loaded=args.adapters + 2)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(args.adapters + 1):
            path = Path(tmp) / f"a{i}.safetensors"
            save_adapter(path, to_kohya(random_adapter(studio.pipe.unet, i)), {})
            files.append(path)
        t0 = time.perf_counter()
        studio.load(files[0], name="a0")
        cold = (time.perf_counter() - t0) * 1000
        for i, f in enumerate(files[1:-1], start=1):
            studio.load(f, name=f"a{i}")
        other = studio.read(files[-1])
        names = list(studio.adapters)
        results = {
            "adapters_loaded": len(names),
            "cold_load_ms": cold,
            "read_file_ms": timed(lambda: studio.read(files[-1])),
            "strength_change_one_ms": timed(lambda: studio.set_scales({"a0": float(torch.rand(1))})),
            "strength_change_all_ms": timed(lambda: studio.set_scales({n: 0.5 for n in names})),
            "hot_swap_ms": timed(lambda: studio.swap("a0", other)),
            "fuse_unfuse_ms": timed(lambda: (studio.fuse({"a0": 0.8}), studio.unfuse())),
            "generate_20_steps_ms": timed(lambda: studio.generate("a red circle", scales={"a0": 0.8}), 3),
        }
        studio.set_scales({})
        results["generate_20_steps_no_adapter_ms"] = timed(lambda: studio.generate("a red circle", scales={}), 3)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
