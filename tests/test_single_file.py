"""Single-file checkpoints as `--base-model`: tiny SD 1.x / 2.x / SDXL models written as one original-layout
.safetensors load through diffusers' from_single_file and draw what their diffusers folders draw; the family and
prediction type come from the header; every other kind of file is refused, naming what it is, and nothing is
unpickled. The shipped configs are checked against the published architectures."""

from __future__ import annotations

import json
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import adapters.single_file as single_file
from adapters.base import check_base_model, load_pipeline, model_modules
from adapters.errors import UserError
from adapters.families import SD1, SD2_EPS, SD2_V, SDXL
from app.cli import main
from tests.original_layout import write_checkpoint

SHIPPED = single_file.CONFIGS_DIR
FOLDERS = {"sd1": "sd1", "sd2": "sd2-768-v", "sdxl": "sdxl"}  # the config folder of each tiny layout (SD 2.x: v)
A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's published ids for "a photo of a cat"


def _text_encoder(width: int, act: str, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=act,
        projection_dim=width,
        vocab_size=49408,  # the real CLIP vocabulary: the tiny models use the shipped tokenizer
        max_position_embeddings=77,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tokenizer(pad: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(single_file.CLIP_VOCAB), pad_token=pad, model_max_length=77)


def tiny_pipeline(layout: str, seed: int = 0):
    """A 32-pixel pipeline of an original layout: sd1 (OpenAI CLIP), sd2 (OpenCLIP, v-prediction) or sdxl (both
    encoders, of different widths as in SDXL: diffusers tells them apart by width)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    from tests.conftest import TINY_VAE

    vae = AutoencoderKL(**TINY_VAE)
    unet = dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=16)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if layout == "sdxl":
        unet = UNet2DConditionModel(
            **unet,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=32 + 48,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=48 + 6 * 8,
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_text_encoder(32, "quick_gelu"),
            text_encoder_2=_text_encoder(48, "gelu", with_projection=True),
            tokenizer=_tokenizer("<|endoftext|>"),
            tokenizer_2=_tokenizer("!"),
            unet=unet,
            scheduler=EulerDiscreteScheduler(**betas),
        )
    unet = UNet2DConditionModel(
        **unet,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        use_linear_projection=layout == "sd2",
    )
    prediction = "v_prediction" if layout == "sd2" else "epsilon"
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_text_encoder(32, "gelu" if layout == "sd2" else "quick_gelu"),
        tokenizer=_tokenizer("!" if layout == "sd2" else "<|endoftext|>"),
        unet=unet,
        scheduler=DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny(root: Path, layout: str) -> tuple[Path, Path, Path]:
    """(diffusers folder, single file, config root): the tiny model saved both ways, and a config root in the
    shipped one's shape holding the tiny model's configs only (no weights, no vocabulary: the shared one is used)."""
    pipe = tiny_pipeline(layout)
    folder, file, configs = root / f"tiny-{layout}", root / f"tiny-{layout}.safetensors", root / "configs"
    pipe.save_pretrained(folder, safe_serialization=True)
    write_checkpoint(pipe, file, layout)
    ignore = shutil.ignore_patterns("*.safetensors", "*.bin", "vocab.json", "merges.txt", "tokenizer.json")
    shutil.copytree(folder, configs / FOLDERS[layout], ignore=ignore)
    return folder, file, configs


@pytest.fixture
def offline(monkeypatch):
    """Any attempt of from_single_file to reach a hub fails the test (HF_HUB_OFFLINE is set too, in conftest)."""
    import diffusers.loaders.single_file as pipeline_loader
    import diffusers.loaders.single_file_utils as utils

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_single_file tried to fetch {args} {kwargs}")

    monkeypatch.setattr(pipeline_loader, "snapshot_download", refuse)
    monkeypatch.setattr(utils, "_get_model_file", refuse)
    monkeypatch.setattr(utils, "fetch_diffusers_config", refuse)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_a_single_file_trains_and_generates_what_its_folder_does(
    tmp_path, monkeypatch, capsys, offline, image_folder
):
    folder, file, configs = write_tiny(tmp_path, "sd1")
    monkeypatch.setattr(single_file, "CONFIGS_DIR", configs)
    monkeypatch.chdir(tmp_path)
    for model, out in ((folder, "from_folder.png"), (file, "from_file.png")):
        args = ["generate", "--base-model", model, "--prompt", "a red circle", "--seed", 3, "--steps", 4]
        assert main([str(a) for a in [*args, "--output", out]]) == 0, capsys.readouterr().err
    assert np.array_equal(_pixels(Path("from_file.png")), _pixels(Path("from_folder.png")))
    assert _pixels(Path("from_file.png")).std() > 0  # a picture, not a blank

    args = [
        "train",
        "--base-model",
        file,
        "--data",
        image_folder,
        "--steps",
        2,
        "--rank",
        2,
        "--output",
        "a.safetensors",
    ]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    from safetensors import safe_open

    with safe_open("a.safetensors", framework="pt") as f:
        assert f.metadata()["ss_sd_model_name"] == file.name


@pytest.mark.parametrize("layout", ["sd2", "sdxl"])
def test_sd2_and_sdxl_single_files_draw_what_their_folders_draw(layout, tmp_path, monkeypatch, offline):
    folder, file, configs = write_tiny(tmp_path, layout)
    monkeypatch.setattr(single_file, "CONFIGS_DIR", configs)
    prediction = "v_prediction" if layout == "sd2" else None  # a bare SD 2.x file does not say; the person does
    from_file = load_pipeline(str(file), device="cpu", prediction_type=prediction)
    from_folder = load_pipeline(str(folder), device="cpu")
    assert type(from_file) is type(from_folder)
    assert from_file.scheduler.config.prediction_type == from_folder.scheduler.config.prediction_type
    assert from_file.tokenizer.pad_token == from_folder.tokenizer.pad_token

    def draw(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, generator=generator, output_type="np").images

    picture = draw(from_file)
    assert np.array_equal(picture, draw(from_folder)) and picture.std() > 0
    assert model_modules(str(file), prediction)[0] == model_modules(str(folder))[0]  # what LoRA can sit on


def _header_file(path: Path, shapes: dict[str, tuple], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file with these keys and shapes (zeros): the header is all that detection reads."""
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


UNET_IN = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
VAE_IN = {"first_stage_model.encoder.conv_in.weight": (1, 3, 1, 1)}
SD1_KEYS = {
    **UNET_IN,
    **VAE_IN,
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1, 768),
}
SD2_KEYS = {
    **UNET_IN,
    **VAE_IN,
    "cond_stage_model.model.token_embedding.weight": (1, 1024),
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (1, 1024),  # diffusers' v2 key
}
SDXL_KEYS = {
    **UNET_IN,
    **VAE_IN,
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (1, 768),
    "conditioner.embedders.1.model.token_embedding.weight": (1, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1,),  # diffusers' xl_base key
}


def test_the_family_and_prediction_type_come_from_the_header(tmp_path):
    def family(keys, metadata=None, name="m.safetensors", prediction_type=None):
        return check_base_model(str(_header_file(tmp_path / name, keys, metadata)), prediction_type)[1]

    assert family(SD1_KEYS) is SD1
    assert family(SDXL_KEYS) is SDXL
    with pytest.raises(UserError, match="--prediction-type v_prediction or --prediction-type epsilon"):
        family(SD2_KEYS)
    assert family(SD2_KEYS, prediction_type="v_prediction") is SD2_V
    assert family(SD2_KEYS, prediction_type="epsilon") is SD2_EPS
    assert family(SD2_KEYS, {"modelspec.prediction_type": "v"}) is SD2_V
    assert family(SD2_KEYS, {"modelspec.architecture": "stable-diffusion-v2-512"}) is SD2_EPS
    assert family(SD2_KEYS, {"modelspec.prediction_type": "v"}, prediction_type="epsilon") is SD2_EPS  # override wins
    (tmp_path / "a1111.yaml").write_text(yaml.safe_dump({"model": {"params": {"parameterization": "v"}}}))
    assert family(SD2_KEYS, name="a1111.safetensors") is SD2_V  # AUTOMATIC1111's yaml beside the file
    with pytest.raises(UserError, match="prediction type 'v' is not one of epsilon, v_prediction"):
        family(SD2_KEYS, prediction_type="v")

    v_768 = _header_file(
        tmp_path / "v.safetensors", SD2_KEYS, {"modelspec.architecture": "stable-diffusion-v2-768-v"}
    )
    checkpoint = single_file.inspect_checkpoint(v_768)
    assert (checkpoint.configs, checkpoint.prediction_type, checkpoint.zero_snr) == (
        SHIPPED / "sd2-768-v",
        "v_prediction",
        False,
    )
    vpred_xl = _header_file(tmp_path / "noob.safetensors", {**SDXL_KEYS, "v_pred": (0,), "ztsnr": (0,)})
    checkpoint = single_file.inspect_checkpoint(vpred_xl)
    assert (checkpoint.configs, checkpoint.prediction_type, checkpoint.zero_snr) == (
        SHIPPED / "sdxl",
        "v_prediction",
        True,
    )
    scheduler = single_file.scheduler_config(checkpoint)
    assert scheduler["rescale_betas_zero_snr"] and scheduler["prediction_type"] == "v_prediction"

    wide = {**SD1_KEYS, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1, 1024)}
    with pytest.raises(UserError, match="is 1024 wide, but an SD 1.x model's text_encoder is 768 wide"):
        family(wide)


@pytest.mark.parametrize(
    "keys, says",
    [
        ({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": (4, 320)}, "is a LoRA"),
        ({"unet.down_blocks.0.attn1.to_q.lora_A.weight": (4, 320)}, "is a LoRA"),
        ({"encoder.conv_in.weight": (1, 3, 1, 1), "decoder.conv_out.weight": (3, 1, 1, 1)}, "is a VAE on its own"),
        ({"first_stage_model.encoder.conv_in.weight": (1, 3, 1, 1)}, "is a VAE on its own"),
        (
            {
                "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,),
                "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
            },
            "is a Stable Diffusion 3 checkpoint",
        ),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, "is a FLUX checkpoint"),
        (
            {**UNET_IN, "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1,)},
            "is an SDXL refiner checkpoint",
        ),
        ({**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
        ({**UNET_IN, **VAE_IN}, "has a UNet but no text encoder"),
    ],
    ids=["kohya-lora", "peft-lora", "vae", "ldm-vae", "sd3", "flux", "xl-refiner", "inpainting", "no-text-encoder"],
)
def test_other_files_are_refused_naming_what_they_are(keys, says, tmp_path):
    path = _header_file(tmp_path / "other.safetensors", keys)
    with pytest.raises(UserError, match=says):
        check_base_model(str(path))


def test_a_ckpt_is_refused_with_a_command_that_converts_it(tmp_path):
    tensors = {"model.diffusion_model.out.2.bias": torch.arange(4.0), "cond_stage_model.x": torch.ones(2, 3)}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7}, ckpt)
    with pytest.raises(UserError, match="never unpickles") as refused:
        load_pipeline(str(ckpt), device="cpu")
    command = next(line.strip() for line in str(refused.value).splitlines() if line.strip().startswith("python -c"))
    argv = shlex.split(command)
    subprocess.run([sys.executable, *argv[1:]], check=True, cwd=tmp_path)  # the command as the person runs it
    from safetensors.torch import load_file

    converted = load_file(tmp_path / "model.safetensors")
    assert converted.keys() == tensors.keys() and all(torch.equal(converted[k], tensors[k]) for k in tensors)


class _WritesMarker:
    """Unpickling this object creates the marker file: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_a_pickle_named_safetensors_is_refused_without_unpickling(kind, tmp_path):
    marker = tmp_path / "unpickled"
    fake = tmp_path / "model.safetensors"
    if kind == "pickle":
        fake.write_bytes(pickle.dumps({"state_dict": _WritesMarker(marker)}, protocol=2))
    else:
        torch.save({"state_dict": _WritesMarker(marker)}, fake)
    marker.unlink(missing_ok=True)  # torch.save does not run __reduce__'s result, but be sure
    for call in (lambda: check_base_model(str(fake)), lambda: load_pipeline(str(fake), device="cpu")):
        with pytest.raises(UserError, match="is a pickled PyTorch checkpoint named .safetensors"):
            call()
    with pytest.raises(UserError, match="pickled"):
        model_modules(str(fake))
    assert not marker.exists()


# Published parameter counts: UNet, VAE, then each text encoder (SD 2.x: the 23 layers its pipelines use).
PUBLISHED = {
    "sd1": [859_520_964, 83_653_863, 123_060_480],
    "sd2-512": [865_910_724, 83_653_863, 340_387_840],
    "sd2-768-v": [865_910_724, 83_653_863, 340_387_840],
    "sdxl": [2_567_463_684, 83_653_863, 123_060_480, 694_659_840],
}
ORIGINAL = {"sd1": "v1-inference.yaml", "sd2-512": "v2-inference.yaml", "sd2-768-v": "v2-inference-v.yaml"}
NATIVE = {"sd1": 512, "sd2-512": 512, "sd2-768-v": 768, "sdxl": 1024}
PADDING = {"sd1": ["<|endoftext|>"], "sd2-512": ["!"], "sd2-768-v": ["!"], "sdxl": ["<|endoftext|>", "!"]}


@pytest.mark.parametrize("folder", sorted(PUBLISHED))
def test_the_shipped_configs_are_the_published_architectures(folder):
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    configs = SHIPPED / folder
    original = yaml.safe_load((configs / ORIGINAL.get(folder, "sd_xl_base.yaml")).read_text())
    counts = []
    for cls, name, derive in (
        (UNet2DConditionModel, "unet", create_unet_diffusers_config_from_ldm),
        (AutoencoderKL, "vae", create_vae_diffusers_config_from_ldm),
    ):
        with init_empty_weights():
            model = cls.from_config(cls.load_config(configs / name))
        derived = derive(original, {}, image_size=NATIVE[folder])  # what diffusers makes of the original config
        ours = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
        assert {k: ours[k] for k in derived} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in derived.items()
        }
        counts.append(sum(p.numel() for p in model.parameters()))
    index = json.loads((configs / "model_index.json").read_text())
    encoders = sorted(k for k in index if k.startswith("text_encoder"))
    for name in encoders:
        cls = getattr(transformers, index[name][1])
        with init_empty_weights():
            counts.append(sum(p.numel() for p in cls(cls.config_class.from_pretrained(configs / name)).parameters()))
    assert counts == PUBLISHED[folder]

    tokenizers = [
        single_file._tokenizer(configs / name) for name in sorted(k for k in index if k.startswith("tokenizer"))
    ]
    assert [t.pad_token for t in tokenizers] == PADDING[folder]
    assert all(t("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT and t.model_max_length == 77 for t in tokenizers)
    assert json.loads((configs / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == (
        "v_prediction" if folder == "sd2-768-v" else "epsilon"
    )


def test_a_bare_sd2_file_trains_once_told_what_it_predicts(tmp_path, monkeypatch, capsys, offline, image_folder):
    """A single SD 2.x file that does not say eps or v is refused with the flag to add; with it, it trains."""
    _, file, configs = write_tiny(tmp_path, "sd2")
    monkeypatch.setattr(single_file, "CONFIGS_DIR", configs)
    args = [
        "train",
        "--base-model",
        file,
        "--data",
        image_folder,
        "--steps",
        2,
        "--rank",
        2,
        "--run-dir",
        tmp_path / "r",
    ]
    assert main([str(a) for a in args]) == 2
    assert "--prediction-type v_prediction" in capsys.readouterr().err
    out = tmp_path / "v.safetensors"
    args += ["--prediction-type", "v_prediction", "--output", out]
    assert main([str(a) for a in [*args[:-4], "--run-dir", tmp_path / "r2", *args[-4:]]]) == 0, (
        capsys.readouterr().err
    )
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["ss_v_parameterization"] == "True"  # trained with the v target
