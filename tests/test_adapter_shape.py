"""The adapter's shape: LoRA dropout, extra targets (feed-forward, proj_in/proj_out, LoCon convolutions) and DoRA.

Each option trains something a run without it does not, and what it writes is read back alike by our runtime (at
any strength), by diffusers' own `load_lora_weights`, and (the kohya-layout files) by ComfyUI's key map, re-derived
in tests/test_interop.py. The references are independent of our reader: diffusers and peft, or the LoRA deltas
added to the base weights by hand.
"""

import json

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import write_scene_folder
from safetensors.torch import load_file, save_file

from adapters.base import load_pipeline
from adapters.errors import UserError
from adapters.export import export_adapter
from adapters.formats import raw_modules, read_safetensors
from adapters.inspect import describe
from adapters.lora import LoraModule, attention_targets
from adapters.runtime import Studio
from app.ui.settings import SettingsForm
from tests.other_tools import comfyui_lora_keys
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.runs import read_events

PROMPT = "a red circle above a blue square"


def draw(pipe, seed=11):
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, generator=generator, output_type="np").images


SHAPE_FIELDS = ("train_ff", "train_proj", "conv_rank", "conv_alpha", "lora_dropout", "use_dora")


def config_for(model, data, run, **extra):
    values = dict(base_model=str(model), data=str(data), steps=3, batch_size=2, learning_rate=1e-2, seed=5, rank=4)
    return TrainConfig(**{**values, "run_dir": str(run), **extra})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_scene_folder(tmp_path_factory.mktemp("shape") / "data")


@pytest.fixture(scope="module")
def shaped(tiny_model, data, tmp_path_factory):
    """A run with feed-forward, proj_in/proj_out and LoCon (conv rank 4, conv alpha 2) on top of the attention."""
    run = tmp_path_factory.mktemp("shaped") / "run"
    extra = dict(train_ff=True, train_proj=True, conv_rank=4, conv_alpha=2)
    return train(config_for(tiny_model, data, run, **extra), device="cpu", log_to_terminal=False)


@pytest.fixture(scope="module")
def dora(tiny_model, data, tmp_path_factory):
    """A DoRA run, also on proj_in/proj_out (1x1 convolutions in SD 1.x) and the 3x3 convolutions."""
    run = tmp_path_factory.mktemp("dora") / "run"
    extra = dict(use_dora=True, train_proj=True, conv_rank=4)
    return train(config_for(tiny_model, data, run, **extra), device="cpu", log_to_terminal=False)


def merged_by_hand(model_dir, lora, strength):
    """A fresh base pipeline with strength x up @ down x alpha / rank added to each layer's weight, in the layer's
    own shape (a 3x3 conv's kernel: lora_up [out, r, 1, 1] times lora_down [r, in, 3, 3])."""
    pipe = load_pipeline(str(model_dir), device="cpu")
    with torch.no_grad():
        for key, m in lora.items():
            weight = pipe.unet.get_submodule(key.split(".", 1)[1]).weight
            delta = m.up.float().flatten(1) @ m.down.float().flatten(1)
            weight += strength * m.alpha / m.rank * delta.view(weight.shape)
    return pipe


def diffusers_draw(model_dir, adapter, strength=1.0):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="a")
    theirs.set_adapters(["a"], [strength])
    return draw(theirs)


def studio_draw(model_dir, adapter, strength=1.0):
    studio = Studio(str(model_dir), device="cpu")
    studio.load(adapter, name="a")
    studio.set_strengths({"a": strength})
    return studio, draw(studio.pipe)


def test_lora_dropout_changes_what_is_learned_and_never_what_is_drawn(tiny_model, data, tmp_path):
    plain = train(config_for(tiny_model, data, tmp_path / "plain"), device="cpu", log_to_terminal=False)
    dropped = train(
        config_for(tiny_model, data, tmp_path / "drop", lora_dropout=0.5), device="cpu", log_to_terminal=False
    )
    a, b = load_file(plain.adapter), load_file(dropped.adapter)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith("lora_up.weight"))  # same seed, other result
    header = json.loads(read_safetensors(dropped.adapter)[1]["lora_studio.config"])
    assert header["lora_dropout"] == 0.5

    # the trained layer drops in training mode only: previews (eval mode) and generation are deterministic
    path = attention_targets(dropped.unet, "both")[0]
    x = torch.randn(3, dropped.unet.get_submodule(path).in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for run, drops in ((dropped, True), (plain, False)):
            layer = run.unet.get_submodule(path)
            layer.train()
            assert (not torch.equal(layer(x), layer(x))) is drops
            layer.eval()
            assert torch.equal(layer(x), layer(x))
    studio = Studio(str(tiny_model), device="cpu")
    studio.load(dropped.adapter, name="d")
    first = np.asarray(studio.generate("a red circle", seed=3, sampling_steps=4, strengths={"d": 1.0})[0])
    again = np.asarray(studio.generate("a red circle", seed=3, sampling_steps=4)[0])
    assert np.array_equal(first, again)


def test_extra_targets_put_lora_on_feed_forward_projections_and_convolutions(shaped, tiny_model):
    tensors, metadata = read_safetensors(shaped.adapter)
    names = {key.split(".")[0] for key in tensors}
    needles = ("_attn1_", "_attn2_", "_ff_net_", "_proj_in", "_proj_out", "_resnets_", "samplers_0_conv")
    by_kind = {}
    for name in names:
        kind = next((k for k in needles if k in name), "other")
        by_kind[kind] = by_kind.get(kind, 0) + 1
    # the tiny UNet: 7 attention blocks (one transformer block each), 8 ResNet blocks, 1 downsampler, 1 upsampler
    assert by_kind == dict(zip(needles, (28, 28, 14, 7, 7, 16, 2)))
    for name in names:  # every module learned: B starts at zero
        assert tensors[f"{name}.lora_up.weight"].abs().sum() > 0, name
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)  # rank 4, 32 in, the 3x3 kernel
    assert tensors[f"{conv}.lora_up.weight"].shape == (64, 4, 1, 1)
    assert float(tensors[f"{conv}.alpha"]) == 2.0  # --conv-alpha
    assert float(tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 4.0  # --alpha 0: the rank
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}  # as kohya records it

    # ComfyUI maps every name onto the layer it came from (tests/test_interop.py re-derives its key map)
    unet = load_pipeline(str(tiny_model), device="cpu").unet
    comfy = comfyui_lora_keys(unet.config, clip_layers=2)
    assert sorted(names - comfy.keys()) == []
    assert {comfy[n][1].replace(".", "_") for n in names} == {n.removeprefix("lora_unet_") for n in names}
    info = describe(shaped.adapter)
    assert info["targets"] == {
        "unet": 102,
        "attn1": 28,
        "attn2": 28,
        "ff": 14,
        "proj": 14,
        "resnet conv": 16,
        "sampler conv": 2,
    }
    assert (info["ranks"], info["conv_ranks"], info["dora"]) == ([4], [4], False)
    start = next(e for e in read_events(shaped.run_dir) if e["type"] == "start")
    assert start["targets"] == 102 and start["target_kinds"]["resnet conv"] == 16


def test_shaped_file_draws_alike_in_diffusers_our_runtime_and_by_hand(shaped, tiny_model):
    """Feed-forward, 1x1-conv projections and 3x3 LoCon in the kohya layout: diffusers' load_lora_weights, our
    runtime at strength 1, and the deltas merged into the base weights by hand draw the same picture; the strength
    slider scales all of them (0.5 = the deltas at half)."""
    tensors, metadata = read_safetensors(shaped.adapter)
    lora = {}
    for component, name, down, up, alpha, _ in raw_modules(tensors, metadata, "kohya", "shaped"):
        path = next(p for p, _ in shaped.unet.named_modules() if p.replace(".", "_") == name and "lora" not in p)
        lora[f"{component}.{path}"] = LoraModule(down, up, alpha)
    base = draw(load_pipeline(str(tiny_model), device="cpu"))
    studio, ours = studio_draw(tiny_model, shaped.adapter)
    assert np.abs(ours - base).max() > 1e-2  # it does something
    assert np.abs(ours - draw(merged_by_hand(tiny_model, lora, 1.0))).max() < 1e-4
    assert np.abs(diffusers_draw(tiny_model, shaped.adapter) - ours).max() < 1e-4
    studio.set_strengths({"a": 0.5})
    half = draw(studio.pipe)
    assert np.abs(half - ours).max() > 1e-3
    assert np.abs(half - draw(merged_by_hand(tiny_model, lora, 0.5))).max() < 1e-4


def test_dora_learns_magnitudes_and_diffusers_draws_what_our_runtime_draws(dora, tiny_model, tmp_path):
    tensors, metadata = read_safetensors(dora.adapter)
    assert not any(k.startswith("lora_unet_") for k in tensors)  # the diffusers (peft) layout
    magnitudes = {k.removesuffix(".lora_magnitude_vector"): t for k, t in tensors.items() if "magnitude" in k}
    lora_a = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    assert set(magnitudes) == lora_a and len(lora_a) == 56 + 14 + 18
    assert json.loads(metadata["lora_adapter_metadata"])["unet.use_dora"] is True
    # the magnitudes were learned: DoRA starts them at each output row's (channel's) norm of the base weight
    unet = load_pipeline(str(tiny_model), device="cpu").unet
    moved = [
        float(
            (m.detach().flatten() - unet.get_submodule(k.removeprefix("unet.")).weight.flatten(1).norm(dim=1))
            .abs()
            .max()
        )
        for k, m in magnitudes.items()
    ]
    assert min(moved) > 1e-4
    info = describe(dora.adapter)
    assert (info["format"], info["dora"], info["targets"]["resnet conv"]) == ("diffusers", True, 16)

    studio, ours = studio_draw(tiny_model, dora.adapter)
    assert np.abs(diffusers_draw(tiny_model, dora.adapter) - ours).max() < 1e-4
    studio.set_strengths({"a": 0.5})
    half = draw(studio.pipe)
    assert np.abs(half - ours).max() > 1e-3  # the strength slider moves a DoRA adapter too
    assert np.abs(diffusers_draw(tiny_model, dora.adapter, 0.5) - half).max() < 1e-4
    # fusing bakes the same picture in, and unfusing gives the live adapter back
    studio.fuse({"a": 0.5})
    assert np.abs(draw(studio.pipe) - half).max() < 1e-4
    studio.unfuse()
    studio.set_strengths({"a": 1.0})
    assert np.abs(draw(studio.pipe) - ours).max() < 1e-6

    with pytest.raises(UserError, match="a DoRA adapter is written in the diffusers layout only"):
        export_adapter(dora.adapter, "kohya", tmp_path / "k.safetensors", base_model=str(tiny_model))
    assert not (tmp_path / "k.safetensors").exists()


def test_a_kohya_layout_dora_file_is_refused_with_the_layout_we_read(tiny_model, tmp_path):
    name = "lora_unet_" + attention_targets(load_pipeline(str(tiny_model), device="cpu").unet)[0].replace(".", "_")
    tensors = {f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4)}
    save_file({**tensors, f"{name}.dora_scale": torch.ones(32, 1)}, tmp_path / "lyco.safetensors")
    with pytest.raises(UserError, match=r"lyco.safetensors is a DoRA adapter in the kohya / LyCORIS layout.*"):
        Studio(str(tiny_model), device="cpu").load(tmp_path / "lyco.safetensors")


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(conv_alpha=4), r"conv_alpha \(--conv-alpha\) has no effect without --conv-rank"),
        (dict(conv_rank=-1), r"conv_rank \(--conv-rank\) must be 0 \(off\) or from 1 to 1024"),
        (dict(lora_dropout=1.0), r"lora_dropout \(--lora-dropout\) must be at least 0 and below 1"),
        (dict(use_dora="yes"), r"use_dora \(--use-dora\) must be true or false"),
    ],
)
def test_bad_shape_settings_name_the_field(values, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**values)


def test_the_page_offers_each_shape_option_in_advanced():
    with gr.Blocks():
        form = SettingsForm(gpus=1)
    for name in SHAPE_FIELDS:
        control = form.controls[name]
        assert (
            control.elem_id == f"setting-{name}"
            and control.info == TrainConfig.__dataclass_fields__[name].metadata["help"]
        )
        assert not TrainConfig.__dataclass_fields__[name].metadata["basic"]  # under *Advanced*
    values = {n: c.value for n, c in form.controls.items()}
    values.update(train_ff=True, conv_rank=8.0, conv_alpha=4.0, lora_dropout=0.1, use_dora=True)
    config = form.config([values[n] for n in form.controls])
    assert (config.train_ff, config.conv_rank, config.conv_alpha, config.lora_dropout, config.use_dora) == (
        True,
        8,
        4.0,
        0.1,
        True,
    )


def test_sdxl_extra_targets_are_named_as_comfyui_maps_them(tiny_sdxl_model, data, tmp_path):
    """On SDXL too, feed-forward, proj_in/proj_out and LoCon's convolutions are written under names ComfyUI maps onto
    the layer each came from (its key map re-derived in tests/other_tools.py), and our runtime reads the file back
    onto every layer."""
    extra = dict(train_ff=True, train_proj=True, conv_rank=4, conv_alpha=2, steps=1, judge=False)
    done = train(config_for(tiny_sdxl_model, data, tmp_path / "run", **extra), device="cpu", log_to_terminal=False)
    tensors, _ = read_safetensors(done.adapter)
    names = {key.split(".")[0] for key in tensors}
    kinds = ("_attn1_", "_attn2_", "_ff_net_", "_proj_in", "_proj_out", "_resnets_", "samplers_0_conv")
    assert all(any(k in n for n in names) for k in kinds), sorted(names)
    unet = load_pipeline(str(tiny_sdxl_model), device="cpu").unet
    comfy = comfyui_lora_keys(unet.config, clip_layers=2, clip_g_layers=2)
    assert sorted(names - comfy.keys()) == []
    assert {comfy[n][1].replace(".", "_") for n in names} == {n.removeprefix("lora_unet_") for n in names}
    studio = Studio(str(tiny_sdxl_model), device="cpu")
    studio.load(done.adapter, name="x")
    assert studio.adapters["x"] == ["unet"]
