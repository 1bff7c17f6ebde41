"""Issue 18's summary line from the stored benchmark results: the newest result of each kind, one line.

    python benchmarks/summary.py                         # from benchmarks/results/
    python benchmarks/summary.py --results $OUT          # from a GPU session's output folder
    python benchmarks/summary.py --write                 # also rewrite the Summary block at the end of RESULTS.md

The line (`na` for a measure no stored result holds):

    summary: sd15_bs8_mfu=... speedup_bs8=... speedup_bs1=... two_gpu_efficiency=... gen_512_30_s=...
    gen_vs_compiled_diffusers=... scale_change_ms=... cold_load_s=... unfused_overhead=... fused_overhead=...
    sdxl_bs4_mfu=... sdxl_bs1_peak_gib=... sdxl_bs1_img_s=... gen_sdxl_1024_30_s=...

Where each field comes from (results of the --tiny shapes or from the CPU are used only with --allow-tiny /
--allow-cpu; one made through other code wrapped around the benchmark, which says so in its `how`, or marked
`not_default`, never):

- sd15_bs8_mfu, speedup_bs8 / speedup_bs1: the newest `benchmarks/sd15.py` training run at batch 8 / 1 with the
  default step (not --no-cuda-graphs nor --channels-last on), for the MFU the newest with the step compiled
  (--torch-compile on, what `auto` picks for a long run) where one was timed: MFU as below; speedup = its images/s
  over those of the diffusers example script's step timed in the same process (`speedup_vs_script`,
  benchmarks/reference.py).
- two_gpu_efficiency: the newest `benchmarks/scaling.py --processes 2 --json` result on GPUs.
- gen_512_30_s: 30 steps with guidance, one adapter, as the Generate tab draws a picture on a CUDA GPU (`ui
  --compile auto` compiles the UNet in the background there): the newest sd15.py run that timed the compiled studio
  (`generate_background_compiled_30_steps_s`, else `generate_compiled_30_steps_s`); only if none did, the newest
  uncompiled figure (`generate_30_steps_s`, what `generate` on the command line draws).
- scale_change_ms, cold_load_s: the newest sd15.py run that measured each: a strength change
  (`strength_change_ms`); an adapter file loaded into the running model (`adapter_cold_load_s`), from a run that
  did not train in the same process first (the app trains in a process of its own; right after training in the
  same process a load took 0.36-0.38 s on an H100 against 0.07-0.09 s, not explained yet:
  `h100_sd15_studio_compile_cold.json`, `h100_sd15_studio_compile_warm.json`). unfused_overhead, fused_overhead:
  the newest sd15.py run that timed the model with no adapter ever loaded: one adapter unfused, and fused, over
  that, minus 1.
- gen_vs_compiled_diffusers: the newest sd15.py run that timed diffusers' pipeline with the LoRA fused and the UNet
  compiled: its 30-step time over ours from the same run, ours as in gen_512_30_s (above 1: we are faster).
- sdxl_bs4_mfu: the newest `benchmarks/sdxl.py` run at batch 4 with the default step and without gradient
  checkpointing, compiled where one was timed (as sd15_bs8_mfu). sdxl_bs1_peak_gib, sdxl_bs1_img_s: the newest
  sdxl.py run at batch 1 made for a small card (with `--gpu-memory` or gradient checkpointing):
  `torch.cuda.max_memory_allocated` over the whole run, the highest of its phases' peaks (the reserved peak is in
  its file) and images/s. gen_sdxl_1024_30_s: as gen_512_30_s, from sdxl.py runs.

MFU = images/s x FLOPs per image / the device's dense bf16 peak (the vendor's datasheet figure, `PEAK_BF16`).
FLOPs per image are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one forward and backward
of the architecture's UNet with rank-8 LoRA on attn1 + attn2 (the trainer's default), at the run's resolution and
batch 1, on the meta device (shapes only: seconds, no memory). On the meta device attention runs in its math form
(two matrix products forward, four backward), so this is the model's FLOP count: neither the flash-attention
backward's recomputation of the scores, which the same counter adds on a GPU, nor gradient checkpointing's second
forward is counted. SD 1.5 at 512: 1.718 TFLOP per image this way, against 1.781 counted on an H100 by sd15.py's
`step_tflop` (which includes the recomputation).

"Newest" is the time a result records (`time`, else its `date`), then, for files that record only a day, the time
git committed them, then their name.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIELDS = (
    "sd15_bs8_mfu",
    "speedup_bs8",
    "speedup_bs1",
    "two_gpu_efficiency",
    "gen_512_30_s",
    "gen_vs_compiled_diffusers",
    "scale_change_ms",
    "cold_load_s",
    "unfused_overhead",
    "fused_overhead",
    "sdxl_bs4_mfu",
    "sdxl_bs1_peak_gib",
    "sdxl_bs1_img_s",
    "gen_sdxl_1024_30_s",
)

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from NVIDIA's datasheets; the first name contained in
# torch.cuda.get_device_name() wins, so the longer names come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4e12),  # SXM ("NVIDIA H200")
    ("A100", 312e12),
    ("L40S", 362.05e12),
)


def peak_bf16(device: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None for a device not in `PEAK_BF16` (then MFU is na)."""
    return next((peak for name, peak in PEAK_BF16 if name in device), None)


def unet_config(arch: str, tiny: bool) -> dict:
    if arch == "sd15":
        from benchmarks.sd15 import sd15_unet_config

        return sd15_unet_config(tiny)
    from benchmarks.sdxl import sdxl_unet_config

    return sdxl_unet_config(tiny)


def with_default_lora(unet):
    """`unet` frozen, with the trainer's default LoRA (rank 8, alpha 8, attn1 + attn2) in fp32 attached."""
    from adapters.lora import attach, attention_targets, train_in_fp32

    unet.requires_grad_(False)
    attach(unet, attention_targets(unet, "both"), 8, 8)
    train_in_fp32(unet)
    return unet


def count_train_flops(unet, resolution: int, batch: int = 1) -> int:
    """FLOPs of one training step's UNet forward and backward (every gradient the UNet's trainable parameters need),
    counted by torch's FlopCounterMode on whatever device `unet` is on."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = unet.device, unet.dtype
    side = resolution // 8
    sample = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timesteps = torch.full((batch,), 500, device=device)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.full((batch, 6), float(resolution), device=device, dtype=dtype),
        }
    counter = FlopCounterMode(display=False)
    with counter:
        unet(sample, timesteps, text, **extra).sample.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


@functools.cache
def flops_per_image(arch: str, resolution: int, tiny: bool = False) -> int:
    """Training FLOPs per image of `arch` ("sd15" or "sdxl") at `resolution` (module docstring: how counted)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = unet_config(arch, tiny)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(torch.bfloat16)
    return count_train_flops(with_default_lora(unet), resolution)


# -- reading the results ---------------------------------------------------------------------------------------------
def script_of(result: dict) -> str:
    """Which benchmark made a result: its `script`, else read from its command."""
    if "script" in result:
        return result["script"]
    match = re.search(r"benchmarks/(\w+)\.py", result.get("command", ""))
    return match.group(1) if match else ""


def _committed(path: Path) -> int:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%ct", "--", path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return int(out) if out else 0
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def recorded(path: Path, result: dict) -> tuple:
    """Sort key: newest last (module docstring)."""
    when = str(result.get("time") or result.get("date") or "")
    return (when[:10], when[10:] or "", _committed(path), path.name)


def load_results(folder: Path, allow_tiny: bool = False, allow_cpu: bool = False) -> list[tuple[Path, dict]]:
    """Every JSON result in `folder`, oldest first; tiny or CPU ones only when allowed; unreadable files named."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"summary: skipping {path}: not readable JSON ({exc})", file=sys.stderr)
            continue
        if not isinstance(result, dict):
            continue
        if result.get("tiny") and not allow_tiny:
            continue
        device = str(result.get("device", ""))
        if not allow_cpu and (not device or device.lower().startswith("cpu")):
            continue
        if result.get("how") or result.get("not_default"):  # made through changed code (a lever tried and dropped)
            continue
        found.append((path, result))
    return sorted(found, key=lambda item: recorded(*item))


def newest(results, want) -> tuple[Path, dict] | None:
    picked = [item for item in results if want(item[1])]
    return picked[-1] if picked else None


def trained(results, want) -> tuple[Path, dict] | None:
    """The newest training run `want` takes that compiled its step (--torch-compile on, what `auto` picks for a long
    run), else the newest one it takes."""
    return newest(results, lambda r: want(r) and r.get("torch_compile") is True) or newest(results, want)


def _training(result: dict) -> bool:
    return "train_images_per_s" in result


def _default_step(result: dict) -> bool:
    """Trained with the step lora-studio picks by default (a CUDA graph on one GPU), not with --no-cuda-graphs, and
    channels-last only where `auto` picks it (a compiled step, since 2026-12-07; a compiled step in the plain
    layout, what `auto` picked before, still counts)."""
    command = result.get("command", "")
    # the layout the step took where the file records it, else the setting as the script read it (any spelling of
    # the flag), else (files from before either was recorded) the command
    if "channels_last_used" in result:
        channels_last = "on" if result["channels_last_used"] else "off"
    else:
        channels_last = result.get("channels_last") or ("on" if "--channels-last on" in command else "auto")
    return "--no-cuda-graphs" not in command and (channels_last != "on" or result.get("torch_compile") is True)


def mfu(result: dict, arch: str, peak_override: float | None = None) -> float | None:
    peak = peak_override or peak_bf16(str(result.get("device", "")))
    if peak is None:
        return None
    flops = flops_per_image(arch, int(result["resolution"]), bool(result.get("tiny")))
    return result["train_images_per_s"] * flops / peak


def page_picture_s(result: dict) -> float | None:
    """A run's seconds per picture the way the Generate tab draws them on a CUDA GPU after its compile (the
    background compile's figure, else the foreground compile's: the same compiled UNet), or None if not timed."""
    for key in ("generate_background_compiled_30_steps_s", "generate_compiled_30_steps_s"):
        if result.get(key):
            return result[key]
    return None


def summarize(results: list[tuple[Path, dict]], peak_override: float | None = None) -> tuple[dict, dict]:
    """({field: value or None}, {field: the file it came from})."""
    values: dict = dict.fromkeys(FIELDS)
    sources: dict = {}

    def take(field, item, value):
        if item is not None and value is not None and not (isinstance(value, float) and math.isnan(value)):
            values[field] = value
            sources[field] = item[0]

    def sd15_train(batch):
        return lambda r: script_of(r) == "sd15" and _training(r) and r.get("batch") == batch and _default_step(r)

    item = trained(results, sd15_train(8))
    if item:
        take("sd15_bs8_mfu", item, mfu(item[1], "sd15", peak_override))
    for batch in (8, 1):
        item = newest(results, lambda r, b=batch: sd15_train(b)(r) and "speedup_vs_script" in r)
        take(f"speedup_bs{batch}", item, item and item[1]["speedup_vs_script"])

    item = newest(results, lambda r: script_of(r) == "scaling" and r.get("processes") == 2 and "efficiency" in r)
    take("two_gpu_efficiency", item, item and item[1]["efficiency"])

    def picture(script):
        """The newest run of `script` that timed the Generate tab's compiled picture, else its newest plain one."""
        item = newest(results, lambda r: script_of(r) == script and page_picture_s(r) is not None)
        return item or newest(results, lambda r: script_of(r) == script and "generate_30_steps_s" in r)

    def picture_s(result: dict) -> float:
        return page_picture_s(result) or result["generate_30_steps_s"]

    item = picture("sd15")
    take("gen_512_30_s", item, item and picture_s(item[1]))
    for field, key in (
        ("scale_change_ms", "strength_change_ms"),
        ("cold_load_s", "adapter_cold_load_s"),
    ):
        # a load is timed as the app does it: in a process that did not train first (see the docstring)
        item = newest(
            results,
            lambda r, k=key: script_of(r) == "sd15" and k in r and not (k == "adapter_cold_load_s" and _training(r)),
        )
        take(field, item, item and item[1][key])
    item = newest(results, lambda r: script_of(r) == "sd15" and "generate_base_30_steps_s" in r)
    if item:
        r = item[1]
        # the base timed first and, since 2026-12-07, again last: their mean (a file without the second, the first)
        base = (
            r["generate_base_30_steps_s"] + r.get("generate_base_again_30_steps_s", r["generate_base_30_steps_s"])
        ) / 2
        take("unfused_overhead", item, r["generate_30_steps_s"] / base - 1)
        if "generate_fused_30_steps_s" in r:
            take("fused_overhead", item, r["generate_fused_30_steps_s"] / base - 1)
    item = newest(results, lambda r: script_of(r) == "sd15" and "diffusers_compiled_30_steps_s" in r)
    take(
        "gen_vs_compiled_diffusers",
        item,
        item and item[1]["diffusers_compiled_30_steps_s"] / picture_s(item[1]),
    )

    def sdxl_train(r):
        return script_of(r) == "sdxl" and _training(r) and _default_step(r)

    item = trained(results, lambda r: sdxl_train(r) and r.get("batch") == 4 and not r.get("gradient_checkpointing"))
    if item:
        take("sdxl_bs4_mfu", item, mfu(item[1], "sdxl", peak_override))
    item = newest(
        results,
        lambda r: sdxl_train(r) and r.get("batch") == 1 and (r.get("gradient_checkpointing") or r.get("gpu_memory")),
    )
    if item:
        take("sdxl_bs1_peak_gib", item, item[1].get("train_peak_memory_gib"))
        take("sdxl_bs1_img_s", item, item[1]["train_images_per_s"])
    item = picture("sdxl")
    take("gen_sdxl_1024_30_s", item, item and picture_s(item[1]))
    return values, sources


def fmt(value) -> str:
    if value is None:
        return "na"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"


def summary_line(values: dict) -> str:
    return "summary: " + " ".join(f"{field}={fmt(values[field])}" for field in FIELDS)


def summary_block(values: dict, sources: dict, results: dict, line: str, peak_override: float | None = None) -> str:
    """The Summary section RESULTS.md ends with: where each figure came from, then the line itself, last."""
    rows = []
    for field in FIELDS:
        path = sources.get(field)
        if path is None:
            rows.append(f"| {field} | na | – | – | – |")
            continue
        r = results[path]
        rows.append(
            f"| {field} | {fmt(values[field])} | `{path.name}` | {r.get('device', '?')} | {r.get('date', '?')} |"
        )
    counted = []
    for field, arch in (("sd15_bs8_mfu", "sd15"), ("sdxl_bs4_mfu", "sdxl")):
        if field in sources:
            r = results[sources[field]]
            res, tiny = int(r["resolution"]), bool(r.get("tiny"))
            name = f"{arch}{' (tiny)' if tiny else ''} at {res}"
            peak = peak_override or peak_bf16(str(r.get("device", "")))
            counted.append(
                f"{name}: {flops_per_image(arch, res, tiny) / 1e12:.4g} TFLOP per image, over "
                f"{peak / 1e12:.1f} TFLOP/s for the {r.get('device')}"
            )
    flops = counted or ["no MFU figure"]
    return "\n".join(
        [
            SUMMARY_HEADING,
            "",
            "The newest stored result of each kind, a compiled one first where there is one "
            "(`benchmarks/summary.py` says which kind each field takes). MFU: "
            "training FLOPs per image counted by torch's FlopCounterMode on the meta device (UNet forward and "
            "backward with rank-8 LoRA) times images/s, over the device's dense bf16 peak from its datasheet: "
            f"{'; '.join(flops)}.",
            "",
            "| field | value | file | device | date |",
            "|---|---|---|---|---|",
            *rows,
            "",
            line,
            "",
        ]
    )


SUMMARY_HEADING = "## Summary (`benchmarks/summary.py --write`)"


def write_results_md(path: Path, block: str) -> None:
    """End RESULTS.md with `block`: the old Summary section (its heading up to the next `## ` heading) is taken
    out, every other section stays as it is, in its place, and the new block goes last."""
    lines = path.read_text().splitlines()
    if SUMMARY_HEADING in lines:
        start = lines.index(SUMMARY_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
    head = "\n".join(lines).rstrip("\n")
    path.write_text(head + "\n\n" + block)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results", help="folder of JSON results"
    )
    parser.add_argument("--write", action="store_true", help="rewrite the Summary block at the end of --results-md")
    parser.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--allow-tiny", action="store_true", help="use --tiny results too (a check of the code path)")
    parser.add_argument("--allow-cpu", action="store_true", help="use results from the CPU too")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--sources", action="store_true", help="print which file each field came from first")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder")
    results = load_results(args.results, args.allow_tiny, args.allow_cpu)
    values, sources = summarize(results, args.peak_tflops and args.peak_tflops * 1e12)
    line = summary_line(values)
    if args.sources:
        for field in FIELDS:
            print(f"{field}: {sources[field] if field in sources else 'na'}")
    if args.write:
        peak = args.peak_tflops and args.peak_tflops * 1e12
        write_results_md(args.results_md, summary_block(values, sources, dict(results), line, peak))
    print(line)


if __name__ == "__main__":
    main()
