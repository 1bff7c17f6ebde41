"""Model families: each model is known for what it is, and a model lora-studio cannot use is refused before any
weight is read, however it is named (a folder, a hub id, `builtin`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.base import load_pipeline, model_modules
from adapters.errors import UserError
from adapters.families import BUILTIN, SD1, SD2_EPS, SD2_V, SDXL, family_of_adapter, family_of_pipeline
from adapters.formats import build_metadata, to_kohya
from adapters.runtime import Studio

ROOT = Path(__file__).resolve().parent.parent
SD3_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": "0.42.1",
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_loaded_models_know_their_family(tiny_model):
    assert family_of_pipeline(load_pipeline("builtin", device="cpu")) is BUILTIN
    tiny = load_pipeline(str(tiny_model), device="cpu")
    assert family_of_pipeline(tiny).name == "custom"  # cross-attention width 32: no published family
    assert model_modules(str(tiny_model))[1].name == "custom"
    assert model_modules("builtin")[1] is BUILTIN


def test_adapter_files_say_which_family_they_were_made_for():
    """From the header when it says, else from the attn2 to_k input width (the text encoder's width)."""
    for family, width in ((SD1, 768), (SD2_V, 1024)):
        tensors = {"lora_unet_x_attn2_to_k.lora_down.weight": torch.zeros(4, width)}
        assert family_of_adapter(tensors, {}) is family
    assert family_of_adapter({}, {"ss_base_model_version": "sdxl_base_v1-0"}) is SDXL
    assert family_of_adapter({"lora_te2_x.lora_down.weight": torch.zeros(4, 8)}, {}) is SDXL
    assert family_of_adapter({}, {}) is None


def test_headers_name_the_family_as_kohya_and_modelspec_do():
    tensors = to_kohya({})
    common = dict(
        tensors=tensors,
        rank=4,
        alpha=4,
        base_model="m",
        output_name="o",
        resolution=512,
        num_images=1,
        tag_frequency={},
        trigger_word="",
        config={},
        steps=1,
    )
    sd1 = build_metadata(family=SD1, **common)
    assert (sd1["ss_base_model_version"], sd1["modelspec.architecture"], sd1["ss_v2"]) == (
        "sd_v1",
        "stable-diffusion-v1/lora",
        "False",
    )
    eps, v = build_metadata(family=SD2_EPS, **common), build_metadata(family=SD2_V, **common)
    assert (eps["modelspec.architecture"], v["modelspec.architecture"]) == (
        "stable-diffusion-v2-512/lora",
        "stable-diffusion-v2-768-v/lora",
    )
    assert eps["ss_v2"] == v["ss_v2"] == "True"


def test_a_model_of_another_kind_is_refused_before_any_weight_is_read(tmp_path):
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(SD3_INDEX))  # and nothing else: no weight could load
    for call in (lambda: load_pipeline(str(folder), device="cpu"), lambda: model_modules(str(folder))):
        with pytest.raises(UserError, match=r"is a StableDiffusion3Pipeline, not a Stable Diffusion text-to-image"):
            call()


def test_sdxl_folders_are_known_from_their_configs(tiny_sdxl_model):
    modules, family = model_modules(str(tiny_sdxl_model))
    assert family is SDXL and sorted(modules) == ["text_encoder", "text_encoder_2", "unet"]


def _fake_hub_cache(root: Path, repo: str, index: dict) -> Path:
    """A Hugging Face cache holding only `repo`'s model_index.json, as a download would have left it."""
    snapshot = "0" * 40
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(snapshot)
    (folder / "snapshots" / snapshot).mkdir(parents=True)
    (folder / "snapshots" / snapshot / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize(
    "index,message",
    [
        (SD3_INDEX, "is a StableDiffusion3Pipeline, not a Stable Diffusion text-to-image pipeline"),
        ({"_class_name": "FluxPipeline"}, "is a FluxPipeline, not a Stable Diffusion text-to-image pipeline"),
    ],
)
def test_a_hub_id_is_refused_like_a_folder(tmp_path, image_folder, index, message):
    """Through the CLI, offline, with the hub cache holding the repo's model_index.json only."""
    cache = _fake_hub_cache(tmp_path / "hub", "someone/some-model", index)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["train", "--base-model", "someone/some-model", "--data", str(image_folder), "--run-dir", "r"]
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "'someone/some-model'" in done.stderr


def test_a_wrong_family_adapter_names_both_families(tiny_model, tmp_path):
    """The message names the adapter's family and the loaded model's, by name."""
    studio = Studio(str(tiny_model), device="cpu")
    path = tmp_path / "sd15.safetensors"
    save_file(
        {
            "lora_unet_x_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
            "lora_unet_x_attn2_to_k.lora_up.weight": torch.zeros(8, 4),
        },
        str(path),
        metadata={"ss_base_model_version": "sd_v1"},
    )
    with pytest.raises(UserError) as caught:
        studio.load(path)
    assert str(caught.value) == (
        f"{path} is an SD 1.x adapter but the loaded base model is custom; use it with an SD 1.x base"
    )


def test_the_native_size_is_read_from_the_configs(tiny_model, tiny_sdxl_model):
    from adapters.base import native_size_of

    assert native_size_of("builtin") == 64
    assert native_size_of(str(tiny_model)) == 32 and native_size_of(str(tiny_sdxl_model)) == 32
    assert native_size_of(str(ROOT / "adapters" / "configs" / "sdxl")) == 1024  # the shipped SDXL base configs
    assert native_size_of(str(ROOT / "adapters" / "configs" / "sd2-768-v")) == 768


def test_an_unreachable_hub_is_said_so_and_not_asked_again_at_every_change_of_the_page(monkeypatch):
    """With no network, a hub id's lookup fails after some 23 s of retries; the page plans at every change of its
    form, so the failure is remembered for a minute (then asked again), and it says the hub could not be reached,
    not that the model lacks a file."""
    import socket

    from diffusers import DiffusionPipeline

    import adapters.base as base

    asked = []

    def no_network(source, **kwargs):
        asked.append(source)
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as exc:
            raise OSError(f"{source} does not appear to have a file named model_index.json.") from exc

    monkeypatch.setattr(DiffusionPipeline, "load_config", no_network)
    monkeypatch.setattr(base, "_HUB_FAILURES", {})
    for _ in range(3):
        with pytest.raises(UserError, match=r"could not reach the Hugging Face hub for base model 'someone/model'"):
            base.check_base_model("someone/model")
    assert asked == ["someone/model"]
    with pytest.raises(UserError, match=r"\(asked \d+ s ago; asked again \d+ s from now\)"):
        base.check_base_model("someone/model")
    monkeypatch.setattr(base, "HUB_RETRY_S", 0)  # a minute later
    with pytest.raises(UserError, match="could not reach"):
        base.check_base_model("someone/model")
    assert len(asked) == 2

    def unknown(source, **kwargs):  # the hub answered: no such model
        raise OSError(f"{source} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(DiffusionPipeline, "load_config", unknown)
    with pytest.raises(UserError, match=r"could not read the model_index.json of base model 'someone/other'.*check"):
        base.check_base_model("someone/other")

    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(source, **kwargs):  # HF_HUB_OFFLINE=1 and the cache lacks it: not "check your network"
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled. To disable it, "
                                   "please unset the `HF_HUB_OFFLINE` environment variable.")  # fmt: skip

    monkeypatch.setattr(DiffusionPipeline, "load_config", offline)
    with pytest.raises(UserError) as said:
        base.check_base_model("someone/cached-never")
    assert "'someone/cached-never' is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in str(
        said.value
    )
    assert "HF_HUB_OFFLINE=1" not in str(said.value)  # not told to set what is set
    cut = base._root_cause(OSError("unset the `HF_HUB_OFFLINE` variable " * 20))  # cut at a word, never mid-word
    assert cut.endswith(" ...") and cut[:-4].split()[-1] in ("unset", "the", "`HF_HUB_OFFLINE`", "variable")
