"""Our files as sd-scripts, AUTOMATIC1111 and ComfyUI read them, and theirs as we read them: SDXL and SD 1.x.

The other tools' naming rules are re-derived in tests/other_tools.py from reading their source; their code is not
run here. "Same picture" means equal to fp32 rounding (max abs diff < 1e-4 on the [0, 1] float output).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters.errors import UserError
from adapters.export import export_adapter
from adapters.formats import read_safetensors, sai_unet_names, to_diffusers, to_kohya
from adapters.lora import LoraModule, attention_targets
from adapters.runtime import Studio
from tests.other_tools import (
    CLIP_MODULES,
    a1111_module,
    a1111_modules,
    comfyui_lora_keys,
    comfyui_unet_map,
    original_unet_names,
    sd_scripts_name,
    sd_scripts_sdxl_reads,
)
from tests.test_interop import draw, merged_reference


def lora_targets(pipe) -> list[tuple[str, str]]:
    """(component, path): every UNet attention projection and every CLIP module of each text encoder."""
    targets = [("unet", p) for p in attention_targets(pipe.unet, "both")]
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component, None)
        if encoder is not None:
            targets += [(component, n) for n, _ in encoder.named_modules() if n.endswith(CLIP_MODULES)]
    return targets


def random_lora(pipe, rank=4, alpha=2.0, seed=0, scale=0.2) -> dict[tuple[str, str], LoraModule]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component, path in lora_targets(pipe):
        layer = getattr(pipe, component).get_submodule(path)
        out[component, path] = LoraModule(
            down=torch.randn(rank, layer.in_features, generator=gen) * scale,
            up=torch.randn(layer.out_features, rank, generator=gen) * scale,
            alpha=alpha,
        )
    return out


def written_names(modules, two_text_encoders) -> dict[str, tuple[str, str]]:
    """{module name our kohya writer gives: (component, path)}, one module at a time."""
    names = {}
    for (component, path), m in modules.items():
        (key,) = {k.split(".")[0] for k in to_kohya({f"{component}.{path}": m}, two_text_encoders=two_text_encoders)}
        names[key] = (component, path)
    return names


def test_sdxl_export_names_are_ones_comfyui_maps_onto_the_same_layers(tiny_sdxl_model, tmp_path):
    """`export --format kohya` of a tiny SDXL LoRA on every attention projection and both text encoders: every
    module name is one ComfyUI maps (model_lora_keys_unet / _clip), onto the layer it came from; misspelt names
    (a wrong text-encoder prefix, no `text_model_`, `to_out` without its `_0`) are not in the table."""
    studio = Studio(str(tiny_sdxl_model), device="cpu")
    modules = random_lora(studio.pipe)
    tensors, header = to_diffusers({f"{c}.{p}": m for (c, p), m in modules.items()})
    save_file(tensors, tmp_path / "d.safetensors", metadata=header)
    export_adapter(tmp_path / "d.safetensors", "kohya", tmp_path / "k.safetensors", base_model=str(tiny_sdxl_model))
    names = {key.split(".")[0] for key in read_safetensors(tmp_path / "k.safetensors")[0]}
    assert len(names) == len(modules) == 4 * 8 + 2 * 2 * 6  # 4 transformer blocks x 8 projections, 2 x 2 CLIP layers

    config = studio.pipe.unet.config
    comfy = comfyui_lora_keys(config, clip_layers=2, clip_g_layers=2)
    assert sorted(names - comfy.keys()) == []  # names ComfyUI would log as "lora key not loaded"
    assert {comfy[n] for n in names} == {(c, p.removeprefix("text_model.")) for c, p in modules}
    # its unet_to_diffusers, restated, agrees with the original-layout writer on every layer we target
    originals = original_unet_names([p for c, p in modules if c == "unet"], config)
    assert {p: comfyui_unet_map(config)[p] for p in originals} == originals
    for wrong in (
        "lora_te3_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_encoder_layers_0_self_attn_q_proj",
        "lora_te2_encoder_layers_1_mlp_fc2",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q",  # one transformer block there
    ):
        assert wrong not in comfy, wrong


@pytest.mark.parametrize("architecture", ["sdxl", "sd1"])
def test_full_size_names_map_in_sd_scripts_a1111_and_comfyui(architecture):
    """The full-size SDXL and SD 1.5 architectures (from adapters/configs, on the meta device: no weights), every
    attention projection and every CLIP module, named by our writer: ComfyUI maps each onto its layer; A1111
    finds each among its model's modules (the UNet's on the very layer); sd-scripts writes the same text-encoder
    names and, on SDXL, reads our diffusers-named UNet modules as the original-layout ones it writes itself."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    folder = f"adapters/configs/{architecture}"
    sdxl = architecture == "sdxl"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        encoders = [
            transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        ]
        if sdxl:
            config_2 = transformers.CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            encoders.append(transformers.CLIPTextModelWithProjection(config_2))
    pipe = type("Parts", (), {"unet": unet, "text_encoder": encoders[0]})()
    if sdxl:
        pipe.text_encoder_2 = encoders[1]
    tiny = LoraModule(down=torch.zeros(1, 1), up=torch.zeros(1, 1), alpha=1.0)
    targets = lora_targets(pipe)
    names = written_names(dict.fromkeys(targets, tiny), two_text_encoders=sdxl)
    unet_targets = [p for c, p in targets if c == "unet"]
    assert len(unet_targets) == (70 if sdxl else 16) * 8  # transformer blocks x attn1/attn2 x 4 projections
    assert len(names) == len(targets) == len(unet_targets) + 12 * 6 + (32 * 6 if sdxl else 0)

    comfy = comfyui_lora_keys(unet.config, clip_layers=12, clip_g_layers=32 if sdxl else 0)
    assert {n: comfy.get(n) for n in names} == {n: (c, p.removeprefix("text_model.")) for n, (c, p) in names.items()}

    originals = original_unet_names(unet_targets, unet.config)
    theirs = a1111_modules(unet, encoders)
    assert sorted(a1111_module(n, sdxl) for n in names if a1111_module(n, sdxl) not in theirs) == []
    unet_names = {n: p for n, (c, p) in names.items() if c == "unet"}
    assert {n: a1111_module(n, sdxl) for n in unet_names} == {
        n: "diffusion_model_" + originals[p].replace(".", "_") for n, p in unet_names.items()
    }

    sd_scripts = {sd_scripts_name(c, p, sdxl, originals): (c, p) for c, p in targets}
    assert {n for n in names if not n.startswith("lora_unet_")} == {
        n for n in sd_scripts if not n.startswith("lora_unet_")
    }
    if sdxl:  # it writes lora_unet_input_blocks_4_1_…; ours are diffusers-named, which it converts on reading
        assert {sd_scripts_sdxl_reads(n): p for n, p in unet_names.items()} == {
            n: p for n, (c, p) in sd_scripts.items() if c == "unet"
        }
    else:  # its SD 1.x UNet keeps diffusers' names: the same names
        assert set(unet_names) == {n for n in sd_scripts if n.startswith("lora_unet_")}


def test_sai_unet_names_match_the_original_layout_writer(tiny_sdxl_model):
    """Our structural map from diffusers UNet modules to their original names agrees, layer for layer, with the
    checkpoint writer whose files diffusers' from_single_file reads back (tiny SDXL, and the full SDXL, SD 1.x and
    SD 2.x UNets on the meta device), for every Linear and Conv2d."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from adapters.lora import module_shapes

    unets = [Studio(str(tiny_sdxl_model), device="cpu").pipe.unet]
    with init_empty_weights():
        for architecture in ("sdxl", "sd1", "sd2-768-v"):
            config = UNet2DConditionModel.load_config(f"adapters/configs/{architecture}", subfolder="unet")
            unets.append(UNet2DConditionModel.from_config(config))
    for unet in unets:
        paths = list(module_shapes(unet))
        assert sai_unet_names(paths) == {o: p for p, o in original_unet_names(paths, unet.config).items()}


def layout_as_written(modules, originals, tool, sdxl=True):
    """The tensors of `modules` laid out as `tool` writes an SDXL LoRA (or SD 1.x's): sd-scripts
    (`lora_unet_input_blocks_…`, on SD 1.x `lora_unet_down_blocks_…`; `lora_te1_text_model_…`,
    `lora_te2_text_model_…`, on SD 1.x `lora_te_text_model_…`; lora_down/lora_up, 0-dim alpha) or ComfyUI's training
    node (`diffusion_model.input_blocks.….lora_up.weight` for either, `text_encoders.clip_l.transformer.text_model.…`,
    clip_g for the second encoder, alpha under the module's name)."""
    tensors = {}
    for (component, path), m in modules.items():
        if tool == "sd-scripts":
            name = sd_scripts_name(component, path, sdxl, originals)
        elif component == "unet":
            name = "diffusion_model." + originals[path]
        else:
            clip = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}[component]
            name = f"text_encoders.{clip}.transformer.text_model." + path.removeprefix("text_model.")
        tensors[f"{name}.lora_down.weight"] = m.down
        tensors[f"{name}.lora_up.weight"] = m.up
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha)
    return tensors


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
@pytest.mark.parametrize("tool", ["sd-scripts", "comfyui"])
def test_files_as_sd_scripts_and_comfyui_write_them_apply_every_key(
    tiny_sdxl_model, tiny_model, tmp_path, tool, family
):
    """A tiny-SDXL (or SD 1.x) LoRA on every attention projection and every CLIP module of each encoder, named as
    sd-scripts or ComfyUI write it (ComfyUI's UNet by the original layout's names, sd-scripts' too on SDXL): every
    key lands on its layer, so the picture is the base with the deltas merged by hand."""
    model = tiny_sdxl_model if family == "sdxl" else tiny_model
    studio = Studio(str(model), device="cpu")
    modules = random_lora(studio.pipe, rank=4, alpha=2.0)
    originals = original_unet_names([p for c, p in modules if c == "unet"], studio.pipe.unet.config)
    tensors = layout_as_written(modules, originals, tool, sdxl=family == "sdxl")
    level = (
        "input_blocks_3_1_transformer_blocks_0_attn1_to_q" if family == "sdxl" or tool == "comfyui" else "attn1_to_q"
    )
    assert any(level in k.replace(".", "_") for k in tensors)  # 1 layer a level
    save_file(tensors, tmp_path / "theirs.safetensors")
    base = draw(studio.pipe)
    studio.load(tmp_path / "theirs.safetensors", name="t")
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    assert studio.adapters["t"] == [*encoders, "unet"]
    studio.set_strengths({"t": 0.7})
    ours = draw(studio.pipe)
    assert np.abs(ours - base).max() > 1e-2  # it does something
    assert np.abs(ours - draw(merged_reference(model, modules, 0.7))).max() < 1e-4


def test_keys_we_cannot_apply_are_refused_by_name(tiny_sdxl_model, tmp_path):
    """A ComfyUI file with whole-tensor `.diff` / `.diff_b` patches beside its LoRA weights, a block the model does
    not have, and a key of an unknown kind: each refused with the file and the keys, nothing half-applied."""
    studio = Studio(str(tiny_sdxl_model), device="cpu")
    modules = random_lora(studio.pipe)
    originals = original_unet_names([p for c, p in modules if c == "unet"], studio.pipe.unet.config)
    tensors = layout_as_written(modules, originals, "comfyui")
    cases = {
        "diff": {"diffusion_model.input_blocks.4.1.norm.diff": torch.zeros(64)},
        "bias": {"diffusion_model.input_blocks.4.1.proj_in.diff_b": torch.zeros(64)},
        "block": {
            "diffusion_model.input_blocks.9.1.proj_in.lora_down.weight": torch.zeros(4, 64),
            "diffusion_model.input_blocks.9.1.proj_in.lora_up.weight": torch.zeros(64, 4),
        },
        "kind": {"diffusion_model.input_blocks.4.1.proj_in.lora_scale": torch.zeros(1)},
    }
    messages = {
        "diff": r"diff.safetensors holds whole-tensor differences .*norm\.diff.*bias_diff off",
        "bias": r"bias.safetensors holds whole-tensor differences .*proj_in\.diff_b",
        "block": r"block.safetensors: 1 LoRA module\(s\) match no layer.*input_blocks\.9\.1\.proj_in",
        "kind": r"kind.safetensors: 1 key\(s\) are not LoRA weights .*proj_in\.lora_scale",
    }
    for case, extra in cases.items():
        save_file({**tensors, **extra}, tmp_path / f"{case}.safetensors")
        with pytest.raises(UserError, match=messages[case]):
            studio.load(tmp_path / f"{case}.safetensors")
    assert studio.adapters == {}


def test_diffusers_export_keeps_text_model_for_diffusers_and_comfyui(tiny_sdxl_model, tmp_path):
    """`export --format diffusers` of an SDXL LoRA with both text encoders: their keys are
    `text_encoder.text_model.…` / `text_encoder_2.text_model.…`, exactly ComfyUI's diffusers names for those
    layers; diffusers' own SDXL loader and our runtime draw from the export the merged picture. (Its UNet keys,
    peft's `unet.….to_q`, are not among ComfyUI's names: for ComfyUI the kohya layout is the one to use.)"""
    from diffusers import StableDiffusionXLPipeline

    studio = Studio(str(tiny_sdxl_model), device="cpu")
    modules = random_lora(studio.pipe, rank=4, alpha=1.5)
    save_file(to_kohya({f"{c}.{p}": m for (c, p), m in modules.items()}), tmp_path / "k.safetensors")
    export_adapter(
        tmp_path / "k.safetensors", "diffusers", tmp_path / "d.safetensors", base_model=str(tiny_sdxl_model)
    )
    keys = {k.rsplit(".", 2)[0] for k in read_safetensors(tmp_path / "d.safetensors")[0]}
    comfy = comfyui_lora_keys(studio.pipe.unet.config, clip_layers=2, clip_g_layers=2)
    text = {k for k in keys if k.startswith("text_encoder")}
    assert text == {f"{c}.text_model.{p.removeprefix('text_model.')}" for c, p in modules if c != "unet"}
    assert {comfy.get(k) for k in text} == {(c, p.removeprefix("text_model.")) for c, p in modules if c != "unet"}
    assert not any(k in comfy for k in keys - text)

    reference = draw(merged_reference(tiny_sdxl_model, modules, 1.0))
    theirs = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(tmp_path), weight_name="d.safetensors", adapter_name="d")
    assert np.abs(draw(theirs) - reference).max() < 1e-4
    studio.load(tmp_path / "d.safetensors", name="d")
    studio.set_strengths({"d": 1.0})
    assert np.abs(draw(studio.pipe) - reference).max() < 1e-4
