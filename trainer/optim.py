"""What the LoRA weights are optimised with: the optimiser, the learning-rate schedule and the loss.

Each comes from its library (torch's AdamW, bitsandbytes' 8-bit AdamW, prodigyopt's Prodigy, diffusers'
`get_scheduler` and `compute_snr`); this module only connects them to `TrainConfig`. A schedule is a pure function
of the step, so a resumed run gets it back by counting.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters.errors import UserError
from trainer.config import TrainConfig

# optimiser -> (the package it needs, how to install it)
_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "pip install bitsandbytes"),
    "prodigy": ("prodigyopt", "pip install prodigyopt (or: pip install -e '.[prodigy]')"),
}


def check_optimizer(config: TrainConfig, device: torch.device) -> None:
    """Refuse, before any model loads, an optimiser this machine cannot run: no CUDA GPU for 8-bit AdamW, or its
    package missing; the message says what to install or choose instead."""
    if config.optimizer == "adamw8bit" and torch.device(device).type != "cuda":
        raise UserError(
            f"optimizer (--optimizer) adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit kernels); this run is on "
            f"{torch.device(device).type}: use --optimizer adamw"
        )
    if config.optimizer in _PACKAGES:
        package, install = _PACKAGES[config.optimizer]
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"optimizer (--optimizer) {config.optimizer} needs the {package} package, which is not installed: "
                f"{install}; or use --optimizer adamw"
            )


def make_optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, text_encoder_params: list[torch.nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """The configured optimiser over the LoRA parameters, at the configured learning rate, weight decay, betas and
    epsilon (and d_coef for Prodigy); the text
    encoders' LoRA (`text_encoder_params`, with --train-text-encoder) is a second parameter group at
    --text-encoder-lr. Without it there is one group, as before the option.

    AdamW runs torch's fused kernels where the parameters are on a CUDA GPU (one launch per step instead of a few per
    tensor), its default path elsewhere. Prodigy gets the settings its authors advise for diffusion models: bias
    correction on, and safeguarded warm-up (which also guards the restarts of cosine_with_restarts)."""
    check_optimizer(config, params[0].device)
    lr, decay = config.learning_rate, config.weight_decay
    if text_encoder_params:
        groups = [{"params": params}, {"params": list(text_encoder_params), "lr": config.effective_text_encoder_lr}]
    else:
        groups = params
    knobs = dict(lr=lr, weight_decay=decay, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, **knobs)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **knobs, d_coef=config.prodigy_d_coef, use_bias_correction=True, safeguard_warmup=True)
    fused = True if params[0].is_cuda else None  # None: torch's own choice, as every run before this option
    return torch.optim.AdamW(groups, **knobs, fused=fused)


def make_lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, start_step: int = 0):
    """diffusers' learning-rate schedule for the run (`--lr-scheduler`), already at `start_step` when resuming; it
    scales every parameter group's own rate by the same factor (the text encoders' too).

    Steps count optimiser steps, so warm-up and decay do not depend on --gradient-accumulation-steps."""
    from diffusers.optimization import get_scheduler

    schedule = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.steps,
        num_cycles=config.lr_scheduler_num_cycles,
        power=config.lr_scheduler_power,
    )
    with warnings.catch_warnings():  # counting up to the resumed step, before any optimiser step: as meant
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        for _ in range(start_step):
            schedule.step()
    return schedule


def rate_at(config: TrainConfig, step: int) -> float:
    """The learning rate `config`'s schedule gives at `step` (the first parameter group's: the UNet's LoRA)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    make_lr_schedule(probe, config, step)
    return probe.param_groups[0]["lr"]


@dataclass(frozen=True)
class Loss:
    """How a step's prediction error becomes the number trained on (`--loss`, `--huber-c`, `--min-snr-gamma`).

    The default, `Loss()`, is the plain mean squared error."""

    kind: str = "l2"  # l2 | huber
    huber_c: float = 0.1
    min_snr_gamma: float = 0.0  # 0 = unweighted

    @classmethod
    def of(cls, config: TrainConfig) -> Loss:
        return cls(config.loss, config.huber_c, config.min_snr_gamma)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-image Min-SNR-gamma loss weights (Hang et al. 2023, section 3.4), as the diffusers training scripts
    compute them: min(SNR, gamma) / SNR where the UNet predicts the noise, min(SNR, gamma) / (SNR + 1) where it
    predicts the velocity. SNR comes from diffusers' `compute_snr`."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # epsilon: a zero-terminal-SNR schedule's last step has SNR 0, where the weight's limit is 1 (not 0/0)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, timesteps=None, noise_scheduler=None, loss: Loss = Loss()
) -> torch.Tensor:
    """The batch's loss, in fp32 whatever the compute dtype: by default the mean squared error over everything.

    With `huber`, each element's error e costs 2c(sqrt(e^2 + c^2) - c) (kohya_ss's pseudo-Huber: about e^2 for
    small errors, 2c|e| for large ones; computed as 2c e^2 / (sqrt(e^2 + c^2) + c), the same number without the
    cancellation that loses small errors in fp32). With min-SNR-gamma, each image's mean is weighted by
    `min_snr_weights` of its timestep (which needs `timesteps` and `noise_scheduler`) before the batch mean."""
    prediction, target = prediction.float(), target.float()
    if loss.kind == "l2" and not loss.min_snr_gamma:
        return F.mse_loss(prediction, target)
    if loss.kind == "huber":
        c = loss.huber_c
        squared = (prediction - target) ** 2
        error = 2 * c * squared / (torch.sqrt(squared + c**2) + c)
    else:
        error = F.mse_loss(prediction, target, reduction="none")
    per_image = error.mean(dim=tuple(range(1, error.dim())))
    if loss.min_snr_gamma:
        per_image = per_image * min_snr_weights(noise_scheduler, timesteps, loss.min_snr_gamma)
    return per_image.mean()
