"""Does capturing the UNet's forward and backward as CUDA graphs cure the launch-bound LoRA step? (CUDA only)

    python benchmarks/graph_probe.py

SD 1.5 architecture, random weights, 512x512, LoRA rank 8 on attn1 + attn2, bf16 autocast. Times eager steps and
steps through `torch.cuda.make_graphed_callables` at batch 1, 4 and 8, and records the largest difference between
the LoRA gradients of one graphed and one eager step (printed, not asserted). The stand-alone probe that came
before the trainer's own CUDA-graph step (`--cuda-graphs`, on by default on one GPU); its output on an H100 is
`benchmarks/results/graph_probe_h100.txt`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sd15 import build_sd15, with_lora  # noqa: E402


class Predict(torch.nn.Module):
    """The UNet as tensors in, tensor out, under bf16 autocast (what make_graphed_callables needs)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timesteps, embeds):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self.unet(latents, timesteps, embeds, return_dict=False)[0]


def main() -> None:
    device = torch.device("cuda")
    pipe, size = build_sd15(tiny=False)
    unet, params = with_lora(pipe.unet, device)
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    opt = torch.optim.AdamW(params, lr=1e-4)
    for batch in (1, 4, 8):
        gen = torch.Generator(device).manual_seed(0)
        lat = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=torch.bfloat16, generator=gen)
        emb = torch.randn(batch, 77, 768, device=device, dtype=torch.bfloat16, generator=gen)
        t = torch.randint(0, 1000, (batch,), device=device, generator=gen)

        inputs = (lat, t, emb)

        def grads(model, inputs=inputs):
            for p in params:
                p.grad = None
            model(*inputs).float().pow(2).mean().backward()
            return [p.grad.clone() for p in params]

        def time_steps(model, inputs=inputs) -> float:
            def step():
                model(*inputs).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=False)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / 20

        saved = [p.detach().clone() for p in params]
        eager = Predict(unet)  # make_graphed_callables patches the module it is given: graph a second wrapper
        reference = grads(eager)
        results[f"eager_step_s_b{batch}"] = time_steps(eager)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graphed = torch.cuda.make_graphed_callables(
            Predict(unet), (lat.clone(), t.clone(), emb.clone()), num_warmup_iters=3
        )
        torch.cuda.synchronize()
        results[f"capture_s_b{batch}"] = time.perf_counter() - t0
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        got = grads(graphed)
        results[f"max_grad_diff_b{batch}"] = max((a - b).abs().max().item() for a, b in zip(reference, got))
        results[f"max_grad_b{batch}"] = max(a.abs().max().item() for a in reference)
        results[f"graphed_step_s_b{batch}"] = time_steps(graphed)
        print(json.dumps(results), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
