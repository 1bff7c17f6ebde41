"""The built-in model: one token per scene word in its tokenizer, built and shipped; pretraining keeps a record."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from transformers import CLIPTokenizer

from adapters.base import BUILTIN_DIR
from trainer.builtin.builder import build_tokenizer
from trainer.builtin.scenes import vocabulary


def _split_words(tokenizer: CLIPTokenizer) -> dict[str, list[str]]:
    """The scene words the tokenizer cuts into more than one token, with their pieces."""
    pieces = {word: tokenizer.tokenize(word) for word in vocabulary()}
    return {word: p for word, p in pieces.items() if len(p) != 1}


def test_built_tokenizer_gives_each_scene_word_one_token():
    assert _split_words(build_tokenizer()) == {}


def test_built_tokenizer_splits_other_words_into_known_pieces():
    """A trigger word or a typo reaches the text encoder as pieces, not as an unknown token: nothing is lost."""
    tokenizer = build_tokenizer()
    text = "glowline, a Red Hexagon 42!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).replace(" ", "") == text.lower().replace(" ", "")


def test_shipped_tokenizer_gives_each_scene_word_one_token():
    """A word added to the scene world without rebuilding and retraining the model fails here."""
    shipped = CLIPTokenizer.from_pretrained(BUILTIN_DIR, subfolder="tokenizer")
    split = _split_words(shipped)
    assert split == {}, (
        f"{BUILTIN_DIR / 'tokenizer'} cuts these scene words into pieces: {split}; the built-in model was made "
        "before they were added: rebuild and pretrain it (trainer/builtin/pretrain.py) or drop the words"
    )


def test_pretraining_writes_its_record_where_asked(tmp_path):
    """A pretraining run leaves a record of what it did (the README's pretraining figures come from one)."""
    from trainer.builtin.builder import build_pipeline, save_pipeline

    save_pipeline(build_pipeline(seed=0), tmp_path / "init")
    record = tmp_path / "results" / "pretrain.json"
    args = ["--init", str(tmp_path / "init"), "--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"]
    args += ["--vae-steps", "6", "--vae-batch", "4", "--vae-crop", "16", "--unet-steps", "7", "--unet-batch", "2"]
    args += ["--eval-count", "0", "--seed", "3", "--record", str(record)]
    subprocess.run([sys.executable, "-m", "trainer.builtin.pretrain", *args], check=True, capture_output=True)

    saved = json.loads(record.read_text())
    assert saved["command"] == shlex.join(["python", "-m", "trainer.builtin.pretrain", *args])
    assert saved["seed"] == 3 and saved["machine"]["cpu_count"] and saved["date"]
    assert saved["vae"]["steps"] == 6 and saved["vae"]["psnr_plain"] > 0 and saved["vae"]["seconds_per_step"] > 0
    assert saved["unet"]["steps"] == 7 and saved["unet"]["seconds_per_step"] > 0
    assert (tmp_path / "out" / "unet").is_dir() and not (tmp_path / "out" / "pretrain.json").exists()


def test_the_built_in_model_loads_and_draws_with_plain_diffusers_and_no_arguments():
    """As a new user would try it: no dtype argument, on the CPU (the text encoder is stored in fp32 so that
    transformers' saved-dtype loading and diffusers' fp32 loading agree); and the whole model stays small."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.manual_seed(0)
    image = DiffusionPipeline.from_pretrained(str(BUILTIN_DIR))("a red circle").images[0]  # 50 steps: 2 s here
    pixels = np.asarray(image, dtype=np.float64)
    assert image.size == (64, 64) and pixels.std() > 20  # a picture, not a blank (a NaN one comes out black)
    red, green, blue = (pixels[..., c].mean() for c in range(3))
    assert red > green + 10 and red > blue + 10  # what was asked for (seeds 0-5: red ahead by 23 to 52)
    assert sum(p.stat().st_size for p in BUILTIN_DIR.rglob("*") if p.is_file()) < 30 * 2**20


def test_save_pipeline_keeps_the_text_encoder_in_fp32(tmp_path):
    from safetensors import safe_open

    from trainer.builtin.builder import build_pipeline, save_pipeline

    save_pipeline(build_pipeline(), tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "text_encoder" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys() if "position_ids" not in k} == {"torch.float32"}
    with safe_open(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
