"""The training loop: LoRA on the UNet's attention layers, read top to bottom in one function, `train`.

    lora-studio train --data sample_images --steps 200 --rank 8 --output style.safetensors

Inputs are checked before any model loads. The frozen VAE and text encoder run once per image (latent mean/std
and caption embedding are cached), so a step is one UNet forward and backward. Every random draw of a step
(which images, latent sample, noise, timestep) comes from one seeded CPU generator and is made for the global
batch, so a run is reproducible and N processes at batch B see the same data as one process at batch N*B.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adapters.base import base_model_label, generation_defaults, load_pipeline, model_family
from adapters.errors import UserError
from adapters.formats import build_metadata, save_adapter, to_kohya
from adapters.lora import attach, attention_targets, extract, train_in_fp32
from trainer.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.dataset import check_folder, load_examples, tag_frequency
from trainer.runs import EVENTS, EventLog, new_run_dir


@dataclass
class TrainResult:
    adapter: Path  # the .safetensors file written
    run_dir: Path
    unet: torch.nn.Module  # the trained UNet, LoRA attached as adapter "default" (for tests and previews)
    loss: float  # the last step's loss


class Cancelled(Exception):
    """Raised inside the loop when a stop was asked for (SIGTERM/SIGINT or the UI's Cancel)."""


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

        box = [str(new_run_dir("runs")) if accelerator.is_main_process else ""]
        if accelerator.num_processes > 1:
            broadcast_object_list(box)
        path = Path(box[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_path(config: TrainConfig, run_dir: Path) -> Path:
    path = Path(config.output) if config.output else run_dir / "adapter.safetensors"
    resumed_own = config.resume and path.resolve().parent == run_dir.resolve()  # a resumed run may replace its own
    if path.exists() and not config.overwrite and not resumed_own:
        raise UserError(
            f"output file {path} already exists; choose another --output, or pass --overwrite to replace it"
        )
    return path


@torch.no_grad()
def encode_examples(pipe, examples, device, dtype) -> dict[str, torch.Tensor]:
    """Cache per image: VAE latent mean and std (scaled) and the caption's text-encoder hidden states."""
    means, stds = [], []
    scale = pipe.vae.config.scaling_factor
    for ex in examples:
        dist = pipe.vae.encode(ex.pixels[None].to(device, dtype)).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)

    def embed(caption: str) -> torch.Tensor:
        ids = pipe.tokenizer(
            caption,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pipe.text_encoder(ids.to(device))[0].float()

    return {
        "latent_mean": torch.cat(means),
        "latent_std": torch.cat(stds),
        "text_embeds": torch.cat([embed(ex.caption) for ex in examples]),
        "empty_embed": embed(""),  # what classifier-free guidance conditions the unconditional branch on
    }


class BatchDrawer:
    """Every random choice of every step, from one seeded generator: reproducible, and split across processes.

    `draw()` makes the *global* batch (batch_size x processes): image order (a fresh permutation each epoch),
    latent sample, noise and timestep; each process then takes its own slice of it.
    """

    def __init__(
        self, num_images: int, global_batch: int, num_timesteps: int, latent_shape, seed: int, dropout: float = 0.0
    ):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.dropout = dropout
        self.num_images, self.global_batch = num_images, global_batch
        self.num_timesteps, self.latent_shape = num_timesteps, tuple(latent_shape)
        self.order: list[int] = []

    def _indices(self) -> torch.Tensor:
        while len(self.order) < self.global_batch:
            self.order += torch.randperm(self.num_images, generator=self.generator).tolist()
        idx, self.order = self.order[: self.global_batch], self.order[self.global_batch :]
        return torch.tensor(idx)

    def draw(self) -> dict[str, torch.Tensor]:
        n = self.global_batch
        return {
            "index": self._indices(),
            "latent_noise": torch.randn((n, *self.latent_shape), generator=self.generator),
            "noise": torch.randn((n, *self.latent_shape), generator=self.generator),
            "timesteps": torch.randint(0, self.num_timesteps, (n,), generator=self.generator),
            "drop_caption": torch.rand(n, generator=self.generator) < self.dropout,
        }

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])


def make_batch(draw: dict, cache: dict, device, process: int = 0, processes: int = 1) -> dict[str, torch.Tensor]:
    """This process's slice of a drawn global batch, with the cached latents and embeddings looked up."""
    per = len(draw["index"]) // processes
    part = slice(process * per, (process + 1) * per)
    idx = draw["index"][part]
    latents = cache["latent_mean"][idx] + cache["latent_std"][idx] * draw["latent_noise"][part].to(device)
    drop = draw["drop_caption"][part].to(device)[:, None, None]
    return {
        "latents": latents,
        "noise": draw["noise"][part].to(device),
        "timesteps": draw["timesteps"][part].to(device),
        "text_embeds": torch.where(drop, cache["empty_embed"], cache["text_embeds"][idx]),
    }


class _Predict(torch.nn.Module):
    """The UNet as tensors in, one tensor out, under its own autocast: the form CUDA-graph capture needs.

    It calls the UNet class's forward directly, past the autocast wrapper accelerate puts on the instance:
    capture needs an autocast that does not cache casted weights."""

    def __init__(self, unet, dtype: torch.dtype):
        super().__init__()
        self.unet, self.dtype = unet, dtype

    def forward(self, latents, timesteps, embeds):
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False):
            return type(self.unet).forward(self.unet, latents, timesteps, embeds, return_dict=False)[0]


def capture_unet(unet, batch: dict, noise_scheduler, dtype: torch.dtype):
    """The UNet's forward and backward recorded once as CUDA graphs, replayed every step after.

    A LoRA step on a Stable Diffusion UNet launches some 3,600 small kernels; launching them, not the GPU's
    arithmetic, sets its time at common batch sizes, and a replayed graph launches them all at once. The
    LoRA weights are read in place at each replay, so the optimizer's updates take effect; the batch's
    shapes are fixed, which a run's are. Returns (None, why) where capture is not possible: train eagerly."""
    if getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None):
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    sample = tuple(t.clone() for t in unet_inputs(batch, noise_scheduler, dtype))
    try:
        return torch.cuda.make_graphed_callables(_Predict(unet, dtype), sample, num_warmup_iters=3), ""
    except Exception as exc:  # an exotic model or driver: the same training, eagerly
        return None, f"CUDA graphs not used ({type(exc).__name__}: {exc}); training eagerly"


def unet_inputs(batch: dict, noise_scheduler, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The UNet's arguments for a batch: noised latents, timesteps, text embeddings, in the compute dtype."""
    noisy = noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    return noisy.to(dtype), batch["timesteps"], batch["text_embeds"].to(dtype)


def diffusion_loss(unet, batch: dict, noise_scheduler, predict=None) -> torch.Tensor:
    """MSE between the UNet's prediction and the scheduler's target (epsilon or v) at the batch's timesteps.

    `predict`, when given, stands in for the UNet call (a captured CUDA graph of it)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = batch["noise"]
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])
    else:
        raise UserError(f"base model scheduler has prediction_type {kind!r}; only epsilon and v_prediction train")
    weight_dtype = next(unet.parameters()).dtype  # conv_in: a frozen base weight, in the compute dtype
    inputs = unet_inputs(batch, noise_scheduler, weight_dtype)
    pred = predict(*inputs) if predict is not None else unet(*inputs).sample
    return F.mse_loss(pred.float(), target.float())


def _stop_on_signals() -> dict:
    """Turn SIGTERM/SIGINT into a flag the loop checks, so a cancel still saves what was learned."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (tests); cancellation then comes through `should_stop`
            pass
    return flag


def train(config: TrainConfig, *, should_stop=None, device=None, log_to_terminal: bool = True) -> TrainResult:
    """Train one adapter as `config` says; the .safetensors file is written before this returns."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler

    # 1. Check every input before loading a model: the data folder, the output file, the run folder.
    check_folder(config.data, config.default_caption)
    # On a machine without CUDA, accelerate only joins a multi-process (gloo) group when told it runs on the CPU.
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    precision = resolve_precision(config.mixed_precision, PartialState(cpu=cpu).device)
    # accelerate keeps one precision per process; a second run in the same process (a notebook, a benchmark)
    # may ask for another. The process group lives in PartialState, which stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    main, processes = accelerator.is_main_process, accelerator.num_processes
    run_dir = _shared_run_dir(config, accelerator)
    if (run_dir / EVENTS).exists() and not config.resume:
        raise UserError(f"run folder {run_dir} already holds a run (events.jsonl); use a new --run-dir or --resume")
    output = output_path(config, run_dir)
    accelerator.wait_for_everyone()  # every process has checked before the main one writes anything
    events = EventLog(run_dir, enabled=main)
    if main:
        config.run_dir = str(run_dir)
        config.save(run_dir / "config.json")
    stop_flag = _stop_on_signals()

    try:
        # 2. The base model, frozen in the compute dtype; fresh LoRA on the chosen attention projections, in fp32.
        pipe = load_pipeline(config.base_model, device=accelerator.device, dtype=weight_dtype)
        unet, family = pipe.unet, model_family(pipe)
        sampling = generation_defaults(config.base_model, dict(pipe.scheduler.config))  # for the previews
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            model.requires_grad_(False)
        targets = attention_targets(unet, config.attention)
        torch.manual_seed(config.seed)  # the LoRA A matrices are drawn from the global generator
        attach(unet, targets, config.rank, config.effective_alpha)
        params = train_in_fp32(unet)
        resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor

        # 3. Data: every image and caption encoded once by the frozen VAE and text encoder.
        examples = load_examples(
            config.data, resolution, default_caption=config.default_caption, trigger_word=config.trigger_word
        )
        cache = encode_examples(pipe, examples, accelerator.device, weight_dtype)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        drawer = BatchDrawer(
            len(examples),
            config.batch_size * processes,
            noise_scheduler.config.num_train_timesteps,
            cache["latent_mean"].shape[1:],
            config.seed,
            config.caption_dropout,
        )
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        start_step = 0
        if config.resume:  # LoRA weights, AdamW moments and the batch generator: the run continues bit-exactly
            checkpoint = find_checkpoint(run_dir, config.resume)
            start_step = load_checkpoint(checkpoint, params, optimizer, drawer, config.to_dict())
            if start_step >= config.steps:
                raise UserError(f"checkpoint {checkpoint} is at step {start_step}; raise --steps above it to go on")
        use_graphs = config.cuda_graphs and accelerator.device.type == "cuda" and processes == 1
        predict = None  # the captured step, made from the first batch
        events.emit(
            "start",
            steps=config.steps,
            images=len(examples),
            resolution=resolution,
            targets=len(targets),
            trainable_parameters=sum(p.numel() for p in params),
            device=str(accelerator.device),
            precision=precision,
            processes=processes,
            cuda_graphs=use_graphs,
        )
        if config.resume:
            events.emit("resume", step=start_step, checkpoint=str(checkpoint))

        # 4. The loop: one UNet forward and backward per step.
        def make_sample(step: int) -> Path | None:
            if not (main and config.sample_prompt):
                return None
            pipe.unet = accelerator.unwrap_model(unet)
            pipe.unet.eval()
            # The frozen model is in the compute dtype and the LoRA weights in fp32: the pipeline mixes them under
            # the same autocast the training step runs in (without it, bf16 and fp16 previews fail on a dtype clash).
            mixed = weight_dtype != torch.float32
            with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=mixed):
                image = pipe(
                    config.sample_prompt,
                    num_inference_steps=20,
                    guidance_scale=sampling["guidance"],
                    guidance_rescale=sampling["guidance_rescale"],
                    generator=torch.Generator("cpu").manual_seed(config.seed),
                    height=resolution,
                    width=resolution,
                ).images[0]
            pipe.unet.train()
            path = run_dir / "samples" / f"step_{step:06d}.png"
            path.parent.mkdir(exist_ok=True)
            image.save(path)
            events.emit("sample", step=step, path=str(path), prompt=config.sample_prompt)
            return path

        bar = tqdm(total=config.steps, initial=start_step, disable=not (main and log_to_terminal), unit="step")
        started, step, loss_value = time.perf_counter(), start_step, math.nan
        unet.train()
        try:
            for step in range(start_step + 1, config.steps + 1):
                stop = stop_flag["stop"] or (should_stop is not None and should_stop())
                if processes > 1:  # all processes stop at the same step, or the others would wait forever
                    stop = accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum") > 0
                if stop:
                    raise Cancelled
                batch = make_batch(drawer.draw(), cache, accelerator.device, accelerator.process_index, processes)
                if use_graphs and predict is None:
                    raw_unet = accelerator.unwrap_model(unet)
                    predict, problem = capture_unet(raw_unet, batch, noise_scheduler, weight_dtype)
                    if problem:
                        print(f"lora-studio: {problem}", file=sys.stderr)
                        events.emit("notice", message=problem)
                        use_graphs = False
                with accelerator.autocast():
                    loss = diffusion_loss(unet, batch, noise_scheduler, predict)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
                elapsed = time.perf_counter() - started
                rate = (step - start_step) / elapsed
                events.emit(
                    "progress",
                    step=step,
                    total=config.steps,
                    loss=loss_value,
                    steps_per_s=rate,
                    images_per_s=rate * config.batch_size * processes,
                    eta_s=(config.steps - step) / rate,
                )
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if config.sample_every and step % config.sample_every == 0 and step != config.steps:
                    make_sample(step)
                if config.save_every and step % config.save_every == 0 and step != config.steps:
                    if main:
                        path = save_checkpoint(
                            run_dir, step, params, optimizer, drawer, config.to_dict(), config.keep_checkpoints
                        )
                        events.emit("checkpoint", step=step, path=str(path))
                    accelerator.wait_for_everyone()
        except Cancelled:
            step -= 1
            bar.close()
            unwrapped = accelerator.unwrap_model(unet)
            path = _save(config, unwrapped, examples, resolution, output, step, family) if main else output
            events.emit("cancelled", step=step, adapter=str(path))
            accelerator.wait_for_everyone()  # no process exits (and gets its peers killed) before the save is done
            raise
        bar.close()
        accelerator.wait_for_everyone()

        # 5. The adapter file (main process only), then the last preview.
        if main:
            _save(config, accelerator.unwrap_model(unet), examples, resolution, output, config.steps, family)
            sample = make_sample(config.steps)
            if config.library:
                name = _add_to_library(config, output, run_dir, sample)
                events.emit("library", name=name, library=config.library)
            events.emit(
                "done", step=config.steps, loss=loss_value, adapter=str(output), seconds=time.perf_counter() - started
            )
        accelerator.wait_for_everyone()
        if processes > 1:
            accelerator.end_training()
        return TrainResult(output, run_dir, accelerator.unwrap_model(unet), loss_value)
    except Cancelled:
        raise
    except Exception as exc:  # the UI tails events.jsonl: say what went wrong there, not only on the terminal
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        events.emit("error", message=message)
        raise


def _save(config: TrainConfig, unet, examples, resolution: int, output: Path, steps: int, family: str) -> Path:
    tensors = to_kohya(extract(unet, "unet"))
    metadata = build_metadata(
        tensors=tensors,
        rank=config.rank,
        alpha=config.effective_alpha,
        base_model=base_model_label(config.base_model),
        family=family,
        output_name=config.name or output.stem,
        resolution=resolution,
        num_images=len(examples),
        tag_frequency=tag_frequency(examples, config.data),
        trigger_word=config.trigger_word,
        config=config.to_dict(),
        steps=steps,
    )
    save_adapter(output, tensors, metadata)
    return output


def _add_to_library(config: TrainConfig, output: Path, run_dir: Path, sample: Path | None) -> str:
    """Copy the finished adapter into the library under a free name (an existing adapter is never replaced)."""
    from adapters.library import Library, sanitize_name

    library = Library(config.library)
    base = sanitize_name(config.name or run_dir.name)
    taken = {e.name for e in library.list()}
    name = next(n for n in (base if i == 0 else f"{base}-{i + 1}" for i in range(10_000)) if n not in taken)
    library.add(output, name, sample=sample)
    return name
