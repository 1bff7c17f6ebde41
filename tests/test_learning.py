"""The built-in model learns the demo style: an adapter trained on sample_images/ with the default settings
repaints pictures of colours and shapes the style set never shows, and keeps the colour the prompt asks for
(the style transfers; the pictures are not recalled). The stronger the adapter, the further the pictures move:
monotone in strength (0 < 0.5 < 1 in the share of the way moved toward the style), not proportional (0.5 moves
them only a little).

The style statistic is mean picture luminance: the neon style is glowing lines on black, the base world is
flat shapes on white, gray or beige.
"""

from pathlib import Path

import pytest
import torch

from adapters.runtime import Studio
from trainer.builtin.evaluate import generate_batch, score, style_eval_prompts
from trainer.builtin.scenes import COLORS, SHAPES, analyse
from trainer.builtin.style_set import STYLE_COLORS, STYLE_SHAPES, TRIGGER
from trainer.config import TrainConfig
from trainer.dataset import find_images, prepare_image
from trainer.loop import train

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
HELD_OUT_COLORS = tuple(c for c in COLORS if c not in STYLE_COLORS)
HELD_OUT_SHAPES = tuple(s for s in SHAPES if s not in STYLE_SHAPES)
PROMPTS = 30  # 2 colours x 3 shapes, 5 seeds each


def style_luminance() -> float:
    """The statistic on the style set itself, at the resolution the model trains at."""
    values = []
    for path in find_images(SAMPLES):
        pixels = ((prepare_image(path, 64) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        values.append(analyse(pixels).luminance)
    return sum(values) / len(values)


def test_style_transfers_to_unseen_colours_and_shapes(tmp_path):
    assert not set(HELD_OUT_COLORS) & set(STYLE_COLORS) and not set(HELD_OUT_SHAPES) & set(STYLE_SHAPES)
    items = style_eval_prompts(HELD_OUT_COLORS, HELD_OUT_SHAPES, PROMPTS, prefix=f"{TRIGGER}, ")
    prompts, seeds = [p for p, *_ in items], [s for _, s, *_ in items]
    studio = Studio("builtin", device="cpu")
    results = {"base": score(generate_batch(studio.pipe, prompts, seeds), items)}
    for attention in ("both", "self", "cross"):
        config = TrainConfig(data=str(SAMPLES), attention=attention, run_dir=str(tmp_path / attention))
        studio.load(train(config, device="cpu", log_to_terminal=False).adapter, name=attention)
        for strength in (0.5, 1.0) if attention == "both" else (1.0,):
            studio.set_strengths({attention: strength})
            results[f"{attention} {strength:g}"] = score(generate_batch(studio.pipe, prompts, seeds), items)
    target, base = style_luminance(), results["base"].luminance

    def moved(key: str) -> float:
        return (base - results[key].luminance) / (base - target)

    print(f"\nstyle set luminance {target:.3f}; held-out prompts: {len(items)}")
    for key, r in results.items():
        share = f"{moved(key):5.0%}" if key != "base" else "    -"
        print(
            f"{key:>9}: luminance {r.luminance:.3f}  moved {share} toward the style  "
            f"colour right {r.color_accuracy:4.0%}  shape right {r.shape_accuracy:4.0%}"
        )

    assert moved("both 1") >= 0.7, "at strength 1 the style statistic moves at least 70% of the way"
    assert 0 < moved("both 0.5") < moved("both 1"), "monotone in strength: 0 < 0.5 < 1 in the share moved"
    assert results["both 1"].color_accuracy >= 0.7, "the prompt's colour survives the style"


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.txt")))
def test_style_captions_use_the_trigger_and_only_style_colours_and_shapes(path):
    caption = path.read_text()
    assert caption.startswith(f"{TRIGGER}, ")
    assert not any(c in caption for c in HELD_OUT_COLORS) and not any(s in caption for s in HELD_OUT_SHAPES)
