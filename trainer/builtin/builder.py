"""Build the small built-in Stable Diffusion pipeline (architecture, tokenizer, seeded weights) in diffusers layout.

    python -m trainer.builtin.builder               # random weights into adapters/builtin/
    python -m trainer.builtin.pretrain ...          # then trains those weights (see README)

The tokenizer is a real CLIP byte-level BPE whose merges are learned here from the scene vocabulary
(`trainer.builtin.scenes.vocabulary()`), so every caption word is one token and any other word still splits into
known pieces; tests/test_builtin.py checks this for the tokenizer built here and for the shipped one. Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import string
from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from adapters.base import BUILTIN_DIR, SETTINGS_FILE
from trainer.builtin.scenes import vocabulary

RESOLUTION = 64  # pixels; the VAE downsamples by 4, so the UNet works on 16x16 latents
# Sampling settings the built-in model is used with when none are given (adapters/base.py generation_defaults):
# measured best for it and its LoRAs; guidance rescale is what its zero-terminal-SNR schedule calls for.
RECOMMENDED = {"guidance": 5.0, "guidance_rescale": 0.7}


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, learned until every word is one symbol; ties broken alphabetically, so it is stable."""
    pieces = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        pairs = Counter()
        for syms in pieces.values():
            pairs.update(zip(syms, syms[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in pieces.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            pieces[w] = out


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer over printable ASCII whose merges make each of `words` (default: scene words) one token."""
    words = vocabulary() if words is None else words
    chars = [c for c in string.printable if not c.isspace() and c.lower() == c]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = _learn_merges(sorted(set(words)))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def assemble_pipeline(
    *, text: dict, unet: dict, vae: dict, scheduler, vocab_size: int | None = None, text_2: dict | None = None
):
    """A StableDiffusionPipeline with random weights from component settings, using the built-in tokenizer; with
    `text_2` (the second text encoder's settings, with its `projection_dim`), a StableDiffusionXLPipeline.

    `text`, `unet` and `vae` are keyword arguments of CLIPTextConfig, UNet2DConditionModel and AutoencoderKL
    (tests and the SD 1.5 / SDXL benchmarks build their own sizes through this too).
    """
    tokenizer = build_tokenizer()
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    def config(settings: dict) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab_size or len(tokenizer), max_position_embeddings=77, **ids, **settings)

    text_encoder = CLIPTextModel(config(text))  # first: the order of creation fixes the random weights
    parts = dict(
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **unet),
        scheduler=scheduler,
    )
    if text_2 is None:
        return StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        **parts, text_encoder_2=CLIPTextModelWithProjection(config(text_2)), tokenizer_2=tokenizer
    )


def build_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The built-in architecture with seeded random weights (fp32)."""
    torch.manual_seed(seed)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        # v-prediction on a zero-terminal-SNR schedule: the last training step is pure noise, so the model (and
        # any LoRA on it) can reach very dark or very light pictures, which eps-prediction with SD's schedule
        # cannot (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        steps_offset=1,
    )
    return assemble_pipeline(
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        vae=dict(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=RESOLUTION,
        ),
        unet=dict(
            sample_size=RESOLUTION // 4,
            layers_per_block=1,
            block_out_channels=(64, 128, 128),
            down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        scheduler=scheduler,
    )


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: Path) -> None:
    """Save in diffusers layout, into a temp folder renamed into place: the UNet and VAE as fp16 safetensors, the
    text encoder as fp32 (its fp16 values, widened): transformers loads a model in the dtype it was saved in while
    diffusers loads in fp32, and a pipeline loaded with no dtype argument must not mix the two."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        raise FileExistsError(f"{tmp} exists (left by an interrupted save?); remove it and run again")
    saved = copy.deepcopy(pipe).to(torch.float16)  # leave `pipe` as it is
    saved.text_encoder.to(torch.float32)
    saved.save_pretrained(tmp, safe_serialization=True)
    (tmp / SETTINGS_FILE).write_text(json.dumps(RECOMMENDED, indent=1) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR, help="folder to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    save_pipeline(build_pipeline(args.seed), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
