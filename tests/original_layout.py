"""Test helper: a diffusers pipeline written as one checkpoint in the original (CompVis / Stability) key layout, the
layout AUTOMATIC1111, ComfyUI and model sites use, so that diffusers' own `from_single_file` can read it back.

The inverse of diffusers' loaders/single_file_utils.py conversion (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), for any number of blocks:
diffusers' own scripts/convert_diffusers_to_original_*.py hard-code the full-size block counts. Tests only.
"""

from __future__ import annotations

import torch

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"))
_UNET_RESNET += (("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _renamed(state: dict[str, torch.Tensor], table: list[tuple[str, str, tuple]]) -> dict[str, torch.Tensor]:
    """Each key's longest matching diffusers prefix replaced by the original one, then the first name after it
    renamed by that row's (diffusers, original) pairs. Linear VAE attention weights become 1x1 convolutions."""
    out = {}
    for key, tensor in state.items():
        old, new, parts = max((row for row in table if key.startswith(row[0] + ".")), key=lambda row: len(row[0]))
        rest = key[len(old) :]
        for diffusers_name, original in parts:
            if rest.startswith("." + diffusers_name + "."):
                rest = "." + original + rest[len(diffusers_name) + 1 :]
                if parts is _VAE_ATTENTION and original != "norm" and tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]
                break
        out[new + rest] = tensor
    return out


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict under `model.diffusion_model.` (openaimodel.UNetModel names)."""
    per_level, levels = config["layers_per_block"], len(config["block_out_channels"])
    down_attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    table = [
        ("time_embedding.linear_1", "time_embed.0", ()),
        ("time_embedding.linear_2", "time_embed.2", ()),
        ("add_embedding.linear_1", "label_emb.0.0", ()),
        ("add_embedding.linear_2", "label_emb.0.2", ()),
        ("conv_in", "input_blocks.0.0", ()),
        ("conv_norm_out", "out.0", ()),
        ("conv_out", "out.2", ()),
        ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", ()),
        ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    for level in range(levels):
        for j in range(per_level):  # input block 0 is conv_in; each level has its layers, then a downsampler
            block = 1 + level * (per_level + 1) + j
            table.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0", _UNET_RESNET))
            if down_attention[level]:
                table.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{block}.1", ()))
        if level < levels - 1:
            block = (level + 1) * (per_level + 1)
            table.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{block}.0.op", ()))
        for j in range(per_level + 1):  # up blocks have one layer more; the upsampler sits in the last one
            block = level * (per_level + 1) + j
            table.append((f"up_blocks.{level}.resnets.{j}", f"output_blocks.{block}.0", _UNET_RESNET))
            if up_attention[level]:
                table.append((f"up_blocks.{level}.attentions.{j}", f"output_blocks.{block}.1", ()))
        if level < levels - 1:
            block, slot = level * (per_level + 1) + per_level, 2 if up_attention[level] else 1
            table.append((f"up_blocks.{level}.upsamplers.0", f"output_blocks.{block}.{slot}", ()))
    return {"model.diffusion_model." + k: v for k, v in _renamed(state, table).items()}


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict under `first_stage_model.` (ldm AutoencoderKL names; attention as 1x1 convs)."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    table = [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in", f"{part}.conv_in", ()), (f"{part}.conv_out", f"{part}.conv_out", ())]
        table += [(f"{part}.conv_norm_out", f"{part}.norm_out", ())]
        table += [(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)]
        table += [(f"{part}.mid_block.resnets.{i}", f"{part}.mid.block_{i + 1}", _VAE_RESNET) for i in (0, 1)]
    for level in range(levels):
        original = levels - 1 - level  # the decoder's levels are numbered the other way round
        for j in range(per_level):
            table.append((f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", _VAE_RESNET))
        for j in range(per_level + 1):
            table.append((f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{original}.block.{j}", _VAE_RESNET))
        table.append((f"encoder.down_blocks.{level}.downsamplers.0", f"encoder.down.{level}.downsample", ()))
        table.append((f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.up.{original}.upsample", ()))
    return {"first_stage_model." + k: v for k, v in _renamed(state, table).items()}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in the OpenAI-CLIP layout SD 1.x (and SDXL's first encoder) use:
    Hugging Face's own names under `prefix` (`cond_stage_model.transformer.`), with the `text_model.` level."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model state dict in the OpenCLIP layout SD 2.x and SDXL's second encoder use, under
    `prefix` (`cond_stage_model.model.`): fused q/k/v `in_proj`, `resblocks`, `ln_final`, a [width, dim]
    projection."""
    names = (
        ("embeddings.token_embedding.weight", "token_embedding.weight"),
        ("embeddings.position_embedding.weight", "positional_embedding"),
        ("final_layer_norm.", "ln_final."),
        ("encoder.layers.", "transformer.resblocks."),
        (".layer_norm1.", ".ln_1."),
        (".layer_norm2.", ".ln_2."),
        (".mlp.fc1.", ".mlp.c_fc."),
        (".mlp.fc2.", ".mlp.c_proj."),
        (".self_attn.out_proj.", ".attn.out_proj."),
    )
    out, fused = {}, {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        for new, old in names:
            key = key.replace(new, old)
        if ".self_attn." in key:  # q_proj/k_proj/v_proj -> one in_proj, in that order
            head, proj, kind = key.rsplit(".", 2)
            fused.setdefault((head.replace(".self_attn", ".attn"), kind), {})[proj] = tensor
            continue
        out[prefix + key] = tensor
    for (head, kind), parts in fused.items():
        out[f"{prefix}{head}.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def write_checkpoint(pipe, path, layout: str, metadata: dict[str, str] | None = None) -> None:
    """Write `pipe` as a single-file checkpoint of `layout` (sd1, sd2, sdxl) at `path`."""
    from safetensors.torch import save_file

    state = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    if layout == "sd1":
        state.update(clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    elif layout == "sd2":
        state.update(open_clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:
        state.update(clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
