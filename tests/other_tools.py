"""Test helper: how kohya sd-scripts, AUTOMATIC1111 and ComfyUI name LoRA modules, re-derived from reading their
source (none of their code is copied). What was read:

- kohya-ss/sd-scripts at 48d368fa: networks/lora.py (LoRANetwork.create_modules: "lora_unet" / "lora_te", with two
  text encoders "lora_te1" / "lora_te2", + "." + the module's path in the model it loads, "." then "_"; targets the
  Linear / Conv2d children of Transformer2DModel, CLIPAttention, CLIPMLP; create_network_from_weights with
  convert_diffusers_to_sai_if_needed, which renames diffusers-named SDXL keys by substring);
  library/sdxl_original_unet.py (its SDXL UNet has the original input_blocks / middle_block / output_blocks names,
  so that is what it writes for SDXL; its SD 1.x UNet, library/original_unet.py, keeps diffusers' names);
  library/sdxl_model_util.py (make_unet_conversion_map); requirements.txt (transformers 4.54.1: CLIP models with
  their `text_model.` level).
- AUTOMATIC1111/stable-diffusion-webui, extensions-builtin/Lora/networks.py (read as the A1111 side of a merge,
  cf2772fa): convert_diffusers_name_to_compvis, assign_network_names_to_compvis_modules, load_network.
- Comfy-Org/ComfyUI at 17358c8f: comfy/lora.py (model_lora_keys_clip, model_lora_keys_unet), comfy/utils.py
  (unet_to_diffusers), comfy/weight_adapter/lora.py (LoRAAdapter.load: `.lora_up.weight`, `_lora.up.weight`,
  `.lora_B.weight`, `.lora.up.weight`, `.lora_linear_layer.up.weight` under a mapped name),
  comfy_extras/nodes_train.py and nodes_lora_extract.py (what it saves).

The original (Stability / CompVis) module names come from tests/original_layout.py, whose checkpoints diffusers'
`from_single_file` reads back weight for weight (tests/test_single_file.py).
"""

from __future__ import annotations

import torch

from tests.original_layout import clip_to_original, open_clip_to_original, unet_to_original

CLIP_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def original_unet_names(unet_paths, config) -> dict[str, str]:
    """{diffusers UNet module path: its path in the original UNet (`input_blocks.4.1.…`)}, through the checkpoint
    writer of tests/original_layout.py."""
    paths = list(unet_paths)
    renamed = unet_to_original({f"{p}.weight": torch.empty(0) for p in paths}, config)
    return {p: k.removeprefix("model.diffusion_model.").removesuffix(".weight") for p, k in zip(paths, renamed)}


def _transformer_depths(config) -> list[int]:
    depth = config.get("transformer_layers_per_block", 1)
    return list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(config["down_block_types"])


def comfyui_unet_map(config) -> dict[str, str]:
    """ComfyUI's unet_to_diffusers, restated over a diffusers UNet config: {diffusers module path: original path}
    for the Linear / Conv2d layers it lists (attention blocks: proj_in, proj_out and per transformer block
    attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2; resnets, samplers and embeddings)."""
    n, depth = config["layers_per_block"], _transformer_depths(config)
    levels = len(config["down_block_types"])
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    resnet["conv_shortcut"] = "skip_connection"

    def attention(ours, theirs, transformers):
        rows = {f"{ours}.proj_in": f"{theirs}.proj_in", f"{ours}.proj_out": f"{theirs}.proj_out"}
        for t in range(transformers):
            for m in [f"{a}.{p}" for a in ("attn1", "attn2") for p in ATTENTION_PROJECTIONS]:
                rows[f"{ours}.transformer_blocks.{t}.{m}"] = f"{theirs}.transformer_blocks.{t}.{m}"
            for m in ("ff.net.0.proj", "ff.net.2"):
                rows[f"{ours}.transformer_blocks.{t}.{m}"] = f"{theirs}.transformer_blocks.{t}.{m}"
        return rows

    table = {
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for x in range(levels):  # input block 1 + (n + 1) * x + i; the level's downsampler after its n blocks
        cross = config["down_block_types"][x].startswith("CrossAttn")
        for i in range(n):
            block = 1 + (n + 1) * x + i
            for a, b in resnet.items():
                table[f"down_blocks.{x}.resnets.{i}.{a}"] = f"input_blocks.{block}.0.{b}"
            if cross:
                table.update(attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{block}.1", depth[x]))
        table[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{1 + (n + 1) * x + n}.0.op"
    table.update(attention("mid_block.attentions.0", "middle_block.1", depth[-1]))
    for i, block in enumerate((0, 2)):
        table.update({f"mid_block.resnets.{i}.{a}": f"middle_block.{block}.{b}" for a, b in resnet.items()})
    for x in range(levels):  # output block (n + 1) * x + i, from the deepest level; upsampler in the last one
        cross = config["up_block_types"][x].startswith("CrossAttn")
        for i in range(n + 1):
            block = (n + 1) * x + i
            for a, b in resnet.items():
                table[f"up_blocks.{x}.resnets.{i}.{a}"] = f"output_blocks.{block}.0.{b}"
            if cross:
                table.update(attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{block}.1", depth[::-1][x]))
        table[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{(n + 1) * x + n}.{2 if cross else 1}.conv"
    return table


def comfyui_lora_keys(config, clip_layers: int, clip_g_layers: int = 0) -> dict[str, tuple[str, str]]:
    """{LoRA module name ComfyUI maps: (component, module it patches: diffusers UNet path or `encoder.layers.…`)}.

    Text encoders (model_lora_keys_clip), per CLIP layer b and module m of CLIP_MODULES: `lora_te_text_model_
    encoder_layers_<b>_<m with _>` and `lora_te1_…` and `text_encoder.text_model.encoder.layers.<b>.<m>` (diffusers)
    patch clip_l, as does `text_encoders.clip_l.transformer.text_model.…` (its own generic name); with clip_g
    (SDXL), `lora_te2_…`, `text_encoder_2.text_model.…` and `text_encoders.clip_g.transformer.text_model.…`.
    UNet (model_lora_keys_unet): `lora_unet_` + the original path ('.' as '_') and `diffusion_model.` + it (its own
    names), and for each unet_to_diffusers row `lora_unet_` + the diffusers path and `unet.` + the diffusers path
    with `.to_` as `.processor.to_` and `to_out.0` as `to_out` (diffusers' oldest attention-processor naming: a
    peft `unet.….to_q` is not among them).
    """
    keys = {}
    clip_l = ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.clip_l.transformer.")
    clip_g = ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.transformer.")
    for encoder, layers, names in (("text_encoder", clip_layers, clip_l), ("text_encoder_2", clip_g_layers, clip_g)):
        for b in range(layers):
            for m in CLIP_MODULES:
                path = f"text_model.encoder.layers.{b}.{m}"
                for prefix in names:
                    name = prefix + (path.replace(".", "_") if prefix.startswith("lora_") else path)
                    keys[name] = (encoder, f"encoder.layers.{b}.{m}")
    for ours, theirs in comfyui_unet_map(config).items():
        keys["lora_unet_" + theirs.replace(".", "_")] = keys["diffusion_model." + theirs] = ("unet", ours)
        keys["lora_unet_" + ours.replace(".", "_")] = ("unet", ours)
        processor = "unet." + ours.replace(".to_", ".processor.to_")
        keys[processor.removesuffix(".0") if processor.endswith(".to_out.0") else processor] = ("unet", ours)
    return keys


def a1111_module(name: str, sdxl: bool) -> str:
    """The module A1111 looks a kohya-named LoRA module up as (convert_diffusers_name_to_compvis, then its
    fallbacks), '_'-separated; `…_attn` for OpenCLIP's fused q/k/v (its `[qkv]_proj` fallback)."""
    import re

    def at(pattern):
        return re.fullmatch(pattern, name)

    if m := at(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)"):  # three input blocks per level
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := at(r"lora_unet_mid_block_attentions_(\d+)_(.+)"):
        return f"diffusion_model_middle_block_1_{m[2]}"
    if m := at(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)"):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if (m := at(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) and not sdxl:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := at(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return re.sub(r"_[qkv]_proj$", "", f"1_model_transformer_resblocks_{m[1]}_{rest}")
    if name.startswith("lora_unet_"):  # "SDXL loras seem to already have correct compvis keys"
        return "diffusion_model_" + name.removeprefix("lora_unet_")
    if name.startswith("lora_te1_text_model_"):
        return ("0_transformer_text_model_" if sdxl else "transformer_text_model_") + name.removeprefix(
            "lora_te1_text_model_"
        )
    return name


def a1111_modules(unet, text_encoders) -> set[str]:
    """The module names A1111 gives the layers of an SD 1.x (one text encoder) or SDXL model: its checkpoint's
    weight names without `.weight`, '_'-separated, as assign_network_names_to_compvis_modules lists them (the UNet
    under `diffusion_model_`; SD 1.x's CLIP under `transformer_`; SDXL's embedders as `0_transformer_…` and
    OpenCLIP's `1_model_…`)."""
    names = set(original_unet_names(_linear_paths(unet), unet.config).values())
    names = {"diffusion_model." + n for n in names}
    clip = clip_to_original(text_encoders[0].state_dict(), "transformer.")
    if len(text_encoders) == 2:
        clip = {"0_" + k: v for k, v in clip.items()}
        clip.update(open_clip_to_original(text_encoders[1].state_dict(), "1_model."))
    names |= {k.rsplit(".", 1)[0] for k in clip if k.endswith((".weight", "in_proj_weight"))}
    return {n.replace(".", "_") for n in names}


def sd_scripts_sdxl_reads(name: str) -> str | None:
    """The name sd-scripts turns a diffusers-named SDXL UNet module into before matching its own modules
    (convert_diffusers_to_sai_if_needed with make_unet_conversion_map: SDXL's three levels written out, two layers
    down and three up each); None where it finds no rule."""
    if not name.startswith("lora_unet_"):
        return name
    rules = {"mid_block_attentions_0": "middle_block_1"}
    for i in range(3):
        for j in range(2):
            rules[f"down_blocks_{i}_attentions_{j}"] = f"input_blocks_{3 * i + j + 1}_1"
        for j in range(3):
            rules[f"up_blocks_{i}_attentions_{j}"] = f"output_blocks_{3 * i + j}_1"
    module = name.removeprefix("lora_unet_")
    for theirs_hf, theirs_sd in rules.items():
        if theirs_hf in module:
            return "lora_unet_" + module.replace(theirs_hf, theirs_sd)
    return None


def sd_scripts_name(component: str, path: str, sdxl: bool, original: dict[str, str]) -> str:
    """The name sd-scripts gives one module it trains: the UNet's by its original path on SDXL (`original`:
    original_unet_names), by its diffusers path on SD 1.x; a text encoder's under transformers 4's `text_model.`,
    as `lora_te_` (SDXL: `lora_te1_` / `lora_te2_`)."""
    if component == "unet":
        return "lora_unet_" + (original[path] if sdxl else path).replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + "text_model_" + path.removeprefix("text_model.").replace(".", "_")


def _linear_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
