"""The outputs folder and the `parameters` text every saved picture carries (AUTOMATIC1111's infotext)."""

from PIL import Image

from app.images import Parameters
from app.outputs import Outputs


def test_parameters_text_reads_back_and_reads_what_a1111_writes():
    made = Parameters(
        prompt="glowline, a: green, triangle",
        negative_prompt="blurry, dark",
        steps=20,
        sampler="Euler a",
        cfg_scale=5.0,
        seed=4294967295,
        width=64,
        height=96,
        model="builtin",
        guidance_rescale=0.7,
        adapters={"neon": 0.8, "old style": -0.5},
        lora_hashes={"neon": "0123456789ab"},
    )
    text = made.text()
    assert text.splitlines() == [
        "glowline, a: green, triangle <lora:neon:0.8> <lora:old style:-0.5>",
        "Negative prompt: blurry, dark",
        "Steps: 20, Sampler: Euler a, CFG scale: 5, Seed: 4294967295, Size: 64x96, Model: builtin, "
        'Guidance rescale: 0.7, Lora hashes: "neon: 0123456789ab"',
    ]
    assert Parameters.parse(text) == made
    # as A1111 writes it: the adapters among the prompt's words, settings we do not know, a quoted value
    a1111 = Parameters.parse(
        "masterpiece, <lora:inked:0.6> a cat\n<lora:flat>\nNegative prompt: (worst quality:1.4)\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, "
        'Model hash: 45dee52b, Model: anything, Lora hashes: "inked: 1a2b3c4d5e6f, flat: 0f0f0f0f0f0f", Version: v1.9'
    )
    assert (a1111.prompt, a1111.negative_prompt) == ("masterpiece, a cat", "(worst quality:1.4)")
    assert a1111.adapters == {"inked": 0.6, "flat": 1.0}
    assert (a1111.steps, a1111.sampler, a1111.cfg_scale, a1111.seed) == (28, "DPM++ 2M", 7.0, 965400086)
    assert (a1111.width, a1111.height, a1111.model) == (512, 768, "anything")
    assert a1111.lora_hashes == {"inked": "1a2b3c4d5e6f", "flat": "0f0f0f0f0f0f"}
    just_words = Parameters.parse("a prompt, no settings")  # fewer than three settings: all prompt, as A1111 reads
    assert (just_words.prompt, just_words.seed, just_words.steps) == ("a prompt, no settings", None, None)


def test_outputs_number_each_day_never_overwrite_and_list_newest_first(tmp_path):
    outputs = Outputs(tmp_path / "outputs")
    assert outputs.history() == []
    day = tmp_path / "outputs" / "2020-01-02"
    day.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(day / "00007-3.png")
    (tmp_path / "outputs" / "2020-01-01").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outputs" / "2020-01-01" / "00009-1.png")
    picture = Image.new("RGB", (8, 8), (255, 0, 0))
    first = outputs.save(picture, Parameters(prompt="a", steps=2, sampler="Euler", seed=11))
    second = outputs.save(picture, Parameters(prompt="b", steps=2, sampler="Euler", seed=11))
    grid = outputs.save_grid(picture, Parameters(prompt="c", steps=2, sampler="Euler", seed=11))
    assert first.parent == second.parent and first.parent.parent == tmp_path / "outputs"
    assert (first.name, second.name) == ("00001-11.png", "00002-11.png")
    assert grid.parent.parent.name == "grids" and grid.name == "00001.png"
    assert Parameters.of_file(second).prompt == "b" and Parameters.of_file(first).prompt == "a"
    assert outputs.history() == [second, first, day / "00007-3.png", tmp_path / "outputs/2020-01-01/00009-1.png"]
    assert outputs.history(limit=1) == [second]
