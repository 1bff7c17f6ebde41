"""Shared fixtures: a tiny Stable Diffusion pipeline built from configs, and small captioned image folders."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# The cores are shared among pytest-xdist's workers (`make test` runs two): each worker, and each app, trainer or
# script a test starts (OMP_NUM_THREADS, inherited), takes its share, so that threads never outnumber the cores
# (torch's threads wait on each other at every parallel loop, and one left without a core stalls the rest: a
# trainer took ten times as long beside another worker). Alone (plain `pytest`), up to four threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(4, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
_GRADIO_CACHE: list[str] = []


def pytest_configure(config):
    """Gradio's cache (uploads, files it sends) for apps built in the tests: a folder of this session, removed at its
    end, so the suite leaves nothing in the system temp folder's gradio/ (set before any test module imports gradio;
    a script that imports this file for its helpers makes none)."""
    if "GRADIO_TEMP_DIR" not in os.environ:
        _GRADIO_CACHE.append(tempfile.mkdtemp(prefix="lora-studio-tests-gradio-"))
        os.environ["GRADIO_TEMP_DIR"] = _GRADIO_CACHE[0]


def pytest_unconfigure(config):
    for folder in _GRADIO_CACHE:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("GRADIO_TEMP_DIR", None)


@pytest.fixture(autouse=True)
def _judge_only_where_tested(request, monkeypatch):
    """The judge (trainer/judge.py) draws some 50 pictures at the end of every run, longer than a whole test run of
    the tiny models: runs in tests not marked `judge` skip it, as with --no-judge. Trainers these tests start as
    subprocesses still judge unless their config turns it off."""
    if request.node.get_closest_marker("judge") is None:
        monkeypatch.setattr("trainer.judge.Judge.start", classmethod(lambda cls, *args, **kwargs: None))


# The tiny models' VAE: 32x32 pixels to 8x8x4 latents.
TINY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=32,
)


# The SD 1.x/2.x-shaped tiny UNets: two cross-attention levels on 8x8 latents.
TINY_UNET = dict(
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=16,
)


def tiny_scheduler(prediction_type: str):
    """SD's noise schedule (scaled linear betas) for the tiny models, predicting `prediction_type`."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A 32x32-pixel SD-1.x-shaped pipeline (two attention levels, cross-attention dim 32), random weights."""
    from trainer.builtin.builder import assemble_pipeline

    torch.manual_seed(seed)
    return assemble_pipeline(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        unet=dict(TINY_UNET, cross_attention_dim=32, attention_head_dim=4),
        vae=TINY_VAE,
        scheduler=tiny_scheduler(prediction_type),
    )


def build_tiny_sd2_pipeline(prediction_type: str, seed: int = 0):
    """A 32x32-pixel SD-2.x-shaped pipeline: a 1024-wide text encoder (one layer, GELU, as OpenCLIP's), linear
    attention projections, and the 512-eps or 768-v parameterisation; random weights."""
    from trainer.builtin.builder import assemble_pipeline

    torch.manual_seed(seed)
    return assemble_pipeline(
        text=dict(
            hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=16, hidden_act="gelu"
        ),
        unet=dict(TINY_UNET, cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True),
        vae=TINY_VAE,
        scheduler=tiny_scheduler(prediction_type),
    )


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A 32x32-pixel SDXL-shaped pipeline: two text encoders (widths 32 + 32, the second with a 32-wide
    projection), pooled text and time-id embedding (`text_time`), random weights."""
    from diffusers import EulerDiscreteScheduler

    from trainer.builtin.builder import assemble_pipeline

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return assemble_pipeline(
        text=text,
        text_2=dict(text, projection_dim=32),
        unet=dict(
            sample_size=8,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            norm_num_groups=16,
        ),
        vae=TINY_VAE,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )


def _saved(tmp_path_factory, prediction_type: str) -> Path:
    path = tmp_path_factory.mktemp("tiny") / f"tiny-sd-{prediction_type}"
    build_tiny_pipeline(prediction_type).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A local diffusers folder of the tiny SDXL-shaped pipeline."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-sdxl"
    build_tiny_sdxl_pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A local diffusers folder of the tiny epsilon-prediction pipeline (loaded like any real model)."""
    return _saved(tmp_path_factory, "epsilon")


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory, "v_prediction")


def write_scene_folder(folder: Path, count: int = 4, size: int = 32, style: str = "neon", seed: int = 0) -> Path:
    """`count` rendered scene images with their captions, as a training folder."""
    from PIL import Image

    from trainer.builtin.scenes import render, sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    for i, (scene, pixels) in enumerate(zip(scenes, render(scenes, size=size, style=style))):
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(scene.caption)
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_scene_folder(tmp_path / "data")
