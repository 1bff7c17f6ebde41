"""The references of issue 18, timed in the same process as lora-studio: diffusers' example training step and
diffusers' own pipeline for generation.

`ScriptStep` trains LoRA the way diffusers' example scripts do (examples/text_to_image/train_text_to_image_lora.py
for SD 1.x, train_text_to_image_lora_sdxl.py for SDXL), written here from what those scripts do, not from their code:

- every base weight frozen in bf16, except the SDXL VAE, which the SDXL script keeps in fp32 (when no other VAE is
  named); LoRA rank r, alpha r, Gaussian init, on to_q / to_k / to_v / to_out.0 of every attention layer through
  diffusers' `unet.add_adapter`, its parameters in fp32 (as lora-studio keeps them);
- in every step: the VAE encodes the batch's pixels (a sample of the latent distribution, times the scaling
  factor); noise and a random timestep per image; the text encoder(s) encode the batch's token ids (SDXL: both
  encoders' penultimate hidden states side by side and the second's pooled output, and the time ids built per
  image); the UNet forward under autocast (bf16); MSE in fp32; the loss read back to the host (the scripts add its
  mean to a running total every step); backward; gradient norm clipped at 1.0; `torch.optim.AdamW` with its
  defaults (the for-each kernels on a GPU, not fused); the constant learning-rate schedule stepped; zero_grad;
- no CUDA graphs, no torch.compile, nothing cached.

Left out, in the reference's favour: data loading. The scripts decode, resize, crop and tokenize in the training
process every step; here the pixel batches and token ids are made once, put on the device, and used in turn.

`DiffusersGeneration` draws with diffusers' own pipeline: the adapter file loaded by `load_lora_weights`, fused at
a strength by `fuse_lora` and its LoRA layers removed by `unload_lora_weights` (the fused weights stay), 30 steps
with guidance; optionally with the UNet through `torch.compile` (the first, compiling picture timed apart).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
PROMPT = "a red circle"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Drop what earlier measurements left (the trainer's models, graphs' pools) before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pixel_batches(data: Path, size: int, batch: int, count: int, device, dtype) -> list[torch.Tensor]:
    """`count` batches of the data folder's pictures as the scripts feed them: resized, centre-cropped to `size`,
    scaled to [-1, 1]; made once and put on the device (the scripts do this in their data loader, every step)."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise FileNotFoundError(f"{data} holds no pictures for the reference step")
    pictures = []
    for path in files:
        image = Image.open(path).convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pictures.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    batches = []
    for b in range(count):
        chosen = [pictures[(b * batch + i) % len(pictures)] for i in range(batch)]
        batches.append(torch.stack(chosen).to(device, dtype))
    return batches


class ScriptStep:
    """diffusers' example LoRA training step (module docstring) on a diffusers model folder.

    `step(i)` runs one optimiser step on pixel batch i (mod the number made) and returns the loss;
    `calls` counts how often the VAE encoder and each text encoder ran, so a test can see that nothing is cached.
    """

    def __init__(
        self, model_dir: Path, data: Path, *, batch: int, size: int, device, rank: int = 8, batches: int = 4
    ):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.mixed = self.device.type == "cuda"  # bf16 mixed precision on a GPU; fp32 on the CPU (a code-path check)
        self.weight_dtype = torch.bfloat16 if self.mixed else torch.float32
        self.sdxl = (model_dir / "text_encoder_2").is_dir()
        self.size, self.batch = size, batch
        self.noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        vae_dtype = torch.float32 if self.sdxl else self.weight_dtype  # the SDXL script keeps its VAE in fp32
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=vae_dtype)
        self.vae.to(self.device).requires_grad_(False)
        encoder_classes = [CLIPTextModel] + ([CLIPTextModelWithProjection] if self.sdxl else [])
        self.text_encoders = []
        self.token_ids = []
        captions = [p.read_text().strip() for p in sorted(Path(data).glob("*.txt"))] or [PROMPT]
        for i, cls in enumerate(encoder_classes):
            sub = "" if i == 0 else "_2"
            encoder = cls.from_pretrained(model_dir, subfolder=f"text_encoder{sub}", dtype=self.weight_dtype)
            self.text_encoders.append(encoder.to(self.device).requires_grad_(False))
            tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder=f"tokenizer{sub}")
            ids = tokenizer(
                captions,
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self.token_ids.append(ids)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=self.weight_dtype)
        self.unet.requires_grad_(False).to(self.device)
        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        cast_training_params(self.unet, dtype=torch.float32)
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.pixels = pixel_batches(data, size, batch, batches, self.device, torch.float32)
        self.calls = {"vae_encode": 0, **{f"text_encoder_{i + 1}": 0 for i in range(len(self.text_encoders))}}
        self.vae.encoder.register_forward_hook(lambda *_: self._count("vae_encode"))
        for i, encoder in enumerate(self.text_encoders):
            encoder.register_forward_hook(lambda *_, key=f"text_encoder_{i + 1}": self._count(key))
        self.train_loss = 0.0

    def _count(self, key: str) -> None:
        self.calls[key] += 1

    def _ids(self, i: int, encoder: int) -> torch.Tensor:
        ids = self.token_ids[encoder]
        rows = [(i * self.batch + k) % len(ids) for k in range(self.batch)]
        return ids[rows].to(self.device)

    def _encode_prompt(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sdxl:
            return self.text_encoders[0](self._ids(i, 0), return_dict=False)[0], None
        hidden, pooled = [], None
        for n, encoder in enumerate(self.text_encoders):
            out = encoder(self._ids(i, n), output_hidden_states=True, return_dict=False)
            pooled = out[0]  # the last encoder's pooled (projected) output is the one kept
            hidden.append(out[-1][-2])  # penultimate layer
        return torch.cat(hidden, dim=-1), pooled.view(self.batch, -1)

    def step(self, i: int) -> float:
        import torch.nn.functional as F

        pixels = self.pixels[i % len(self.pixels)]
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample() * self.vae.config.scaling_factor
        latents = latents.to(self.weight_dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (self.batch,), device=self.device
        ).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prompt_embeds, pooled = self._encode_prompt(i)
        extra = {}
        if self.sdxl:  # time ids per image: original size, crop top-left, target size
            ids = [[self.size, self.size, 0, 0, self.size, self.size] for _ in range(self.batch)]
            time_ids = torch.tensor(ids, device=self.device, dtype=self.weight_dtype)
            extra["added_cond_kwargs"] = {"time_ids": time_ids, "text_embeds": pooled}
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed):
            pred = self.unet(noisy, timesteps, prompt_embeds, return_dict=False, **extra)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        value = loss.detach().repeat(self.batch).mean().item()  # the scripts read the loss back every step
        self.train_loss += value
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return value

    def speed(self, warmup: int, steps: int) -> dict:
        """Steady-state seconds per step: `warmup` steps untimed, then `steps` timed (synchronised, wall clock);
        on a GPU also the peak memory allocated over all these steps (the models included)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for i in range(warmup):
            self.step(i)
        sync(self.device)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            self.step(i)
        sync(self.device)
        seconds = (time.perf_counter() - t0) / steps
        out = {"script_step_s": seconds, "script_images_per_s": self.batch / seconds, "script_steps_timed": steps}
        if self.device.type == "cuda":
            out["script_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out


def script_step_speed(model_dir: Path, data: Path, *, batch: int, size: int, device, warmup: int, steps: int) -> dict:
    """Build the example scripts' step on this model, time it, and free it again."""
    free_memory()
    step = ScriptStep(model_dir, data, batch=batch, size=size, device=device)
    try:
        return step.speed(warmup, steps)
    finally:
        del step
        free_memory()


def median_seconds(draw: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median wall-clock seconds of `repeats` calls of `draw` (synchronised around each)."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        draw()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class DiffusersGeneration:
    """diffusers' own pipeline with one adapter file fused at `strength` (module docstring)."""

    def __init__(self, model_dir: Path, adapter: Path, *, strength: float, device, steps: int = 30):
        from diffusers import DiffusionPipeline

        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # as lora-studio's runtime draws
        self.pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.load_lora_weights(str(adapter), adapter_name="bench")
        self.pipe.fuse_lora(lora_scale=strength)
        self.pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay
        self.steps = steps
        self.size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def draw(self, seed: int = 0):
        generator = torch.Generator("cpu").manual_seed(seed)
        return self.pipe(
            PROMPT,
            num_inference_steps=self.steps,
            guidance_scale=7.5,
            height=self.size,
            width=self.size,
            generator=generator,
        ).images

    def seconds(self, warmup: int = 1, repeats: int = 3) -> float:
        for _ in range(warmup):
            self.draw()
        return median_seconds(self.draw, self.device, repeats)

    def compile(self, mode: str = "reduce-overhead") -> float:
        """`torch.compile` the UNet and draw once; returns that first picture's seconds (the compile, mostly)."""
        self.pipe.unet = torch.compile(self.pipe.unet, mode=mode, fullgraph=True)
        return median_seconds(self.draw, self.device, repeats=1)
