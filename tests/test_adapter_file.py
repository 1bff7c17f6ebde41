"""The adapter file: kohya/A1111 layout and nothing else, full metadata, exact round trip, read by diffusers."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from adapters.base import load_pipeline
from adapters.formats import model_hash, read_safetensors
from adapters.lora import LoraModule, attention_targets
from adapters.runtime import Studio
from trainer.config import TrainConfig
from trainer.loop import train

REQUIRED_METADATA = (
    "ss_network_module ss_network_dim ss_network_alpha ss_base_model_version ss_v2 ss_output_name "
    "ss_sd_model_name ss_resolution ss_num_train_images ss_tag_frequency sshs_model_hash "
    "modelspec.sai_model_spec modelspec.architecture modelspec.title modelspec.date modelspec.resolution "
    "modelspec.trigger_phrase lora_studio.config lora_studio.format_version"
).split()


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    from tests.conftest import write_scene_folder

    tmp = tmp_path_factory.mktemp("trained")
    data = write_scene_folder(tmp / "data")
    config = TrainConfig(
        base_model=str(tiny_model),
        data=str(data),
        steps=20,
        batch_size=2,
        learning_rate=5e-3,
        rank=4,
        alpha=2.0,
        trigger_word="zz",
        output=str(tmp / "style.safetensors"),
        run_dir=str(tmp / "run"),
    )
    return config, train(config, device="cpu", log_to_terminal=False)


def test_file_holds_only_the_kohya_layout(trained, tiny_model):
    config, result = trained
    with safe_open(str(result.adapter), "pt") as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    unet = load_pipeline(tiny_model, device="cpu").unet
    modules = {"lora_unet_" + p.replace(".", "_") for p in attention_targets(unet, "both")}
    expected = {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected
    for m in modules:
        down, up, alpha = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"], tensors[f"{m}.alpha"]
        assert down.shape[0] == 4 and up.shape[1] == 4 and alpha.dim() == 0 and float(alpha) == 2.0


def test_metadata_fields(trained):
    config, result = trained
    _, meta = read_safetensors(result.adapter)
    assert set(REQUIRED_METADATA) <= set(meta)
    assert all(isinstance(v, str) for v in meta.values())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert meta["ss_num_train_images"] == "4" and meta["ss_resolution"] == "(32, 32)"
    assert meta["modelspec.trigger_phrase"] == "zz" and meta["modelspec.resolution"] == "32x32"
    assert TrainConfig.from_dict(json.loads(meta["lora_studio.config"])).steps == 20
    assert json.loads(meta["ss_tag_frequency"])["data"]["zz"] == 4  # every caption got the trigger word
    tensors, _ = read_safetensors(result.adapter)
    assert meta["sshs_model_hash"] == model_hash(tensors)


def test_round_trip_same_tensors(trained):
    config, result = trained
    studio = Studio(config.base_model, device="cpu")
    lora = studio.read(result.adapter)
    from adapters.lora import extract

    in_memory = extract(result.unet, "unet")
    assert lora.keys() == in_memory.keys()
    for k in lora:
        assert torch.equal(lora[k].down, in_memory[k].down) and torch.equal(lora[k].up, in_memory[k].up)
        assert lora[k].alpha == in_memory[k].alpha == 2.0


def test_alpha_other_than_rank_is_honoured(tiny_model):
    """A hand-made adapter (rank 4, alpha 1) changes one layer's output by exactly up @ down * alpha / rank."""
    studio = Studio(str(tiny_model), device="cpu")
    path = attention_targets(studio.pipe.unet, "both")[0]
    layer = studio.pipe.unet.get_submodule(path)
    torch.manual_seed(0)
    module = LoraModule(down=torch.randn(4, layer.in_features), up=torch.randn(layer.out_features, 4), alpha=1.0)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base_out = layer(x)
    studio.add({f"unet.{path}": module}, "hand")
    studio.set_strengths({"hand": 0.5})
    with torch.no_grad():
        got = studio.pipe.unet.get_submodule(path)(x)
    expected = base_out + 0.5 * x @ (module.up @ module.down * (1.0 / 4)).T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_diffusers_load_lora_weights_reads_our_file(trained):
    """diffusers' own loader on our file draws what our in-memory trained model draws (fp32 rounding)."""
    from diffusers import StableDiffusionPipeline

    config, result = trained
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    ours = load_pipeline(config.base_model, device="cpu")
    ours.unet = result.unet
    ours.unet.set_adapters(["default"], [0.8])
    image_ours = ours("zz, a red circle", generator=torch.Generator().manual_seed(7), **kwargs).images

    theirs = StableDiffusionPipeline.from_pretrained(config.base_model, safety_checker=None)
    theirs.load_lora_weights(str(result.adapter.parent), weight_name=result.adapter.name, adapter_name="style")
    theirs.set_adapters(["style"], [0.8])
    image_theirs = theirs("zz, a red circle", generator=torch.Generator().manual_seed(7), **kwargs).images

    theirs.set_adapters(["style"], [0.0])
    image_base = theirs("zz, a red circle", generator=torch.Generator().manual_seed(7), **kwargs).images
    assert np.abs(image_ours - image_base).max() > 1e-2, "the adapter should visibly change the picture"
    assert np.abs(image_ours - image_theirs).max() < 1e-4


def test_keys_follow_the_published_naming(trained):
    config, result = trained
    with safe_open(str(result.adapter), "pt") as f:
        for key in f.keys():
            assert re.fullmatch(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", key), key
            assert "to_out_0" in key or re.search(r"attn[12]_to_[qkv]\.", key), key
