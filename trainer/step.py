"""The training step: noise a batch, one UNet forward and backward, one optimiser step; eager or as a CUDA graph.

    step = make_step(unet, optimizer, accelerator=acc, noise_scheduler=ns, family=family, dtype=torch.bfloat16)
    print(step.kind, step.why)          # "cuda graph", "one CUDA GPU, --cuda-graphs on"
    loss = step(batch)                  # the batch's mean loss, detached
    loss = step(batch_1, batch_2)       # gradient accumulation: one optimiser step on both batches' gradients

The loop calls `step(batch)` and knows nothing of graphs. `compare_with_eager` is the check that a fast step
trains the adapter the eager one does (within the GPU's own run-to-run noise); tests/test_gpu.py runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from adapters.errors import UserError
from adapters.families import Family
from adapters.runtime import use_compile_cache
from trainer.optim import Loss, diffusion_loss

TARGETS = ("epsilon", "v_prediction")


def training_target(noise_scheduler, batch: dict) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon models) or the velocity (v-prediction models)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return batch["noise"]
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])
    raise UserError(f"base model scheduler has prediction_type {kind!r}; only {' and '.join(TARGETS)} train")


def unet_inputs(batch: dict, noise_scheduler, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The UNet's inputs for a batch: noised latents, timesteps and the conditioning, in the compute dtype. The
    latents are noised with the batch's `input_noise` where it has one (--input-perturbation), else its `noise`."""
    noise = batch.get("input_noise", batch["noise"])
    noisy = noise_scheduler.add_noise(batch["latents"], noise, batch["timesteps"])
    return noisy.to(dtype), batch["timesteps"], {k: v.to(dtype) for k, v in batch["cond"].items()}


def batch_loss(
    unet, batch: dict, noise_scheduler, family: Family, dtype=None, graphed=None, loss: Loss = Loss(), encode=None
) -> torch.Tensor:
    """The loss of `unet` on a batch, as a training step computes it (`loss` says how: `trainer.optim.Loss`);
    `graphed`, when given, stands in for the UNet call (a captured CUDA graph of it). `dtype` defaults to the
    frozen UNet's own. `encode`, when given, turns the batch's caption token ids into the UNet's conditioning
    first (the text encoders run in the step, with gradients: --train-text-encoder)."""
    dtype = dtype or next(unet.parameters()).dtype  # conv_in: a frozen base weight, in the compute dtype
    if encode is not None:
        batch = {**batch, "cond": encode(batch["cond"])}
    target = training_target(noise_scheduler, batch)
    noisy, timesteps, cond = unet_inputs(batch, noise_scheduler, dtype)
    if graphed is not None:
        prediction = graphed(noisy, timesteps, *cond.values())
    else:
        prediction = unet(noisy, timesteps, **family.unet_kwargs(cond)).sample
    return diffusion_loss(prediction, target, batch["timesteps"], noise_scheduler, loss)


class _Predict(torch.nn.Module):
    """The UNet as tensors in, one tensor out, under its own autocast: the form CUDA-graph capture needs.

    It calls the UNet class's forward directly, past the autocast wrapper accelerate puts on the instance:
    capture needs an autocast that does not cache casted weights."""

    def __init__(
        self, unet, family: Family, cond_keys: tuple[str, ...], dtype: torch.dtype, channels_last: bool = False
    ):
        super().__init__()
        self.unet, self.family, self.cond_keys, self.dtype = unet, family, cond_keys, dtype
        self.channels_last = channels_last

    def forward(self, latents, timesteps, *cond):
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        kwargs = self.family.unet_kwargs(dict(zip(self.cond_keys, cond)))
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False):
            return type(self.unet).forward(self.unet, latents, timesteps, **kwargs, return_dict=False)[0]


def average_gradients(params: list, accelerator) -> None:
    """Every process's gradients become their mean over the processes, in place, through one all-reduce of them
    all laid end to end (the LoRA's gradients are a few MB: one call, not one per tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    mean = accelerator.reduce(torch.cat([g.reshape(-1).float() for g in grads]), reduction="mean")
    for g, part in zip(grads, mean.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


# What `compile_blocks` compiles: "blocks", every transformer and resnet block (measured, the default); "models",
# larger regions: each Transformer2DModel whole (its GroupNorm, projections and layout changes around the blocks),
# the resnet blocks, the down- and upsamplers (not yet measured in the trainer; benchmarks/sd15.py
# --compile-regions models sets it for a run to compare).
COMPILE_REGIONS = "blocks"


def region_classes(regions: str) -> tuple[type, ...]:
    """The module classes `compile_blocks` compiles for `regions` ("blocks" or "models", see `COMPILE_REGIONS`)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    if regions == "models":
        from diffusers.models import Transformer2DModel

        return (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D)
    return (BasicTransformerBlock, ResnetBlock2D)


def compile_blocks(unet, regions: str | None = None) -> list[tuple[torch.nn.Module, Callable]]:
    """Each repeated block of the UNet (every transformer and resnet block; `regions` "models": the larger regions,
    see `COMPILE_REGIONS`, which gives the default) with its torch.compile'd call, which `compiled_blocks` puts in
    place only while a CUDA graph is captured: the graph replays the compiled kernels, and every other call
    (previews, the judge, an eager batch) runs the blocks as they were. Blocks of one class and shape share their
    compiled code (regional compilation: a few dozen small compiles, not one of the UNet)."""
    classes = region_classes(regions or COMPILE_REGIONS)
    use_compile_cache()  # where generation keeps its compiled code, not inductor's default in the temp folder
    blocks = []
    for module in unet.modules():
        if not isinstance(module, classes):  # no class of a region holds another's in diffusers' SD UNets
            continue
        module.compile()
        blocks.append((module, module._compiled_call_impl))
        module._compiled_call_impl = None
    room_for_versions(len(blocks))
    return blocks


def room_for_versions(blocks: int) -> None:
    """Let dynamo keep a compiled version of each of `blocks` compiled blocks at 8 picture shapes. The blocks of one
    class share one forward, and dynamo keeps 8 compiled versions of a function by default, running every further
    one eagerly: SD 1.5's resnet blocks alone come in 14 shapes (an H100 run hit the limit), and each picture shape
    adds as many."""
    config = torch._dynamo.config
    room = 8 * blocks
    config.recompile_limit = max(config.recompile_limit, room)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, room)


def uncast_lora_layers(unet, dtype: torch.dtype) -> list:
    """The UNet's LoRA layers whose input can reach their LoRA matrices uncast while the step runs under autocast
    (`dtype` bf16 or fp16): plain LoRA (no DoRA), no LoRA dropout. peft casts a layer's input to its LoRA weights'
    dtype (fp32 here) before the LoRA products, and autocast casts it straight back: where the input arrives in
    `dtype` (an attention's output projection, cross-attention's key and value), two copies of the activation per
    layer forward and two of its gradient backward, all exact, so leaving them out changes no number. (Where
    autocast's fp32 LayerNorm hands the input over in fp32, as on a GPU, peft's cast copies nothing anyway.) None
    in fp32 (no autocast: there the cast is the one that makes the dtypes meet)."""
    if dtype == torch.float32:
        return []
    from peft.tuners.lora import LoraLayer

    return [
        m
        for m in unet.modules()
        if isinstance(m, LoraLayer)
        and not getattr(m, "lora_variant", None)
        and all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())
    ]


@contextmanager
def lora_inputs_uncast(layers: list) -> Iterator[None]:
    """Inside this block, peft does not cast the inputs of `layers` (`uncast_lora_layers`) to their weights' dtype;
    after it each layer casts as it did before."""
    before = [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, cast in zip(layers, before):
            layer.cast_input_dtype_enabled = cast


def hold_channels_last(unet) -> None:
    """Store `unet`'s frozen 4-D weights (its convolutions') channels-last, in place; trained ones (a conv LoRA's)
    keep their layout, and with it their optimiser state's and the saved file's."""
    for param in unet.parameters():
        if param.dim() == 4 and not param.requires_grad:
            param.data = param.data.contiguous(memory_format=torch.channels_last)


@contextmanager
def compiled_blocks(blocks: list[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """The blocks of `compile_blocks` run compiled inside this block, as they were after it."""
    try:
        for module, call in blocks:
            module._compiled_call_impl = call
        yield
    finally:
        for module, _ in blocks:
            module._compiled_call_impl = None


@dataclass
class Step:
    """One training step; `kind` says how it runs (`eager` or `cuda graph`) and `why`.

    Given several batches it accumulates: each one's loss, divided by their number, goes backward in turn, then
    the gradients are clipped to `max_grad_norm` (0 = not), and the optimiser steps once. With `encode`
    (--train-text-encoder) the text encoders run in the step too, and their LoRA (`text_encoder_params`) learns.

    On several processes the UNet runs past the DDP wrapper accelerate put on it (whose hooks then never fire),
    and every LoRA gradient, the text encoders' too, is averaged over the processes here, in one all-reduce after
    the last batch: the mean DDP takes, in one call, and it works the same when a CUDA graph ran the backward,
    which DDP's per-parameter hooks do not see."""

    kind: str
    why: str
    unet: torch.nn.Module  # as accelerate prepared it
    optimizer: torch.optim.Optimizer
    accelerator: object
    noise_scheduler: object
    family: Family
    dtype: torch.dtype
    notice: Callable[[str], None] = print  # told when a fast step falls back to eager, and why
    loss: Loss = field(default_factory=Loss)
    max_grad_norm: float = 0.0
    max_shapes: int = 4  # batch shapes (aspect-ratio buckets) that get a graph each; others run eagerly
    encode: Callable[[dict], dict] | None = None  # caption token ids -> conditioning, with gradients (see batch_loss)
    text_encoder_params: list = field(default_factory=list)  # the LoRA that `encode` trains
    compiled: list = field(default_factory=list, repr=False)  # `compile_blocks`' (block, call): the graphs run them
    channels_last: bool = False  # the graphs take the latents channels-last (the weights: `hold_channels_last`)
    uncast: list = field(default_factory=list)  # LoRA layers run without peft's input casts (`uncast_lora_layers`)
    _graphs: dict = field(default_factory=dict, repr=False)  # batch latent shape -> its graphed UNet

    def _graphed(self, batch: dict) -> Callable | None:
        """The graphed UNet for this batch's shape: captured at its first batch, while fewer than `max_shapes`
        are held (each holds its own GPU memory); None: run this batch eagerly."""
        if self.kind != "cuda graph":
            return None
        shape = tuple(batch["latents"].shape)
        if shape not in self._graphs and len(self._graphs) < self.max_shapes:
            self._graphs[shape] = self._capture(batch)
        return self._graphs.get(shape)

    def __call__(self, *batches: dict) -> torch.Tensor:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        several = self.accelerator.num_processes > 1
        unet = self.accelerator.unwrap_model(self.unet) if several else self.unet  # past DDP: averaged below
        losses = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            graphed = self._graphed(batch)
            with self.accelerator.autocast():
                uncast = self._uncast_here() if graphed is None else []  # a graph replays what it recorded
                with lora_inputs_uncast(uncast):
                    loss = batch_loss(
                        unet, batch, self.noise_scheduler, self.family, self.dtype, graphed, self.loss, self.encode
                    )
            with lora_inputs_uncast(uncast):  # a checkpointed block's forward, run again here, runs as it did
                self.accelerator.backward(loss / len(batches))
            if graphed is not None and not last:
                # A graph's backward hands out gradients in its own buffers, which the next replay overwrites; a
                # parameter that has no gradient yet takes the buffer itself. Copies keep the sum.
                for p in params:
                    if p.grad is not None:
                        p.grad = p.grad.clone()
            losses.append(loss.detach())
        if several:
            average_gradients(params, self.accelerator)
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _uncast_here(self) -> list:
        """`uncast` where the forward about to run is under an autocast to the step's dtype (else peft's casts are
        what make the dtypes meet: none)."""
        device = self.accelerator.device.type
        if self.uncast and torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == self.dtype:
            return self.uncast
        return []

    def _capture(self, batch: dict) -> Callable | None:
        """Record the UNet's forward and backward once as CUDA graphs, replayed at every batch of this shape.

        A LoRA step on a Stable Diffusion UNet launches some 3,600 small kernels; launching them, not the GPU's
        arithmetic, sets its time at common batch sizes, and a replayed graph launches them all at once. The
        LoRA weights are read in place at each replay, so the optimiser's updates take effect. A graph replays
        one shape: each aspect-ratio bucket gets its own. Where capture fails, the step runs eagerly from then on."""
        if getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None):
            torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
        noisy, timesteps, cond = unet_inputs(batch, self.noise_scheduler, self.dtype)
        sample = tuple(t.clone() for t in (noisy, timesteps, *cond.values()))
        raw = self.accelerator.unwrap_model(self.unet)
        try:
            predict = _Predict(raw, self.family, tuple(cond), self.dtype, self.channels_last)
            # the warm-up compiles (once per shape), the capture records it; `predict` autocasts to `self.dtype`
            with compiled_blocks(self.compiled), lora_inputs_uncast(self.uncast):
                return torch.cuda.make_graphed_callables(predict, sample, num_warmup_iters=3)
        except Exception as exc:  # an exotic model or driver: the same training, eagerly
            self.kind, self.why = "eager", f"CUDA graphs not used ({type(exc).__name__}: {exc}); training eagerly"
            self.notice(self.why)
            return None


def gradient_checkpointing(setting: str, plan) -> tuple[bool, str]:
    """Whether to recompute activations in the backward pass (`--gradient-checkpointing`), and why: `auto` is what
    the run's plan (trainer/plan.py) decided."""
    if setting != "auto":
        return setting == "on", f"--gradient-checkpointing {setting}"
    if plan.gradient_checkpointing:
        return True, f"auto: the plan says the step needs it ({plan.turned_on[0]})"
    if plan.gpu_gib:
        return False, f"auto: the step fits without it ({plan.gpu_gib['train']:.1f} GiB)"
    return False, "auto: not on the CPU"


def make_step(
    unet,
    optimizer,
    *,
    accelerator,
    noise_scheduler,
    family: Family,
    dtype: torch.dtype,
    cuda_graphs: bool = True,
    notice: Callable[[str], None] = print,
    loss: Loss = Loss(),
    max_grad_norm: float = 0.0,
    encode: Callable[[dict], dict] | None = None,
    text_encoder_params: list | None = None,
    eager_why: str = "",
    torch_compile: bool = False,
    compile_why: str = "--torch-compile on",
    channels_last: str = "off",
    channels_last_why: str = "",
) -> Step:
    """The fastest step this run can take, and why: a CUDA graph on CUDA (one GPU or several) unless switched off,
    else eager.

    `encode` and `text_encoder_params` (--train-text-encoder): the step runs the text encoders on the batch's token
    ids and trains their LoRA too; it then runs eagerly (the graph holds the UNet's forward and backward alone).
    `eager_why`, when given, is another reason of the run's own to step eagerly (e.g. LoRA dropout's random masks,
    which a graph's warm-up would draw from the run's generator).
    `torch_compile` (--torch-compile, `compile_why` saying why): the UNet's repeated blocks are compiled at each
    graph's capture (`compile_blocks`); an eager step does not compile, and says so through `notice`.
    `channels_last` ("on" or "off", the run's plan having resolved --channels-last auto; `channels_last_why` says
    why): with "on" the frozen convolution weights are held channels-last and the graphed step takes its latents
    so.
    Under autocast (bf16 or fp16 mixed precision), plain LoRA layers skip peft's casts of their inputs to fp32
    (`uncast_lora_layers`): the same numbers, fewer copies."""
    kind = noise_scheduler.config.prediction_type
    if kind not in TARGETS:
        raise UserError(f"base model scheduler has prediction_type {kind!r}; only {' and '.join(TARGETS)} train")
    if accelerator.device.type != "cuda":
        choice = ("eager", f"CUDA graphs need a CUDA GPU; this run is on {accelerator.device.type}")
    elif not cuda_graphs:
        choice = ("eager", "--no-cuda-graphs")
    elif encode is not None:
        choice = (
            "eager",
            "--train-text-encoder: the text encoders run and learn in every step, and the CUDA graph holds the "
            "UNet's forward and backward alone",
        )
    elif eager_why:
        choice = ("eager", eager_why)
    elif accelerator.num_processes > 1:
        choice = (
            "cuda graph",
            f"--cuda-graphs on, on each of {accelerator.num_processes} processes' GPUs; the gradients are averaged "
            "over them once per step, outside the graph",
        )
    else:
        choice = ("cuda graph", "one CUDA GPU, --cuda-graphs on")
    blocks = []
    if torch_compile and choice[0] == "cuda graph":
        blocks = compile_blocks(accelerator.unwrap_model(unet))
        choice = (
            choice[0],
            f"{choice[1]}; {len(blocks)} UNet blocks through torch.compile in the graph ({compile_why})",
        )
        notice(
            f"compiling the UNet's {len(blocks)} repeated blocks at the first step of each picture shape "
            f"({compile_why})"
        )
    elif torch_compile:
        notice(f"--torch-compile: not used, the step runs eagerly ({choice[1]})")
    layout = channels_last == "on"
    if layout:
        hold_channels_last(accelerator.unwrap_model(unet))
        why = channels_last_why or f"--channels-last {channels_last}"
        choice = (choice[0], f"{choice[1]}; convolutions channels-last ({why})")
    return Step(
        *choice,
        unet,
        optimizer,
        accelerator,
        noise_scheduler,
        family,
        dtype,
        notice,
        loss,
        max_grad_norm=max_grad_norm,
        encode=encode,
        text_encoder_params=list(text_encoder_params or []),
        compiled=blocks,
        channels_last=layout,
        uncast=uncast_lora_layers(accelerator.unwrap_model(unet), dtype),
    )


def relative_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative L2 distance of the tensors `a` from `b`, all taken as one vector (absolute where `b` is all zeros)."""
    num = sum(float((x - y).float().pow(2).sum()) for x, y in zip(a, b, strict=True))
    return (num / (sum(float(y.float().pow(2).sum()) for y in b) or 1.0)) ** 0.5


def compare_with_eager(
    unet,
    params: list[torch.nn.Parameter],
    batches: list[dict],
    *,
    family: Family,
    noise_scheduler,
    dtype,
    lr=1e-4,
    accumulation: int = 1,
    torch_compile: bool = False,
    channels_last: str = "off",
) -> dict:
    """How far the fast step's LoRA lands from the eager one's, against how far two eager runs land apart.

    `unet` (on a CUDA GPU, frozen in `dtype`, LoRA `params` attached in fp32) is trained on `batches` three times
    from the same LoRA weights with a fresh AdamW: eagerly twice, then with the fastest step `make_step` picks;
    each step takes `accumulation` batches; `torch_compile`: the fast step compiles the UNet's blocks too;
    `channels_last` ("on"): the fast step holds the convolutions channels-last (the eager runs before it do not).
    Distances are relative L2 over all LoRA parameters; `moved` is how far the eager run went from the start."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    precision = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    accelerator = Accelerator(mixed_precision=precision)
    start = [p.detach().clone() for p in params]

    def run(fast: bool) -> tuple[list[torch.Tensor], str]:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        step = make_step(
            unet,
            optimizer,
            accelerator=accelerator,
            noise_scheduler=noise_scheduler,
            family=family,
            dtype=dtype,
            cuda_graphs=fast,
            torch_compile=fast and torch_compile,
            channels_last=channels_last if fast else "off",
        )
        for i in range(0, len(batches), accumulation):
            step(*batches[i : i + accumulation])
        return [p.detach().float().clone() for p in params], step.kind

    (eager, _), (eager_again, _), (fast, fast_kind) = run(False), run(False), run(True)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    return {
        "fast_kind": fast_kind,
        "eager_vs_eager": relative_distance(eager_again, eager),
        "fast_vs_eager": relative_distance(fast, eager),
        "moved": relative_distance(eager, [s.float() for s in start]),
    }
