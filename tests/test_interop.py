"""Adapters that travel: files from diffusers and from kohya-style writers draw what their own math says.

Each reference is computed independently of our reader: diffusers' own pipeline with its own LoRA, or the base
weights with the LoRA deltas added by hand. "Same image" means equal to fp32 rounding (max abs diff < 1e-4 on
the [0, 1] float output).
"""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters.base import load_pipeline
from adapters.errors import UserError
from adapters.export import export_adapter
from adapters.formats import read_lora, read_safetensors, to_kohya
from adapters.inspect import describe
from adapters.lora import LoraModule, attention_targets
from adapters.runtime import Studio
from tests.other_tools import comfyui_lora_keys

PROMPT = "a red circle above a blue square"


def draw(pipe, seed=11):
    return pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


# How the other tools name LoRA modules, read in their source (not copied):
# - kohya sd-scripts, networks/lora.py (LoRANetwork.create_modules): "lora_unet" / "lora_te" (SDXL: "lora_te1",
#   "lora_te2") + "." + the module's name in the model sd-scripts loads, every "." then "_". Its targets: the
#   Linear / 1x1 Conv children of Transformer2DModel (UNet) and of CLIPAttention / CLIPMLP (text encoder). Its SD 1.x
#   UNet keeps diffusers' module names (library/original_unet.py); its text encoder is transformers 4's
#   CLIPTextModel (requirements.txt pins 4.44), whose layers sit under `text_model.`.
# - AUTOMATIC1111, extensions-builtin/Lora/networks.py (convert_diffusers_name_to_compvis): rewrites
#   `lora_te_text_model_encoder_layers_<i>_<rest>` to its CLIP module `transformer_text_model_encoder_layers_<i>_
#   <rest>` and `lora_unet_{down,mid,up}_block(s)_...` (diffusers names) to the compvis UNet's; on SDXL it reads
#   `lora_te1_text_model_...` and `lora_te2_text_model_encoder_layers_...`. Anything else is "failed to match".
# - ComfyUI, comfy/lora.py (model_lora_keys_clip, model_lora_keys_unet) with comfy/utils.py (unet_to_diffusers):
#   re-derived as `comfyui_lora_keys` in tests/other_tools.py (which says what was read, and where).
CLIP_LAYER = re.compile(r"layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])$")

# What sd-scripts writes (and A1111 / ComfyUI map) for the tiny pipeline's text encoder, two CLIP layers, written out.
TINY_TEXT_ENCODER_NAMES = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj",
    "lora_te_text_model_encoder_layers_0_self_attn_v_proj",
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
    "lora_te_text_model_encoder_layers_0_mlp_fc1",
    "lora_te_text_model_encoder_layers_0_mlp_fc2",
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_1_self_attn_k_proj",
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj",
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1",
    "lora_te_text_model_encoder_layers_1_mlp_fc2",
}


def sd_scripts_name(component, path, te_prefix="lora_te_text_model_"):
    """The name sd-scripts gives an SD 1.x module: the UNet's diffusers path, or CLIP layer i's projection under
    transformers 4's `text_model.` (whatever level this transformers version has). `te_prefix` makes the
    variants: `lora_te1_text_model_` (SDXL's first encoder; A1111 and ComfyUI accept it on SD 1.x too) and
    `lora_te_` (what lora-studio wrote under transformers 5 before it followed the other tools)."""
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    layer, module = CLIP_LAYER.search(path).groups()
    return f"{te_prefix}encoder_layers_{layer}_{module.replace('.', '_')}"


def kohya_tensors(modules, with_alpha=True, te_prefix="lora_te_text_model_"):
    """A kohya-layout writer as sd-scripts lays files out: lora_down [r, in], lora_up [out, r], 0-dim alpha."""
    tensors = {}
    for (component, path), m in modules.items():
        name = sd_scripts_name(component, path, te_prefix)
        tensors[f"{name}.lora_down.weight"] = m.down
        tensors[f"{name}.lora_up.weight"] = m.up
        if with_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(m.alpha)
    return tensors


def random_modules(pipe, rank=4, alpha=2.0, seed=0, text_encoder=True, scale=0.2, text_targets=("q_proj", "v_proj")):
    """Random LoRA on every attention projection of the UNet and (optionally) the text encoder's `text_targets`."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    paths = [("unet", p) for p in attention_targets(pipe.unet, "both")]
    if text_encoder:
        paths += [
            ("text_encoder", n)
            for n, m in pipe.text_encoder.named_modules()
            if n.endswith(text_targets) and isinstance(m, torch.nn.Linear)
        ]
    for component, path in paths:
        layer = getattr(pipe, component).get_submodule(path)
        out[(component, path)] = LoraModule(
            down=torch.randn(rank, layer.in_features, generator=gen) * scale,
            up=torch.randn(layer.out_features, rank, generator=gen) * scale,
            alpha=alpha,
        )
    return out


def merged_reference(model_dir, modules, strength):
    """A fresh base pipeline with W += strength * up @ down * alpha / rank written into each layer."""
    pipe = load_pipeline(str(model_dir), device="cpu")
    with torch.no_grad():
        for (component, path), m in modules.items():
            getattr(pipe, component).get_submodule(path).weight += strength * m.delta()
    return pipe


ALL_CLIP = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.mark.parametrize("te_prefix", ["lora_te_text_model_", "lora_te1_text_model_", "lora_te_"])
def test_kohya_file_as_sd_scripts_writes_it_applies_every_key(tiny_model, tmp_path, te_prefix):
    """sd-scripts' naming (and `lora_te1_`, and our own earlier `lora_te_encoder_...`) with alphas: every UNet and
    text-encoder module lands on its layer, so the picture equals the base with the deltas merged by hand."""
    studio = Studio(str(tiny_model), device="cpu")
    modules = random_modules(studio.pipe, rank=4, alpha=2.0, text_targets=ALL_CLIP)
    tensors = kohya_tensors(modules, te_prefix=te_prefix)
    assert sum(k.startswith("lora_te") and k.endswith(".alpha") for k in tensors) == 12  # 2 CLIP layers x 6
    save_file(tensors, tmp_path / "kohya.safetensors", metadata={"ss_network_module": "networks.lora"})
    reference = draw(merged_reference(tiny_model, modules, 0.7))
    studio.load(tmp_path / "kohya.safetensors", name="k")
    studio.set_strengths({"k": 0.7})
    ours = draw(studio.pipe)
    assert np.abs(ours - draw(Studio(str(tiny_model), device="cpu").pipe)).max() > 1e-2  # it does something
    assert np.abs(ours - reference).max() < 1e-4


def test_kohya_file_without_alpha_means_alpha_equals_rank(tiny_model, tmp_path):
    studio = Studio(str(tiny_model), device="cpu")
    modules = random_modules(studio.pipe, rank=4, alpha=4.0, text_encoder=False)
    save_file(kohya_tensors(modules, with_alpha=False), tmp_path / "noalpha.safetensors")
    studio.load(tmp_path / "noalpha.safetensors", name="k")
    studio.set_strengths({"k": 1.0})
    assert np.abs(draw(studio.pipe) - draw(merged_reference(tiny_model, modules, 1.0))).max() < 1e-4
    assert describe(tmp_path / "noalpha.safetensors")["alphas"] == "not stored (alpha = rank)"


def test_kohya_export_writes_the_names_sd_scripts_a1111_and_comfyui_use(tiny_model, tmp_path):
    """`export --format kohya` of a UNet + text-encoder LoRA: every module name is one ComfyUI maps, onto the layer
    it came from, the text encoder's are exactly sd-scripts' (which A1111 rewrites to its CLIP modules), and
    diffusers' own `load_lora_weights` draws the merged picture from the file."""
    from diffusers import StableDiffusionPipeline

    from adapters.formats import to_diffusers

    studio = Studio(str(tiny_model), device="cpu")
    modules = random_modules(studio.pipe, text_targets=ALL_CLIP)
    tensors, header = to_diffusers({f"{c}.{p}": m for (c, p), m in modules.items()})
    save_file(tensors, tmp_path / "d.safetensors", metadata=header)
    export_adapter(tmp_path / "d.safetensors", "kohya", tmp_path / "k.safetensors", base_model=str(tiny_model))
    names = {key.split(".")[0] for key in read_safetensors(tmp_path / "k.safetensors")[0]}
    assert {n for n in names if n.startswith("lora_te")} == TINY_TEXT_ENCODER_NAMES
    comfy = comfyui_lora_keys(studio.pipe.unet.config, clip_layers=2)
    assert sorted(names - comfy.keys()) == []  # names ComfyUI would log as "lora key not loaded"
    assert {comfy[n] for n in names} == {(c, p.removeprefix("text_model.")) for c, p in modules}
    assert len(names) == len(modules) == 56 + 12  # 7 attention blocks x 2 x 4 projections, 2 CLIP layers x 6

    theirs = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(tmp_path), weight_name="k.safetensors", adapter_name="k")
    assert np.abs(draw(theirs) - draw(merged_reference(tiny_model, modules, 1.0))).max() < 1e-4


def test_sdxl_text_encoders_are_written_te1_and_te2_and_read_back():
    """Two text encoders: `lora_te1_` / `lora_te2_` with `text_model_` (what sd-scripts writes, A1111 and ComfyUI
    read on SDXL); told the base has two, the first encoder is `lora_te1_` even when the LoRA skips the second."""
    m = LoraModule(down=torch.randn(2, 8), up=torch.randn(8, 2), alpha=1.0)
    unet = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    te1, te2 = "encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"  # transformers 5's paths
    lora = {f"unet.{unet}": m, f"text_encoder.{te1}": m, f"text_encoder_2.{te2}": m}
    tensors = to_kohya(lora)
    names = {key.split(".")[0] for key in tensors}
    assert names == {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2",
    }
    sdxl_unet = {"layers_per_block": 2, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2}
    sdxl_unet["up_block_types"] = ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]
    assert names <= comfyui_lora_keys(sdxl_unet, clip_layers=2, clip_g_layers=2).keys()
    only_first = {f"text_encoder.{te1}": m}
    assert list(to_kohya(only_first, two_text_encoders=True))[0].startswith("lora_te1_text_model_encoder_layers_0_")
    shapes = {"unet": {unet: (8, 8)}, "text_encoder": {te1: (8, 8)}, "text_encoder_2": {te2: (8, 8)}}
    back = read_lora(tensors, {}, shapes, source="xl.safetensors", base_family="SDXL")
    assert sorted(back) == sorted(lora) and all(torch.equal(back[k].up, lora[k].up) for k in lora)


def test_two_keys_for_one_layer_are_refused():
    """Both spellings of one text-encoder layer in a file: refused, not one silently dropped."""
    tensors = {}
    for name in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_encoder_layers_0_self_attn_q_proj"):
        tensors[f"{name}.lora_down.weight"] = torch.zeros(2, 8)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(8, 2)
    shapes = {"unet": {}, "text_encoder": {"encoder.layers.0.self_attn.q_proj": (8, 8)}}
    with pytest.raises(
        UserError, match=r"d.safetensors: two LoRA modules name the layer text_encoder.encoder.layers.0"
    ):
        read_lora(tensors, {}, shapes, source="d.safetensors", base_family="SD 1.x")


def peft_pipeline_with_lora(tiny_model, rank=4, alpha=2.0):
    """diffusers' own pipeline with peft LoRA on the UNet and the text encoder, random (non-zero) weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pipe


def save_with_diffusers(pipe, folder, with_metadata=True):
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    if with_metadata:
        kwargs = dict(
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
        )
    type(pipe).save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        **kwargs,
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_diffusers_saved_file_draws_like_diffusers(tiny_model, tmp_path):
    pipe = peft_pipeline_with_lora(tiny_model, rank=4, alpha=2.0)
    reference = draw(pipe)  # diffusers + peft, in memory, strength 1, alpha/rank = 0.5
    path = save_with_diffusers(pipe, tmp_path)
    tensors, meta = read_safetensors(path)
    assert any(k.startswith("text_encoder.") for k in tensors) and "lora_adapter_metadata" in meta
    studio = Studio(str(tiny_model), device="cpu")
    studio.load(path, name="d")
    assert studio.adapters["d"] == ["text_encoder", "unet"]  # the text-encoder LoRA is applied too
    studio.set_strengths({"d": 1.0})
    assert np.abs(draw(studio.pipe) - reference).max() < 1e-4
    info = describe(path)
    assert info["format"] == "diffusers" and info["ranks"] == [4] and info["alphas"] == [2.0]
    assert info["targets"]["text_encoder"] > 0


def test_diffusers_file_without_metadata_and_old_layout(tiny_model, tmp_path):
    """No lora_adapter_metadata: alpha = rank. The older `.lora.down/.lora.up` naming reads the same."""
    pipe = peft_pipeline_with_lora(tiny_model, rank=4, alpha=4.0)
    reference = draw(pipe)
    path = save_with_diffusers(pipe, tmp_path, with_metadata=False)
    tensors, _ = read_safetensors(path)
    old = {
        k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
        for k, v in tensors.items()
    }
    save_file(old, tmp_path / "old.safetensors")
    for file in (path, tmp_path / "old.safetensors"):
        studio = Studio(str(tiny_model), device="cpu")
        studio.load(file, name="d")
        studio.set_strengths({"d": 1.0})
        assert np.abs(draw(studio.pipe) - reference).max() < 1e-4, file.name


def test_two_adapters_equal_their_weighted_sum(tiny_model):
    studio = Studio(str(tiny_model), device="cpu")
    a = random_modules(studio.pipe, seed=1, text_encoder=False)
    b = random_modules(studio.pipe, seed=2, text_encoder=False, rank=2, alpha=3.0)
    studio.add({f"{c}.{p}": m for (c, p), m in a.items()}, "a")
    studio.add({f"{c}.{p}": m for (c, p), m in b.items()}, "b")
    studio.set_strengths({"a": 0.7, "b": 0.3})
    combined = draw(studio.pipe)
    # the single adapter whose delta is 0.7 * delta_a + 0.3 * delta_b, written full-rank (down = I, alpha = rank)
    summed = {}
    for key in a:
        delta = 0.7 * a[key].delta() + 0.3 * b[key].delta()
        n = delta.shape[1]
        summed[f"{key[0]}.{key[1]}"] = LoraModule(down=torch.eye(n), up=delta, alpha=float(n))
    studio.add(summed, "sum")
    studio.set_strengths({"sum": 1.0})
    assert np.abs(draw(studio.pipe) - combined).max() < 1e-4


def test_fuse_matches_unfused_and_unfuse_restores_bit_for_bit(tiny_model):
    studio = Studio(str(tiny_model), device="cpu")
    base_weights = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items()}
    base_image = draw(studio.pipe)
    studio.add({f"{c}.{p}": m for (c, p), m in random_modules(studio.pipe, seed=3).items()}, "a")
    studio.add({f"{c}.{p}": m for (c, p), m in random_modules(studio.pipe, seed=4).items()}, "b")
    studio.set_strengths({"a": 0.6, "b": -0.4})
    live = draw(studio.pipe)
    studio.fuse({"a": 0.6, "b": -0.4})
    assert np.abs(draw(studio.pipe) - live).max() < 1e-4  # fp32 rounding: the sum is done in another order
    with pytest.raises(UserError, match="unfuse"):
        studio.set_strengths({"a": 1.0})
    studio.unfuse()
    after = studio.pipe.unet.state_dict()
    for key, value in base_weights.items():  # bit-for-bit: the saved base weights are put back
        wrapped = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        assert torch.equal(after[key] if key in after else after[wrapped], value), key
    studio.set_strengths({})
    assert np.array_equal(draw(studio.pipe), base_image)


def test_hot_swap_replaces_weights_in_place(tiny_model):
    studio = Studio(str(tiny_model), device="cpu")
    first = {f"{c}.{p}": m for (c, p), m in random_modules(studio.pipe, seed=6, text_encoder=False).items()}
    second = {
        f"{c}.{p}": m for (c, p), m in random_modules(studio.pipe, seed=7, alpha=1.0, text_encoder=False).items()
    }
    studio.add(first, "slot")
    studio.set_strengths({"slot": 0.8})
    layer_ids = [id(m) for m in studio.pipe.unet.modules()]
    studio.swap("slot", second)
    swapped = draw(studio.pipe)
    assert [id(m) for m in studio.pipe.unet.modules()] == layer_ids  # no layer added or removed
    fresh = Studio(str(tiny_model), device="cpu")
    fresh.add(second, "other")
    fresh.set_strengths({"other": 0.8})
    assert np.abs(swapped - draw(fresh.pipe)).max() < 1e-5
    wrong_rank = {
        k: LoraModule(torch.zeros(2, m.down.shape[1]), torch.zeros(m.up.shape[0], 2), 2.0) for k, m in second.items()
    }
    with pytest.raises(UserError, match="cannot hot-swap 'slot': rank 2"):
        studio.swap("slot", wrong_rank)


def test_loaded_adapters_are_bounded_and_evicted_ones_deleted(tiny_model):
    studio = Studio(str(tiny_model), device="cpu", max_loaded=2)
    for i in range(3):
        studio.add(
            {f"{c}.{p}": m for (c, p), m in random_modules(studio.pipe, seed=i, text_encoder=False).items()}, f"a{i}"
        )
        if i == 0:
            studio.set_strengths({"a0": 1.0})  # active: never evicted
    assert sorted(studio.adapters) == ["a0", "a2"]
    assert sorted(studio.pipe.unet.peft_config) == ["a0", "a2"]
    layer = studio.pipe.unet.get_submodule(attention_targets(studio.pipe.unet, "both")[0])
    assert sorted(layer.lora_A) == ["a0", "a2"]


def test_export_round_trip_keeps_alpha_and_diffusers_reads_the_export(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    studio = Studio(str(tiny_model), device="cpu")
    modules = random_modules(studio.pipe, rank=4, alpha=1.5, text_targets=ALL_CLIP)
    tensors = kohya_tensors(modules)
    save_file(tensors, tmp_path / "k.safetensors", metadata={"ss_network_dim": "4"})
    export_adapter(tmp_path / "k.safetensors", "diffusers", tmp_path / "d.safetensors", base_model=str(tiny_model))
    export_adapter(tmp_path / "d.safetensors", "kohya", tmp_path / "k2.safetensors", base_model=str(tiny_model))
    back, meta = read_safetensors(tmp_path / "k2.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert meta["ss_network_dim"] == "4"  # training metadata carried through both conversions
    d_meta = read_safetensors(tmp_path / "d.safetensors")[1]
    assert json.loads(d_meta["lora_adapter_metadata"])["unet.lora_alpha"] == 1.5

    reference = draw(merged_reference(tiny_model, modules, 1.0))
    theirs = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(tmp_path), weight_name="d.safetensors", adapter_name="d")
    assert np.abs(draw(theirs) - reference).max() < 1e-4
    with pytest.raises(UserError, match="already exists"):
        export_adapter(
            tmp_path / "k.safetensors", "diffusers", tmp_path / "d.safetensors", base_model=str(tiny_model)
        )


SD15 = {"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (768, 320)}, "text_encoder": {}}


@pytest.mark.parametrize("metadata", [{"ss_base_model_version": "sdxl_base_v1-0"}, {}])
def test_sdxl_adapter_on_sd15_base_says_so(metadata):
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
    }
    with pytest.raises(UserError, match=r"xl.safetensors is an SDXL adapter but the loaded base model is SD 1.x"):
        read_lora(tensors, metadata, SD15, source="xl.safetensors", base_family="SD 1.x")


def test_keys_matching_no_layer_are_refused(tiny_model, tmp_path):
    studio = Studio(str(tiny_model), device="cpu")
    save_file(
        {
            "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 4),
        },
        tmp_path / "odd.safetensors",
    )
    with pytest.raises(UserError, match=r"odd.safetensors: 1 LoRA module\(s\) match no layer.*no_such_block_to_q"):
        studio.load(tmp_path / "odd.safetensors")


def test_shape_that_does_not_fit_is_refused(tiny_model, tmp_path):
    studio = Studio(str(tiny_model), device="cpu")
    name = sd_scripts_name("unet", attention_targets(studio.pipe.unet, "both")[0])
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 99), f"{name}.lora_up.weight": torch.zeros(32, 4)},
        tmp_path / "shape.safetensors",
    )
    with pytest.raises(UserError, match=r"shape.safetensors: unet\..*expects in 32 / out 32, the file has in 99"):
        studio.load(tmp_path / "shape.safetensors")


def test_lycoris_and_unknown_files_are_refused(tiny_model, tmp_path):
    studio = Studio(str(tiny_model), device="cpu")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(UserError, match="is a LoHa"):
        studio.load(tmp_path / "loha.safetensors")
    save_file({"model.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(UserError, match="holds no LoRA weights"):
        studio.load(tmp_path / "ckpt.safetensors")
