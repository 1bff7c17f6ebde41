"""Model families: what differs between SD 1.x, SD 2.x (eps and v), SDXL and the built-in model, in one place.

    family = family_of_pipeline(pipe)        # a loaded pipeline
    family = family_of_index(model_index)    # a model_index.json, before any weight is read
    family = family_of_adapter(tensors, metadata)   # an adapter file (None when it does not say)
    cond = family.conditioning(pipe, ["a red circle"], size=512)   # what the UNet is conditioned on
    unet(noisy, t, **family.unet_kwargs(cond))

Everything that decides by family (the pipeline class, which text encoders there are, the native size, the
names A1111 / ComfyUI / kohya read in a file's header) asks the `Family` here instead of testing the model.
SD 2.x has two descriptions (512 epsilon and 768 v-prediction) that differ only in the modelspec name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


@dataclass(frozen=True)
class Family:
    name: str  # how messages and `inspect` call it
    pipeline_class: str  # the diffusers pipeline that runs it
    text_encoders: tuple[str, ...]  # pipeline attributes holding the text encoders, in order
    kohya_version: str  # `ss_base_model_version`, as kohya sd-scripts writes it
    modelspec_architecture: str  # `modelspec.architecture`, as Stability's model spec names it
    v2: bool = False  # `ss_v2`: kohya's flag for the SD 2.x text encoder
    caption_keys: tuple[str, ...] = ("text_embeds",)  # conditioning that an empty caption replaces

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline parts LoRA can sit on: the UNet and each text encoder."""
        return ("unet", *self.text_encoders)

    def tokens(self, pipe, captions: list[str]) -> dict[str, torch.Tensor]:
        """The captions as token ids for each text encoder: `input_ids` [n, 77] (SDXL: and `input_ids_2`)."""
        tokenizers = ("tokenizer", "tokenizer_2")[: len(self.text_encoders)]
        return {key: token_ids(getattr(pipe, name), captions) for key, name in zip(_IDS, tokenizers)}

    def encode(self, pipe, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning for token ids (`tokens`), in fp32, as the family's own pipeline computes it;
        keys that are not token ids (SDXL's `time_ids`) pass through. Gradients flow into any LoRA on the text
        encoders, so a step that trains them calls this; `conditioning` is the same without gradients.

        SD 1.x / 2.x and the built-in model: the text encoder's last hidden states, `text_embeds` [n, 77, dim].
        SDXL: both encoders' penultimate hidden states side by side, `text_embeds` [n, 77, 768 + 1280], and the
        second encoder's projected pooled output, `pooled` [n, 1280].
        """
        rest = {k: v for k, v in tokens.items() if k not in _IDS}
        if len(self.text_encoders) == 1:
            encoder = pipe.text_encoder
            return {"text_embeds": encoder(tokens["input_ids"].to(encoder.device))[0].float(), **rest}
        hidden, pooled = [], None
        for key, encoder in zip(_IDS, (pipe.text_encoder, pipe.text_encoder_2)):
            out = encoder(tokens[key].to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        return {"text_embeds": torch.cat(hidden, dim=-1).float(), "pooled": pooled.float(), **rest}

    @torch.no_grad()
    def conditioning(self, pipe, captions: list[str]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning for `captions` (`encode` of their `tokens`), in fp32, without gradients."""
        return self.encode(pipe, self.tokens(pipe, captions))

    def image_conditioning(self, original_size, crop_top_left, target_size) -> dict[str, torch.Tensor]:
        """Conditioning that depends on the picture, not its caption: SDXL's added time ids (original height and
        width, crop top and left, target height and width) [1, 6]; nothing for the other families."""
        if len(self.text_encoders) == 1:
            return {}
        return {"time_ids": torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)}

    def pipeline_kwargs(self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor]) -> dict:
        """The family's pipeline arguments that stand in for a prompt and the empty negative prompt, from their
        `conditioning`: a pipeline so called never runs its text encoders (they may have left the GPU)."""
        kwargs = {"prompt_embeds": cond["text_embeds"], "negative_prompt_embeds": uncond["text_embeds"]}
        if "pooled" in self.caption_keys:
            kwargs.update(pooled_prompt_embeds=cond["pooled"], negative_pooled_prompt_embeds=uncond["pooled"])
        return kwargs

    def unet_kwargs(self, cond: dict[str, torch.Tensor]) -> dict:
        """The UNet's keyword arguments, besides the noisy latents and the timesteps, for a conditioning dict."""
        if len(self.text_encoders) == 1:
            return {"encoder_hidden_states": cond["text_embeds"]}
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return {"encoder_hidden_states": cond["text_embeds"], "added_cond_kwargs": added}


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids as Stable Diffusion pipelines make them: padded (and cut) to the tokenizer's 77."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


_IDS = ("input_ids", "input_ids_2")  # each text encoder's token ids, in `Family.tokens`
_ONE_ENCODER = ("text_encoder",)
BUILTIN = Family(
    "lora-studio builtin", "StableDiffusionPipeline", _ONE_ENCODER, "lora_studio_builtin", "lora-studio-builtin/lora"
)
SD1 = Family("SD 1.x", "StableDiffusionPipeline", _ONE_ENCODER, "sd_v1", "stable-diffusion-v1/lora")
SD2_EPS = Family("SD 2.x", "StableDiffusionPipeline", _ONE_ENCODER, "sd_v2", "stable-diffusion-v2-512/lora", v2=True)
SD2_V = Family("SD 2.x", "StableDiffusionPipeline", _ONE_ENCODER, "sd_v2", "stable-diffusion-v2-768-v/lora", v2=True)
SDXL = Family(
    "SDXL",
    "StableDiffusionXLPipeline",
    ("text_encoder", "text_encoder_2"),
    "sdxl_base_v1-0",
    "stable-diffusion-xl-v1-base/lora",
    caption_keys=("text_embeds", "pooled"),
)
CUSTOM = Family("custom", "StableDiffusionPipeline", _ONE_ENCODER, "custom", "custom/lora")
FAMILIES = (BUILTIN, SD1, SD2_EPS, SD2_V, SDXL, CUSTOM)
_BY_CLASS = {"StableDiffusionPipeline": None, "StableDiffusionXLPipeline": SDXL}


def native_size(pipe) -> int:
    """The pixel size a loaded model was trained at: its UNet's latent size times the VAE's downsampling."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def family_by_name(name: str) -> Family:
    """The family a name stands for (`SD 2.x` is the v-prediction description; its eps twin differs only in
    the modelspec name and native size)."""
    for family in (BUILTIN, SD1, SD2_V, SDXL, CUSTOM):
        if family.name == name:
            return family
    raise ValueError(f"no model family named {name!r}; known: {sorted({f.name for f in FAMILIES})}")


def _is_builtin(source) -> bool:
    path = Path(str(source or ""))
    return bool(str(source or "")) and path.exists() and path.resolve() == BUILTIN_DIR


def _of_width(cross_attention_dim, prediction_type: str | None) -> Family:
    """SD 1.x, 2.x and SDXL text encoders have widths 768, 1024 and 2048 (two encoders concatenated)."""
    if cross_attention_dim == 2048:
        return SDXL
    if cross_attention_dim == 1024:
        return SD2_V if prediction_type == "v_prediction" else SD2_EPS
    return SD1 if cross_attention_dim == 768 else CUSTOM


def family_of_config(
    unet_config: dict, *, source=None, prediction_type: str | None = None, pipeline_class: str | None = None
) -> Family:
    """A model's family from its UNet config (and, where known, its folder, scheduler and pipeline class)."""
    if _is_builtin(source):
        return BUILTIN
    if _BY_CLASS.get(pipeline_class or ""):
        return _BY_CLASS[pipeline_class]
    if unet_config.get("addition_embed_type") == "text_time":  # SDXL's pooled text + time ids
        return SDXL
    return _of_width(unet_config.get("cross_attention_dim"), prediction_type)


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, read from the model itself."""
    source = getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "")
    return family_of_config(
        dict(pipe.unet.config),
        source=source,
        prediction_type=pipe.scheduler.config.get("prediction_type"),
        pipeline_class=type(pipe).__name__,
    )


def family_of_index(model_index: dict, *, source=None) -> Family | None:
    """The family a `model_index.json` names by its pipeline class, before any weights are read; None where the
    class is not a Stable Diffusion text-to-image pipeline (the caller says what it is instead)."""
    if _is_builtin(source):
        return BUILTIN
    cls = model_index.get("_class_name")
    if cls not in _BY_CLASS:
        return None
    return _BY_CLASS[cls] or SD1  # SD 1.x and 2.x share a class; the configs tell them apart after loading


def family_of_adapter(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Family | None:
    """The family an adapter file was made for: from its header, else from its shapes; None when neither says."""
    version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    for needle, family in (("builtin", BUILTIN), ("xl", SDXL), ("v2", SD2_V), ("v1", SD1)):
        if needle in version:
            return family
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")) for k in tensors):
        return SDXL
    widths = {
        t.shape[1]
        for k, t in tensors.items()
        if re.search(r"attn2[._]to_k", k) and k.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight"))
    }
    family = _of_width(next(iter(widths), 0), "v_prediction")
    return None if family is CUSTOM else family
