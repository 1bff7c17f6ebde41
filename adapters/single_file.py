"""Single-file checkpoints (one `.safetensors` in the original layout, as AUTOMATIC1111, ComfyUI and model sites hand
them out): what the file is, from its header alone, and its pipeline through diffusers' own `from_single_file`.

    checkpoint = inspect_checkpoint(path)              # layout, config folder, prediction type; refuses other files
    pipe = load_single_file(path, dtype=torch.float32)  # a StableDiffusion(XL)Pipeline, nothing fetched

`from_single_file` converts the weights itself; it needs a diffusers config folder for the architecture. Those are
shipped in adapters/configs/ (configs only, no weights): sd1, sd2-512 (epsilon), sd2-768-v (v-prediction), sdxl,
each holding model_index.json, unet/, vae/, text_encoder*/, scheduler/ and the tokenizer settings; the CLIP BPE
vocabulary they share is adapters/configs/clip-tokenizer/. Nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import UserError
from adapters.formats import PICKLE_SUFFIXES

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # one diffusers config folder per layout (tests swap it)
CLIP_VOCAB = Path(__file__).resolve().parent / "configs" / "clip-tokenizer"  # vocab.json + merges.txt, shared
PREDICTION_TYPES = ("epsilon", "v_prediction")

_UNET = "model.diffusion_model."
# The text-encoder keys that tell the original layouts apart, and the token embedding that gives each one's width.
_LAYOUTS = {
    "sdxl": ("conditioner.embedders.1.model.", "conditioner.embedders.0.transformer."),
    "sd2": ("cond_stage_model.model.",),
    "sd1": ("cond_stage_model.transformer.",),
}
_TOKEN_EMBEDDINGS = {
    "conditioner.embedders.0.transformer.": "text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.": "token_embedding.weight",
    "cond_stage_model.model.": "token_embedding.weight",
    "cond_stage_model.transformer.": "text_model.embeddings.token_embedding.weight",
}
_ENCODER_OF_PREFIX = {  # which text encoder of the config folder each prefix holds
    "conditioner.embedders.0.transformer.": "text_encoder",
    "conditioner.embedders.1.model.": "text_encoder_2",
    "cond_stage_model.model.": "text_encoder",
    "cond_stage_model.transformer.": "text_encoder",
}
# What diffusers' own detector (infer_diffusers_model_type) calls the kinds of checkpoint lora-studio does not load.
_OTHER_KINDS = {
    "xl_refiner": "an SDXL refiner checkpoint (lora-studio trains on base models such as SDXL base 1.0)",
    "xl_inpaint": "an SDXL inpainting checkpoint (9 input channels)",
    "inpainting": "an SD 1.x inpainting checkpoint (9 input channels)",
    "inpainting_v2": "an SD 2.x inpainting checkpoint (9 input channels)",
    "instruct-pix2pix": "an InstructPix2Pix checkpoint",
    "upscale": "a Stable Diffusion x4 upscaler checkpoint",
    "playground-v2-5": "a Playground v2.5 checkpoint (EDM sampling)",
    "sd3": "a Stable Diffusion 3 checkpoint",
    "sd35_medium": "a Stable Diffusion 3.5 checkpoint",
    "sd35_large": "a Stable Diffusion 3.5 checkpoint",
    "stable_cascade_stage_b": "a Stable Cascade checkpoint",
    "stable_cascade_stage_b_lite": "a Stable Cascade checkpoint",
    "stable_cascade_stage_c": "a Stable Cascade checkpoint",
    "stable_cascade_stage_c_lite": "a Stable Cascade checkpoint",
}
_OTHER_PREFIXES = {  # the rest by the model's name before the first '-' (flux-dev, ltx-video-0.9.1, wan-t2v-14B...)
    "flux": "a FLUX checkpoint",
    "controlnet": "a ControlNet",
    "animatediff": "an AnimateDiff motion module",
    "ltx": "an LTX-Video checkpoint",
    "wan": "a Wan video checkpoint",
    "hunyuan": "a HunyuanVideo checkpoint",
    "mochi": "a Mochi checkpoint",
    "auraflow": "an AuraFlow checkpoint",
    "sana": "a Sana checkpoint",
    "lumina2": "a Lumina 2 checkpoint",
    "chroma": "a Chroma checkpoint",
    "hidream": "a HiDream checkpoint",
    "cosmos": "a Cosmos checkpoint",
    "z": "a Z-Image checkpoint",
    "autoencoder": "an autoencoder on its own",
}
_OTHER_BLOCKS = (
    ("joint_blocks.", "a Stable Diffusion 3 checkpoint (MMDiT joint blocks)"),
    ("double_blocks.", "a FLUX checkpoint (double-stream blocks)"),
)


@dataclass(frozen=True)
class Checkpoint:
    """What a single-file checkpoint is, from its header: enough to load it with `from_single_file`."""

    path: Path
    layout: str  # sd1 | sd2 | sdxl: the original key layout of its text encoder(s)
    configs: Path  # the diffusers config folder it loads with
    prediction_type: str  # epsilon | v_prediction
    prediction_from: str  # what said so: the override, the header, a marker key, a yaml beside it, the layout
    zero_snr: bool  # a `ztsnr` marker key: trained with zero terminal SNR (its scheduler rescales the betas)


def is_single_file(base_model: str | Path | None) -> bool:
    """Whether `--base-model` names a file (single-file checkpoint) rather than a folder, hub id or `builtin`."""
    return bool(base_model) and Path(str(base_model)).expanduser().is_file()


def conversion_command(path: Path) -> str:
    """The one-line command that turns a pickled checkpoint into a `.safetensors` one (it unpickles, so only for
    files the person trusts; `weights_only=True` refuses anything but tensors and plain containers)."""
    import shlex

    out = path.with_suffix(".safetensors")
    out = out if out != path else path.with_suffix(".converted.safetensors")
    code = (
        "import torch, safetensors.torch as st; "
        f"sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, {str(out)!r})"
    )
    plain = not any(c in code for c in '"$`\\!')
    return "python -c " + (f'"{code}"' if plain else shlex.quote(code))


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """{tensor name: shape} and the metadata of a safetensors file, from its JSON header alone (no tensor is read,
    nothing is unpickled); a pickle, whatever its name, is refused with the command that converts it."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{path} is a pickled PyTorch checkpoint ({path.suffix}); lora-studio never unpickles files (loading one "
            f"can run any code in it). If you trust it, convert it once with:\n  {conversion_command(path)}\n"
            "and pass the .safetensors file as --base-model"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a bare pickle
            raise UserError(
                f"{path} is a pickled PyTorch checkpoint named {path.suffix}, not a safetensors file; lora-studio "
                "never unpickles files. If you trust it, convert it once with:\n"
                f"  {conversion_command(path)}\nand pass the converted file as --base-model"
            ) from exc
        raise UserError(
            f"{path} is not a valid safetensors file ({exc}); pass a .safetensors checkpoint, a diffusers folder, "
            "a Hugging Face id or 'builtin' as the base model"
        ) from exc
    return shapes, metadata


def _other_kind(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What diffusers' own detector says a checkpoint is, when it is not an SD 1.x/2.x/SDXL base (None if it is)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:  # the detector reads shapes only; meta tensors carry them without memory
        kind = infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    except Exception:  # it fails on some unknown key sets
        kind = None
    if kind not in (None, "v1", "v2", "xl_base"):
        return _OTHER_KINDS.get(kind) or _OTHER_PREFIXES.get(kind.split("-")[0].split("_")[0], f"a {kind} checkpoint")
    # diffusers names SD3 and FLUX only at their published sizes (and anything unknown `v1`): their blocks say it too
    for needle, what in _OTHER_BLOCKS:
        if any(needle in k for k in shapes):
            return what
    return None


def _refuse_non_checkpoint(path: Path, keys: list[str]) -> None:
    """Refuse, naming what it is, a file that is not a whole SD checkpoint: a LoRA, a VAE, a text encoder, a UNet."""
    from adapters.formats import detect_layout

    if detect_layout(keys) != "unknown" or any(k.startswith(("lora_", "lycoris_")) for k in keys):
        raise UserError(
            f"{path} is a LoRA (or LyCORIS) adapter, not a base model: pass a checkpoint as --base-model and the "
            "adapter with --adapter (generate) or load it in the Generate tab"
        )
    if any(k.startswith(_UNET) for k in keys):
        return
    if keys and all(
        k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.")) for k in keys
    ):
        raise UserError(
            f"{path} is a VAE on its own (an autoencoder, no UNet or text encoder), not a base model; pass a whole "
            "checkpoint (UNet, VAE and text encoders in one file) as --base-model"
        )
    if keys and all(k.startswith(("text_model.", "transformer.", "cond_stage_model.", "conditioner.")) for k in keys):
        raise UserError(f"{path} is a text encoder on its own, not a base model; pass a whole checkpoint")
    if "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys:
        raise UserError(
            f"{path} is a UNet on its own in diffusers' layout; pass the diffusers folder it comes from, or a whole "
            "single-file checkpoint, as --base-model"
        )


def _layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    keys = list(shapes)
    _refuse_non_checkpoint(path, keys)
    other = _other_kind(shapes)
    if other:
        raise UserError(
            f"{path} is {other}; lora-studio trains on Stable Diffusion 1.x, 2.x and SDXL base checkpoints "
            "(and their fine-tunes)"
        )
    if not any(k.startswith(_UNET) for k in keys):
        raise UserError(
            f"{path} holds no Stable Diffusion UNet (no {_UNET}* keys; first keys: {sorted(keys)[:3]}); pass an SD "
            "1.x, 2.x or SDXL checkpoint, a diffusers folder, a Hugging Face id or 'builtin'"
        )
    for layout, prefixes in _LAYOUTS.items():
        if all(any(k.startswith(p) for k in keys) for p in prefixes):
            return layout
    raise UserError(
        f"{path} has a UNet but no text encoder in a layout lora-studio knows (cond_stage_model.transformer for "
        "SD 1.x, cond_stage_model.model for SD 2.x, conditioner.embedders for SDXL); pass a whole checkpoint"
    )


_V_WORDS = ("v", "v_prediction", "v-prediction", "vpred", "v_pred")
_EPS_WORDS = ("epsilon", "eps")


def _prediction_type(path: Path, layout: str, keys, metadata: dict, override: str | None) -> tuple[str, str]:
    """(prediction type, what said so). SD 2.x comes as 512 epsilon and 768 v models with the same keys, so the file
    must say which (SAI model spec header, a `v_pred` key, an AUTOMATIC1111 yaml beside it) or the person must."""
    import yaml

    if override:
        if override not in PREDICTION_TYPES:
            raise UserError(f"prediction type {override!r} is not one of {', '.join(PREDICTION_TYPES)}")
        return override, "the prediction type you gave"
    said = metadata.get("modelspec.prediction_type", "").strip().lower()
    if said in _V_WORDS or said in _EPS_WORDS:
        return ("v_prediction" if said in _V_WORDS else "epsilon"), "its modelspec.prediction_type header"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction", "its modelspec.architecture header"
    if architecture.startswith("stable-diffusion-v2-512"):
        return "epsilon", "its modelspec.architecture header"
    if "v_pred" in keys:  # the marker ComfyUI reads (v-prediction SDXL fine-tunes carry it)
        return "v_prediction", "its v_pred marker key"
    beside = path.with_suffix(".yaml")
    if beside.is_file():  # AUTOMATIC1111 reads a same-named yaml as the checkpoint's original config
        try:
            params = (yaml.safe_load(beside.read_text()) or {}).get("model", {}).get("params", {})
        except (yaml.YAMLError, AttributeError) as exc:
            raise UserError(f"{beside} (the config beside {path.name}) is not a readable yaml config: {exc}") from exc
        return ("v_prediction" if params.get("parameterization") == "v" else "epsilon"), f"{beside.name} beside it"
    if layout == "sd2":
        raise UserError(
            f"{path} is an SD 2.x checkpoint, and SD 2.x comes as 512-pixel epsilon models (2.0/2.1-base) and "
            "768-pixel v-prediction models (2.0/2.1 768-v) that the file does not tell apart: say which with "
            "--prediction-type v_prediction or --prediction-type epsilon, or put AUTOMATIC1111's yaml beside it "
            f'({path.with_suffix(".yaml").name}, with `parameterization: "v"` for a v model)'
        )
    return "epsilon", f"the {layout.upper()} layout (published {layout.upper()} models predict epsilon)"


def _check_shapes(path: Path, shapes: dict[str, tuple[int, ...]], layout: str, configs: Path) -> None:
    """Refuse a file whose widths are not those of the configs it would load with (from_single_file would fail
    deep inside, or load a wrong model): the text encoders' widths, and the UNet's first layer."""
    names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
    for prefix in _LAYOUTS[layout]:
        key = prefix + _TOKEN_EMBEDDINGS[prefix]
        encoder = _ENCODER_OF_PREFIX[prefix]
        width = json.loads((configs / encoder / "config.json").read_text())["hidden_size"]
        if key in shapes and shapes[key][-1] != width:
            raise UserError(
                f"{path}: its text encoder ({prefix}*) is {shapes[key][-1]} wide, but an {names[layout]} model's "
                f"{encoder} is {width} wide; the file is not a standard {names[layout]} checkpoint"
            )
    unet = json.loads((configs / "unet" / "config.json").read_text())
    first = shapes.get(_UNET + "input_blocks.0.0.weight")
    expected = (unet["block_out_channels"][0], unet["in_channels"], 3, 3)
    if first is not None and tuple(first) != expected:
        raise UserError(
            f"{path}: its UNet's first layer has shape {list(first)}, an {names[layout]} text-to-image UNet's is "
            f"{list(expected)} (an inpainting or other variant has more input channels); pass a text-to-image "
            "checkpoint"
        )


def inspect_checkpoint(path: str | Path, prediction_type: str | None = None) -> Checkpoint:
    """What a single-file checkpoint is, from its header (keys, shapes, metadata): its layout (SD 1.x, 2.x, SDXL),
    the shipped config folder it loads with and its prediction type; any other file is refused, naming what it is."""
    path = Path(path).expanduser()
    shapes, metadata = read_header(path)
    layout = _layout(path, shapes)
    prediction, said_by = _prediction_type(path, layout, shapes, metadata, prediction_type)
    folder = {"sd1": "sd1", "sdxl": "sdxl", "sd2": "sd2-768-v" if prediction == "v_prediction" else "sd2-512"}[layout]
    configs = CONFIGS_DIR / folder
    _check_shapes(path, shapes, layout, configs)
    return Checkpoint(path, layout, configs, prediction, said_by, zero_snr="ztsnr" in shapes)


def model_index(checkpoint: Checkpoint) -> dict:
    """The model_index.json of the config folder a checkpoint loads with."""
    return json.loads((checkpoint.configs / "model_index.json").read_text())


def scheduler_config(checkpoint: Checkpoint) -> dict:
    """The scheduler config a checkpoint loads with: its config folder's, with the checkpoint's prediction type and,
    for a zero-terminal-SNR model, rescaled betas and trailing timesteps (as Lin et al. 2023 prescribe)."""
    config = json.loads((checkpoint.configs / "scheduler" / "scheduler_config.json").read_text())
    config["prediction_type"] = checkpoint.prediction_type
    if checkpoint.zero_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def _scheduler(checkpoint: Checkpoint):
    import inspect

    import diffusers

    config = scheduler_config(checkpoint)
    cls = getattr(diffusers, config["_class_name"])
    if checkpoint.zero_snr and "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = diffusers.DDIMScheduler  # e.g. PNDM cannot rescale its betas
    return cls.from_config(config)


def _tokenizer(folder: Path):
    """A config folder's tokenizer: its own vocabulary files if it has them, else the shared CLIP vocabulary with
    the folder's settings (the families differ only in the padding token: SD 2.x and SDXL's second pad with '!')."""
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    return CLIPTokenizer.from_pretrained(
        str(CLIP_VOCAB), pad_token=settings["pad_token"], model_max_length=settings["model_max_length"]
    )


def load_single_file(path: str | Path, *, dtype: torch.dtype = torch.float32, prediction_type: str | None = None):
    """The pipeline of a single-file checkpoint, through diffusers' `from_single_file` with the shipped configs
    (`config=` the family's folder, `local_files_only`: nothing is fetched). Tokenizers and the scheduler are built
    here and passed in (one shared vocabulary; the prediction type the file or the person says)."""
    import diffusers

    checkpoint = inspect_checkpoint(path, prediction_type)
    index = model_index(checkpoint)
    components = {"scheduler": _scheduler(checkpoint)}
    for name in index:
        if name.startswith("tokenizer"):
            components[name] = _tokenizer(checkpoint.configs / name)
    if index["_class_name"] == "StableDiffusionPipeline":
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        return getattr(diffusers, index["_class_name"]).from_single_file(
            str(checkpoint.path), config=str(checkpoint.configs), local_files_only=True, dtype=dtype, **components
        )
    except Exception as exc:
        raise UserError(
            f"could not load the single-file checkpoint {checkpoint.path} as {checkpoint.layout.upper()} "
            f"({type(exc).__name__}: {exc}); the file may be damaged or an unusual variant"
        ) from exc


def checkpoint_family(checkpoint: Checkpoint):
    """The model family of a checkpoint: that of the configs it loads with, and its prediction type."""
    from adapters.families import family_of_config

    unet = json.loads((checkpoint.configs / "unet" / "config.json").read_text())
    pipeline_class = model_index(checkpoint)["_class_name"]
    return family_of_config(unet, prediction_type=checkpoint.prediction_type, pipeline_class=pipeline_class)
