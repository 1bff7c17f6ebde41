"""What each half of the default LoRA placement learns on its own: the demo style set trained with LoRA on the
UNet's self-attention only (`--attention self`), cross-attention only (`cross`) and both (the default), each
scored on the learning test's held-out prompts (tests/test_learning.py: colours and shapes the style set never
shows) at strength 1, and `both` also at 0.5.

    python benchmarks/attention_split.py --out benchmarks/results/attention_split_cpu.txt   # ~4 min on 2 cores

The rows are printed as the learning test prints its own (luminance: the neon style is dark, the base world
light; "moved": the share of the way from the base model's luminance to the style set's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.runtime import Studio  # noqa: E402
from trainer.builtin.evaluate import generate_batch, score, style_eval_prompts  # noqa: E402
from trainer.builtin.scenes import COLORS, SHAPES, analyse  # noqa: E402
from trainer.builtin.style_set import STYLE_COLORS, STYLE_SHAPES, TRIGGER  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.dataset import find_images, prepare_image  # noqa: E402
from trainer.loop import train  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=30, help="held-out prompts (the learning test's 30)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    colors = tuple(c for c in COLORS if c not in STYLE_COLORS)
    shapes = tuple(s for s in SHAPES if s not in STYLE_SHAPES)
    items = style_eval_prompts(colors, shapes, args.prompts, prefix=f"{TRIGGER}, ")
    prompts, seeds = [p for p, *_ in items], [s for _, s, *_ in items]
    target = []
    for path in find_images(SAMPLES):
        pixels = ((prepare_image(path, 64) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        target.append(analyse(pixels).luminance)
    target_luminance = sum(target) / len(target)

    started = time.time()
    studio = Studio("builtin", device="cpu")
    results = {"base": score(generate_batch(studio.pipe, prompts, seeds), items)}
    with tempfile.TemporaryDirectory() as work:
        for attention in ("both", "self", "cross"):
            config = TrainConfig(data=str(SAMPLES), attention=attention, run_dir=f"{work}/{attention}", judge=False)
            studio.load(train(config, device="cpu", log_to_terminal=False).adapter, name=attention)
            for strength in (0.5, 1.0) if attention == "both" else (1.0,):
                studio.set_strengths({attention: strength})
                results[f"{attention} {strength:g}"] = score(generate_batch(studio.pipe, prompts, seeds), items)
            studio.set_strengths({})
    base = results["base"].luminance
    lines = [
        f"# python benchmarks/attention_split.py --prompts {args.prompts}, {time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}, {time.time() - started:.0f} s",
        f"style set luminance {target_luminance:.3f}; held-out prompts: {len(items)}",
    ]
    for key, r in results.items():
        share = f"{(base - r.luminance) / (base - target_luminance):5.0%}" if key != "base" else "    -"
        lines.append(
            f"{key:>9}: luminance {r.luminance:.3f}  moved {share} toward the style  "
            f"colour right {r.color_accuracy:4.0%}  shape right {r.shape_accuracy:4.0%}"
        )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
