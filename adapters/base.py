"""Base pipelines: resolving `builtin`, a local diffusers folder, a Hugging Face id or a single-file checkpoint, and
loading it once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from adapters.errors import UserError
from adapters.families import BUILTIN_DIR, Family, family_of_config, family_of_index
from adapters.formats import PICKLE_SUFFIXES
from adapters.single_file import checkpoint_family, inspect_checkpoint, is_single_file, read_header

BUILTIN = "builtin"


def pick_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_base_model(base_model: str | None) -> str:
    """Turn what the user typed into what `from_pretrained` takes: a folder path, or a hub id left as it is; or the
    path of a single-file checkpoint (adapters/single_file.py loads it).

    `builtin` (or nothing) is the small model in the repo. A folder must be in diffusers layout; a name that is not a
    path is taken as a hub id, which is the only case that can reach the network. A pickle (.ckpt) is refused with
    the command that converts it, unopened.
    """
    if not base_model or base_model == BUILTIN:
        return str(BUILTIN_DIR)
    path = Path(base_model).expanduser()
    if path.is_file() or path.suffix.lower() in PICKLE_SUFFIXES:
        read_header(path)  # refuses a pickle, whatever its name, with its conversion command
        return str(path)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"base model folder {path} has no model_index.json: pass a folder in diffusers layout "
                "(as written by save_pretrained), a Hugging Face id, or 'builtin'"
            )
        return str(path)
    if base_model.startswith((".", "/", "~")) or base_model.count("/") != 1:
        raise UserError(
            f"base model {base_model!r} is neither an existing folder nor a Hugging Face id (owner/name): "
            "check the path, or use 'builtin'"
        )
    return base_model


HUB_RETRY_S = 60  # a hub id that could not be looked up is not asked for again for this long (each try: ~23 s)
_HUB_FAILURES: dict[str, tuple[float, str]] = {}  # hub id -> (when, the message)


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def hub_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the hub could not be reached at all (no network, no name server, a
    timeout), as against a name the hub does not know."""
    return any(
        isinstance(e, (ConnectionError, TimeoutError))
        or any(word in type(e).__name__ for word in ("Connect", "Timeout", "OfflineMode"))
        or "Name or service not known" in str(e)
        for e in _causes(exc)
    )


def _root_cause(exc: BaseException, limit: int = 200) -> str:
    """The innermost error's name and first line, cut at a word (with "...") past `limit` characters."""
    last = list(_causes(exc))[-1]
    said = f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}"
    return said if len(said) <= limit else said[:limit].rsplit(" ", 1)[0] + " ..."


def check_base_model(base_model: str | None, prediction_type: str | None = None) -> tuple[str, Family]:
    """The resolved source and its family, from its `model_index.json` alone (for a hub id, only that small
    file is fetched), or a single file's header: a model lora-studio cannot use is refused here, before any weight
    is read, however it was named (folder, hub id, `builtin`, file). `prediction_type` overrides what a single file
    says (SD 2.x files often say nothing)."""
    from diffusers import DiffusionPipeline

    source = resolve_base_model(base_model)
    if is_single_file(source):
        return source, checkpoint_family(inspect_checkpoint(source, prediction_type))
    hub = not Path(source).exists()
    failed = _HUB_FAILURES.get(source) if hub else None
    if failed and time.monotonic() - failed[0] < HUB_RETRY_S:  # the page asks at every change of its form
        ago = time.monotonic() - failed[0]
        raise UserError(f"{failed[1]} (asked {ago:.0f} s ago; asked again {HUB_RETRY_S - ago:.0f} s from now)")
    try:
        index = DiffusionPipeline.load_config(source)
    except Exception as exc:  # hub or file errors: say which model and what to try
        offline = any("OfflineMode" in type(e).__name__ for e in _causes(exc))
        if hub and offline:  # HF_HUB_OFFLINE is set and the local cache does not hold it
            message = (
                f"base model {base_model!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, so "
                "it is not fetched: download it once with the network on (HF_HUB_OFFLINE unset), or pass a local "
                "diffusers folder or a checkpoint file"
            )
        elif hub and hub_unreachable(exc):
            message = (
                f"could not reach the Hugging Face hub for base model {base_model!r} ({_root_cause(exc)}). Check "
                "your network; a model downloaded before loads from the local cache with HF_HUB_OFFLINE=1; or pass "
                "a local diffusers folder or a checkpoint file"
            )
        else:
            message = (
                f"could not read the model_index.json of base model {base_model!r} ({type(exc).__name__}: {exc}). "
                "For a hub id, check the name and your network or log in with `hf auth login`; or pass a local "
                "diffusers folder"
            )
        if hub:
            _HUB_FAILURES[source] = (time.monotonic(), message)
        raise UserError(message) from exc
    _HUB_FAILURES.pop(source, None)
    family = family_of_index(index, source=source)
    if family is None:
        raise UserError(
            f"base model {base_model!r} is a {index.get('_class_name')}, not a Stable Diffusion text-to-image "
            "pipeline; lora-studio trains on Stable Diffusion 1.x, 2.x and SDXL models"
        )
    return source, family


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


def load_pipeline(
    base_model: str | None, *, device=None, dtype: torch.dtype = torch.float32, prediction_type: str | None = None
):
    """Load a base pipeline (no safety checker) onto `device` in `dtype`; errors name the model. A single-file
    checkpoint loads through diffusers' `from_single_file` with the shipped configs; `prediction_type` overrides
    what the file says."""
    import diffusers

    from adapters.single_file import load_single_file

    source, family = check_base_model(base_model, prediction_type)
    if is_single_file(source):
        pipe = load_single_file(source, dtype=dtype, prediction_type=prediction_type)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device or pick_device())
    # SD 1.x/2.x folders may name a safety checker; lora-studio loads none (SDXL pipelines have none to drop)
    no_checker = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,
            **(no_checker if family.pipeline_class == "StableDiffusionPipeline" else {}),
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


def model_modules(
    base_model: str | None, prediction_type: str | None = None
) -> tuple[dict[str, dict[str, tuple[int, int]]], Family]:
    """The LoRA-able layers of a base model's UNet and text encoder(s), and its family, from its configs alone.

    The models are built on the meta device (no weights read), so this is cheap even for SDXL-sized models.
    """
    import transformers
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    from adapters.lora import module_shapes

    source, _ = check_base_model(base_model, prediction_type)
    if is_single_file(source):  # its architecture is that of the shipped configs it loads with
        source = str(inspect_checkpoint(source, prediction_type).configs)
    try:
        index = DiffusionPipeline.load_config(source)
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
        scheduler = DDPMScheduler.load_config(source, subfolder="scheduler")
        family = family_of_config(
            unet_config,
            source=source,
            prediction_type=scheduler.get("prediction_type"),
            pipeline_class=index.get("_class_name"),
        )
        with torch.device("meta"):  # this thread only (accelerate's init_empty_weights is process-wide)
            models = {"unet": UNet2DConditionModel.from_config(unet_config)}
            for name in family.text_encoders:
                cls = getattr(transformers, index[name][1])  # e.g. ["transformers", "CLIPTextModel"]
                models[name] = cls(cls.config_class.from_pretrained(source, subfolder=name))
    except Exception as exc:
        raise UserError(f"could not read the configs of base model {base_model!r}: {exc}") from exc
    return {name: module_shapes(model) for name, model in models.items()}, family


def native_size_of(base_model: str | None, prediction_type: str | None = None) -> int:
    """The pixel size a base model was trained at, from its configs alone (UNet sample size times the VAE's
    downsampling): what `resolution 0` trains at. For a single file, the shipped configs it loads with."""
    return model_geometry(base_model, prediction_type)[0]


def model_geometry(base_model: str | None, prediction_type: str | None = None) -> tuple[int, int, int]:
    """(native size, VAE scale factor, UNet levels) of a base model, from its configs alone (see native_size_of)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source, _ = check_base_model(base_model, prediction_type)
    if is_single_file(source):
        source = str(inspect_checkpoint(source, prediction_type).configs)
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae = AutoencoderKL.load_config(source, subfolder="vae")
    except Exception as exc:
        raise UserError(f"could not read the configs of base model {base_model!r}: {exc}") from exc
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return unet["sample_size"] * scale, scale, len(unet["block_out_channels"])


def load_vae(base_model: str | None, *, device=None, prediction_type: str | None = None):
    """The base model's VAE alone, in fp32 on `device`, for looking at pictures (the data check): nothing else of
    the model is read. A single file's VAE is converted by diffusers' `from_single_file` with the shipped configs."""
    from diffusers import AutoencoderKL

    source, _ = check_base_model(base_model, prediction_type)
    try:
        if is_single_file(source):
            configs = str(inspect_checkpoint(source, prediction_type).configs)
            vae = AutoencoderKL.from_single_file(source, config=configs, subfolder="vae", local_files_only=True)
        else:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=torch.float32, use_safetensors=True)
    except UserError:
        raise
    except Exception as exc:  # hub or file errors: say which model and what to try
        raise UserError(
            f"could not load the VAE of base model {base_model!r} ({type(exc).__name__}: {exc}). For a hub id, check "
            "the name and your network or log in with `hf auth login`; or pass a local diffusers folder"
        ) from exc
    return vae.eval().requires_grad_(False).to(device or pick_device())
