"""SDXL: both text encoders, pooled embeddings and time ids train a LoRA; the file says SDXL; diffusers' own SDXL
loader reads it and draws what our runtime draws; strengths, fuse and refusals work as on SD 1.x."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adapters.base import load_pipeline
from adapters.errors import UserError
from adapters.families import SDXL, family_of_pipeline
from adapters.formats import read_safetensors
from adapters.runtime import Studio
from trainer.config import TrainConfig
from trainer.dataset import load_examples
from trainer.loop import BatchDrawer, encode_examples, make_batch, train
from trainer.step import batch_loss


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_model, tmp_path_factory):
    from tests.conftest import write_scene_folder

    root = tmp_path_factory.mktemp("sdxl")
    data = write_scene_folder(root / "data", count=4)
    config = TrainConfig(
        base_model=str(tiny_sdxl_model),
        data=str(data),
        steps=120,
        batch_size=4,
        learning_rate=5e-3,
        rank=4,
        seed=1,
        run_dir=str(root / "run"),
        trigger_word="zq",
        preview_prompt="zq, a red circle",
    )
    before = load_pipeline(str(tiny_sdxl_model), device="cpu")
    batch = fixed_batch(before, data)
    with torch.no_grad():
        loss_before = batch_loss(before.unet, batch, scheduler(before), SDXL).item()
    result = train(config, device="cpu", log_to_terminal=False)
    with torch.no_grad():
        loss_after = batch_loss(result.unet.eval(), batch, scheduler(before), SDXL).item()
    return result, (loss_before, loss_after)


def scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def fixed_batch(pipe, folder, seed=123):
    examples = load_examples(folder, 32)
    cache = encode_examples(pipe, SDXL, examples, 32, torch.device("cpu"), torch.float32)
    drawer = BatchDrawer(len(examples), len(examples) * 4, 1000, cache["latent_mean"].shape[1:], seed)
    return make_batch(drawer.draw(), cache, SDXL, "cpu")


def test_an_sdxl_lora_trains_and_its_file_says_sdxl(sdxl_adapter, tiny_sdxl_model):
    result, (loss_before, loss_after) = sdxl_adapter
    print(f"SDXL fixed-set loss {loss_before:.4f} -> {loss_after:.4f}")
    assert loss_after < 0.9 * loss_before
    assert (result.run_dir / "previews" / "step_000120.png").is_file()  # drawn from the cached prompt embeddings
    tensors, metadata = read_safetensors(result.adapter)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(re.search(r"_transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)\.", k) for k in tensors)
    assert any("_attn1_to_q" in k for k in tensors) and any("_attn2_to_k" in k for k in tensors)


def test_the_time_ids_describe_each_picture(tmp_path, tiny_sdxl_model):
    """original (height, width), crop top-left in the resized picture, target size: per image, as SDXL wants."""
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (64, 32), "red").save(folder / "wide.png")
    Image.new("RGB", (32, 48), "blue").save(folder / "tall.png")
    for name in ("wide", "tall"):
        (folder / f"{name}.txt").write_text("a picture")
    pipe = load_pipeline(str(tiny_sdxl_model), device="cpu")
    cache = encode_examples(pipe, SDXL, load_examples(folder, 32), 32, torch.device("cpu"), torch.float32)
    # sorted by name: tall (48 high, 32 wide: 8 px cut at the top), then wide (32 high, 64 wide: 16 px at the left)
    assert cache["cond"]["time_ids"].tolist() == [[48, 32, 8, 0, 32, 32], [32, 64, 0, 16, 32, 32]]
    assert cache["cond"]["pooled"].shape == (2, 32) and cache["cond"]["text_embeds"].shape == (2, 77, 64)
    # the caption's conditioning is what diffusers' own SDXL pipeline encodes the prompt to
    embeds, _, pooled, _ = pipe.encode_prompt("a picture", do_classifier_free_guidance=False)
    assert torch.equal(cache["cond"]["text_embeds"][0], embeds[0]) and torch.equal(
        cache["cond"]["pooled"][0], pooled[0]
    )


def test_diffusers_sdxl_loader_draws_what_our_runtime_draws(sdxl_adapter, tiny_sdxl_model):
    result, _ = sdxl_adapter
    studio = Studio(str(tiny_sdxl_model), device="cpu")
    assert family_of_pipeline(studio.pipe) is SDXL and studio.native_size == 32
    studio.load(result.adapter, name="style")
    ours = studio.generate("zq, a red circle", seed=5, sampling_steps=3, strengths={"style": 1.0})[0]
    base = studio.generate("zq, a red circle", seed=5, sampling_steps=3, strengths={})[0]

    from diffusers import StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    theirs.load_lora_weights(str(result.adapter))
    image = theirs(
        "zq, a red circle",
        num_inference_steps=3,
        guidance_scale=studio.defaults["guidance"],
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    a, b, c = (np.asarray(x, dtype=np.int16) for x in (ours, image, base))
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of the same float picture
    assert np.abs(a - c).max() > 10  # and the adapter does change the picture


def test_strengths_fuse_and_refusals_on_sdxl(sdxl_adapter, tiny_sdxl_model, tmp_path):
    result, _ = sdxl_adapter
    studio = Studio(str(tiny_sdxl_model), device="cpu")
    studio.load(result.adapter, name="style")
    draw = lambda s: np.asarray(studio.generate("a red circle", seed=2, sampling_steps=2, strengths=s)[0])  # noqa: E731
    base, half, full = draw({}), draw({"style": 0.5}), draw({"style": 1.0})
    assert not np.array_equal(half, full) and np.array_equal(draw({"style": 0.0}), base)
    weights = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items() if "base_layer" in k}
    studio.fuse({"style": 1.0})
    assert np.abs(draw(None).astype(int) - full.astype(int)).max() <= 1
    studio.unfuse()
    assert all(torch.equal(v, studio.pipe.unet.state_dict()[k]) for k, v in weights.items())

    sd15 = tmp_path / "sd15.safetensors"
    save_file(
        {
            "lora_unet_x_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
            "lora_unet_x_attn2_to_k.lora_up.weight": torch.zeros(8, 4),
        },
        str(sd15),
        metadata={"ss_base_model_version": "sd_v1"},
    )
    with pytest.raises(UserError, match="is an SD 1.x adapter but the loaded base model is SDXL"):
        studio.load(sd15)


def test_an_fp16_sdxl_vae_decodes_in_bf16_instead_of_being_upcast_to_fp32_for_every_picture(
    tiny_sdxl_model, tiny_model
):
    """SDXL's VAE says `force_upcast` (it overflows in fp16), so diffusers' SDXL pipeline converts an fp16 VAE to
    fp32 for every picture. The studio holds it in bf16 instead (fp32's range): the decoder runs in bf16, and the
    picture is the upcast one's within a few levels. `vae_bf16=False` keeps diffusers' way; SD 1.x keeps fp16."""
    ours = Studio(str(tiny_sdxl_model), device="cpu", dtype=torch.float16)
    theirs = Studio(str(tiny_sdxl_model), device="cpu", dtype=torch.float16, vae_bf16=False)
    decoded = {}
    for name, studio in (("ours", ours), ("theirs", theirs)):

        def seen(module, args, name=name):
            decoded.setdefault(name, args[0].dtype)  # returns None: the input goes on unchanged

        hook = studio.pipe.vae.decoder.register_forward_pre_hook(seen)
        picture = studio.generate("a red circle", seed=2, sampling_steps=4)[0]
        decoded[f"{name} picture"] = np.asarray(picture).astype(int)
        hook.remove()
    assert decoded["ours"] == torch.bfloat16 and ours.pipe.vae.dtype == torch.bfloat16
    assert decoded["theirs"] == torch.float32 and theirs.pipe.vae.dtype == torch.float16  # upcast, then back
    gap = np.abs(decoded["ours picture"] - decoded["theirs picture"])
    print("bf16 against fp32 decoding, levels of 255: max", gap.max(), "mean", gap.mean())
    assert gap.max() <= 8 and gap.mean() <= 1.5
    assert Studio(str(tiny_model), device="cpu", dtype=torch.float16).pipe.vae.dtype == torch.float16
