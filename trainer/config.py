"""TrainConfig: every training knob, declared once with its help text; the CLI, the UI and config files build it.

A bad value is an error naming the field and the fix; an unknown key in a config file is an error (with the
closest known name), never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from adapters.errors import UserError
from adapters.library import sanitize_name
from adapters.lora import ATTENTION_CHOICES

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
# diffusers.optimization's schedules, as `get_scheduler` names them (kohya_ss uses the same names)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Old spellings still read from config files and flags, with a one-line notice: old name -> field.
RENAMED = {"sample_prompt": "preview_prompt", "sample_every": "preview_every"}
MAX_STEPS = 1_000_000  # days of training even at 10 steps/s; a larger count is a typo
# A list of prompts (`--preview-prompt` given once per prompt; a list, or one string, in a config file).
Prompts = tuple[str, ...]
# kohya_ss's options inside a sample prompt that previews understand: `a cat --d 7 --n blurry --s 30 --l 6`.
PREVIEW_OPTIONS = {"d": "SEED", "n": "NEGATIVE PROMPT", "s": "SAMPLING STEPS", "l": "GUIDANCE"}
# Fields that say what one command may do, not what the run is: a run folder's config.json keeps them at their
# defaults (`TrainConfig.as_run_keeps_it`), so that a later `--resume latest`, which starts from that file, does not
# inherit them (a resume given --overwrite once would otherwise replace an existing --output at every resume after).
ONE_OFF = ("overwrite", "resume")
# Groups, in the order the page shows them; `files` are chosen by the page itself (uploads, run folder, library).
GROUPS = ("model", "data", "adapter", "training", "loss", "previews", "runs", "files")


def _f(default, help: str, group: str, choices: tuple | None = None, basic: bool = False):
    """A field with its help text, its group, its choices, and whether the page shows it outside *Advanced*."""
    assert group in GROUPS, group
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "basic": basic})


def flag(name: str) -> str:
    """The command-line flag of a field: `learning_rate` -> `--learning-rate`."""
    return "--" + name.replace("_", "-")


def notice_renamed(old: str) -> str:
    """Say once, on stderr, that an old spelling was read; returns the field it stands for."""
    new = RENAMED[old]
    print(
        f"lora-studio: {old!r} ({flag(old)}) is now {new!r} ({flag(new)}); the old name works for now",
        file=sys.stderr,
    )
    return new


@dataclass
class TrainConfig:
    # what to train on
    base_model: str = _f(
        "builtin",
        "Base model: 'builtin' (the small model shipped with lora-studio, works offline), a Hugging Face id "
        "such as stable-diffusion-v1-5/stable-diffusion-v1-5, a local diffusers folder, or a single .safetensors "
        "checkpoint file (SD 1.x, 2.x, SDXL).",
        "model",
        basic=True,
    )
    prediction_type: str = _f(
        "auto",
        "What the base model predicts, for a single-file checkpoint that does not say (SD 2.x 768 models: "
        "v_prediction; 512 models: epsilon). auto = as the model says.",
        "model",
        ("auto", "epsilon", "v_prediction"),
    )
    data: str = _f(
        "", "Folder of training images (png, jpg, jpeg, webp, gif) with a same-named .txt caption each.", "files"
    )
    output: str = _f(
        "", "Adapter file to write (.safetensors). Default: adapter.safetensors inside the run folder.", "files"
    )
    overwrite: bool = _f(
        False, "Allow replacing an existing --output file (otherwise training refuses to start).", "files"
    )
    name: str = _f(
        "", "Adapter name, as shown in the library. Default: the run folder's name.", "adapter", basic=True
    )
    library: str = _f(
        "", "Adapter library folder to add the finished adapter to (with its last preview). Empty = none.", "files"
    )
    run_dir: str = _f(
        "",
        "Run folder for the config, events log, previews and checkpoints. Default: a new folder under ./runs/, "
        "named after the date, time and --name.",
        "files",
    )
    # the data
    resolution: int = _f(
        0,
        "Training resolution in pixels: the square's side (with --buckets, each bucket's area is about its square). "
        "0 = the base model's native size.",
        "data",
        basic=True,
    )
    trigger_word: str = _f(
        "", "Word put at the start of every caption, to call the style up at generation.", "data", basic=True
    )
    default_caption: str = _f(
        "", "Caption for images that have no .txt file. Empty = every image must have its own caption.", "data"
    )
    caption_dropout: float = _f(
        0.1,
        "Share of training images shown with an empty caption, so the style holds without its prompt too and "
        "classifier-free guidance keeps it. 0 = never.",
        "data",
    )
    buckets: bool = _f(
        True,
        "Aspect-ratio buckets: each image trains at the bucket size nearest its own aspect ratio (sides multiples of "
        "64, about --resolution squared in area), resized to cover it and centre-cropped, instead of a square "
        "crop; every batch comes from one bucket. --no-buckets crops every image to the square.",
        "data",
    )
    crop: str = _f(
        "center",
        "Where each image is cut to its bucket (or square): center, the same every time, its latent cached; random, "
        "a new place at every draw (from the run's seeded generator), so the edges of a picture that does not fit "
        "come up too. random skips the latent cache: every step's pictures are encoded by the VAE (slower steps).",
        "data",
        ("center", "random"),
    )
    repeats: int = _f(
        1,
        "Times each image at the top of the data folder is shown per epoch. A sub-folder named N_name (kohya_ss's "
        "convention: 10_mystyle gives its own images 10 repeats); several may sit side by side.",
        "data",
    )
    flip: bool = _f(
        False,
        "Also train on each image mirrored left to right: both latents are cached, and every draw shows one of the "
        "two at random (from the run's seeded generator). For pictures without a handedness (no text, no "
        "one-sided details that matter).",
        "data",
    )
    shuffle_tags: bool = _f(
        False,
        "Shuffle each caption's comma-separated tags, keeping the first --keep-tokens in place (and the trigger "
        "word's tag first, moved there when the caption has it later). --tag-shuffles orders of each caption are "
        "made before training (and encoded once and cached, "
        "unless --train-text-encoder), and every draw picks one of them from the run's seeded generator.",
        "data",
    )
    keep_tokens: int = _f(
        0, "With --shuffle-tags: how many leading tags stay in place (kohya_ss's keep_tokens).", "data"
    )
    tag_shuffles: int = _f(
        8,
        "With --shuffle-tags: how many shuffled orders of each caption are encoded and cached (the captions' memory "
        "grows with it; kohya_ss draws a new order every step).",
        "data",
    )
    epochs: int = _f(
        0,
        "Train this many epochs (passes over every image x its repeats) instead of --steps: the step count is "
        "derived (rounded up to whole steps) and printed before training starts. 0 = use --steps.",
        "training",
    )
    # the adapter
    rank: int = _f(8, "LoRA rank (dim): size of the adapter. 4-32 is typical for a style.", "adapter", basic=True)
    alpha: float = _f(
        0.0, "LoRA alpha; the update is scaled by alpha/rank. 0 = same as rank (scale 1).", "adapter", basic=True
    )
    attention: str = _f(
        "both",
        "Which UNet attention layers get LoRA: self (attn1), cross (attn2) or both.",
        "adapter",
        ATTENTION_CHOICES,
        basic=True,
    )
    train_text_encoder: bool = _f(
        False,
        "Also train LoRA on the text encoder(s) (SDXL: both): every layer's attention projections and MLP, as "
        "kohya_ss does. Captions are then encoded at every step instead of once, so steps are slower and the "
        "encoders stay in GPU memory. Off (the default): LoRA on the UNet only.",
        "adapter",
    )
    # the adapter's shape beyond the attention layers (README, "Coming from kohya_ss": kohya's network_args)
    train_ff: bool = _f(
        False,
        "Also put LoRA on every transformer block's feed-forward layers (ff.net.0.proj and ff.net.2), at --rank "
        "and --alpha. kohya_ss's LoRA trains them by default.",
        "adapter",
    )
    train_proj: bool = _f(
        False,
        "Also put LoRA on each attention block's proj_in and proj_out (linear layers, or 1x1 convolutions in "
        "SD 1.x), at --rank and --alpha. kohya_ss's LoRA trains them by default.",
        "adapter",
    )
    conv_rank: int = _f(
        0,
        "LoCon: also put LoRA on the UNet's 3x3 convolutions (each ResNet block's conv1 and conv2, the down- and "
        "upsamplers' conv), with this rank (kohya_ss's conv_dim). 0 = off.",
        "adapter",
    )
    conv_alpha: float = _f(
        0.0,
        "With --conv-rank: alpha of the convolutions' LoRA, whose update is scaled by conv_alpha/conv_rank "
        "(kohya_ss's conv_alpha). 0 = same as --conv-rank (scale 1).",
        "adapter",
    )
    lora_dropout: float = _f(
        0.0,
        "Dropout on each UNet LoRA layer's input while training (peft's lora_dropout): this share of the values is "
        "zeroed at random in every step, which can keep a small data set from being learned by heart. Previews "
        "and generation never drop. The masks come from the run's seeded generator (kept in checkpoints); on a GPU "
        "the step then runs without CUDA graphs. 0 = off; 0.1 is usual.",
        "adapter",
    )
    use_dora: bool = _f(
        False,
        "DoRA (peft's use_dora): every UNet LoRA layer also learns the length of each of its output rows, besides "
        "their direction (--train-text-encoder's LoRA stays plain). Slower steps. The adapter file is written in "
        "diffusers' layout, which diffusers reads; ComfyUI does not draw it as it was trained, AUTOMATIC1111 is "
        "unchecked (README, Adapter files). At strength 0 the learned lengths still apply: only switching the "
        "adapter off gives the base model.",
        "adapter",
    )
    # the optimisation
    steps: int = _f(400, "Number of training steps (optimiser steps).", "training", basic=True)
    batch_size: int = _f(2, "Images per step (per process).", "training", basic=True)
    learning_rate: float = _f(
        1e-4,
        "Learning rate for the LoRA weights (the peak, when --lr-scheduler changes it). With --optimizer prodigy it "
        "multiplies the step size Prodigy finds: use 1.",
        "training",
        basic=True,
    )
    text_encoder_lr: float = _f(
        0.0,
        "With --train-text-encoder: learning rate for the text encoder's LoRA weights (the peak; --lr-scheduler "
        "moves it as it moves --learning-rate). 0 = the same as --learning-rate.",
        "training",
    )
    seed: int = _f(0, "Random seed: the same seed, data and settings train the same adapter.", "training", basic=True)
    mixed_precision: str = _f(
        "auto",
        "Compute precision: no (fp32), fp16, bf16; auto = bf16 on a GPU that has it, else fp32. "
        "LoRA weights stay fp32 in every mode.",
        "training",
        MIXED_PRECISION,
    )
    cuda_graphs: bool = _f(
        True,
        "On a CUDA GPU, replay each step's UNet forward and backward as a CUDA graph: the same training, "
        "several times faster at small batches. With several processes each GPU replays its own and the "
        "gradients are averaged once per step. Not used on the CPU; --no-cuda-graphs turns it off.",
        "training",
    )
    torch_compile: str = _f(
        "auto",
        "Compile the UNet's repeated blocks (each transformer and resnet block) with torch.compile inside the "
        "CUDA-graph step: SD 1.5's steps ran 16% (batch 1) to 26% (batch 8) faster on an H100, after about 97 s "
        "of compiling (45 s more for each further picture shape); SDXL's took 27% less time at batch 4, after "
        "about 71 s. auto = on when the run's plan says the faster steps pay for the compile twice over (SD 1.x "
        "and SDXL without gradient checkpointing on one process, the only ones measured; each aspect-ratio bucket "
        "compiles again; a resumed run counts the steps it has left); a short run never compiles. Needs "
        "--cuda-graphs on a CUDA GPU.",
        "training",
        ("auto", "on", "off"),
    )
    channels_last: str = _f(
        "auto",
        "Hold the frozen UNet's convolution weights and the step's latents channels-last (NHWC), the layout a "
        "GPU's convolution kernels work in, so that cuDNN need not convert each convolution's input and output. "
        "The adapter does not depend on it. auto = on where the step compiles (--torch-compile) on SD 1.x: there "
        "a step took 6% less time (H100, batch 8, one machine: 0.0704 against 0.0749 s) and the adapter stayed as "
        "close to eager's as two eager runs are; off elsewhere: without the compile it was slower (0.0973 against "
        "0.0929 s a step), and SDXL's compiled step was not measured with it; on tries it.",
        "training",
        ("auto", "on", "off"),
    )
    gradient_checkpointing: str = _f(
        "auto",
        "Recompute the UNet's activations during the backward pass instead of keeping them: less GPU memory, "
        "slower steps. auto = on when the run's plan says the step would not fit without it.",
        "training",
        ("auto", "on", "off"),
    )
    gpu_memory: float = _f(
        0.0,
        "GiB of GPU memory the run may use (0 = the whole card): the plan fits the run into it and the trainer holds "
        "to it, e.g. to leave room for other programs or to try what a smaller card would do.",
        "training",
    )
    # how the LoRA weights are optimised (README, "Coming from kohya_ss", maps kohya's names to these)
    optimizer: str = _f(
        "adamw",
        "adamw: torch's AdamW (fused kernels on a CUDA GPU). adamw8bit: bitsandbytes' 8-bit AdamW, less optimiser "
        "memory (CUDA GPU only; pip install bitsandbytes). prodigy: finds its own step size (pip install "
        "prodigyopt; set --learning-rate 1; run with bias correction, and safeguarded warm-up, as its authors advise "
        "for diffusion models).",
        "training",
        OPTIMIZERS,
    )
    weight_decay: float = _f(0.01, "Decoupled weight decay of the optimiser (AdamW style). 0 = none.", "training")
    adam_beta1: float = _f(
        0.9,
        "The optimiser's first-moment decay (AdamW's beta1, for every --optimizer; kohya_ss: betas=...).",
        "training",
    )
    adam_beta2: float = _f(
        0.999,
        "The optimiser's second-moment decay (AdamW's beta2, for every --optimizer; kohya_ss: betas=...).",
        "training",
    )
    adam_epsilon: float = _f(
        1e-8, "The optimiser's epsilon, added to the denominator (every --optimizer).", "training"
    )
    prodigy_d_coef: float = _f(
        1.0,
        "With --optimizer prodigy: scales the step size Prodigy finds (its d_coef; below 1 for a gentler LoRA).",
        "training",
    )
    lr_scheduler: str = _f(
        "constant",
        "How the learning rate moves over the steps (diffusers' schedules): constant; constant_with_warmup; linear "
        "or cosine decay to 0; cosine_with_restarts (--lr-scheduler-num-cycles); polynomial decay to 1e-7 "
        "(--lr-scheduler-power). Every one but constant starts with --lr-warmup-steps.",
        "training",
        LR_SCHEDULERS,
    )
    lr_warmup_steps: int = _f(
        0, "Steps over which the learning rate climbs from 0 to --learning-rate at the start. 0 = none.", "training"
    )
    lr_scheduler_num_cycles: int = _f(
        1, "cosine_with_restarts: how many cosine cycles, each restarting at the full learning rate.", "training"
    )
    lr_scheduler_power: float = _f(1.0, "polynomial: the power of the decay (1 = linear).", "training")
    gradient_accumulation_steps: int = _f(
        1,
        "Batches whose gradients are summed before each optimiser step: each step learns from batch size x this "
        "many images, in the memory of one batch. --steps counts optimiser steps.",
        "training",
    )
    max_grad_norm: float = _f(
        0.0,
        "Before each optimiser step, scale the LoRA gradients down so their total norm is at most this. 0 = no "
        "clipping (kohya_ss and the diffusers scripts clip at 1).",
        "training",
    )
    # what each step's error is measured with
    loss: str = _f(
        "l2",
        "l2: mean squared error. huber: kohya_ss's pseudo-Huber loss with a constant --huber-c: squared for small "
        "errors, linear for large ones, so outlier images pull less.",
        "loss",
        ("l2", "huber"),
    )
    huber_c: float = _f(
        0.1, "huber: where the loss turns from squared to linear (kohya_ss's huber_c, constant schedule).", "loss"
    )
    min_snr_gamma: float = _f(
        0.0,
        "Min-SNR-gamma loss weighting: each timestep's loss is weighted by min(SNR, gamma)/SNR (epsilon models) or "
        "min(SNR, gamma)/(SNR + 1) (v-prediction), so the easy low-noise steps count less. 5 is usual; 0 = off.",
        "loss",
    )
    noise_offset: float = _f(
        0.0,
        "Add this much of a per-image, per-channel constant to the training noise, so the adapter can make darker "
        "darks and brighter lights. 0.05-0.1 is usual; 0 = off.",
        "loss",
    )
    input_perturbation: float = _f(
        0.0,
        "Input perturbation (kohya_ss's --ip_noise_gamma, diffusers' --input_perturbation): the UNet is shown the "
        "latents noised with the training noise plus this much of a second noise, and still learns to predict the "
        "first (Ning et al. 2023, against the gap between training and sampling). 0.1 is usual; 0 = off.",
        "loss",
    )
    # watching it learn
    preview_prompt: Prompts = _f(
        (),
        "Prompts for the preview pictures made during training (give the flag once per prompt; in the page, one per "
        "line). Each is drawn with its own fixed seed, --seed plus its place in the list (0, 1, ...), or the seed "
        "it names as kohya_ss writes it: 'a cat --d 7'; --n, --s and --l give it its own negative prompt, sampling "
        "steps and guidance. None = no previews.",
        "previews",
        basic=True,
    )
    preview_negative_prompt: str = _f("", "Negative prompt of every preview picture. Empty = none.", "previews")
    preview_sampling_steps: int = _f(20, "Denoising steps of each preview picture.", "previews")
    preview_guidance: float = _f(
        0.0, "Guidance scale of the preview pictures. 0 = the base model's recommended (7.5 for SD).", "previews"
    )
    preview_every: int = _f(
        0, "Make previews every N steps (and at the end). 0 = only at the end.", "previews", basic=True
    )
    preview_every_epoch: int = _f(
        0,
        "Also make previews at the end of every N epochs (an epoch: the steps per epoch the run prints before it "
        "starts). 0 = not by epoch.",
        "previews",
    )

    judge: bool = _f(
        True,
        "At every saved checkpoint (--judge-every) and at the end of the run, draw held-out prompts at "
        "--judge-strengths and score each picture for style (closeness to the training images' style statistics) "
        "and content leak (likeness to the nearest training image); the scores go to judge.json in the run folder "
        "and the adapter file records the recommended strength. --no-judge turns it off.",
        "previews",
    )
    judge_every: int = _f(
        0,
        "Judge the checkpoints of every N steps (a multiple of --save-every), for the grid of checkpoint x "
        "strength; each adds about as much time as the judging at the end. 0 = every saved checkpoint (none without "
        "--save-every: then only the end); a multiple of --save-every beyond --steps: only the end.",
        "previews",
    )
    judge_prompts: str = _f(
        "",
        "The judge's held-out prompts, separated by ; (a prompt may hold commas). Empty = 3 made from the "
        "captions, with their colours and things swapped for ones no caption names (the trigger word kept).",
        "previews",
    )
    judge_strengths: str = _f(
        "0,0.5,0.75,1,1.25",
        "Adapter strengths the judge draws each prompt at, comma-separated (0, the base model, is always drawn: "
        "the scores are measured from it).",
        "previews",
    )
    judge_clip: str = _f(
        "",
        "A CLIP model (hub id already in the local Hugging Face cache, or a folder) for the judge's prompt-following "
        "score; never downloaded. Empty = openai/clip-vit-base-patch32 or openai/clip-vit-large-patch14 when one is "
        "in the local cache, else prompt following is skipped.",
        "previews",
    )

    # long runs and several GPUs
    save_every: int = _f(0, "Save a resumable checkpoint every N steps. 0 = none.", "runs")
    keep_checkpoints: int = _f(
        3, "How many of the newest checkpoints to keep (the one the judge recommends is kept too). 0 = all.", "runs"
    )
    resume: str = _f(
        "",
        "Resume a run: 'latest' (its newest checkpoint in --run-dir) or a checkpoint folder. Empty = start fresh.",
        "files",
    )
    num_processes: int = _f(
        1,
        "Processes to train on, one per GPU, through accelerate launch (data parallel; batch size is per process).",
        "runs",
    )
    log_with: str = _f(
        "none",
        "tensorboard: also log the loss, the learning rate and the previews for TensorBoard, through accelerate's "
        "trackers, into the run folder's tensorboard/ (pip install tensorboardX, or tensorboard). The page reads "
        "events.jsonl either way.",
        "runs",
        ("none", "tensorboard"),
    )

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise UserError naming the first bad field and how to fix it."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = hints[f.name]
            if want == Prompts:  # one string (the form before lists, and the page's box) or a list of strings
                value = tuple(value.splitlines()) if isinstance(value, str) else value
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise UserError(f"{f.name} ({flag(f.name)}) must be text or a list of texts, got {value!r}")
                setattr(self, f.name, tuple(v.strip() for v in value if v.strip()))
                continue
            ok = (
                isinstance(value, bool)
                if want is bool
                else (isinstance(value, int) and not isinstance(value, bool))
                if want is int
                else (isinstance(value, (int, float)) and not isinstance(value, bool))
                if want is float
                else isinstance(value, str)
            )
            if not ok:
                kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[want]
                raise UserError(f"{f.name} ({flag(f.name)}) must be {kind}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"{f.name} ({flag(f.name)}) must be one of {', '.join(choices)}; got {value!r}")
        self.alpha = float(self.alpha)
        self.conv_alpha = float(self.conv_alpha)
        self.lora_dropout = float(self.lora_dropout)
        self.learning_rate = float(self.learning_rate)
        self.text_encoder_lr = float(self.text_encoder_lr)
        for name in (
            "weight_decay",
            "lr_scheduler_power",
            "max_grad_norm",
            "huber_c",
            "min_snr_gamma",
            "noise_offset",
            "input_perturbation",
            "preview_guidance",
        ):
            setattr(self, name, float(getattr(self, name)))
        self.caption_dropout = float(self.caption_dropout)
        checks = [
            (self.rank >= 1, "rank (--rank) must be at least 1 (try 4, 8 or 16)"),
            (self.rank <= 1024, "rank (--rank) must be at most 1024"),
            (self.alpha >= 0, "alpha (--alpha) must be 0 (meaning: equal to rank) or positive"),
            (
                0 <= self.conv_rank <= 1024,
                f"conv_rank (--conv-rank) must be 0 (off) or from 1 to 1024 (try 4 or 8); got {self.conv_rank}",
            ),
            (
                0 <= self.conv_alpha < float("inf"),
                f"conv_alpha (--conv-alpha) must be 0 (meaning: equal to --conv-rank) or positive; "
                f"got {self.conv_alpha:g}",
            ),
            (
                self.conv_rank > 0 or self.conv_alpha == 0,
                "conv_alpha (--conv-alpha) has no effect without --conv-rank: give --conv-rank N (e.g. 8) to train "
                "the convolutions, or leave --conv-alpha at 0",
            ),
            (
                0 <= self.lora_dropout < 1,
                f"lora_dropout (--lora-dropout) must be at least 0 and below 1 (typical: 0.1); "
                f"got {self.lora_dropout:g}",
            ),
            (
                1 <= self.steps <= MAX_STEPS,
                f"steps (--steps) must be at least 1 and at most {MAX_STEPS}; got {self.steps}",
            ),
            (self.batch_size >= 1, "batch_size (--batch-size) must be at least 1"),
            (self.repeats >= 1, f"repeats (--repeats) must be at least 1; got {self.repeats}"),
            (self.epochs >= 0, f"epochs (--epochs) must be 0 (use --steps) or more; got {self.epochs}"),
            (self.keep_tokens >= 0, f"keep_tokens (--keep-tokens) must be 0 or more; got {self.keep_tokens}"),
            (
                1 <= self.tag_shuffles <= 64,
                f"tag_shuffles (--tag-shuffles) must be from 1 to 64 (typical: 8); got {self.tag_shuffles}",
            ),
            (
                self.optimizer == "prodigy" or 0 < self.learning_rate < 1,
                f"learning_rate (--learning-rate) must be a positive number below 1 (typical: 1e-4); "
                f"got {self.learning_rate:g}",
            ),
            (
                self.optimizer != "prodigy" or 0.1 <= self.learning_rate <= 10,
                f"learning_rate (--learning-rate) with --optimizer prodigy multiplies the step size Prodigy finds: "
                f"use 1, as its authors advise (0.1 to 10 is accepted); got {self.learning_rate:g}",
            ),
            (
                self.optimizer == "prodigy" or 0 <= self.text_encoder_lr < 1,
                f"text_encoder_lr (--text-encoder-lr) must be 0 (the same as --learning-rate) or a positive number "
                f"below 1; got {self.text_encoder_lr:g}",
            ),
            (
                self.optimizer != "prodigy" or self.text_encoder_lr == 0 or 0.1 <= self.text_encoder_lr <= 10,
                f"text_encoder_lr (--text-encoder-lr) with --optimizer prodigy multiplies the step size Prodigy "
                f"finds: use 0 (the same as --learning-rate) or 0.1 to 10; got {self.text_encoder_lr:g}",
            ),
            (
                self.train_text_encoder or self.text_encoder_lr == 0,
                "text_encoder_lr (--text-encoder-lr) has no effect without --train-text-encoder: add "
                "--train-text-encoder, or leave --text-encoder-lr at 0",
            ),
            (
                0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
                f"adam_beta1 and adam_beta2 (--adam-beta1, --adam-beta2) must be at least 0 and below 1 (typical: "
                f"0.9 and 0.999); got {self.adam_beta1:g} and {self.adam_beta2:g}",
            ),
            (
                0 < self.adam_epsilon <= 1e-2,
                f"adam_epsilon (--adam-epsilon) must be above 0 and at most 0.01 (typical: 1e-8); got "
                f"{self.adam_epsilon:g}",
            ),
            (
                0 < self.prodigy_d_coef <= 10,
                f"prodigy_d_coef (--prodigy-d-coef) must be above 0 and at most 10; got {self.prodigy_d_coef:g}",
            ),
            (
                self.optimizer == "prodigy" or self.prodigy_d_coef == 1,
                "prodigy_d_coef (--prodigy-d-coef) has no effect without --optimizer prodigy: add it, or leave "
                "--prodigy-d-coef at 1",
            ),
            (
                0 <= self.weight_decay < 1,
                f"weight_decay (--weight-decay) must be at least 0 and below 1 (typical: 0.01); "
                f"got {self.weight_decay:g}",
            ),
            (
                0 <= self.lr_warmup_steps and (self.epochs > 0 or self.lr_warmup_steps < self.steps),
                f"lr_warmup_steps (--lr-warmup-steps) must be 0 or more and below --steps ({self.steps}); "
                f"got {self.lr_warmup_steps}",
            ),  # with --epochs the steps are counted from the images: checked then (check_run_length)
            (
                self.lr_scheduler != "constant" or self.lr_warmup_steps == 0,
                "lr_warmup_steps (--lr-warmup-steps) has no effect with --lr-scheduler constant: use "
                "--lr-scheduler constant_with_warmup, or --lr-warmup-steps 0",
            ),
            (
                self.lr_scheduler_num_cycles >= 1,
                "lr_scheduler_num_cycles (--lr-scheduler-num-cycles) must be at least 1",
            ),
            (
                0 < self.lr_scheduler_power <= 10,
                f"lr_scheduler_power (--lr-scheduler-power) must be above 0 and at most 10; "
                f"got {self.lr_scheduler_power:g}",
            ),
            (
                self.lr_scheduler != "polynomial" or self.learning_rate > 1e-7,
                "learning_rate (--learning-rate) must be above 1e-7 with --lr-scheduler polynomial "
                "(it decays to 1e-7)",
            ),
            (
                self.gradient_accumulation_steps >= 1,
                "gradient_accumulation_steps (--gradient-accumulation-steps) must be at least 1 (1 = none)",
            ),
            (
                0 <= self.max_grad_norm < float("inf"),
                f"max_grad_norm (--max-grad-norm) must be 0 (no clipping) or a positive number (typical: 1); "
                f"got {self.max_grad_norm:g}",
            ),
            (
                0 < self.huber_c < float("inf"),
                f"huber_c (--huber-c) must be above 0 (typical: 0.1); got {self.huber_c:g}",
            ),
            (
                0 <= self.min_snr_gamma < float("inf"),
                f"min_snr_gamma (--min-snr-gamma) must be 0 (off) or positive (typical: 5); "
                f"got {self.min_snr_gamma:g}",
            ),
            (
                0 <= self.noise_offset < 1,
                f"noise_offset (--noise-offset) must be at least 0 and below 1 (typical: 0.05); "
                f"got {self.noise_offset:g}",
            ),
            (
                0 <= self.input_perturbation < 1,
                f"input_perturbation (--input-perturbation) must be at least 0 and below 1 (typical: 0.1); "
                f"got {self.input_perturbation:g}",
            ),
            (
                self.resolution == 0 or (self.resolution >= 64 and self.resolution % 8 == 0),
                f"resolution (--resolution) must be 0 (native) or a multiple of 8 from 64 up; got {self.resolution}",
            ),
            (self.preview_every >= 0, "preview_every (--preview-every) must be 0 or more"),
            (self.preview_every_epoch >= 0, "preview_every_epoch (--preview-every-epoch) must be 0 or more"),
            (
                1 <= self.preview_sampling_steps <= 1000,
                f"preview_sampling_steps (--preview-sampling-steps) must be from 1 to 1000 (typical: 20-30); "
                f"got {self.preview_sampling_steps}",
            ),
            (
                0 <= self.preview_guidance <= 100,
                f"preview_guidance (--preview-guidance) must be 0 (the model's own) or a positive number up to 100 "
                f"(typical: 7.5); got {self.preview_guidance:g}",
            ),
            (
                0 <= self.caption_dropout < 1,
                f"caption_dropout (--caption-dropout) must be at least 0 and below 1; got {self.caption_dropout:g}",
            ),
            (self.save_every >= 0, "save_every (--save-every) must be 0 or more"),
            (
                self.judge_every <= 0 or self.save_every > 0,
                f"judge_every (--judge-every) counts saved checkpoints, and none is saved: add --save-every N (N "
                f"dividing {self.judge_every}, e.g. --save-every {self.judge_every}), or leave --judge-every at 0 "
                "(the end of the run is judged)",
            ),
            (
                self.judge_every == 0
                or (self.judge_every > 0 and self.save_every > 0 and self.judge_every % self.save_every == 0),
                f"judge_every (--judge-every) must be 0 (judge every saved checkpoint) or a multiple of save_every "
                f"(--save-every, now {self.save_every}): the judge scores saved checkpoints; got {self.judge_every}",
            ),
            (self.keep_checkpoints >= 0, "keep_checkpoints (--keep-checkpoints) must be 0 (all) or more"),
            (
                0 <= self.gpu_memory <= 10_000,
                "gpu_memory (--gpu-memory) must be 0 (the whole card) or the GiB the run may use; "
                f"got {self.gpu_memory}",
            ),
            (self.num_processes >= 1, "num_processes (--num-processes) must be at least 1"),
            (
                not self.resume or bool(self.run_dir) or self.resume != "latest",
                "resume (--resume latest) needs the run folder too: add --run-dir runs/<run-id>",
            ),
            (
                not self.output or self.output.endswith(".safetensors"),
                f"output (--output) must end in .safetensors; got {self.output!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.previews()  # a preview prompt's options are read now, not at the first preview
        from trainer.judge import check_clip, parse_strengths

        parse_strengths(self.judge_strengths)  # a UserError naming the field
        if self.judge:
            check_clip(self.judge_clip)  # a folder that is not there is said now, not after the model has loaded
        if self.name:  # an unusable adapter name is refused now, not when the run ends and the library needs it
            try:
                sanitize_name(self.name)
            except UserError as exc:
                raise UserError(f"name (--name): {exc}") from None

    @property
    def effective_alpha(self) -> float:
        return self.alpha or float(self.rank)

    @property
    def effective_conv_alpha(self) -> float:
        return self.conv_alpha or float(self.conv_rank)

    def run_length(self, per_epoch: int, processes: int = 1) -> tuple[int, int, float]:
        """(steps per epoch, steps, epochs) for `per_epoch` images per epoch (each image times its repeats): an
        epoch is rounded up to whole steps of batch x processes x accumulation; --epochs gives the steps."""
        steps_per_epoch = math.ceil(per_epoch / (self.batch_size * processes * self.gradient_accumulation_steps))
        steps = self.epochs * steps_per_epoch if self.epochs else self.steps
        return steps_per_epoch, steps, self.epochs or steps / steps_per_epoch

    def check_run_length(self, steps: int, steps_per_epoch: int) -> None:
        """What needs the run's step count, once --epochs has given it (from the images): warm-up below it."""
        if self.epochs and self.lr_warmup_steps >= steps:
            raise UserError(
                f"lr_warmup_steps (--lr-warmup-steps) {self.lr_warmup_steps} is not below the run's {steps} steps "
                f"({self.epochs} epochs of {steps_per_epoch}): lower it, or raise --epochs"
            )

    def previews(self) -> list[Preview]:
        """Each preview prompt with its seed, negative prompt, sampling steps and guidance: its own options
        (kohya_ss's `--d`, `--n`, `--s`, `--l` after the prompt), else the preview fields, and seed + its place."""
        return [_preview(text, i, self) for i, text in enumerate(self.preview_prompt)]

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate

    # -- building --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", say_renamed: bool = True) -> TrainConfig:
        """Build from a mapping; unknown keys are an error that names them and the closest known field. An old
        spelling of a field is read as the field, said on stderr unless `say_renamed` is false."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: expected a mapping of field names to values, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        renamed = notice_renamed if say_renamed else RENAMED.get
        values = {(renamed(k) if k in RENAMED and RENAMED[k] not in values else k): v for k, v in values.items()}
        unknown = [k for k in values if k not in names]
        if unknown:
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(str(k).replace("-", "_"), names, n=1)
                parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise UserError(f"{source}: unknown field(s) {', '.join(parts)}; known fields: {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():  # YAML reads 1e-4 (no dot) as text: a number written so is a number
            if hints[name] is float and isinstance(value, str):
                try:
                    values[name] = float(value)
                except ValueError:
                    pass
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A config file's fields, over those of the preset it names (`preset:`)."""
        return cls.from_dict(config_file_values(path), source=str(path))

    def as_run_keeps_it(self) -> TrainConfig:
        """This config as its run folder's config.json keeps it: the `ONE_OFF` fields at their defaults."""
        return dataclasses.replace(self, **{f.name: f.default for f in dataclasses.fields(self) if f.name in ONE_OFF})

    def save(self, path: Path) -> None:
        from adapters.formats import write_atomic

        write_atomic(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def cli_command(self) -> str:
        """The `lora-studio train ...` command line that builds this same config (non-default fields only)."""
        import shlex

        parts = ["lora-studio", "train"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, tuple):  # a list field: its flag once per item
                parts += [part for item in value for part in (flag(f.name), shlex.quote(item))]
            elif isinstance(value, bool):
                parts.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
            else:
                parts += [flag(f.name), shlex.quote(f"{value:g}" if isinstance(value, float) else str(value))]
        return " ".join(parts)


@dataclass(frozen=True)
class Preview:
    """One preview picture's recipe: drawn at every preview step with the same seed, so pictures compare."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    sampling_steps: int = 20
    guidance: float = 0.0  # 0 = the base model's recommended


def _preview(text: str, index: int, config: TrainConfig) -> Preview:
    """Read one preview prompt: the prompt, then kohya_ss's options, each ` --KEY VALUE`."""
    prompt, *options = re.split(r"(?:^|\s+)--(?=\S)", text)
    values = {"d": config.seed + index, "n": config.preview_negative_prompt}
    values.update(s=config.preview_sampling_steps, l=config.preview_guidance)
    where = f"preview_prompt (--preview-prompt) {text!r}"
    known = ", ".join(f"--{key} {what}" for key, what in PREVIEW_OPTIONS.items())
    for option in options:
        key, _, value = option.partition(" ")
        value = value.strip()
        if key not in PREVIEW_OPTIONS:
            size = " (previews are drawn at the training resolution)" if key in ("w", "h") else ""
            raise UserError(f"{where}: --{key} is not understood{size}; a preview prompt takes {known}")
        kind = {"d": int, "s": int, "l": float, "n": str}[key]
        try:
            values[key] = kind(value)
        except ValueError:
            values[key] = None
        bad_number = (key == "s" and not 1 <= values[key] <= 1000) or (key == "l" and not 0 <= values[key] <= 100)
        if not value or values[key] is None or bad_number:
            need = {"d": "a whole number", "s": "a whole number from 1 to 1000", "l": "a number from 0 to 100"}
            need = need.get(key, "text")
            raise UserError(f"{where}: --{key} needs {need} after it, got {value!r}")
    if not prompt.strip():
        raise UserError(f"{where}: the prompt itself is empty; write it before the options")
    return Preview(prompt.strip(), values["d"], values["n"], values["s"], float(values["l"]))


def decode_text(raw: bytes) -> str:
    """A text file's bytes as editors save them: UTF-16 with its byte-order mark (Windows Notepad), else UTF-8 with
    or without one; UnicodeDecodeError for anything else."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def read_config_file(path: str | Path) -> dict:
    """Read a .json, .yaml or .yml config file into a dict, with errors naming the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; give the .json or .yaml file in it")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = decode_text(path.read_bytes())
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if path.suffix.lower() == ".json":
            return json.loads(text)
    except Exception as exc:
        raise UserError(f"config file {path} could not be parsed: {exc}") from exc
    raise UserError(f"config file {path} must end in .json, .yaml or .yml")


def config_file_values(path: str | Path, preset: str | None = None) -> dict:
    """A config file's values over those of its preset: the one its `preset:` key names, or `preset` (the
    command line's `--preset`) instead where given. A name that is not a preset is an error naming the file."""
    from trainer.presets import preset_values

    values = read_config_file(path)
    if not isinstance(values, dict) or "preset" not in values and not preset:
        return values  # (not a mapping: from_dict says so)
    named = values.pop("preset", None)
    base = preset_values(named, where=f"config file {path}: preset") if named is not None else {}
    if preset:
        base = preset_values(preset)
    return {**base, **values}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (kebab-case), help text from the field; unset flags stay unset."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")  # argparse formats help
        if hints[f.name] == Prompts:  # given once per item; the items given replace a config file's list
            old = [flag(o) for o, new in RENAMED.items() if new == f.name]
            parser.add_argument(
                flag(f.name),
                *old,
                action=_RenamedAppend,
                dest=f.name,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=help_text.replace("(default: ())", "(repeatable)"),
            )
        elif hints[f.name] is bool:
            parser.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            old = [flag(o) for o, new in RENAMED.items() if new == f.name]
            parser.add_argument(
                flag(f.name),
                *old,
                action=_Renamed if old else "store",
                dest=f.name,
                type=hints[f.name],
                choices=f.metadata.get("choices"),
                default=argparse.SUPPRESS,
                metavar=f.name.upper() if not f.metadata.get("choices") else None,
                help=help_text,
            )


class _Renamed(argparse.Action):
    """Stores a flag's value, first saying so when it was given under its old spelling."""

    def __call__(self, parser, namespace, values, option_string=None):
        old = (option_string or "")[2:].replace("-", "_")
        if old in RENAMED:
            notice_renamed(old)
        setattr(namespace, self.dest, values)


class _RenamedAppend(argparse.Action):
    """Adds a flag's value to its list (the list starts empty, whatever a config file holds), first saying so when
    it was given under its old spelling."""

    def __call__(self, parser, namespace, values, option_string=None):
        old = (option_string or "")[2:].replace("-", "_")
        if old in RENAMED:
            notice_renamed(old)
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), values])


def from_args(args: argparse.Namespace, config_path: str | None = None) -> TrainConfig:
    """A preset's fields (`--preset`, else the config file's `preset:`), overridden by the config file's values (if
    any), overridden by the flags given on the command line."""
    from trainer.presets import preset_values

    given = vars(args)
    if given.get("resume"):
        _check_resume_args(given)
    own_run = not config_path and given.get("resume") and given.get("run_dir")  # resume with the run's own settings
    if own_run:
        saved = Path(given["run_dir"]) / "config.json"
        config_path = saved if saved.is_file() else None
    if config_path:
        values = config_file_values(config_path, given.get("preset"))
        if own_run and isinstance(values, dict):  # one written before ONE_OFF were left out of it may hold them
            values = {k: v for k, v in values.items() if k not in ONE_OFF}
    else:
        values = preset_values(given["preset"]) if given.get("preset") else {}
    source = str(config_path) if config_path else "command line"
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if config_path:
        # report unknown keys (or a file that is not a mapping) against the file itself
        TrainConfig.from_dict(dict(values) if isinstance(values, dict) else values, source=source, say_renamed=False)
    if "steps" in given and given.get("epochs"):
        raise UserError("give --steps or --epochs, not both: the one left out is derived from the other")
    if "steps" in given and "epochs" not in given and isinstance(values, dict) and values.get("epochs"):
        values["epochs"] = 0  # --steps given over a file (or resumed run) counted in epochs: the run is in steps
    inherited = dict(values) if isinstance(values, dict) else {}
    typed = {k: v for k, v in vars(args).items() if k in names}
    values.update(typed)
    try:
        return TrainConfig.from_dict(values, source=source)
    except UserError as exc:  # a value refused that the person did not type: say where it came from
        field = re.match(r"(\w+) \(--", str(exc))
        name = field and field.group(1)
        if not name or name in typed or name not in inherited:
            raise
        origin = f"--preset {given['preset']}" if given.get("preset") and not config_path else str(config_path)
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{exc} ({name} {inherited[name]!r} comes from {origin}; give {flag} to change it)") from None


def _check_resume_args(given: dict) -> None:
    """--resume and --run-dir as given on the command line, before any model loads: `latest` needs an existing
    run folder; a checkpoint folder names its run (runs/<id>/checkpoints/step_N), which is taken as --run-dir."""
    resume, run_dir = given["resume"], given.get("run_dir")
    if resume != "latest":
        checkpoint = Path(resume)
        if not (checkpoint / "state.safetensors").is_file():
            close = difflib.get_close_matches(resume, ["latest"], n=1, cutoff=0.5)
            hint = "; did you mean --resume latest (with --run-dir)?" if close else ""
            raise UserError(
                f"resume (--resume): {resume} is neither 'latest' nor a checkpoint folder (one holding "
                f"state.safetensors, as runs/<run-id>/checkpoints/step_000100){hint}"
            )
        if not run_dir and checkpoint.resolve().parent.name == "checkpoints":
            given["run_dir"] = str(checkpoint.resolve().parent.parent)
    elif run_dir and not Path(run_dir).is_dir():
        raise UserError(
            f"run folder {run_dir} does not exist (--run-dir): give the folder of the run to resume, as runs/<run-id>"
        )


def markdown_table() -> str:
    """The README's table of train flags, from the fields themselves (`python -m trainer.config`)."""
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        spelled = flag(f.name)
        if f.metadata.get("choices"):
            spelled += " " + "\\|".join(f.metadata["choices"])
        default = "(empty)" if f.default in ("", ()) else f"`{f.default}`"
        rows.append(f"| `{spelled}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
