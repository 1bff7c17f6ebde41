"""--train-text-encoder: LoRA on the text encoder(s) too, at its own learning rate; the file carries it under the
names kohya sd-scripts writes, and our runtime and diffusers' own loaders draw the same pictures from it."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.families import SD1
from adapters.runtime import Studio
from tests.conftest import write_scene_folder
from tests.test_interop import TINY_TEXT_ENCODER_NAMES
from trainer.config import TrainConfig
from trainer.dataset import load_examples
from trainer.loop import BatchDrawer, encode_examples, make_batch, train
from trainer.runs import read_events

PROMPT = "a red circle above a blue square"


def run(model, data, folder, **extra):
    values = dict(base_model=str(model), data=str(data), steps=6, batch_size=2, learning_rate=1e-3, seed=3)
    return train(TrainConfig(**{**values, **extra, "run_dir": str(folder)}), device="cpu", log_to_terminal=False)


def text_module_names(tensors: dict, prefix: str = "lora_te") -> set[str]:
    return {k.split(".")[0] for k in tensors if k.startswith(prefix)}


@pytest.fixture(scope="module")
def sd1_adapter(tiny_model, tmp_path_factory):
    """Six steps with the text encoder trained, at a rate high enough that its part changes the pictures."""
    root = tmp_path_factory.mktemp("te")
    data = write_scene_folder(root / "data")
    return run(tiny_model, data, root / "run", train_text_encoder=True, text_encoder_lr=2e-2, preview_prompt=PROMPT)


def encoded(model_dir, adapter=None, strength=1.0):
    """The conditioning our runtime gives PROMPT: the base text encoder, or with `adapter` at `strength`."""
    studio = Studio(str(model_dir), device="cpu")
    if adapter:
        studio.load(adapter, name="a")
        studio.set_strengths({"a": strength})
    return studio.family.conditioning(studio.pipe, [PROMPT])["text_embeds"]


def test_the_text_encoder_learns_and_its_lora_is_written_as_sd_scripts_names_it(sd1_adapter, tiny_model, tmp_path):
    tensors = load_file(sd1_adapter.adapter)
    assert text_module_names(tensors) == TINY_TEXT_ENCODER_NAMES  # q/k/v/out_proj, fc1, fc2 of both CLIP layers
    ups = [tensors[f"{name}.lora_up.weight"] for name in TINY_TEXT_ENCODER_NAMES]
    assert all(up.abs().max() > 0 for up in ups)  # every one was trained away from its zero start
    base, trained = encoded(tiny_model), encoded(tiny_model, sd1_adapter.adapter)
    assert (trained - base).abs().max() > 1e-2  # what the caption means to the UNet changed
    start = next(e for e in read_events(sd1_adapter.run_dir) if e["type"] == "start")
    assert start["text_encoder_targets"] == 12 and start["step_kind"] == "eager"
    assert (sd1_adapter.run_dir / "previews" / "step_000006.png").is_file()  # drawn through the trained encoder

    # the default leaves the text encoder alone: nothing of it in the file
    plain = load_file(run(tiny_model, sd1_adapter.run_dir.parent / "data", tmp_path / "plain", steps=2).adapter)
    assert text_module_names(plain) == set() and len(plain) == 3 * 56


def test_the_text_encoder_lora_learns_at_its_own_rate(tiny_model, image_folder, tmp_path):
    """AdamW's first step moves each weight by about its learning rate (the update is lr x g / (|g| + eps)); the
    LoRA up matrices start at zero, so after one step their largest entry is the rate their group ran at."""
    result = run(tiny_model, image_folder, tmp_path / "r", steps=1, train_text_encoder=True, text_encoder_lr=1e-5)
    tensors = load_file(result.adapter)
    largest = {
        part: max(t.abs().max().item() for k, t in tensors.items() if k.startswith(part) and "lora_up" in k)
        for part in ("lora_unet_", "lora_te_")
    }
    assert largest["lora_unet_"] == pytest.approx(1e-3, rel=1e-2)
    assert largest["lora_te_"] == pytest.approx(1e-5, rel=1e-2)
    progress = [e for e in read_events(tmp_path / "r") if e["type"] == "progress"]
    assert (progress[0]["lr"], progress[0]["text_encoder_lr"]) == (1e-3, 1e-5)


def test_caption_dropout_and_tag_shuffles_reach_the_text_encoder_as_token_ids(tiny_model, image_folder):
    """With the text encoder trained the cache holds token ids: a dropped caption is the empty caption's ids, any
    other row the ids of its own image's drawn tag order."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    for i in range(4):
        (image_folder / f"img{i}.txt").write_text(f"zz, tag{i}, red coat, snow, night, city")
    examples = load_examples(image_folder, 32)
    orders = [[f"zz, tag{i}, snow, red coat", f"zz, city, tag{i}", f"zz, night, tag{i}"] for i in range(4)]
    captions = [list(variant) for variant in zip(*orders)]
    cache = encode_examples(pipe, SD1, examples, 32, "cpu", torch.float32, captions=captions, train_text_encoder=True)
    assert set(cache["cond"]) == {"input_ids"} and cache["cond"]["input_ids"].dtype == torch.long
    draw = BatchDrawer(4, 64, 1000, cache["latent_mean"].shape[1:], seed=0, dropout=0.3, captions=3).draw()
    rows = make_batch(draw, cache, SD1, "cpu")["cond"]["input_ids"]
    empty = SD1.tokens(pipe, [""])["input_ids"][0]
    for row, index, dropped, k in zip(rows, draw["index"], draw["drop_caption"], draw["caption"]):
        want = empty if dropped else SD1.tokens(pipe, [orders[index][k]])["input_ids"][0]
        assert torch.equal(row, want)
    assert 0 < int(draw["drop_caption"].sum()) < 64 and len(set(draw["caption"].tolist())) == 3


def picture(pipe):
    return pipe(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(4),
        output_type="np",
    ).images[0]


def diffusers_picture(pipeline_class, model_dir, adapter, strength):
    theirs = pipeline_class.from_pretrained(str(model_dir))
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(adapter), adapter_name="a")
    theirs.set_adapters(["a"], [strength])  # scales the UNet's and the text encoders' LoRA alike
    return picture(theirs)


def check_runtime_against_diffusers(pipeline_class, model_dir, adapter):
    """Our runtime at strength 1, then 0.5 (the slider's in-place path), draws what diffusers draws from the file;
    the text-encoder part alone moves the picture, so a runtime that left it out, or did not scale it, differs."""
    studio = Studio(str(model_dir), device="cpu")
    studio.load(adapter, name="a")
    studio.set_strengths({"a": 1.0})
    full = picture(studio.pipe)
    studio.set_strengths({"a": 0.5})
    half = picture(studio.pipe)
    assert np.abs(full - diffusers_picture(pipeline_class, model_dir, adapter, 1.0)).max() < 1e-4
    assert np.abs(half - diffusers_picture(pipeline_class, model_dir, adapter, 0.5)).max() < 1e-4
    unet_only = adapter.with_name("unet_only.safetensors")
    save_file({k: v for k, v in load_file(adapter).items() if k.startswith("lora_unet_")}, unet_only)
    studio.load(unet_only, name="u")
    studio.set_strengths({"u": 0.5})
    assert np.abs(half - picture(studio.pipe)).max() > 1e-3  # the text encoder's LoRA shows in the picture


def test_diffusers_draws_what_our_runtime_draws_from_an_sd1_file_with_text_encoder_lora(sd1_adapter, tiny_model):
    from diffusers import StableDiffusionPipeline

    check_runtime_against_diffusers(StableDiffusionPipeline, tiny_model, sd1_adapter.adapter)


def test_sdxl_trains_both_text_encoders_and_diffusers_reads_them(tiny_sdxl_model, image_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = run(tiny_sdxl_model, image_folder, tmp_path / "xl", train_text_encoder=True, text_encoder_lr=2e-2)
    tensors = load_file(result.adapter)
    first, second = text_module_names(tensors, "lora_te1_"), text_module_names(tensors, "lora_te2_")
    assert {n.replace("lora_te1_", "lora_te_") for n in first} == TINY_TEXT_ENCODER_NAMES
    assert {n.replace("lora_te2_", "lora_te_") for n in second} == TINY_TEXT_ENCODER_NAMES
    assert not text_module_names(tensors, "lora_te_")
    # both encoders learned: the second one's last layer feeds the pooled output, the first one's penultimate
    # layer the hidden states (SDXL reads the first encoder's penultimate layer, so its last layer gets no gradient)
    assert tensors["lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"].abs().max() > 0
    assert tensors["lora_te1_text_model_encoder_layers_0_mlp_fc2.lora_up.weight"].abs().max() > 0
    check_runtime_against_diffusers(StableDiffusionXLPipeline, tiny_sdxl_model, result.adapter)


def test_the_page_offers_the_option_in_advanced_and_builds_the_config_from_it():
    import gradio as gr

    from app.ui.settings import SettingsForm

    with gr.Blocks():
        form = SettingsForm(gpus=1)
    box, rate = form.controls["train_text_encoder"], form.controls["text_encoder_lr"]
    assert isinstance(box, gr.Checkbox) and box.value is False and isinstance(rate, gr.Number) and rate.value == 0
    values = {name: control.value for name, control in form.controls.items()}
    values.update(train_text_encoder=True, text_encoder_lr=2e-5)
    config = form.config(list(values.values()))
    assert (config.train_text_encoder, config.effective_text_encoder_lr) == (True, 2e-5)
    assert "--train-text-encoder --text-encoder-lr 2e-05" in config.cli_command()
