"""The built-in model learns the demo style: an adapter trained on sample_images/ with the default settings
repaints pictures of colours and shapes the style set never shows, and keeps the colour the prompt asks for
(the style transfers; the pictures are not recalled). The stronger the adapter, the further the pictures move:
monotone in strength (0 < 0.5 < 1 in the share of the way moved toward the style), not proportional (0.5 moves
them only a little).

The style statistic is mean picture luminance: the neon style is glowing lines on black, the base world is
flat shapes on white, gray or beige.

The same default run (saving a checkpoint every 100 steps) is the judge's learning test: the judge recommends a
later checkpoint than the first, with a better style score, and sees a deliberately over-trained run (one picture
of the set, many steps) leak more of its training picture.
"""

import shutil
from pathlib import Path

import pytest
import torch

from adapters.formats import RECOMMENDED_STRENGTH, read_safetensors
from adapters.library import Library
from adapters.runtime import Studio
from trainer.builtin.evaluate import generate_batch, score, style_eval_prompts
from trainer.builtin.scenes import COLORS, SHAPES, analyse
from trainer.builtin.style_set import STYLE_COLORS, STYLE_SHAPES, TRIGGER
from trainer.config import TrainConfig
from trainer.dataset import find_images, prepare_image
from trainer.judge import read_judge
from trainer.loop import train

pytestmark = pytest.mark.judge  # runs here are judged where their config says so (tests/conftest.py)
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
HELD_OUT_COLORS = tuple(c for c in COLORS if c not in STYLE_COLORS)
HELD_OUT_SHAPES = tuple(s for s in SHAPES if s not in STYLE_SHAPES)
PROMPTS = 30  # 2 colours x 3 shapes, 5 seeds each
# The judge test draws strength 1 (and the base model) only, to keep it short. Its over-trained run: one picture,
# batch 1, 100 steps at 10 times the default learning rate (the default run shows each picture 50 times, at batch 2).
JUDGED = dict(judge_every=100, judge_strengths="0,1")
OVER_TRAINED = dict(steps=100, learning_rate=1e-3, judge_strengths="0,1")


def style_luminance() -> float:
    """The statistic on the style set itself, at the resolution the model trains at."""
    values = []
    for path in find_images(SAMPLES):
        pixels = ((prepare_image(path, 64) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        values.append(analyse(pixels).luminance)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def neon(tmp_path_factory):
    """The default run on the style set, judged at strength 1 at a checkpoint every 100 steps and at the end (the
    checkpoints and the judge change nothing of what it learns)."""
    run_dir = tmp_path_factory.mktemp("neon") / "both"
    config = TrainConfig(data=str(SAMPLES), run_dir=str(run_dir), save_every=100, **JUDGED)
    return train(config, device="cpu", log_to_terminal=False)


def test_style_transfers_to_unseen_colours_and_shapes(neon, tmp_path):
    assert not set(HELD_OUT_COLORS) & set(STYLE_COLORS) and not set(HELD_OUT_SHAPES) & set(STYLE_SHAPES)
    items = style_eval_prompts(HELD_OUT_COLORS, HELD_OUT_SHAPES, PROMPTS, prefix=f"{TRIGGER}, ")
    prompts, seeds = [p for p, *_ in items], [s for _, s, *_ in items]
    studio = Studio("builtin", device="cpu")
    results = {"base": score(generate_batch(studio.pipe, prompts, seeds), items)}
    studio.load(neon.adapter, name="both")
    for strength in (0.5, 1.0):
        studio.set_strengths({"both": strength})
        results[f"both {strength:g}"] = score(generate_batch(studio.pipe, prompts, seeds), items)
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


def _cell(judged: dict, step: int, strength: float) -> dict:
    row = next(r for r in judged["checkpoints"] if r["step"] == step)
    return next(c for c in row["cells"] if c["strength"] == strength)


def test_judge_recommends_a_trained_checkpoint_and_sees_an_over_trained_run_copy(neon, tmp_path):
    from app.ui.judge import judge_html

    judged = read_judge(neon.run_dir)
    assert [row["step"] for row in judged["checkpoints"]] == [100, 200, 300, 400]
    best = judged["recommended"]
    first = _cell(judged, 100, best["strength"])
    print(
        f"\njudge, recommended: step {best['step']} at strength {best['strength']:g}, style {best['style']:.3f} "
        f"(step 100: {first['style']:.3f}), leak {best['leak']:.3f} (limit {judged['leak_limit']:.3f})"
    )
    assert best["step"] > 100 and best["style"] > first["style"] + 0.1, "training moved the pictures to the style"
    assert _cell(judged, 400, 1.0)["style"] > _cell(judged, 100, 1.0)["style"] + 0.1, "the last more than the first"
    assert best["leak"] <= judged["leak_limit"]
    # the adapter file says the strength the judge recommends for it; the library shows it
    strength = read_safetensors(neon.adapter)[1][RECOMMENDED_STRENGTH]
    assert float(strength) == judged["latest"]["strength"]
    assert Library(tmp_path / "library").add(neon.adapter, "neon").summary["recommended_strength"] == strength
    assert "★ style" in judge_html(neon.run_dir)

    # over-trained: one picture of the set (two objects, one above the other), many steps on it alone
    one = tmp_path / "one"
    one.mkdir()
    for suffix in (".png", ".txt"):
        shutil.copy(SAMPLES / f"neon_03{suffix}", one)
    config = TrainConfig(data=str(one), run_dir=str(tmp_path / "over"), batch_size=1, **OVER_TRAINED)
    over = read_judge(train(config, device="cpu", log_to_terminal=False).run_dir)
    normal_leak, over_leak = _cell(judged, 400, 1.0)["leak"], _cell(over, config.steps, 1.0)["leak"]
    print(f"leak at strength 1: normal run {normal_leak:.3f}, over-trained run {over_leak:.3f}")
    assert over_leak > normal_leak + 0.1
    assert over_leak > over["leak_limit"], "the page flags it as leaking"
