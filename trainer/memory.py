"""What a run really used: the GPU's peak memory per phase of the run, and the process's peak system memory.

A run has three phases that need memory differently: `cache` (the base model on the device, the captions and
pictures encoded once), `train` (the UNet forward and backward with the LoRA, its gradients and optimiser state)
and `preview` (a picture drawn with the adapter, the VAE decoding it). `PhasePeaks.end(phase)` closes the phase
that just ran: it reads `torch.cuda.max_memory_allocated` / `max_memory_reserved` and starts the counters again,
so each phase's peak is its own. The plan (trainer/plan.py) estimates the same three numbers before a run; a run's
`done` event carries what was measured, so the two can be compared.
"""

from __future__ import annotations

import resource
import sys

import torch

GIB = 2**30


def system_peak_gib() -> float:
    """The most resident memory this process has held so far (Linux and macOS report it in different units)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB


class PhasePeaks:
    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        self.allocated: dict[str, float] = {}
        self.reserved: dict[str, float] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self, phase: str) -> None:
        """Close `phase`: keep its peak (the highest of its stretches so far), start counting afresh."""
        if not self.cuda:
            return
        allocated = torch.cuda.max_memory_allocated(self.device) / GIB
        reserved = torch.cuda.max_memory_reserved(self.device) / GIB
        self.allocated[phase] = max(self.allocated.get(phase, 0.0), allocated)
        self.reserved[phase] = max(self.reserved.get(phase, 0.0), reserved)
        torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self) -> dict:
        """{"gpu_allocated_gib": {phase: GiB}, "gpu_reserved_gib": {...}, "system_gib": GiB}; on a CPU only the
        system memory."""
        out = {"system_gib": round(system_peak_gib(), 3)}
        if self.cuda:
            out["gpu_allocated_gib"] = {k: round(v, 3) for k, v in self.allocated.items()}
            out["gpu_reserved_gib"] = {k: round(v, 3) for k, v in self.reserved.items()}
        return out
