"""Scoring generated pictures of the scene world: prompt colour fidelity and the neon-style statistic.

Used by the built-in model's pretraining (its reported scores), by the learning tests, and for the README.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from adapters.families import native_size
from trainer.builtin.scenes import HELD_OUT_PAIRS, analyse, single_object_scene


def held_out_prompts(count: int = 100) -> list[tuple[str, int, str, str]]:
    """(prompt, seed, colour, shape) for single objects of the (colour, shape) pairs pretraining never saw."""
    pairs = sorted(HELD_OUT_PAIRS)
    out = []
    for i in range(count):
        color, shape = pairs[i % len(pairs)]
        scene = single_object_scene(random.Random(1000 + i), color, shape)
        out.append((scene.caption, i, color, shape))
    return out


def style_eval_prompts(colors, shapes, count: int, prefix: str = "") -> list[tuple[str, int, str, str]]:
    """(prompt, seed, colour, shape) for single objects drawn only from `colors` x `shapes`."""
    combos = [(c, s) for c in colors for s in shapes]
    out = []
    for i in range(count):
        color, shape = combos[i % len(combos)]
        scene = single_object_scene(random.Random(2000 + i), color, shape)
        out.append((prefix + scene.caption, i, color, shape))
    return out


def generate_batch(pipe, prompts: list[str], seeds: list[int], *, steps: int = 20, batch: int = 50) -> list:
    """One image per (prompt, seed), in batches, a CPU generator per image, at the model's recommended guidance."""
    from adapters.base import generation_defaults

    defaults = generation_defaults(pipe.name_or_path, dict(pipe.scheduler.config))
    images = []
    size = native_size(pipe)
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
        out = pipe(
            prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=defaults["guidance"],
            guidance_rescale=defaults["guidance_rescale"],
            generator=gens,
            height=size,
            width=size,
        )
        images += out.images
    return images


@dataclass
class Score:
    color_accuracy: float  # share of pictures whose main object has the prompt's colour
    shape_accuracy: float
    luminance: float  # mean picture luminance, 0..1 (the neon style is dark, the base world is light)
    count: int


def score(images, items) -> Score:
    """Compare each picture's analysed colour and shape with the prompt's."""
    readings = [analyse(im) for im in images]
    n = len(readings)
    return Score(
        color_accuracy=sum(r.color == it[2] for r, it in zip(readings, items)) / n,
        shape_accuracy=sum(r.shape == it[3] for r, it in zip(readings, items)) / n,
        luminance=sum(r.luminance for r in readings) / n,
        count=n,
    )


def prompt_fidelity(pipe, count: int = 100, steps: int = 20) -> Score:
    """The built-in model's score on `count` held-out (prompt, seed) pairs."""
    items = held_out_prompts(count)
    images = generate_batch(pipe, [p for p, *_ in items], [s for _, s, *_ in items], steps=steps)
    return score(images, items)


def main() -> None:
    """Score a scene-world model: prompt fidelity on held-out pairs and the CPU time of one picture."""
    import argparse
    import json
    import os
    import platform
    import statistics
    import sys
    import time
    from dataclasses import asdict
    from pathlib import Path

    from adapters.base import load_pipeline

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="builtin", help="builtin or a diffusers folder")
    parser.add_argument("--count", type=int, default=100, help="held-out (prompt, seed) pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the record (with command, date, load) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    pipe = load_pipeline(args.model, device="cpu")
    result = {
        "command": " ".join(["python", "-m", "trainer.builtin.evaluate", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "model": args.model,
        **asdict(prompt_fidelity(pipe, count=args.count)),
    }
    size = native_size(pipe)
    times = []
    for seed in range(4):
        start = time.perf_counter()
        pipe(
            "a red circle",
            num_inference_steps=20,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
        )
        times.append(time.perf_counter() - start)
    result["seconds_per_image_20_steps"] = statistics.median(times[1:])
    result["threads"] = args.threads
    result["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
