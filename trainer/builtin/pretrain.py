"""Pretrain the built-in model from scratch on the procedural scene world (seeded, reproducible).

The shipped weights (adapters/builtin/) were made on a 2-core CPU with these three commands:

    python -m trainer.builtin.builder --out .pretrain/init         # architecture + tokenizer, seeded random weights
    python -m trainer.builtin.pretrain --init .pretrain/init --out .pretrain/vae --device cpu --workers 1 \
        --vae-steps 3000 --vae-batch 32 --vae-crop 32 --unet-steps 0 --eval-count 0
    python -m trainer.builtin.pretrain --init .pretrain/init --out adapters/builtin --device cpu --workers 1 \
        --vae-from .pretrain/vae --unet-steps 5000 --unet-batch 32 --unet-lr 3e-4 --save-every 1000 \
        --stop-after 3000

Two phases. (1) The VAE learns to encode and decode 64x64 pictures. As a generic image codec it sees plain
scenes and also outlined, glowing shapes on random background colours, so it can represent looks that the
diffusion model itself never saw. (2) The UNet and the text encoder learn together, from scratch, to draw plain
scenes (white, gray or beige backgrounds, flat shapes) from their captions: 10% of captions are dropped for
classifier-free guidance, 30% get a nonsense word, the target is v on a zero-terminal-SNR schedule, and the saved
weights are an EMA. The (colour, shape) pairs in scenes.HELD_OUT_PAIRS never appear in phase 2; prompt fidelity
is scored on them. On a GPU, `--device cuda` trains in bf16 and `--unet-steps auto` fits the steps into
`--unet-minutes` after timing a few.

Each run writes its record to `--record` (default: pretrain.json beside the weights): the command, date, machine,
settings and seed, each phase's time and seconds per step, the VAE's PSNR and the prompt-fidelity scores. With
`--vae-from`, the VAE it takes is scored on the batch that phase 1 with the same --vae-* and --workers settings
scored its own on. The run that made the shipped weights kept no record in the repo;
benchmarks/results/builtin_pretrain_cpu.json is a short run of this script against the shipped VAE (its command
inside, the rest in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from adapters.base import load_pipeline
from adapters.formats import write_atomic
from trainer.builtin.builder import save_pipeline
from trainer.builtin.evaluate import prompt_fidelity
from trainer.builtin.scenes import render, sample_scene


class SceneBatches(IterableDataset):
    """Endless batches of rendered scenes (uint8) and, for the UNet phase, token ids; seeded per worker."""

    def __init__(self, kind: str, batch: int, seed: int, tokenizer=None, drop_caption: float = 0.1):
        self.kind, self.batch, self.seed = kind, batch, seed
        self.tokenizer, self.drop_caption = tokenizer, drop_caption

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        torch.set_num_threads(1)
        for n in itertools.count():
            yield self.nth(n, worker)

    def nth(self, n: int, worker: int = 0):
        """The n-th batch of data-loading process `worker` (the loader deals out its workers' batches in turn)."""
        rng = random.Random(f"{self.seed}-{self.kind}-{worker}-{n}")
        scenes = [sample_scene(rng) for _ in range(self.batch)]
        if self.kind == "vae":
            half = self.batch // 2
            bgs = torch.tensor([[rng.uniform(0, 255) for _ in range(3)] for _ in scenes])
            keep = torch.tensor([rng.random() < 0.5 for _ in scenes])[:, None]
            plain = render(scenes[:half], style="plain")
            plain_bg = render(scenes[:half], style="plain", backgrounds=bgs[:half])
            neon = render(scenes[half:], style="neon")
            neon_bg = render(scenes[half:], style="neon", backgrounds=bgs[half:] * 0.3)
            k = keep[:, :, None, None]
            return torch.cat([torch.where(k[:half], plain, plain_bg), torch.where(k[half:], neon, neon_bg)])
        captions = ["" if rng.random() < self.drop_caption else _noisy(s.caption, rng) for s in scenes]
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return render(scenes, style="plain"), ids


def _noisy(caption: str, rng: random.Random, p: float = 0.3) -> str:
    """Sometimes add a nonsense word (a stand-in for trigger words, names, typos) that says nothing about the scene.

    The text encoder is causal and every later token state, padding included, sees an earlier word, so a model
    that never met an unknown word lets one (a LoRA's trigger word, say) garble the whole prompt. Trained like
    this it learns that such words carry no content, as a real CLIP model has.
    """
    if rng.random() >= p:
        return caption
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
    where = rng.random()
    if where < 0.5:
        return f"{word}, {caption}"
    if where < 0.8:
        return f"{caption}, {word}"
    words = caption.split()
    i = rng.randint(1, len(words))
    return " ".join(words[:i] + [word] + words[i:])


def _lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _loader(dataset, workers: int, device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=bool(workers),
    )


def _to_unit(images: torch.Tensor, device) -> torch.Tensor:
    return images.to(device, non_blocking=True).float() / 127.5 - 1.0


def train_vae(vae, args, device, autocast) -> dict:
    """Phase 1: L1 + MSE reconstruction with a small KL term; returns the phase's log."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    loader = iter(_loader(SceneBatches("vae", args.vae_batch, args.seed), args.workers, device))
    gen = torch.Generator(device).manual_seed(args.seed)
    crop_gen = torch.Generator().manual_seed(args.seed)
    start, log = time.time(), []
    for step in range(args.vae_steps):
        if step == 5:  # seconds per step are measured from here, past start-up and warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            warm = time.time()
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.vae_steps, args.vae_lr)
        x = _to_unit(next(loader), device)
        if (
            args.vae_crop
        ):  # the VAE is convolutional: it learns edges and colours from crops at a fraction of the cost
            i, j = (int(v) for v in torch.randint(0, x.shape[-1] - args.vae_crop + 1, (2,), generator=crop_gen))
            x = x[:, :, i : i + args.vae_crop, j : j + args.vae_crop]
        with autocast():
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=gen)).sample
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == args.vae_steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - start
    per_step = (time.time() - warm) / (args.vae_steps - 5) if args.vae_steps > 5 else float("nan")
    vae.eval().requires_grad_(False)
    # Scale latents to unit variance, as Stable Diffusion does with its 0.18215.
    with torch.no_grad():
        sample = _to_unit(next(loader), device)
        std = vae.encode(sample).latent_dist.sample(generator=gen).float().std().item()
    quality = vae_quality(vae, sample)
    vae.register_to_config(scaling_factor=1.0 / std)
    print(f"vae latent std {std:.4f} -> scaling_factor {1.0 / std:.5f}; {quality}", flush=True)
    return {
        "steps": args.vae_steps,
        "log": log,
        "seconds": seconds,
        "seconds_per_step": per_step,
        "scaling_factor": 1.0 / std,
        **quality,
    }


def vae_quality(vae, x: torch.Tensor) -> dict:
    """Mean PSNR in dB of the VAE's reconstructions of a phase-1 batch in [-1, 1]: plain half, outlined half."""
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = ((rec - x) ** 2).mean(dim=(1, 2, 3)) / 4  # in [0, 1] units
        psnr = (10 * torch.log10(1 / mse)).tolist()
    half = len(psnr) // 2
    return {"psnr_plain": sum(psnr[:half]) / half, "psnr_outlined": sum(psnr[half:]) / (len(psnr) - half)}


def phase1_score_batch(args) -> torch.Tensor:
    """The batch phase 1 scores its VAE on: the loader's next after its --vae-steps training batches (uint8)."""
    workers = max(1, args.workers)
    return SceneBatches("vae", args.vae_batch, args.seed).nth(args.vae_steps // workers, args.vae_steps % workers)


def train_unet(pipe, args, device, autocast, total: int, save: bool = True) -> dict:
    """Phase 2: UNet and text encoder from scratch, v-prediction MSE, an EMA of the weights kept on the side."""
    from diffusers import DDPMScheduler

    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    for m in (unet, text_encoder):
        m.train().requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    loader = iter(_loader(SceneBatches("unet", args.unet_batch, args.seed, pipe.tokenizer), args.workers, device))
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    sf = vae.config.scaling_factor
    start, log = time.time(), []
    for step in range(total):
        if step == 5:  # the timing run measures from here, past start-up and warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            warm = time.time()
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, args.unet_lr)
        images, ids = next(loader)
        with torch.no_grad(), autocast():
            latents = vae.encode(_to_unit(images, device)).latent_dist.sample(generator=gen).float() * sf
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen, device=device)
        noisy = sched.add_noise(latents, noise, t)
        with autocast():
            states = text_encoder(ids.to(device, non_blocking=True))[0]
            pred = unet(noisy, t, states).sample
        loss = F.mse_loss(pred.float(), sched.get_velocity(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 100 == 0:
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})
        if step % 500 == 0 or step == total - 1:
            print(f"unet step {step}/{total} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if save and args.save_every and step and step % args.save_every == 0:
            _save_ema(pipe, params, ema, args.out)
        if args.stop_after and step == args.stop_after:  # the same weights as that step's snapshot
            total = step + 1
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    if save:
        _save_ema(pipe, params, ema, args.out)
    per_step = (time.time() - warm) / max(1, total - 5) if total > 5 else float("nan")
    return {"steps": total, "log": log, "seconds": time.time() - start, "seconds_per_step": per_step}


def fit_steps(pipe, args, device, autocast) -> int:
    """How many UNet steps fit in --unet-minutes, timed on a throwaway copy of the model."""
    import copy

    timing = train_unet(copy.deepcopy(pipe), args, device, autocast, total=40, save=False)
    steps = int(args.unet_minutes * 60 / timing["seconds_per_step"])
    print(f"unet: {timing['seconds_per_step'] * 1000:.1f} ms/step -> {steps} steps in {args.unet_minutes} min")
    return steps


def _save_ema(pipe, params, ema, out: Path) -> None:
    """Save the EMA weights as the pipeline (the live weights are put back afterwards)."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    save_pipeline(pipe, out)
    with torch.no_grad():
        for p, v in zip(params, live):
            p.copy_(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, required=True, help="folder made by python -m trainer.builtin.builder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the trained pipeline to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8, help="data-rendering processes")
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="skip phase 1 and use the VAE of this pipeline folder (from an earlier run)",
    )
    parser.add_argument("--vae-batch", type=int, default=128)
    parser.add_argument("--vae-lr", type=float, default=5e-4)
    parser.add_argument("--vae-crop", type=int, default=0, help="train the VAE on random crops of this size")
    parser.add_argument(
        "--unet-steps", default="auto", help="a number (0: phase 1 only), or auto (fit into --unet-minutes)"
    )
    parser.add_argument("--unet-minutes", type=float, default=12.0)
    parser.add_argument("--unet-batch", type=int, default=256)
    parser.add_argument("--unet-lr", type=float, default=3e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=2000, help="save the EMA weights every N UNet steps")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="end the UNet phase at this step (the learning-rate schedule still spans --unet-steps)",
    )
    parser.add_argument("--eval-count", type=int, default=100)
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        help="where to write the run's record (JSON), e.g. benchmarks/results/builtin_pretrain.json "
        "(default: pretrain.json in --out)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext
    started = time.time()
    pipe = load_pipeline(args.init, device=device)
    report = {
        "command": shlex.join(["python", "-m", "trainer.builtin.pretrain", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # the CPU is often shared: a load above its core count means other work slowed this run down
            "load_average_1_5_15_min_at_start": os.getloadavg(),
        },
        "torch": torch.__version__,
    }
    if args.vae_from:  # phase 1 already ran (same seed and settings): take its VAE, scaling factor included
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", torch_dtype=torch.float32).to(device)
        pipe.vae.eval().requires_grad_(False)
        quality = vae_quality(pipe.vae, _to_unit(phase1_score_batch(args), device))
        report["vae"] = {"from": str(args.vae_from), "scaling_factor": pipe.vae.config.scaling_factor, **quality}
        print(f"vae from {args.vae_from}: {quality}", flush=True)
    else:
        report["vae"] = train_vae(pipe.vae, args, device, autocast)
    steps = fit_steps(pipe, args, device, autocast) if args.unet_steps == "auto" else int(args.unet_steps)
    if steps:
        report["unet"] = train_unet(pipe, args, device, autocast, total=steps)
    else:  # phase 1 only: keep the VAE for a later --vae-from
        save_pipeline(pipe, args.out)
    if args.eval_count:
        scoring = time.time()
        fidelity = prompt_fidelity(load_pipeline(args.out, device=device), count=args.eval_count)
        report["prompt_fidelity"] = {**asdict(fidelity), "seconds": time.time() - scoring}
    report["seconds"] = time.time() - started
    report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    print(json.dumps({"prompt_fidelity": report.get("prompt_fidelity"), "seconds": report["seconds"]}), flush=True)
    record = args.record or args.out / "pretrain.json"
    write_atomic(record, (json.dumps(report, indent=1) + "\n").encode())
    print(f"wrote {record}", flush=True)


if __name__ == "__main__":
    main()
