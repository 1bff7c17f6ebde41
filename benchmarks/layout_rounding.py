"""How far the convolutions' memory layout alone moves a UNet's output and LoRA gradients (issue 18, --channels-last).

    python benchmarks/layout_rounding.py            # the tiny SD 1.5-shaped UNet of sd15.py --tiny, on the CPU
    python benchmarks/layout_rounding.py --full     # SD 1.5's shapes (slow on a CPU)

One forward and backward of the UNet with rank-8 LoRA on attn1 + attn2 (random non-zero LoRA weights) on one
random batch, in the default layout and again with the UNet and latents channels-last, in fp32 without autocast:
the relative L2 distance of each top-level block's output, of the UNet's output, and of the LoRA gradients (all,
and the three parameters that moved most, with their gradients' size). Both passes run the same weights and inputs,
so every distance is the two layouts' rounding; a third pass in the default layout shows the run-to-run part.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sd15 import build_sd15, with_lora  # noqa: E402
from trainer.step import relative_distance as distance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="SD 1.5's shapes instead of the tiny ones")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe, size = build_sd15(tiny=not args.full)
    unet, params = with_lora(pipe.unet, torch.device("cpu"), torch.float32)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(args.batch, 4, size // 8, size // 8, generator=gen)
    emb = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=gen)

    blocks: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            blocks.setdefault(name, []).append(output.detach().contiguous())

        return hook

    for name, child in unet.named_children():
        children = enumerate(child) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
        for i, module in children:
            module.register_forward_hook(keep(name if i is None else f"{name}.{i}"))

    def one_pass(layout) -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet.to(memory_format=layout)
        for p in params:
            p.grad = None
        out = unet(latents.contiguous(memory_format=layout), timesteps, emb).sample
        out.pow(2).mean().backward()
        return out.detach().contiguous(), [p.grad.clone() for p in params]

    plain_out, plain_grads = one_pass(torch.contiguous_format)
    nhwc_out, nhwc_grads = one_pass(torch.channels_last)
    again_out, again_grads = one_pass(torch.contiguous_format)
    print(f"$ python {' '.join(sys.argv)}  (torch {torch.__version__}, {size} px, batch {args.batch}, fp32, CPU)")
    print("block output, channels-last vs default layout:")
    for name, (plain, nhwc, _) in blocks.items():
        print(f"  {name:16s} {distance([nhwc], [plain]):.2e}")
    print(
        f"UNet output: {distance([nhwc_out], [plain_out]):.2e} "
        f"(default vs default: {distance([again_out], [plain_out]):.2e})"
    )
    print(
        f"LoRA gradients: {distance(nhwc_grads, plain_grads):.2e} "
        f"(default vs default: {distance(again_grads, plain_grads):.2e})"
    )
    moved = sorted(
        ((distance([a], [b]), float(b.norm()), n) for a, b, n in zip(nhwc_grads, plain_grads, names)), reverse=True
    )
    print("most moved LoRA gradients (distance, gradient norm, parameter):")
    for d, norm, name in moved[:3]:
        print(f"  {d:.2e}  {norm:.1e}  {name}")


if __name__ == "__main__":
    main()
