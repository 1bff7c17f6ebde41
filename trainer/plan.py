"""The plan: before a run starts, what it will need on this machine (peak GPU memory per phase, system memory, disk,
time), what the trainer turns on so that it fits, and, when nothing makes it fit, a refusal naming settings that do.

Memory is a small model of the step, in GiB, per phase of a run (the phases trainer/memory.py measures):
- `cache`: the frozen UNet and VAE on the device (the text encoders have left it; the UNet comes over last).
- `train`: those weights, the LoRA's fp32 weights, gradients and AdamW moments (16 bytes a parameter), a fixed
  allowance, and per picture of the batch the activations the backward pass keeps. Those are proportional to an
  activation count of the model itself, taken from its configs alone: the UNet runs once on the meta device (no
  weights, no arithmetic) and every leaf module's output elements are counted (`act`), or, with gradient
  checkpointing, the inputs of the blocks diffusers recomputes (`kept`). Two constants turn counts into bytes,
  one per checkpointing setting, fitted to runs of both SD 1.5 and SDXL; so the model carries to any UNet a diffusers
  config describes (SD 2.x, the built-in model) without a calibration of its own.
- `preview`: the weights, the LoRA, and the VAE decoding the picture, proportional to the decoder's largest
  activation at the preview size; with tiled decoding (what the plan turns on when the whole picture would not fit)
  that of one 512-pixel tile. The judge draws its pictures as previews are drawn (one at a time on a GPU, with the
  same pipeline), so a judged run has this phase too, previews or not.
The constants come from `benchmarks/plan_calibration.py` runs on an H200 (`benchmarks/results/plan_*_h200*.json`);
tests/test_plan.py checks the plan against every run stored there (within 15%).

Time: steady seconds per step measured per family and step kind (CUDA graph, eager; with and without checkpointing)
on the same H200, scaled by the ratio of its bf16 matrix-multiply rate to this GPU's (a 0.1 s probe); on the CPU, the
built-in model's measured steps scaled by activation count and by this CPU's `cpu_probe_seconds` against the measuring
machine's (a 0.15 s probe). Start-up (loading and caching) grows with the weights'
size. Previews and checkpoint writes are not timed; the plan says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from adapters.base import check_base_model
from adapters.errors import UserError
from adapters.families import BUILTIN_DIR
from adapters.single_file import inspect_checkpoint, is_single_file

GIB = 2**30

# Bytes per activation element kept for the backward pass, fitted to the stored H200 runs (bf16 weights).
BYTES_PER_ACTIVATION = 2.60  # no checkpointing: per element of every leaf module's output (`act`)
BYTES_PER_KEPT = 7.8  # checkpointing: per element of the recomputed blocks' inputs (`kept`)
BYTES_PER_DECODED = 13.0  # previews: per element of the VAE decoder's largest activation (bf16)
RUNTIME_GIB = 0.17  # CUDA's own workspaces, the latent cache, the noise and timesteps of a step: fitted
LORA_STATE_BYTES = 16  # fp32 weight + gradient + AdamW's two moments, per LoRA parameter
CONTEXT_GIB = 0.5  # the CUDA context, which torch's allocator does not count but the card holds
TILE = 512  # tiled VAE decoding's tile, in pixels
# system memory: the process's own libraries, plus the loaded weights (read in fp16, then converted)
SYSTEM_BASE_GIB = {"cuda": 1.42, "cpu": 0.45}
SYSTEM_PER_WEIGHT_GIB = 1.55
# steady seconds per step on the calibration GPU (`CALIBRATION_TFLOPS` of bf16 matmul): a + b * batch * size^1.5,
# size the activation count over that of the family's model at its own size, per (family, checkpointing); the
# shipped configs (adapters/configs/) are the reference models. Eager steps are launch-bound: at least `eager`.
CALIBRATION_TFLOPS = 805.8
STEP_SECONDS = {
    ("sd1", False): {"a": 0.022, "b": 0.0085, "eager": 0.165},
    ("sd1", True): {"a": 0.030, "b": 0.011, "eager": 0.33},
    ("sdxl", False): {"a": 0.060, "b": 0.048, "eager": 0.52},
    ("sdxl", True): {"a": 0.080, "b": 0.064, "eager": 1.10},
}
# --torch-compile (regional, inside the CUDA graph), per model family: (seconds of compiling before the first step,
# share of a graphed step's time it saves), measured on H100 machines of 16 CPU cores.
# SD 1.x: benchmarks/results/train_compile_h100.json and the trainer's whole first step in
# h100_sd15_b8_torch_compile_room.json (97.5 s, an empty compile cache); 16% at batch 1 in the probe, 21-26% at
# batch 8: the smallest. SDXL: the trainer at batch 4 (the only SDXL batch measured; taken for every batch),
# 1024 px, compiled and not, the same machine and session, its compile cache holding only SD 1.5's shapes
# (h100_sdxl_b4_compile.json: first step 73.6 s, 0.196 s a step; h100_sdxl_b4.json: 2.6 s, 0.268 s; 71 s is the
# difference of the first steps). auto compiles no other family; `on` estimates one with SD 1.x's figures.
COMPILE = {"sd1": (97.0, 0.16), "sdxl": (71.0, 0.27)}
# each further picture shape (aspect-ratio bucket) compiles again: measured 33-45 s on SD 1.5 (a second batch
# size, lent H100s, 2026-12-05/06); SDXL's is SD 1.5's scaled by their first compiles (not measured)
COMPILE_PER_SHAPE = {"sd1": 45.0, "sdxl": 45.0 * 71.0 / 97.0}
# --channels-last auto: on where the step compiles and the family was measured so, with the share of the compiled
# step's time it saves. SD 1.x: lent H100, 2026-12-07, batch 8, one call, 0.0704 s a step channels-last
# (h100_sd15_b8_cl_cmp.json) against 0.0749 s in the plain layout (h100_sd15_b8_compiled_reference.json); its
# adapter 0.00021 from eager's where two eager ones were 0.00013 apart. Uncompiled it was slower (0.0973 against
# 0.0929 s, 2026-11-24), so auto leaves it off there, and on families not measured compiled with it.
CHANNELS_LAST = {"sd1": 0.06}
GRAPHED_SHAPES = 4  # trainer/step.py's Step.max_shapes: the shapes that get a graph (and a compile) each
COMPILE_PAYBACK = 2.0  # auto compiles when the steps' saving is at least this many times the compile
NO_STEPS = "the steps of --epochs are counted from the images"
CONFIGS = Path(__file__).resolve().parent.parent / "adapters" / "configs"
# the built-in model on the 2-core CPU machine (benchmarks/results/plan_builtin_cpu.json): a + b * batch at 64 px,
# with that machine's `cpu_probe_seconds` the day it was measured; another CPU's step is scaled by its own probe
CPU_STEP = {"a": 0.057, "b": 0.0274, "probe_s": 0.0222}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the plan needs to know of a base model, from its configs alone."""

    family: str  # "sd1", "sd2", "sdxl", "builtin" or "other"
    native: int  # pixels
    unet_params: int
    vae_params: int
    text_params: int
    act: int  # leaf output elements of one UNet forward at the native size, batch 1
    kept: int  # input elements of the blocks gradient checkpointing recomputes, same forward
    decoded: int  # the VAE decoder's largest activation at the native size (elements)
    decoded_tile: int  # the same for one TILE-pixel tile
    leaves: int  # leaf modules of the UNet (an eager step launches kernels for each)


def _source(base_model: str | None, prediction_type: str | None) -> str:
    source, _ = check_base_model(base_model, prediction_type)
    if is_single_file(source):
        source = str(inspect_checkpoint(source, prediction_type).configs)
    return source


@functools.lru_cache(maxsize=8)
def geometry(base_model: str | None, prediction_type: str | None = None) -> Geometry:
    """Build the UNet, VAE and text encoder(s) of `base_model` on the meta device and count (see the module doc)."""
    import transformers
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    source = _source(base_model, prediction_type)
    try:
        index = DiffusionPipeline.load_config(source)
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae_config = AutoencoderKL.load_config(source, subfolder="vae")
        with torch.device("meta"):  # this thread only (accelerate's init_empty_weights is process-wide)
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = AutoencoderKL.from_config(vae_config)
            text_params = 0
            for name in ("text_encoder", "text_encoder_2"):
                if index.get(name) and index[name][0]:
                    cls = getattr(transformers, index[name][1])
                    encoder = cls(cls.config_class.from_pretrained(source, subfolder=name))
                    text_params += sum(p.numel() for p in encoder.parameters())
    except Exception as exc:
        raise UserError(f"could not read the configs of base model {base_model!r}: {exc}") from exc
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    native = unet_config["sample_size"] * scale
    counts = {"act": 0, "kept": 0, "leaves": 0}

    def leaf(module, args, output):
        if isinstance(output, torch.Tensor):
            counts["act"] += output.numel()

    def block(module, args):
        counts["kept"] += args[0].numel()

    hooks = []
    for module in unet.modules():
        if not any(True for _ in module.children()):
            counts["leaves"] += 1
            hooks.append(module.register_forward_hook(leaf))
        if isinstance(module, ResnetBlock2D | Transformer2DModel):
            hooks.append(module.register_forward_pre_hook(block))
    side = native // scale
    dtype = torch.float32  # counts, not bytes: the meta device does no arithmetic in any dtype
    with torch.device("meta"), torch.no_grad():
        kwargs = {}
        if unet_config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and the six time ids
            pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(1, pooled, dtype=dtype),
                "time_ids": torch.zeros(1, 6, dtype=dtype),
            }
        cross = unet_config["cross_attention_dim"]
        unet(
            torch.zeros(1, unet_config["in_channels"], side, side, dtype=dtype),
            torch.tensor([1]),
            torch.zeros(1, 77, cross if isinstance(cross, int) else cross[0], dtype=dtype),
            **kwargs,
        )
        for hook in hooks:
            hook.remove()
        decoded = [_largest_decoded(vae, side, dtype), _largest_decoded(vae, min(side, TILE // scale), dtype)]
    family = {"SDXL": "sdxl"}.get(_family_name(unet_config), "other")
    if family == "other" and cross == 768:
        family = "sd1"
    elif family == "other" and cross == 1024:
        family = "sd2"
    elif family == "other" and Path(source).resolve() == BUILTIN_DIR.resolve():
        family = "builtin"
    return Geometry(
        family=family,
        native=native,
        unet_params=sum(p.numel() for p in unet.parameters()),
        vae_params=sum(p.numel() for p in vae.parameters()),
        text_params=text_params,
        act=counts["act"],
        kept=counts["kept"],
        decoded=decoded[0],
        decoded_tile=decoded[1],
        leaves=counts["leaves"],
    )


def _family_name(unet_config: dict) -> str:
    return "SDXL" if unet_config.get("addition_embed_type") == "text_time" else ""


def _largest_decoded(vae, side: int, dtype) -> int:
    largest = [0]

    def leaf(module, args, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    hooks = [m.register_forward_hook(leaf) for m in vae.decoder.modules() if not any(True for _ in m.children())]
    vae.decode(torch.zeros(1, vae.config.latent_channels, side, side, dtype=dtype))
    for hook in hooks:
        hook.remove()
    return largest[0]


_COUNTED: dict[tuple, int] = {}


def lora_parameters(config) -> int:
    """The trainable parameters of `config`'s adapter (`_count_lora_parameters`), counted once per model and shape:
    the page plans again at every change of the form."""
    fields = ("base_model", "prediction_type", "attention", "rank", "train_ff", "train_proj", "use_dora", "conv_rank")
    key = tuple(getattr(config, name) for name in (*fields, "train_text_encoder"))
    if key not in _COUNTED:
        _COUNTED[key] = _count_lora_parameters(config)
    return _COUNTED[key]


def _count_lora_parameters(config) -> int:
    """The trainable parameters of `config`'s adapter: rank x (in + out) of each targeted layer (and the conv
    layers' rank x (in x k x k + out) with --conv-rank; DoRA's magnitudes; the text encoders' with
    --train-text-encoder), counted on the meta device."""
    from diffusers import UNet2DConditionModel

    from adapters.base import model_modules
    from adapters.lora import attention_targets, conv_targets, feed_forward_targets, projection_targets

    prediction = None if config.prediction_type == "auto" else config.prediction_type
    source = _source(config.base_model, prediction)
    with torch.device("meta"):  # this thread only (accelerate's init_empty_weights is process-wide)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet"))
    targets = attention_targets(unet, config.attention)
    targets += feed_forward_targets(unet) if config.train_ff else []
    targets += projection_targets(unet) if config.train_proj else []
    modules = dict(unet.named_modules())

    def size(name: str, rank: int) -> int:  # peft's A (in -> rank, the layer's kernel) and B (rank -> out)
        layer = modules[name]
        magnitude = 1 if config.use_dora else 0  # DoRA's magnitude: one value per output
        if isinstance(layer, torch.nn.Conv2d):  # proj_in/proj_out of SD 1.x are 1x1 convolutions
            k = layer.kernel_size[0] * layer.kernel_size[1]
            return rank * (layer.in_channels * k + layer.out_channels) + magnitude * layer.out_channels
        return rank * (layer.in_features + layer.out_features) + magnitude * layer.out_features

    total = sum(size(name, config.rank) for name in targets)
    if config.conv_rank:
        total += sum(size(name, config.conv_rank) for name in conv_targets(unet))
    if config.train_text_encoder:
        shapes, _ = model_modules(config.base_model, prediction)
        for component, layers in shapes.items():
            if component != "unet":
                total += sum(config.rank * (i + o) for i, o in layers.values())
    return total


GPU_MEMORY_ON_CPU = "--gpu-memory {:g} is for a GPU; this run is on the {}, where nothing holds it to that size"


@dataclasses.dataclass
class Plan:
    """What a run will need and what the trainer does so that it fits; `str(plan)` is the table `--plan` prints."""

    device: str  # "cuda: NVIDIA H200 (139.8 GiB)" or "cpu"
    family: str
    batch: int
    resolution: int
    lora_parameters: int
    gpu_gib: dict[str, float]  # phase -> estimated peak allocated
    gpu_available_gib: float | None  # what the run may use (the card, or --gpu-memory), less the CUDA context
    need_gib: float  # the run's peak: the step, or a preview beside the CUDA graph's pool of the step's activations
    system_gib: float
    disk_mib: float
    step_seconds: float
    steps: int  # the steps timed; 0 for an --epochs run whose images are not known yet
    start_seconds: float
    total_seconds: float
    gradient_checkpointing: bool
    tiled_preview: bool
    turned_on: list[str]  # what the plan turned on to fit, each with why
    fits: bool
    advice: str  # settings that fit, when it does not
    notes: list[str] = dataclasses.field(default_factory=list)  # settings this machine ignores, said
    torch_compile: bool = False  # --torch-compile: the step's blocks compiled (its time in start_seconds)
    torch_compile_why: str = ""
    channels_last: bool = False  # --channels-last: the convolutions and the graphed step's latents NHWC
    channels_last_why: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rows = [
            f"Plan for this run on {self.device} ({self.family}, batch {self.batch} at {self.resolution} px, "
            f"{self.lora_parameters / 1e6:.2f} M LoRA parameters):"
        ]
        if self.gpu_gib:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in self.gpu_gib.items())
            room = f" of {self.gpu_available_gib:.1f} GiB it may use" if self.gpu_available_gib else ""
            rows.append(f"  GPU memory: peak {self.need_gib:.1f} GiB{room} (allocated by phase: {phases})")
        rows.append(f"  system memory: {self.system_gib:.1f} GiB")
        rows.append(f"  disk: {mib(self.disk_mib)} (adapter and kept checkpoints)")
        if self.steps:
            rows.append(
                f"  time: about {duration(self.total_seconds)} ({self.step_seconds:.3f} s a step after "
                f"{duration(self.start_seconds)} of loading and caching; previews, judging and saves not counted)"
            )
        else:
            rows.append(
                f"  time: {self.step_seconds:.3f} s a step after {duration(self.start_seconds)} of loading and "
                f"caching; {NO_STEPS} (give --data)"
            )
        if self.torch_compile_why:
            rows.append(f"  torch.compile: {'on' if self.torch_compile else 'off'} ({self.torch_compile_why})")
        if self.channels_last:
            rows.append(f"  channels-last: on ({self.channels_last_why})")
        rows += [f"  turned on: {what}" for what in self.turned_on]
        rows += [f"  note: {what}" for what in self.notes]
        if not self.fits:
            rows.append(f"  does not fit: {self.advice}")
        return "\n".join(rows)


def mib(size: float) -> str:
    """A size in MiB as the plan prints it: a small adapter (the built-in model's is 0.5 MiB) is not "0 MiB"."""
    return f"{size:.1f} MiB" if size < 10 else f"{size:.0f} MiB"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def matmul_tflops(device: torch.device) -> float:
    """This GPU's bf16 matrix-multiply rate (TFLOP/s), from a short probe."""
    import time

    n = 4096
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, count = time.perf_counter(), 20
    for _ in range(count):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


@functools.lru_cache(maxsize=4)
def _probed_tflops(device: str) -> float:
    """`matmul_tflops` once per device and process: the page plans again at every change of the form, and a probe
    each time would cost 0.1 s and compete with a run training on the same GPU."""
    return matmul_tflops(torch.device(device))


def cpu_probe_seconds() -> float:
    """A short forward and backward pass of small layers like the built-in model's (convolution, group norm,
    attention, linear), on one thread of this CPU: the fastest of five tries, in seconds. A CPU step of a
    small model is bound as much by each operation's overhead as by arithmetic, which a matrix-multiply rate alone
    would miss."""
    import time

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 16, 16, generator=generator)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    norm = torch.nn.GroupNorm(8, 32)
    qkv, out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def once():
        h = torch.nn.functional.silu(norm(conv(x))).flatten(2).transpose(1, 2)
        q, k, v = qkv(h).chunk(3, dim=-1)
        y = out(torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1) @ v)
        y.square().mean().backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: threads waiting on each other while other work holds a core made the
    try:  # probe swing from 0.032 to 1.72 s between runs (benchmarks/results/cpu_probe_busy.txt)
        once()
        tries = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                once()
            tries.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return min(tries)  # not skewed by a moment's load (the app starting, say): the probe runs once per process


CPU_PROBE_EVERY_S = 10.0
_CPU_PROBES: list[tuple[float, float]] = []  # (when, seconds) of this process's probes


def _probed_cpu() -> float:
    """The fastest `cpu_probe_seconds` this process has taken, probing again when the last is older than
    `CPU_PROBE_EVERY_S` (the page plans at every change of the form): a probe taken while other work held the
    cores (the page's data check of a preloaded folder, at load) gave a 400-step plan of 6 min for a run of 2."""
    import time

    now = time.monotonic()
    if not _CPU_PROBES or now - _CPU_PROBES[-1][0] > CPU_PROBE_EVERY_S:
        _CPU_PROBES.append((now, cpu_probe_seconds()))
        del _CPU_PROBES[:-100]
    return min(seconds for _, seconds in _CPU_PROBES)


def estimate(
    config,
    *,
    device: torch.device | str = "cpu",
    card_gib: float | None = None,
    processes: int = 1,
    images: int = 0,
    tflops: float | None = None,
    device_name: str | None = None,
    pictures=(),
    done_steps: int = 0,
    cpu_probe_s: float | None = None,
) -> Plan:
    """The plan of `config` on `device` (a card of `card_gib`, else the device's own; `config.gpu_memory` lowers it).
    `images`: training pictures (for the time of an epoch-counted run); `pictures`: their files, when known (the
    aspect-ratio buckets they fill, each a compile of its own); `done_steps`: a resumed run's steps already taken
    (its time and its compile's payback count the rest); `tflops` (a GPU's) and `cpu_probe_s` (a CPU's) stand for
    the probes of this machine's speed. Decides --gradient-checkpointing auto and the previews'
    tiled decoding; refuses nothing itself (`check` does)."""
    device = torch.device(device)
    prediction = None if config.prediction_type == "auto" else config.prediction_type
    geom = geometry(config.base_model, prediction)
    resolution = config.resolution or geom.native
    area = (resolution / geom.native) ** 2  # activations scale with the pixels
    lora = lora_parameters(config)
    cuda = device.type == "cuda"
    bytes_per_weight = 2 if (cuda and config.mixed_precision != "no") else 4
    weights_gib = (geom.unet_params + geom.vae_params) * bytes_per_weight / GIB
    if config.train_text_encoder:
        weights_gib += geom.text_params * bytes_per_weight / GIB
    lora_gib = lora * LORA_STATE_BYTES / GIB
    base = weights_gib + lora_gib + RUNTIME_GIB
    scale = bytes_per_weight / 2  # the constants are for bf16

    def train_gib(batch: int, checkpointing: bool) -> float:
        per_image = (BYTES_PER_KEPT * geom.kept if checkpointing else BYTES_PER_ACTIVATION * geom.act) / GIB
        return base + batch * per_image * area * scale

    def preview_gib(tiled: bool) -> float:
        decoded = geom.decoded_tile if tiled else geom.decoded * area
        return base + BYTES_PER_DECODED * decoded * scale / GIB

    previews = bool(config.preview_prompt) or config.judge  # the judge draws as the previews do
    graphed = cuda and _graphed(config)

    def need_gib(batch: int, checkpointing: bool) -> float:
        """The run's peak: the step, or a (tiled) preview beside the graph's pool of the step's activations."""
        train = train_gib(batch, checkpointing)
        return max(train, preview_gib(True) + (train - base if graphed else 0.0)) if previews else train

    available = None
    if cuda:
        if card_gib is None:
            card_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        if config.gpu_memory:
            card_gib = min(card_gib, config.gpu_memory)
        available = card_gib - CONTEXT_GIB
    turned_on, advice = [], ""
    checkpointing = config.gradient_checkpointing == "on"
    if config.gradient_checkpointing == "auto" and cuda and train_gib(config.batch_size, False) > available:
        checkpointing = True
        turned_on.append(
            f"gradient checkpointing (without it the step needs {train_gib(config.batch_size, False):.1f} GiB; "
            f"with it {train_gib(config.batch_size, True):.1f})"
        )
    # a CUDA-graph step keeps its activations' memory in the graph's own pool, also while previews draw
    pool = train_gib(config.batch_size, checkpointing) - base if graphed else 0.0
    tiled = bool(cuda and previews and preview_gib(False) + pool > available)
    if tiled:
        turned_on.append(
            f"tiled VAE decoding for previews ({preview_gib(False) + pool:.1f} GiB whole, "
            f"{preview_gib(True) + pool:.1f} tiled, with the step's graph memory)"
        )
    gpu = {}
    if cuda:
        gpu = {"cache": base - lora_gib, "train": train_gib(config.batch_size, checkpointing)}
        if previews:
            gpu["preview"] = preview_gib(tiled)
        gpu = {k: round(v, 3) for k, v in gpu.items()}
    need = max(gpu["train"], gpu.get("preview", 0.0) + pool) if cuda else 0.0
    fits = not cuda or need <= available
    if not fits:
        advice = _advice(config, need_gib, available, checkpointing)
    # system memory: libraries and weights; on the CPU the activations live there too
    fp16_weights = (geom.unet_params + geom.vae_params + geom.text_params) * 2 / GIB
    system = SYSTEM_BASE_GIB["cuda" if cuda else "cpu"] + SYSTEM_PER_WEIGHT_GIB * fp16_weights
    if not cuda:
        system += train_gib(config.batch_size, checkpointing) - base
    # disk: the adapter (fp32) and each kept checkpoint (fp32 weights, AdamW's two moments and its step's adapter);
    # the last step writes the adapter, not a checkpoint
    steps = config.steps
    if config.epochs:  # counted from the images: unknown (0) until they are
        steps = config.run_length(images, processes)[1] if images else 0
    saves = max(steps - 1, 0) // config.save_every if config.save_every else 0
    kept = saves if config.keep_checkpoints == 0 else min(saves, config.keep_checkpoints)
    disk = lora * (4 + kept * (12 + 4)) / 2**20
    # an optimiser step runs --gradient-accumulation-steps forwards and backwards
    step = _step_seconds(config, geom, device, checkpointing, area, tflops, processes, cpu_probe_s)
    step *= config.gradient_accumulation_steps
    start = 1.0 + 1.2 * fp16_weights
    left = max(steps - done_steps, 0)
    shapes = _picture_shapes(config, pictures, resolution) if geom.family in COMPILE else 1
    compiled, compile_why = _torch_compile(config, geom.family, graphed, checkpointing, left, step, shapes, processes)
    if compiled:
        step *= 1 - COMPILE[geom.family][1]
        start += _compile_seconds(geom.family, shapes)
    layout, layout_why = channels_last_choice(config.channels_last, geom.family, compiled)
    if layout and compiled and geom.family in CHANNELS_LAST:
        step *= 1 - CHANNELS_LAST[geom.family]
    return Plan(
        device=device_name or _device_name(device, card_gib),
        family=geom.family,
        batch=config.batch_size,
        resolution=resolution,
        lora_parameters=lora,
        gpu_gib=gpu,
        gpu_available_gib=round(available, 2) if available is not None else None,
        need_gib=round(need, 3),
        system_gib=round(system, 2),
        disk_mib=round(disk, 1),
        step_seconds=round(step, 4),
        steps=steps,
        start_seconds=round(start, 1),
        total_seconds=round(start + left * step, 1),
        gradient_checkpointing=checkpointing,
        tiled_preview=tiled,
        turned_on=turned_on,
        fits=fits,
        advice=advice,
        notes=[GPU_MEMORY_ON_CPU.format(config.gpu_memory, device.type.upper())]
        if config.gpu_memory and not cuda
        else [],
        torch_compile=compiled,
        torch_compile_why=compile_why,
        channels_last=layout,
        channels_last_why=layout_why,
    )


def _device_name(device: torch.device, card_gib: float | None) -> str:
    if device.type != "cuda":
        return "the CPU"
    return f"{torch.cuda.get_device_name(device)} ({card_gib:.1f} GiB)"


def _advice(config, need_gib, available: float, checkpointing: bool) -> str:
    """Settings that fit (the same images a step, through accumulation), or what is needed."""
    need = need_gib(config.batch_size, checkpointing)
    per_step = config.batch_size * config.gradient_accumulation_steps
    for batch in range(config.batch_size, 0, -1):
        if per_step % batch:  # the same images a step, or it is not the same training
            continue
        for ckpt in (False, True):
            if need_gib(batch, ckpt) <= 0.95 * available:  # a margin for the estimate's own error
                accumulate = per_step // batch
                flags = (
                    []
                    if batch == config.batch_size
                    else [f"--batch-size {batch}", f"--gradient-accumulation-steps {accumulate}"]
                )
                if ckpt:
                    flags.append("--gradient-checkpointing on")
                return (
                    f"the run needs about {need:.1f} GiB and {available:.1f} GiB is free for it; "
                    f"{' '.join(flags)} trains on as many images a step in about {need_gib(batch, ckpt):.1f} GiB"
                )
    return (
        f"even batch 1 with gradient checkpointing needs about {need_gib(1, True):.1f} GiB and {available:.1f} GiB "
        "is free for it: a smaller --resolution or --rank, or a GPU with more memory"
    )


def _step_seconds(
    config,
    geom: Geometry,
    device,
    checkpointing: bool,
    area: float,
    tflops: float | None,
    processes: int,
    cpu_probe_s: float | None = None,
) -> float:
    batch = config.batch_size
    if device.type != "cuda":
        builtin = geometry("builtin")
        speed = (cpu_probe_s or _probed_cpu()) / CPU_STEP["probe_s"]
        return (CPU_STEP["a"] + CPU_STEP["b"] * batch * (geom.act * area / builtin.act)) * speed
    family = geom.family if geom.family in ("sd1", "sdxl") else "sd1"
    known = STEP_SECONDS[(family, checkpointing)]
    reference = geometry(str(CONFIGS / family))
    size = area * geom.act / reference.act  # pictures of that family's model at its own size
    speed = CALIBRATION_TFLOPS / (tflops or _probed_tflops(str(device)))
    step = (known["a"] + known["b"] * batch * size**1.5) * speed
    if not _graphed(config):  # launch-bound: grows with the modules launched, not the GPU's speed
        step = max(step, known["eager"] * geom.leaves / reference.leaves)
    return step


def _picture_shapes(config, pictures, resolution: int) -> int:
    """The picture shapes a run trains at: its aspect-ratio buckets that hold an image (1 without --buckets or
    without the files), at most the `GRAPHED_SHAPES` that get a graph (the rest run eagerly, uncompiled)."""
    if not config.buckets or not pictures:
        return 1
    from trainer.dataset import bucket_counts, bucket_stride

    stride = bucket_stride(resolution, 8, 4)  # SD 1.x / 2.x / SDXL: a VAE of scale 8, a UNet of 4 levels
    filled = [n for n in bucket_counts([Path(p) for p in pictures], resolution, stride).values() if n]
    return max(1, min(len(filled), GRAPHED_SHAPES))


def _compile_seconds(family: str, shapes: int) -> float:
    return COMPILE[family][0] + COMPILE_PER_SHAPE[family] * (shapes - 1)


def _torch_compile(
    config,
    family: str,
    graphed: bool,
    checkpointing: bool,
    steps: int,
    step: float,
    shapes: int = 1,
    processes: int = 1,
):
    """Whether the step compiles the UNet's blocks (--torch-compile), and why: `auto` compiles only where it was
    measured and the run's `steps` (still to take) are enough for the faster steps to repay the compile of its
    `shapes` picture shapes `COMPILE_PAYBACK` times."""
    setting = config.torch_compile
    seconds, saving = COMPILE.get(family, COMPILE["sd1"])
    if family in COMPILE:
        seconds = _compile_seconds(family, shapes)
    if setting == "off":
        return False, "--torch-compile off"
    if not graphed:
        why = "it compiles inside the CUDA-graph step, and this run's step is eager"
        return False, f"auto: {why}" if setting == "auto" else f"--torch-compile on: not used, {why}"
    if setting == "on":
        return True, f"--torch-compile on: about {seconds:.0f} s of compiling before the first step"
    if family not in COMPILE or checkpointing or processes > 1:
        what = (
            "with gradient checkpointing"
            if checkpointing
            else f"on {family} models"
            if family not in COMPILE
            else f"on {processes} processes (each would compile, and wait for the slowest)"
        )
        return False, f"auto: the compiled step is not measured {what}; --torch-compile on tries it"
    if not steps:
        return False, f"auto: the run's length is not known ({NO_STEPS})"
    saved = steps * step * saving
    over = f"{steps} steps" + (f", {shapes} picture shapes" if shapes > 1 else "")
    if saved < COMPILE_PAYBACK * seconds:
        return False, f"auto: about {seconds:.0f} s of compiling would save about {saved:.0f} s over {over}"
    return True, f"auto: about {seconds:.0f} s of compiling saves about {saved:.0f} s over {over}"


def channels_last_choice(setting: str, family: str, compiled: bool) -> tuple[bool, str]:
    """Whether the step holds the convolutions channels-last (--channels-last), and why: `auto` only where the step
    compiles and the family was measured faster so (`CHANNELS_LAST`)."""
    if setting != "auto":
        return setting == "on", f"--channels-last {setting}"
    if compiled and family in CHANNELS_LAST:
        return True, f"auto: with the compiled step it saves about {CHANNELS_LAST[family]:.0%} of each step"
    if compiled:
        return False, f"auto: not measured on {family} models compiled; --channels-last on tries it"
    return False, "auto: it speeds up only the compiled step (without --torch-compile it was slower)"


def _graphed(config) -> bool:
    """Whether the step will be a CUDA graph (trainer/step.py's make_step says why not, at the run's start)."""
    return config.cuda_graphs and not config.train_text_encoder and config.lora_dropout == 0


def check(plan: Plan) -> None:
    """Refuse a run whose plan does not fit, before any work, with the settings that would."""
    if not plan.fits:
        raise UserError(
            f"this run would not fit in the GPU's memory: it needs about {plan.need_gib:.1f} GiB at its peak and "
            f"{plan.gpu_available_gib:.1f} GiB is there to use. {plan.advice[0].upper()}{plan.advice[1:]}"
        )


def load_results(paths: list[Path]) -> list[dict]:
    """The runs of stored plan_calibration result files, each with its file's arch."""
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs += [{**run, "arch": data["arch"], "file": Path(path).name} for run in data["runs"]]
    return runs
