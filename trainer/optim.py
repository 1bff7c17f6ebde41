"""What the LoRA weights are optimised with: the optimiser, the learning-rate schedule and the loss.

Each comes from its library (torch's AdamW, diffusers' `get_scheduler`); this module only connects them to
`TrainConfig`. A schedule is a pure function of the step, so a resumed run gets it back by counting.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from trainer.config import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameters at the configured learning rate (weight decay 0.01, torch's betas)."""
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)


def make_lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, start_step: int = 0):
    """diffusers' learning-rate schedule for the run (constant today), already at `start_step` when resuming."""
    from diffusers.optimization import get_scheduler

    schedule = get_scheduler("constant", optimizer, num_training_steps=config.steps)
    with warnings.catch_warnings():  # counting up to the resumed step, before any optimiser step: as meant
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
        for _ in range(start_step):
            schedule.step()
    return schedule


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and the target, in fp32 whatever the compute dtype."""
    return F.mse_loss(prediction.float(), target.float())
