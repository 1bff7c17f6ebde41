"""The training loop: LoRA on the UNet's attention layers, read top to bottom in one function, `train`.

    lora-studio train --data sample_images --steps 200 --rank 8 --output style.safetensors

Inputs are checked before any model loads. The frozen VAE and text encoder run once per image (latent mean/std
and the caption's conditioning are cached), so a step is one UNet forward and backward; with --train-text-encoder
the captions' token ids are cached instead, and the text encoders run (and learn) in every step. What differs
between model families comes from `adapters.families`; how a step runs (eager, CUDA graph) from `trainer.step`.
Every random draw of a step (which images, latent sample, noise, timestep) comes from one seeded CPU generator and
is made for the global batch, so a run is reproducible and N processes at batch B see the same data as one process
at batch N*B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adapters.base import base_model_label, check_base_model, generation_defaults, load_pipeline
from adapters.errors import UserError
from adapters.families import Family, family_of_pipeline, native_size
from adapters.formats import build_metadata, check_writable, save_adapter, to_diffusers, to_kohya
from adapters.library import sanitize_name
from adapters.lora import (
    attach,
    attention_targets,
    conv_targets,
    extract,
    feed_forward_targets,
    module_kind,
    projection_targets,
    text_encoder_targets,
    train_in_fp32,
)
from trainer.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resume_step,
    save_checkpoint,
)
from trainer.config import Preview, TrainConfig
from trainer.dataset import (
    bucket_sizes,
    bucket_stride,
    check_folder,
    load_examples,
    long_captions,
    random_crop,
    repeats_of,
    shuffled_captions,
    tag_frequency,
)
from trainer.judge import JUDGE_DIR, JUDGE_JSON, Judge, recommend
from trainer.memory import PhasePeaks
from trainer.optim import Loss, check_optimizer, make_lr_schedule, make_optimizer, rate_at
from trainer.plan import GPU_MEMORY_ON_CPU, TILE, check, estimate
from trainer.runs import (
    EVENTS,
    LOSS_PNG,
    PARTIAL_SUFFIX,
    PLAN,
    PREVIEWS,
    TENSORBOARD,
    EventLog,
    check_log_with,
    draw_loss_curve,
    new_run_dir,
    run_losses,
    scan_events,
)
from trainer.step import gradient_checkpointing, make_step


@dataclass
class TrainResult:
    adapter: Path  # the .safetensors file written
    run_dir: Path
    unet: torch.nn.Module  # the trained UNet, LoRA attached as adapter "default" (for tests and previews)
    loss: float  # the last step's loss
    text_encoders: dict = dataclasses.field(default_factory=dict)  # with --train-text-encoder: {name: its encoder}


class Cancelled(Exception):
    """Raised inside the loop when a stop was asked for (SIGTERM/SIGINT or the UI's Cancel). Once the loop has
    saved what it learned, it says where: `run_dir`, `step` (0: nothing learned, nothing saved) and `adapter`."""

    run_dir: Path | None = None
    step: int = 0
    adapter: Path | None = None


def resolve_precision(requested: str, device: torch.device) -> str:
    """accelerate's mixed_precision for a TrainConfig value; fp16 without a GPU is a clear error."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if requested == "fp16" and device.type != "cuda":
        raise UserError("mixed_precision (--mixed-precision) fp16 needs a CUDA GPU; use no or bf16 on the CPU")
    return requested


def _shared_run_dir(config: TrainConfig, accelerator) -> Path:
    """The run folder: the configured one, or a new one made by the main process and told to the others."""
    if config.run_dir:
        path = Path(config.run_dir)
    else:
        from accelerate.utils import broadcast_object_list

        box = [str(new_run_dir("runs", config.name)) if accelerator.is_main_process else ""]
        if accelerator.num_processes > 1:
            broadcast_object_list(box)
        path = Path(box[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_path(config: TrainConfig, run_dir: Path) -> Path:
    path = Path(config.output) if config.output else run_dir / "adapter.safetensors"
    check_writable(path, "--output")  # refused now, not after the run has trained (--overwrite or not)
    if not path.exists() or config.overwrite:
        return path
    # a resumed run may replace its own adapter: the one in its folder, or the one its events say it wrote (a
    # cancelled or finished run's, at --output) while the file still holds what the run wrote there
    since = ""
    if config.resume:
        own, written = path.resolve(), _adapters_written(run_dir)
        if own.parent == run_dir.resolve() or (own in written and written[own] == _sha256(path)):
            return path
        if own in written:
            since = " and is no longer the adapter this run wrote there (it changed since)"
    raise UserError(
        f"output file {path} already exists{since}; choose another --output, or pass --overwrite to replace it"
    )


def _adapters_written(run_dir: Path) -> dict[Path, str | None]:
    """Each adapter file the run's events say it wrote, with the sha256 it had then (None in a run folder written
    before the events kept it: such a file is not replaced without --overwrite)."""
    return {
        Path(e["adapter"]).resolve(): e.get("sha256")
        for e in scan_events(run_dir)[0]
        if isinstance(e.get("adapter"), str)
    }


def _never_stepped(run_dir: Path) -> bool:
    """Whether the run of this folder was stopped before its first step: no checkpoint, and either no event yet
    (stopped while loading, its config.json written) or a last end that is a cancel at step 0, with no progress."""
    if list_checkpoints(run_dir):
        return False
    events = scan_events(run_dir)[0] if (run_dir / EVENTS).is_file() else []
    if not events:
        return (run_dir / "config.json").is_file()
    ends = [e for e in events if e.get("type") in ("done", "cancelled", "error")]
    return (
        bool(ends)
        and ends[-1]["type"] == "cancelled"
        and not ends[-1].get("step")
        and not any(e.get("type") == "progress" for e in events)
    )


def _check_run_folder(run_dir: Path) -> None:
    """A new run may go into a folder that is empty, or that the page (or a --config file there) has staged with the
    run's config.json; one holding files a run writes, without a readable run config.json, is someone else's and
    its files (a loss.png, a config.json) would be written over."""
    writes = ["config.json", PLAN, LOSS_PNG, JUDGE_JSON, JUDGE_DIR, PREVIEWS, TENSORBOARD, "checkpoints"]
    taken = [name for name in writes if (run_dir / name).exists()]
    if not taken:
        return
    try:
        TrainConfig.from_file(run_dir / "config.json")
        return
    except (UserError, OSError, ValueError):
        pass
    raise UserError(
        f"run folder {run_dir} already holds {', '.join(taken)} and is not a run's folder (no readable run "
        "config.json): a run would write over them; give a new or empty --run-dir"
    )


def _check_resume(config: TrainConfig, run_dir: Path, steps_per_epoch: int) -> tuple[Path, int]:
    """The checkpoint a resume goes on from, and its step, once it is known that it can: its settings are the
    run's, and the run has steps left to take. Checked before anything in the run folder is written."""
    checkpoint = find_checkpoint(run_dir, config.resume)
    step = resume_step(checkpoint, config.to_dict())
    ends = [e for e in scan_events(run_dir)[0] if e.get("type") in ("start", "done", "cancelled", "error")]
    if ends and ends[-1]["type"] == "done" and config.steps <= int(ends[-1].get("step") or 0):
        finished = int(ends[-1]["step"])
        longer = (
            f"raise --epochs above {config.epochs} (an epoch is {steps_per_epoch} steps), or give --steps above "
            f"{finished}"
            if config.epochs
            else f"resume with --steps above {finished}"
        )
        raise UserError(
            f"run {run_dir} already finished at step {finished} (its adapter: {ends[-1].get('adapter', '?')}); "
            f"to train it on, {longer}"
        )
    return checkpoint, step


@torch.no_grad()
def encode_examples(
    pipe,
    family: Family,
    examples,
    resolution: int,
    device,
    dtype,
    previews: list[Preview] = (),
    flip: bool = False,
    captions: list[list[str]] | None = None,
    latents: bool = True,
    train_text_encoder: bool = False,
) -> dict:
    """Cache per image: the caption's conditioning (`family.conditioning`), the picture's own
    (`family.image_conditioning`: SDXL's time ids) and the VAE latent mean and std (scaled), all on `device`.
    With `flip`, the mirrored pictures' latents follow the pictures' own (image i's mirror at len(examples) + i);
    `captions` (K lists of one caption per image, e.g. K tag shuffles) replace the examples' own, and the
    conditioning of list k's caption i is at k * len(examples) + i. Without `latents` (--crop random), no
    picture is encoded: each step encodes its own crops (`CropEncoder`).

    The captions go first; on a GPU the text encoders then leave it, before the VAE runs, so that the two never
    share its memory (each preview's prompt and negative prompt are encoded with the captions, as
    `preview_conds`: (prompt, negative) per preview, None for an empty negative). With `train_text_encoder` the
    captions (and the empty caption and the previews' prompts) are cached as token ids (`family.tokens`), for the
    text encoders to encode in every step, and the encoders stay on the device."""
    text = family.tokens if train_text_encoder else family.conditioning
    conds = [
        {
            **text(pipe, [caption]),
            # the size trained at: the square (resolution, resolution), or the image's bucket, as (height, width)
            **family.image_conditioning(ex.original_size, ex.crop_top_left, tuple(ex.pixels.shape[1:])),
        }
        for variant in captions or [[ex.caption for ex in examples]]
        for ex, caption in zip(examples, variant)
    ]
    cache = {
        "cond": {key: torch.cat([c[key] for c in conds]).to(device) for key in conds[0]},
        # what classifier-free guidance conditions the unconditional branch on; dropped captions get it
        "empty_cond": {key: value.to(device) for key, value in text(pipe, [""]).items()},
        "preview_conds": [
            (text(pipe, [p.prompt]), text(pipe, [p.negative_prompt]) if p.negative_prompt else None) for p in previews
        ],
        "images": len(examples),
        "tokens": train_text_encoder,  # cond, empty_cond and preview_conds hold token ids, not conditioning
    }
    if torch.device(device).type == "cuda" and not train_text_encoder:
        for name in family.text_encoders:
            getattr(pipe, name).to("cpu")
        torch.cuda.empty_cache()
    if not latents:
        return cache
    vae = pipe.vae
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):  # e.g. SDXL's VAE overflows in fp16
        vae, dtype = vae.float(), torch.float32
    means, stds = [], []
    scale = vae.config.scaling_factor
    for pixels in [ex.pixels for ex in examples] + ([ex.pixels.flip(-1) for ex in examples] if flip else []):
        dist = vae.encode(pixels[None].to(device, dtype)).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    if len({m.shape for m in means}) > 1:  # aspect-ratio buckets: sizes differ, so one tensor per picture
        return {"latent_mean": [m[0] for m in means], "latent_std": [s[0] for s in stds], **cache}
    return {"latent_mean": torch.cat(means), "latent_std": torch.cat(stds), **cache}


class CropEncoder:
    """--crop random: each drawn picture is cut from its `cover` at the place drawn for it (and mirrored when drawn
    so), then encoded by the VAE, since no cache can hold every crop. Also gives the picture's own conditioning
    for that crop (SDXL's time ids name the crop's corner)."""

    def __init__(self, pipe, family: Family, examples, device, dtype):
        self.vae, self.family, self.examples, self.device, self.dtype = pipe.vae, family, examples, device, dtype
        if dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):  # as encode_examples does
            self.vae, self.dtype = self.vae.float(), torch.float32

    @torch.no_grad()
    def __call__(self, index: list[int], flip: list[bool], where: torch.Tensor):
        """(latent mean, latent std, picture conditioning) of images `index`, cut at `where` ((n, 2) in [0, 1))."""
        pixels, conds = [], []
        for i, mirrored, at in zip(index, flip, where):
            ex = self.examples[i]
            cut, corner = random_crop(ex.cover, (ex.pixels.shape[2], ex.pixels.shape[1]), at)
            pixels.append(cut.flip(-1) if mirrored else cut)
            conds.append(self.family.image_conditioning(ex.original_size, corner, tuple(ex.pixels.shape[1:])))
        dist = self.vae.encode(torch.stack(pixels).to(self.device, self.dtype)).latent_dist
        scale = self.vae.config.scaling_factor
        cond = {key: torch.cat([c[key] for c in conds]).to(self.device) for key in conds[0]}
        return dist.mean.float() * scale, dist.std.float() * scale, cond


class BatchDrawer:
    """Every random choice of every step, from one seeded generator: reproducible, and split across processes.

    `draw()` makes the *global* batch (batch_size x processes): image order (a fresh permutation of every image
    x its repeats each epoch), latent sample, noise (with `noise_offset` times a per-image, per-channel constant
    added; with `input_perturbation`, also the noise the UNet's input is noised with: that noise plus this times a
    second draw), timestep, with `flip` mirrored or not, and with `crop` where each picture is cut (two uniform draws,
    down and across); each process then takes its own slice of it.
    With aspect-ratio buckets (`buckets`: each image's bucket; `bucket_shapes`: each bucket's latent shape), a
    batch first draws its bucket, in proportion to the bucket's images x repeats, then its images from that
    bucket's own epoch order; with one bucket nothing more is drawn.
    """

    def __init__(
        self,
        num_images: int,
        global_batch: int,
        num_timesteps: int,
        latent_shape,
        seed: int,
        dropout: float = 0.0,
        noise_offset: float = 0.0,
        *,
        repeats: list[int] | None = None,
        flip: bool = False,
        captions: int = 1,
        buckets: list[int] | None = None,
        bucket_shapes: list | None = None,
        crop: bool = False,
        input_perturbation: float = 0.0,
    ):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        # each image's index as many times as its repeats: an epoch of a bucket is a permutation of its pool
        pool = [i for i, r in enumerate(repeats or [1] * num_images) for _ in range(r)]
        buckets = buckets or [0] * num_images
        self.pools = [[i for i in pool if buckets[i] == b] for b in range(max(buckets) + 1)]
        self.weights = torch.tensor([float(len(p)) for p in self.pools])
        self.shapes = [tuple(s) for s in bucket_shapes] if bucket_shapes else [tuple(latent_shape)]
        self.orders: list[list[int]] = [[] for _ in self.pools]
        self.dropout, self.noise_offset, self.flip, self.captions = dropout, noise_offset, flip, captions
        self.crop, self.input_perturbation = crop, input_perturbation
        self.num_images, self.global_batch = num_images, global_batch
        self.num_timesteps = num_timesteps

    def _indices(self) -> tuple[torch.Tensor, int]:
        bucket = 0
        if len(self.pools) > 1:
            bucket = int(torch.multinomial(self.weights, 1, generator=self.generator))
        order, pool = self.orders[bucket], self.pools[bucket]
        while len(order) < self.global_batch:
            order += [pool[j] for j in torch.randperm(len(pool), generator=self.generator).tolist()]
        self.orders[bucket] = order[self.global_batch :]
        return torch.tensor(order[: self.global_batch]), bucket

    def draw(self) -> dict[str, torch.Tensor]:
        n = self.global_batch
        index, bucket = self._indices()
        shape = self.shapes[bucket]
        drawn = {
            "index": index,
            "latent_noise": torch.randn((n, *shape), generator=self.generator),
            "noise": torch.randn((n, *shape), generator=self.generator),
            "timesteps": torch.randint(0, self.num_timesteps, (n,), generator=self.generator),
            "drop_caption": torch.rand(n, generator=self.generator) < self.dropout,
        }
        if self.noise_offset:  # drawn last, so that a run without it draws what it always did
            shift = torch.randn((n, shape[0], 1, 1), generator=self.generator)
            drawn["noise"] = drawn["noise"] + self.noise_offset * shift
        if self.flip:  # each image shown as it is or mirrored, one chance in two
            drawn["flip"] = torch.rand(n, generator=self.generator) < 0.5
        if self.captions > 1:  # which of each image's cached captions (tag shuffles) it is shown with
            drawn["caption"] = torch.randint(0, self.captions, (n,), generator=self.generator)
        if self.crop:  # --crop random: where each picture is cut, down and across
            drawn["crop"] = torch.rand((n, 2), generator=self.generator)
        if self.input_perturbation:  # drawn last too; the target stays "noise"
            extra = torch.randn((n, *shape), generator=self.generator)
            drawn["input_noise"] = drawn["noise"] + self.input_perturbation * extra
        return drawn

    def state(self) -> dict:
        """The generator and what is left of the epoch: one order, or one per bucket when there are several."""
        orders = [list(order) for order in self.orders]
        return {"generator": self.generator.get_state(), "order": orders[0] if len(orders) == 1 else orders}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        order = state["order"]
        self.orders = [list(o) for o in order] if order and isinstance(order[0], list) else [list(order)]


def make_batch(
    draw: dict, cache: dict, family: Family, device, process: int = 0, processes: int = 1
) -> dict[str, torch.Tensor]:
    """This process's slice of a drawn global batch, with the cached latents and conditioning looked up (with
    --crop random, the drawn crops encoded: `cache["crops"]`, a CropEncoder)."""
    per = len(draw["index"]) // processes
    part = slice(process * per, (process + 1) * per)
    idx = draw["index"][part]
    placed = {}  # the picture's own conditioning of each drawn crop
    if "crop" in draw:
        flips = draw["flip"][part].tolist() if "flip" in draw else [False] * len(idx)
        mean, std, placed = cache["crops"](idx.tolist(), flips, draw["crop"][part])
    else:
        pictures = idx + draw["flip"][part].long() * (len(cache["latent_mean"]) // 2) if "flip" in draw else idx
        mean, std = cache["latent_mean"], cache["latent_std"]
        if isinstance(mean, list):  # several buckets: one latent per picture, of its bucket's size
            mean, std = (torch.stack([values[i] for i in pictures.tolist()]) for values in (mean, std))
        else:
            mean, std = mean[pictures], std[pictures]
    latents = mean + std * draw["latent_noise"][part].to(device)
    drop = draw["drop_caption"][part].to(device)
    if "caption" in draw:  # this image's drawn tag shuffle
        idx = idx + draw["caption"][part] * cache["images"]
    cond = {}
    for key, values in cache["cond"].items():
        if key in cache["empty_cond"]:  # a dropped caption conditions like the empty one (or is its token ids)
            mask = drop.view(-1, *[1] * (values.dim() - 1))
            cond[key] = torch.where(mask, cache["empty_cond"][key], values[idx])
        else:
            cond[key] = placed[key] if key in placed else values[idx]
    batch = {
        "latents": latents,
        "noise": draw["noise"][part].to(device),
        "timesteps": draw["timesteps"][part].to(device),
        "cond": cond,
    }
    if "input_noise" in draw:  # --input-perturbation: what the UNet's input is noised with (the target is "noise")
        batch["input_noise"] = draw["input_noise"][part].to(device)
    return batch


def set_stop_signals(handler) -> dict:
    """Give SIGTERM and SIGINT `handler` (a function, or `signal.SIG_IGN`); returns the handlers they had, for
    `restore_signals`. Outside the main thread nothing changes (an empty dict)."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (tests, the page's workers)
            pass
    return previous


def restore_signals(previous: dict) -> None:
    """Give SIGTERM/SIGINT back the handlers `set_stop_signals` returned: afterwards Ctrl+C and `kill` stop the
    process again (a notebook, a test session, a benchmark that trained and goes on, and every process started
    later, which would inherit an ignored signal)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _stop_on_signals() -> dict:
    """Turn SIGTERM/SIGINT into a flag the loop checks, so a cancel still saves what was learned (outside the main
    thread, cancellation comes through `should_stop`). The handlers they had are kept in `flag["previous"]`."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    flag["previous"] = set_stop_signals(handler)
    return flag


class _LauncherWatch:
    """A worker of a multi-process run stops, saving what it learned, once its launcher is gone.

    torchrun starts each worker in a session of its own, so a launcher killed outright (SIGKILL, the OOM killer)
    takes none of them along: left alone, they trained on as orphans, beside a resumed run in the same folder.
    A thread polls the parent process and raises the stop flag the loop checks; the loop's per-step vote then stops
    every process at the same step. `end()` ends the watch."""

    def __init__(self, flag: dict):
        self.parent, self._done = os.getppid(), threading.Event()

        def watch() -> None:
            while not self._done.wait(0.5):
                if self.gone():
                    flag["stop"] = True
                    return

        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()

    def gone(self) -> bool:
        return os.getppid() != self.parent

    def end(self) -> None:
        self._done.set()


def train(config: TrainConfig, *, should_stop=None, device=None, log_to_terminal: bool = True) -> TrainResult:
    """Train one adapter as `config` says; the .safetensors file is written before this returns."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler

    # 1. Check every input before loading a model: the data folder, the base model (its model_index.json or
    # header alone), the output file, the run folder.
    pairs = check_folder(config.data, config.default_caption)
    check_base_model(config.base_model, None if config.prediction_type == "auto" else config.prediction_type)
    # On a machine without CUDA, accelerate only joins a multi-process (gloo) group when told it runs on the CPU.
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    precision = resolve_precision(config.mixed_precision, PartialState(cpu=cpu).device)
    # accelerate keeps one precision per process; a second run in the same process (a notebook, a benchmark)
    # may ask for another. The process group lives in PartialState, which stays.
    AcceleratorState._reset_state()
    check_log_with(config.log_with)
    tracking = config.log_with != "none"
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=cpu,
        log_with=config.log_with if tracking else None,
        project_dir=config.run_dir or "runs" if tracking else None,  # the run folder, once known (below)
    )
    check_optimizer(config, accelerator.device)  # its package and its device, before any model loads
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    main, processes = accelerator.is_main_process, accelerator.num_processes
    # An epoch shows every image its repeats times; --epochs N makes the step count N epochs' worth.
    per_epoch = sum(repeats_of(path, config.data, config.repeats) for path, _ in pairs)
    per_step = config.batch_size * processes * config.gradient_accumulation_steps
    steps_per_epoch, steps, epochs = config.run_length(per_epoch, processes)
    if config.epochs:
        config.check_run_length(steps, steps_per_epoch)
        config = dataclasses.replace(config, steps=steps)
    new_folder = not (config.run_dir and Path(config.run_dir).exists())
    run_dir = _shared_run_dir(config, accelerator)
    start_over = not new_folder and _never_stepped(run_dir)  # nothing to go on from, nothing learned to keep
    if start_over and config.resume == "latest":
        config = dataclasses.replace(config, resume="")
        if main:
            print(f"lora-studio: run {run_dir} was stopped before its first step: it starts over", file=sys.stderr)
    try:
        if (run_dir / EVENTS).exists() and not config.resume and not start_over:
            raise UserError(
                f"run folder {run_dir} already holds a run (events.jsonl); use a new --run-dir or --resume"
            )
        if not config.resume:
            _check_run_folder(run_dir)
        checkpoint, done = _check_resume(config, run_dir, steps_per_epoch) if config.resume else (None, 0)
        output = output_path(config, run_dir)
    except UserError:
        if main and new_folder and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before anything was written: no empty run folder left behind
        raise
    accelerator.wait_for_everyone()  # every process has checked before the main one writes anything
    if main and start_over:
        (run_dir / EVENTS).unlink(missing_ok=True)  # the stopped start's log: the run's own begins again
    events = EventLog(run_dir, enabled=main)
    if main:
        config.run_dir = str(run_dir)
        config.as_run_keeps_it().save(run_dir / "config.json")  # the run's settings, not this command's ONE_OFF
    peaks = PhasePeaks(accelerator.device)  # each phase's own peak memory, for the done event
    # The plan: what this run needs on this machine, what it turns on to fit (gradient checkpointing, tiled
    # previews), a refusal with settings that fit when nothing does; in the run folder beside what was measured.
    pictures = [path for path, _ in pairs]
    plan = estimate(
        config, device=accelerator.device, processes=processes, images=per_epoch, pictures=pictures, done_steps=done
    )
    if main:
        (run_dir / PLAN).write_text(json.dumps(plan.to_dict(), indent=1))
        events.emit("plan", **plan.to_dict())
    capped = bool(config.gpu_memory and accelerator.device.type == "cuda")
    index = accelerator.device.index or 0
    if capped:  # hold the run to a card of that size (lifted again when it ends)
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.gpu_available_gib / total), index)
    stop_flag = _stop_on_signals()  # given back when the run ends (finally, below)
    launcher = _LauncherWatch(stop_flag) if processes > 1 else None
    try:
        check(plan)  # before any model loads
        # 2. The base model, frozen in the compute dtype; fresh LoRA on the chosen attention projections, in fp32.
        # On a GPU the UNet waits in system memory while the captions and pictures are encoded: the text
        # encoders, the VAE and the UNet are never on the GPU together (SDXL's caching peak was 6.9 GiB, the
        # UNet's 4.8 GiB of it idle), and the UNet moves over once the cache is made.
        gpu = accelerator.device.type == "cuda"
        pipe = load_pipeline(
            config.base_model,
            device="cpu" if gpu else accelerator.device,
            dtype=weight_dtype,
            prediction_type=None if config.prediction_type == "auto" else config.prediction_type,
        )
        unet, family = pipe.unet, family_of_pipeline(pipe)
        if gpu:
            for name in ("vae", *family.text_encoders):
                getattr(pipe, name).to(accelerator.device)
        sampling = generation_defaults(config.base_model, dict(pipe.scheduler.config))  # for the previews
        for name in ("unet", "vae", *family.text_encoders):
            getattr(pipe, name).requires_grad_(False)
        targets = attention_targets(unet, config.attention)
        targets += feed_forward_targets(unet) if config.train_ff else []
        targets += projection_targets(unet) if config.train_proj else []
        convs = conv_targets(unet) if config.conv_rank else []  # LoCon, at its own rank and alpha
        torch.manual_seed(
            config.seed
        )  # the LoRA A matrices (and dropout's masks) are drawn from the global generator
        attach(
            unet,
            targets,
            config.rank,
            config.effective_alpha,
            conv=convs,
            conv_rank=config.conv_rank,
            conv_alpha=config.effective_conv_alpha,
            dropout=config.lora_dropout,
            use_dora=config.use_dora,
        )
        params = train_in_fp32(unet)
        # --train-text-encoder: LoRA on every CLIP layer's attention and MLP of each text encoder, drawn after the
        # UNet's (whose draws stay what they are without it), optimised as a group of its own
        text_encoders = {name: getattr(pipe, name) for name in family.text_encoders if config.train_text_encoder}
        text_params: list[torch.nn.Parameter] = []
        for encoder in text_encoders.values():
            attach(encoder, text_encoder_targets(encoder), config.rank, config.effective_alpha)
            text_params += train_in_fp32(encoder)
        all_params = params + text_params  # what checkpoints hold, in this order
        checkpointing = gradient_checkpointing(config.gradient_checkpointing, plan)
        if checkpointing[0]:
            unet.enable_gradient_checkpointing()
        resolution = config.resolution or native_size(pipe)
        # bucket sides: multiples of 64, or, for a model too small for that, of what its VAE and UNet divide by
        stride = bucket_stride(resolution, pipe.vae_scale_factor, len(unet.config.block_out_channels))

        # 3. Data: every image and caption encoded once by the frozen VAE and text encoder(s).
        notes: list[str] = []  # what the data check has to say (an animation's first frame, a long caption)
        examples = load_examples(
            config.data,
            resolution,
            default_caption=config.default_caption,
            trigger_word=config.trigger_word,
            notes=notes,
            repeats=config.repeats,
            buckets=bucket_sizes(resolution, stride) if config.buckets else None,
            crop=config.crop,
        )
        # the buckets the images fell in, as (width, height) -> images, in size order
        sizes = sorted({(ex.pixels.shape[2], ex.pixels.shape[1]) for ex in examples})
        image_bucket = [sizes.index((ex.pixels.shape[2], ex.pixels.shape[1])) for ex in examples]
        notes += long_captions(examples, pipe.tokenizer)
        if config.gpu_memory and not capped:
            notes.append(GPU_MEMORY_ON_CPU.format(config.gpu_memory, accelerator.device.type.upper()))
        shuffles = config.tag_shuffles if config.shuffle_tags else 1
        captions = None
        if config.shuffle_tags:  # K fixed orders of each caption's tags, encoded once; each draw picks one
            per_image = [
                shuffled_captions(
                    ex.caption, shuffles, config.keep_tokens, config.seed * 100_003 + i, config.trigger_word
                )
                for i, ex in enumerate(examples)
            ]
            captions = [list(variant) for variant in zip(*per_image)]
        previews = config.previews()
        cropping = config.crop == "random"  # no latent cache: each step encodes the crops it draws
        # the judge's held-out prompts are encoded now, while the text encoders are still on the device
        judge = Judge.start(config, pipe, family, examples, resolution, sampling, run_dir, events) if main else None
        cache = encode_examples(
            pipe,
            family,
            examples,
            resolution,
            accelerator.device,
            weight_dtype,
            previews,
            config.flip,
            captions,
            latents=not cropping,
            train_text_encoder=config.train_text_encoder,
        )
        unet.to(accelerator.device)
        peaks.end("cache")
        if cropping:
            cache["crops"] = CropEncoder(pipe, family, examples, accelerator.device, weight_dtype)
            scale = pipe.vae_scale_factor  # each bucket's latent shape, from its first image's size
            shapes = [(pipe.vae.config.latent_channels, h // scale, w // scale) for w, h in sizes]
        elif len(sizes) > 1:  # the latent shape of each bucket: that of its first image
            shapes = [cache["latent_mean"][image_bucket.index(b)].shape for b in range(len(sizes))]
        else:
            shapes = [cache["latent_mean"].shape[1:]]
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        model = (family, noise_scheduler.config.prediction_type)  # what the adapter file says it was made for
        drawer = BatchDrawer(
            len(examples),
            config.batch_size * processes,
            noise_scheduler.config.num_train_timesteps,
            shapes[0],
            config.seed,
            config.caption_dropout,
            config.noise_offset,
            repeats=[ex.repeats for ex in examples],
            flip=config.flip,
            captions=shuffles,
            buckets=image_bucket if len(sizes) > 1 else None,
            bucket_shapes=shapes if len(sizes) > 1 else None,
            crop=cropping,
            input_perturbation=config.input_perturbation,
        )
        optimizer = make_optimizer(params, config, text_params)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        start_step, stretched = 0, ""
        if config.resume:  # LoRA weights, AdamW moments and the batch generator: the run continues bit-exactly
            start_step = load_checkpoint(checkpoint, all_params, optimizer, drawer, config.to_dict())
            before = json.loads((checkpoint / "state.json").read_text())["config"].get("steps", config.steps)
            decays = config.lr_scheduler not in ("constant", "constant_with_warmup")
            if decays and before != config.steps and start_step < config.steps:
                # the schedule is a function of the step and the run's length: a longer run moves the rate
                was, now = rate_at(dataclasses.replace(config, steps=before), start_step), rate_at(config, start_step)
                stretched = (
                    f"steps {before} -> {config.steps}: the {config.lr_scheduler} learning-rate schedule now spans "
                    f"{config.steps} steps, so from step {start_step} the rate is {now:.3g} (it was {was:.3g} on "
                    "the schedule the run began with); resume with the old steps to keep it"
                )
            if start_step >= config.steps:
                longer = (
                    f"raise --epochs above {config.epochs} (an epoch is {steps_per_epoch} steps), or give --steps "
                    f"above {start_step}"
                    if config.epochs
                    else f"raise --steps above {start_step}"
                )
                raise UserError(f"checkpoint {checkpoint} is at step {start_step}; {longer} to go on")
        lr_schedule = make_lr_schedule(optimizer, config, start_step)

        def say(message: str) -> None:
            """A line for the person at the terminal only (the page shows the events)."""
            if main and log_to_terminal:
                tqdm.write(f"lora-studio: {message}", file=sys.stderr)

        def notice(message: str) -> None:
            print(f"lora-studio: {message}", file=sys.stderr)
            events.emit("notice", message=message)

        if stretched:
            notice(stretched)

        for note in notes:
            notice(note)
        if cropping:
            notice(
                "--crop random: no latent cache; every step cuts its pictures at random places and encodes them with "
                "the VAE (slower steps)"
            )
        if tracking:  # accelerate's TensorBoard tracker, into <run>/tensorboard/; a resume passes TensorBoard's
            # purge_step, so readers that honour it replace the steps logged after the checkpoint (not tested here)
            accelerator.project_configuration.project_dir = str(run_dir)
            accelerator.project_configuration.logging_dir = str(run_dir)
            writer = {"purge_step": start_step + 1} if start_step else {}
            accelerator.init_trackers(TENSORBOARD, init_kwargs={"tensorboard": writer})
        notice(
            f"{len(examples)} images, {per_epoch} per epoch with their repeats; {per_step} per step (batch "
            f"{config.batch_size} x {processes} process(es) x {config.gradient_accumulation_steps} accumulated) = "
            f"{steps_per_epoch} steps per epoch; {config.steps} steps = {round(epochs, 1):g} epochs"
            + (" (from --epochs)" if config.epochs else "")
        )
        bucket_counts = {f"{w}x{h}": image_bucket.count(b) for b, (w, h) in enumerate(sizes)}
        notice(
            f"{len(sizes)} aspect-ratio bucket(s), width x height: images: "
            + ", ".join(f"{size}: {count}" for size, count in bucket_counts.items())
            + ("" if config.buckets else " (--no-buckets: every image centre-cropped to the square)")
        )
        if config.torch_compile == "on" and not plan.torch_compile:
            notice(plan.torch_compile_why)  # asked for, and this run's step cannot: say why
        step = make_step(
            unet,
            optimizer,
            accelerator=accelerator,
            noise_scheduler=noise_scheduler,
            family=family,
            dtype=weight_dtype,
            cuda_graphs=config.cuda_graphs,
            notice=notice,
            loss=Loss.of(config),
            max_grad_norm=config.max_grad_norm,
            encode=(lambda tokens: family.encode(pipe, tokens)) if text_encoders else None,
            text_encoder_params=text_params,
            eager_why="--lora-dropout draws new masks in every step" if config.lora_dropout else "",
            torch_compile=plan.torch_compile,
            compile_why=plan.torch_compile_why,
            channels_last="on" if plan.channels_last else "off",
            channels_last_why=plan.channels_last_why,
        )
        if config.use_dora:
            notice(
                "--use-dora: the adapter is written in diffusers' layout (diffusers reads it); ComfyUI does not draw "
                "a DoRA adapter as it was trained (see the README, Adapter files)"
            )
        events.emit(
            "start",
            steps=config.steps,
            images=len(examples),
            repeats=per_epoch,  # images shown per epoch, each image counted its repeats times
            batch_size=config.batch_size,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            steps_from="epochs" if config.epochs else "steps",
            buckets=bucket_counts,
            resolution=resolution,
            targets=len(targets) + len(convs),
            target_kinds=dict(Counter(module_kind(path) for path in [*targets, *convs])),
            text_encoder_targets=sum(len(text_encoder_targets(e)) for e in text_encoders.values()),
            trainable_parameters=sum(p.numel() for p in all_params),
            device=str(accelerator.device),
            precision=precision,
            processes=processes,
            family=family.name,
            step_kind=step.kind,
            step_why=step.why,
            torch_compile=bool(step.compiled),
            channels_last=step.channels_last,
            gradient_checkpointing=checkpointing[0],
            gradient_checkpointing_why=checkpointing[1],
        )
        if config.resume:
            newest = " (the newest complete one)" if config.resume == "latest" else ""
            notice(f"resuming at step {start_step} from checkpoint {checkpoint}{newest}")
            events.emit("resume", step=start_step, checkpoint=str(checkpoint))

        # 4. The loop: one UNet forward and backward per step.
        def make_preview(at: int) -> Path | None:
            """One picture per preview prompt, each with its own fixed seed; returns the first one's file."""
            if not (main and previews):
                return None
            peaks.end("train")
            pipe.unet = accelerator.unwrap_model(unet)
            if plan.tiled_preview:  # the whole picture's decoding would not fit: 512-pixel tiles, blended
                pipe.vae.enable_tiling()
                pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = TILE, TILE // pipe.vae_scale_factor
            for part in (pipe.unet, *text_encoders.values()):
                part.eval()
            paths = []
            for i, (preview, (cond, negative)) in enumerate(zip(previews, cache["preview_conds"])):
                # The frozen model is in the compute dtype and the LoRA weights in fp32: the pipeline mixes them
                # under the autocast the training step runs in (without it, bf16 and fp16 previews fail on a dtype
                # clash).
                mixed = weight_dtype != torch.float32
                with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=mixed):
                    negative = negative or cache["empty_cond"]
                    if cache["tokens"]:  # the text encoders as trained so far
                        with torch.no_grad():
                            cond, negative = family.encode(pipe, cond), family.encode(pipe, negative)
                    image = pipe(
                        **family.pipeline_kwargs(cond, negative),
                        num_inference_steps=preview.sampling_steps,
                        guidance_scale=preview.guidance or sampling["guidance"],
                        guidance_rescale=sampling["guidance_rescale"],
                        generator=torch.Generator("cpu").manual_seed(preview.seed),
                        height=resolution,
                        width=resolution,
                    ).images[0]
                path = run_dir / PREVIEWS / (f"step_{at:06d}.png" if i == 0 else f"step_{at:06d}-{i}.png")
                path.parent.mkdir(exist_ok=True)
                image.save(path)
                paths.append(path)
                epoch = {"epoch": at // steps_per_epoch} if at % steps_per_epoch == 0 else {}
                events.emit("preview", step=at, path=str(path), prompt=preview.prompt, seed=preview.seed, **epoch)
                if tracking:
                    import numpy as np

                    tracker = accelerator.get_tracker("tensorboard")
                    tracker.log_images({f"preview/{i}": np.asarray(image)[None]}, step=at, dataformats="NHWC")
            for part in (pipe.unet, *text_encoders.values()):
                part.train()
            peaks.end("preview")
            return paths[0]

        def preview_due(at: int) -> bool:
            """A preview every --preview-every steps, and at the end of every --preview-every-epoch epochs (the
            last step makes its own, after the adapter is saved)."""
            by_step = config.preview_every and at % config.preview_every == 0
            by_epoch = config.preview_every_epoch and at % (config.preview_every_epoch * steps_per_epoch) == 0
            return bool(by_step or by_epoch) and at != config.steps

        def checkpoint(at: int, strength: float | None = None) -> Path:
            """A resumable checkpoint of step `at`, with the adapter file of that step inside (the page's Generate
            tab tries and downloads it; `strength`: the judge's recommended strength for it)."""
            name = f"{sanitize_name(config.name or run_dir.name)}-step{at}.safetensors"
            unwrapped = accelerator.unwrap_model(unet)
            return save_checkpoint(
                run_dir,
                at,
                all_params,
                optimizer,
                drawer,
                config.to_dict(),
                config.keep_checkpoints,
                adapter=lambda folder: _save(
                    config, unwrapped, text_encoders, examples, resolution, folder / name, at, model, strength
                ),
                also_keep=[best["step"]] if judge and (best := recommend(judge.rows, judge.limit)[0]) else (),
            )

        def judged(at: int) -> float | None:
            """The judge's recommended strength for the LoRA as it is at step `at`; None when it recommends none or
            could not draw (out of GPU memory: said, and training goes on without that step's scores)."""
            strengths = ", ".join(f"{s:g}" for s in judge.strengths)
            say(f"judging step {at}: {len(judge.prompts)} prompts at strengths {strengths}")
            try:
                strength = judge.score(at, accelerator.unwrap_model(unet), weight_dtype, text_encoders)
                say(judge.summary(at))
                return strength
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                notice(
                    f"the judge ran out of GPU memory at step {at} and judged nothing there; training goes on "
                    "(--no-judge turns the judge off)"
                )
                return None

        bar = tqdm(total=config.steps, initial=start_step, disable=not (main and log_to_terminal), unit="step")
        started, at, loss_value = time.perf_counter(), start_step, math.nan
        for part in (unet, *text_encoders.values()):
            part.train()
        try:
            for at in range(start_step + 1, config.steps + 1):
                stop = stop_flag["stop"] or (should_stop is not None and should_stop())
                if processes > 1:  # all processes stop at the same step, or the others would wait forever
                    stop = accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum") > 0
                if stop:
                    raise Cancelled
                batches = [  # more than one: gradient accumulation, one optimiser step on them all
                    make_batch(drawer.draw(), cache, family, accelerator.device, accelerator.process_index, processes)
                    for _ in range(config.gradient_accumulation_steps)
                ]
                loss = step(*batches)
                rates = lr_schedule.get_last_lr()  # the learning rates this step took: UNet (, text encoders)
                lr_schedule.step()
                loss_value = accelerator.reduce(loss, reduction="mean").item()
                if not math.isfinite(loss_value):  # the weights this step wrote are no good: stop, save nothing
                    raise _diverged(config, run_dir, at, f"the loss is {loss_value}")
                rate = (at - start_step) / (time.perf_counter() - started)
                events.emit(
                    "progress",
                    step=at,
                    total=config.steps,
                    loss=loss_value,
                    lr=rates[0],
                    **({"text_encoder_lr": rates[1]} if text_encoders else {}),
                    steps_per_s=rate,
                    images_per_s=rate * config.batch_size * processes * config.gradient_accumulation_steps,
                    eta_s=(config.steps - at) / rate,
                )
                if tracking:
                    accelerator.log({"loss": loss_value, "lr": rates[0]}, step=at)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if preview_due(at):
                    make_preview(at)
                if config.save_every and at % config.save_every == 0 and at != config.steps:
                    _require_finite(all_params, config, run_dir, at)
                    if main:  # judged first, so that the checkpoint's adapter file says the strength to use
                        due = judge and at % (config.judge_every or config.save_every) == 0
                        path = checkpoint(at, judged(at) if due else None)
                        events.emit("checkpoint", step=at, path=str(path))
                    accelerator.wait_for_everyone()
        except Cancelled as cancel:
            at -= 1
            cancel.run_dir, cancel.step = run_dir, at
            bar.close()
            if launcher is not None and launcher.gone():  # every worker lost it at once: the main one says so
                notice(
                    f"the launcher (process {launcher.parent}) is gone: every process stops here and saves what it "
                    "learned; --resume latest goes on from there"
                )
            if at == 0:  # stopped before the first step: nothing was learned, nothing is saved
                events.emit("cancelled", step=0)
                raise
            unwrapped = accelerator.unwrap_model(unet)
            _require_finite(all_params, config, run_dir, at)
            path = output
            if main:
                path = _save(config, unwrapped, text_encoders, examples, resolution, output, at, model)
            if main:  # a checkpoint of this very step, so that a resume goes on from here whatever --save-every says
                if f"step_{at:06d}" not in [c.name for c in list_checkpoints(run_dir)]:
                    saved = checkpoint(at)
                    events.emit("checkpoint", step=at, path=str(saved))
                if config.library:  # to try in Generate and download, beside any finished adapter
                    name, replaced = _add_to_library(config, path, run_dir, None, partial=True)
                    events.emit(
                        "library", name=name, library=config.library, partial=True, sha256=_sha256(path),
                        replaced=replaced,
                    )  # fmt: skip
                draw_loss_curve(run_losses(scan_events(run_dir)[0]), run_dir / LOSS_PNG)
            events.emit("cancelled", step=at, adapter=str(path), **({"sha256": _sha256(path)} if main else {}))
            cancel.adapter = Path(path)
            _finish_trackers(accelerator)
            accelerator.wait_for_everyone()  # no process exits (and gets its peers killed) before the save is done
            raise
        bar.close()
        peaks.end("train")
        accelerator.wait_for_everyone()

        # 5. The adapter file (main process only), then the last preview.
        _require_finite(all_params, config, run_dir, config.steps)
        if main:
            unwrapped = accelerator.unwrap_model(unet)
            strength = judged(config.steps) if judge else None
            _save(config, unwrapped, text_encoders, examples, resolution, output, config.steps, model, strength)
            if judge:
                say(judge.verdict())
            preview = make_preview(config.steps)
            if config.library:
                name, replaced = _add_to_library(config, output, run_dir, preview)
                events.emit("library", name=name, library=config.library, replaced=replaced)
                if replaced:
                    notice(
                        f"the library's {', '.join(replaced)} (this run's adapter when it was cancelled) is replaced "
                        f"by {name}"
                    )
            draw_loss_curve(run_losses(scan_events(run_dir)[0]), run_dir / LOSS_PNG)
            events.emit(
                "done",
                step=config.steps,
                loss=loss_value,
                adapter=str(output),
                sha256=_sha256(output),
                seconds=time.perf_counter() - started,
                memory=peaks.summary(),
            )
        _finish_trackers(accelerator)
        accelerator.wait_for_everyone()
        if processes > 1:
            accelerator.end_training()
        return TrainResult(output, run_dir, accelerator.unwrap_model(unet), loss_value, text_encoders)
    except Cancelled:
        raise
    except Exception as exc:  # the UI tails events.jsonl: say what went wrong there, not only on the terminal
        error = _out_of_memory(config, run_dir, exc, plan) if isinstance(exc, torch.cuda.OutOfMemoryError) else exc
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        events.emit("error", message=message)
        _finish_trackers(accelerator)
        if error is exc:
            raise
        raise error from exc
    finally:
        restore_signals(stop_flag["previous"])
        if launcher is not None:
            launcher.end()
        if capped:  # what runs next in this process (the page's Generate) has the whole card again
            torch.cuda.set_per_process_memory_fraction(1.0, index)


def _finish_trackers(accelerator) -> None:
    """Close the TensorBoard writer (its last values reach the disk); end_training would also end the process
    group, which a run in a process that goes on (a test, a notebook) still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def _kept(run_dir: Path) -> str:
    """What a stopped run leaves to go on from, in words."""
    found = list_checkpoints(run_dir)
    if not found:
        return "no checkpoint had been saved yet (--save-every N makes them)"
    return f"its newest checkpoint, {found[-1]}, is kept: --run-dir {run_dir} --resume latest continues from it"


def _diverged(config: TrainConfig, run_dir: Path, step: int, what: str) -> UserError:
    """The error for a run whose loss or LoRA weights stopped being finite numbers."""
    return UserError(
        f"training stopped at step {step}: {what}; the run diverged. Nothing with NaN/Inf weights was written, "
        f"any adapter file already there is left as it was, and {_kept(run_dir)} (with the same settings). Start "
        f"a new run with a lower --learning-rate (now {config.learning_rate:g}; try {config.learning_rate / 10:g}), "
        "or, if it trains in fp16, with --mixed-precision bf16"
    )


def _require_finite(params, config: TrainConfig, run_dir: Path, step: int) -> None:
    """Refuse to save LoRA weights that hold NaN or Inf (a diverged run), with the advice `_diverged` gives."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise _diverged(config, run_dir, step, "the LoRA weights hold NaN or Inf values")


def _out_of_memory(config: TrainConfig, run_dir: Path, exc: Exception, plan=None) -> UserError:
    """CUDA ran out of memory: what to change, from the settings this run has (and what its plan expected)."""
    smaller = f"try {config.batch_size // 2}" if config.batch_size > 1 else "already 1"
    size = f"now {config.resolution}" if config.resolution else "now the model's native size"
    precision = "; --mixed-precision bf16 (it trains in fp32 now)" if config.mixed_precision == "no" else ""
    recompute = (
        f"; --gradient-checkpointing on (now {config.gradient_checkpointing})"
        if config.gradient_checkpointing != "on"
        else ""
    )
    expected = ""
    if plan is not None and plan.gpu_gib:
        expected = (
            f"The plan expected a peak of about {plan.need_gib:.1f} GiB of the {plan.gpu_available_gib:.1f} GiB "
            "this run may use: is another program using the GPU? (--gpu-memory plans for less.) "
        )
    return UserError(
        f"the GPU ran out of memory ({str(exc).splitlines()[0][:200]}). {expected}Things that need less: a smaller "
        f"--batch-size (now {config.batch_size}; {smaller}); a smaller --resolution ({size}); a smaller --rank "
        f"(now {config.rank}){recompute}; --no-cuda-graphs (graphs keep their own memory pool){precision}; and "
        f"no other program on the same GPU. The run stopped; {_kept(run_dir)}"
    )


def _save(
    config: TrainConfig,
    unet,
    text_encoders: dict,
    examples,
    resolution: int,
    output: Path,
    steps: int,
    model,
    strength: float | None = None,
) -> Path:
    """The adapter file, with the header other tools read: the UNet's LoRA and the trained `text_encoders`' ({pipeline
    attribute: model}; `lora_te_`, or `lora_te1_` and `lora_te2_` for SDXL's two); `model` is (family, prediction
    type); `strength` the judge's recommended strength (None: not judged). Written in the kohya layout, but DoRA in
    the diffusers layout (the one layout diffusers reads DoRA from; `to_kohya` refuses it)."""
    lora = extract(unet, "unet")
    for name, encoder in text_encoders.items():
        lora.update(extract(encoder, name))
    layout = {}  # the diffusers layout's own header field (lora_adapter_metadata)
    if config.use_dora:
        tensors, layout = to_diffusers(lora)
    else:
        tensors = to_kohya(lora, two_text_encoders=len(model[0].text_encoders) > 1)
    conv = {"conv_dim": str(config.conv_rank), "conv_alpha": f"{config.effective_conv_alpha:g}"}
    metadata = build_metadata(
        tensors=tensors,
        rank=config.rank,
        alpha=config.effective_alpha,
        base_model=base_model_label(config.base_model),
        family=model[0],
        prediction_type=model[1],
        output_name=sanitize_name(config.name) if config.name else output.stem,
        resolution=resolution,
        num_images=len(examples),
        tag_frequency=tag_frequency(examples, config.data),
        trigger_word=config.trigger_word,
        config=_header_config(config),
        steps=steps,
        network_args=conv if config.conv_rank else None,  # kohya's own record of LoCon's rank and alpha
        recommended_strength=strength,
    )
    save_adapter(output, tensors, {**metadata, **layout})
    return output


def _header_config(config: TrainConfig) -> dict:
    """The settings as an adapter file keeps them: every field, but the folders and files of this machine cut to
    their names (a file shared or downloaded tells nothing of where it was made)."""
    values = config.to_dict()
    for key in ("data", "output", "library", "run_dir", "resume"):
        values[key] = Path(values[key]).name if values[key] else ""
    values["base_model"] = base_model_label(config.base_model)
    return values


def _add_to_library(
    config: TrainConfig, output: Path, run_dir: Path, preview: Path | None, partial: bool = False
) -> tuple[str, list[str]]:
    """Copy the adapter into the library under a free name (an existing adapter is never replaced); a cancelled
    run's adapter goes in as `<name>-partial`. The run's own earlier `-partial` adapters (of attempts cancelled
    before a resume), where the library still holds them as the run put them, are superseded: a finished adapter
    replaces them, a newer partial one takes the place of the newest. Returns the name, and the names removed."""
    from adapters.library import Library

    library = Library(config.library)
    own = _own_partials(library, run_dir)
    if partial and own:
        name = own.pop()
        library.add(output, name, sample=preview, overwrite=True)
    else:
        base = sanitize_name(config.name or run_dir.name) + (PARTIAL_SUFFIX if partial else "")
        name = next(n for n in (base if i == 0 else f"{base}-{i + 1}" for i in range(10_000)) if not library.taken(n))
        library.add(output, name, sample=preview)
    for old in own:
        library.delete(old)
    return name, own


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _own_partials(library, run_dir: Path) -> list[str]:
    """The `-partial` adapters this run put in `library` (its `library` events) that are there still, under the
    name it gave and with the very bytes it wrote (one renamed, replaced or re-imported by a person is not the
    run's any more), oldest first."""
    names = []
    for event in scan_events(run_dir)[0]:
        if event["type"] != "library" or not event.get("partial") or not event.get("sha256"):
            continue
        if Path(event.get("library") or "").resolve() != library.root.resolve():
            continue
        path = library.root / f"{event['name']}.safetensors"
        if path.is_file() and event["name"] not in names and _sha256(path) == event["sha256"]:
            names.append(event["name"])
    return names
