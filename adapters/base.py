"""Base pipelines: resolving `builtin`, a local diffusers folder or a Hugging Face id, and loading it once."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adapters.errors import UserError

BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
_SUPPORTED_CLASSES = ("StableDiffusionPipeline",)


def pick_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_base_model(base_model: str | None) -> str:
    """Turn what the user typed into what `from_pretrained` takes: a folder path, or a hub id left as it is.

    `builtin` (or nothing) is the small model in the repo. A path that exists must be a diffusers folder; a name
    that is not a path is taken as a hub id, which is the only case that can reach the network.
    """
    if not base_model or base_model == BUILTIN:
        return str(BUILTIN_DIR)
    path = Path(base_model).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(
                f"base model folder {path} has no model_index.json: pass a folder in diffusers layout "
                "(as written by save_pretrained), a Hugging Face id, or 'builtin'"
            )
        cls = json.loads(index.read_text()).get("_class_name")
        if cls not in _SUPPORTED_CLASSES:
            raise UserError(
                f"base model {path} is a {cls}; lora-studio trains on Stable Diffusion 1.x/2.x "
                f"({', '.join(_SUPPORTED_CLASSES)}) for now"
            )
        return str(path)
    if base_model.startswith((".", "/", "~")) or base_model.count("/") != 1:
        raise UserError(
            f"base model {base_model!r} is neither an existing folder nor a Hugging Face id (owner/name): "
            "check the path, or use 'builtin'"
        )
    return base_model


def base_model_label(base_model: str | None) -> str:
    """The name to record in metadata: `builtin`, a hub id, or the folder's name."""
    if not base_model or base_model == BUILTIN:
        return BUILTIN
    path = Path(base_model).expanduser()
    return path.name if path.exists() else base_model


SETTINGS_FILE = "lora_studio.json"  # a model folder's recommended sampling settings, if it has them


def generation_defaults(source: str | Path | None, scheduler_config: dict | None = None) -> dict[str, float]:
    """The guidance and guidance rescale to use when the user gives none, for a model.

    A local model folder may recommend its own in `lora_studio.json` (the built-in model does). Otherwise SD's
    usual guidance 7.5, and guidance rescale 0.7 for zero-terminal-SNR schedules, as Lin et al. 2023 prescribe
    (without it, guidance over-exposes such models).
    """
    folder = Path(resolve_base_model(str(source))) if source else None  # None: a pipeline built in memory
    if scheduler_config is None:
        config_file = folder / "scheduler" / "scheduler_config.json" if folder else None
        scheduler_config = json.loads(config_file.read_text()) if config_file and config_file.is_file() else {}
    settings = {"guidance": 7.5, "guidance_rescale": 0.7 if scheduler_config.get("rescale_betas_zero_snr") else 0.0}
    recommended = folder / SETTINGS_FILE if folder else None
    if recommended and recommended.is_file():
        settings.update({k: float(v) for k, v in json.loads(recommended.read_text()).items() if k in settings})
    return settings


def model_family(pipe) -> str:
    """`lora-studio builtin`, `SD 1.x`, `SD 2.x` or `SDXL`, read from the loaded model itself, else `custom`."""
    source = Path(str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "")))
    if source.exists() and source.resolve() == BUILTIN_DIR:
        return "lora-studio builtin"
    return _family_of_dim(pipe.unet.config.cross_attention_dim)


def _family_of_dim(cross_attention_dim: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(cross_attention_dim, "custom")


def load_pipeline(base_model: str | None, *, device=None, dtype: torch.dtype = torch.float32):
    """Load a StableDiffusionPipeline (no safety checker) onto `device` in `dtype`; errors name the model."""
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model(base_model)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except UserError:
        raise
    except Exception as exc:  # hub or file errors: say which model and what to try
        raise UserError(
            f"could not load base model {base_model!r} ({type(exc).__name__}: {exc}). For a hub id, check the "
            "name and your network or log in with `hf auth login`; or pass a local diffusers folder"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or pick_device())


def model_modules(base_model: str | None) -> tuple[dict[str, dict[str, tuple[int, int]]], str]:
    """The LoRA-able layers of a base model's UNet and text encoder, and its family, from its configs alone.

    The models are built on the meta device (no weights read), so this is cheap even for SDXL-sized models.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapters.lora import module_shapes

    source = resolve_base_model(base_model)
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
        text_config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder")
    except Exception as exc:
        raise UserError(f"could not read the configs of base model {base_model!r}: {exc}") from exc
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(text_config)
    builtin = Path(source).exists() and Path(source).resolve() == BUILTIN_DIR
    family = "lora-studio builtin" if builtin else _family_of_dim(unet.config.cross_attention_dim)
    return {"unet": module_shapes(unet), "text_encoder": module_shapes(text_encoder)}, family
