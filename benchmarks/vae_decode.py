"""What the VAE decode of one SDXL picture costs in each precision (random weights of SDXL's VAE, from the config
the repo ships: adapters/configs/sdxl/vae/config.json).

    python3 benchmarks/vae_decode.py --json out.json            # on a CUDA GPU: 1024x1024
    python3 benchmarks/vae_decode.py --tiny --device cpu         # the code path, a 32x32 picture, timed once

SDXL's VAE says `force_upcast` (it overflows in fp16), so diffusers' SDXL pipeline, holding the VAE in fp16,
converts it to fp32 for every picture, decodes in fp32 and converts it back. Timed here, median of five after a
warm-up (once with --tiny; a CPU without bf16 arithmetic is very slow at the bf16 and fp16 ones): that path
("fp16_upcast": the conversions included), the VAE held in fp32, in bf16 (fp32's range, no overflow) and in fp16
(for reference: random weights do not overflow); each channels-last as the runtime holds it on CUDA, each from
the same weights rounded to fp16 (as a model loaded in fp16 holds them). Also: the largest and mean difference of
each picture from the fp32 one, in 8-bit levels: random weights and a random latent, so these say how far the
arithmetic drifts, not how a trained VAE's pictures look (the timings hold for any weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = Path(__file__).resolve().parent.parent / "adapters" / "configs" / "sdxl" / "vae" / "config.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 32x32 picture timed once, to check the code path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    device = torch.device(args.device)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(json.loads(CONFIG.read_text())).to(device).eval()
    if device.type == "cuda":
        vae.to(memory_format=torch.channels_last)
    vae.to(torch.float16)
    weights = {k: v.clone() for k, v in vae.state_dict().items()}  # each variant starts from these
    side, repeat = (32, 1) if args.tiny else (1024, 5)
    # fp16 as the UNet hands it over in an fp16 pipeline: every variant decodes the same numbers
    latent = torch.randn(1, 4, side // 8, side // 8, device=device, generator=torch.Generator(device).manual_seed(0))
    latent = latent.half()
    results = {
        "script": "vae_decode",
        "command": "python3 " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": side,
        # cuDNN may run fp32 convolutions in TF32 (torch's default, as in a real pipeline): the fp32 rows say so
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def save():
        print(json.dumps(results, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    def decode_as(dtype, upcast=False):
        if upcast:  # diffusers' SDXL pipeline: fp16 VAE to fp32, decode, back to fp16
            vae.to(torch.float32)
            image = vae.decode(latent.to(torch.float32)).sample
            vae.to(torch.float16)
            return image
        return vae.decode(latent.to(dtype)).sample

    pictures = {}
    with torch.no_grad():
        for name, dtype, upcast in (
            ("fp32", torch.float32, False),
            ("bf16", torch.bfloat16, False),
            ("fp16", torch.float16, False),
            ("fp16_upcast", torch.float16, True),
        ):
            vae.to(dtype)
            vae.load_state_dict(weights)  # copied into this dtype: the fp16 weights, not those of the last variant
            decode_as(dtype, upcast)
            times = []
            for _ in range(repeat):
                sync()
                t0 = time.perf_counter()
                image = decode_as(dtype, upcast)
                sync()
                times.append(time.perf_counter() - t0)
            results[f"decode_{name}_ms"] = 1000 * statistics.median(times)
            pictures[name] = ((image.float().clamp(-1, 1) + 1) * 127.5).round()
            if name != "fp32":
                gap = (pictures[name] - pictures["fp32"]).abs()
                results[f"{name}_vs_fp32_max_levels"] = float(gap.max())
                results[f"{name}_vs_fp32_mean_levels"] = float(gap.mean())
            save()


if __name__ == "__main__":
    main()
