"""Generation with adapters: a base pipeline loaded once, adapters attached by name, strengths changed in place.

    studio = Studio("builtin")
    studio.load("style.safetensors", name="style")
    images = studio.generate("a red circle", seed=7, strengths={"style": 0.8})

The verbs: `load`/`add` (attach), `set_strengths` (any number of adapters, each at its strength), `fuse`/`unfuse`
(bake strengths into the weights and restore them bit-exactly), `swap` (replace an adapter's weights in place),
`unload`, `set_scheduler` (another sampler on the same noise schedule). Nothing here reloads the base model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from adapters.base import generation_defaults, load_pipeline, pick_device
from adapters.errors import UserError
from adapters.families import family_of_pipeline, native_size
from adapters.formats import file_hash, read_lora, read_safetensors
from adapters.lora import Lora, LoraModule, install, lora_layers, magnitude_of, module_shapes, split_components

# The samplers the page and CLI offer: a name a person knows -> the diffusers scheduler class.
SCHEDULERS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "UniPC": "UniPCMultistepScheduler",
}
# The largest picture side, in times the model's native side: far above the size it was trained at a model repeats
# its subject, and a picture takes far longer (self-attention's work grows as the side to the fourth power). 4x is
# AUTOMATIC1111's slider limit for SD 1.5 (2048 for 512).
MAX_SIZE_FACTOR = 4


class Interrupted(Exception):
    """`Studio.generate` was told to stop (its `after_step` said True) before the last denoising step."""


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` -> (file, strength); the strength defaults to 1 and a colon in a path is kept."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            strength = float(tail)
        except ValueError:
            strength = None
        if strength is not None and not math.isfinite(strength):
            raise UserError(f"adapter strength in {text!r} must be a finite number, got {tail}")
        if strength is not None:
            return head, strength
        if head.lower().endswith(".safetensors") and not Path(text).exists():
            raise UserError(
                f"adapter strength {tail!r} in {text!r} is not a number: give FILE:STRENGTH, e.g. {head}:0.8"
            )
    return text, 1.0


def _delete_adapter(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "delete_adapters"):  # diffusers models
        model.delete_adapters(name)
    else:  # transformers models
        model.delete_adapter(name)


class Studio:
    """One base pipeline and the adapters attached to it; nothing here reloads the base model."""

    def __init__(
        self,
        base_model: str = "builtin",
        *,
        device=None,
        dtype: torch.dtype | None = None,
        max_loaded: int = 8,
        prediction_type: str | None = None,
        cuda_graphs: bool = True,
        lora_forward: str = "auto",
        compile_unet: bool = False,
        background_compile: bool = False,
        channels_last: bool | None = None,
        vae_bf16: bool | None = None,
    ):
        self.device = torch.device(device) if device else pick_device()
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.base_model = base_model
        self.pipe = load_pipeline(base_model, device=self.device, dtype=dtype, prediction_type=prediction_type)
        self.family = family_of_pipeline(self.pipe)
        self.defaults = generation_defaults(base_model, dict(self.pipe.scheduler.config))
        self._model_scheduler = self.pipe.scheduler
        self._shapes = {c: module_shapes(getattr(self.pipe, c)) for c in self.family.components}
        self.max_loaded = max_loaded
        self.adapters: OrderedDict[str, list[str]] = OrderedDict()  # name -> components, least recently used first
        self._sources: dict[str, tuple] = {}  # name -> (path, size, mtime) of the file it came from
        self.hashes: dict[str, str] = {}  # name -> its file's hash, 12 digits, as A1111's `Lora hashes` give it
        self.files_read = 0  # adapter files `load` has read (a reused one is not read again)
        self.strengths: dict[str, float] = {}
        self._layers: dict[str, dict[str, list]] = {}  # name -> {component: the peft layers holding it}
        self._fused: dict[str, torch.Tensor] | None = None  # layer path -> base weight saved before fusing
        self._scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # see set_strengths
        # how generation runs the active adapters' LoRA Linear layers: see `use_lora_forward`
        self.lora_forward = checked_lora_forward(lora_forward)
        self._packs: Packs | None = None
        self._merged_runs: dict[int, MergedLinear] = {}  # id(layer) -> its MergedLinear, kept across adapter sets
        # on a CUDA GPU the UNet's denoising steps are replayed as CUDA graphs (`cuda_graphs=False`: never);
        # `compile_unet`: the UNet's forward also goes through torch.compile (see `UNetGraphs`); with
        # `background_compile`, compiled on a worker thread while the first pictures are drawn uncompiled
        self._background = BackgroundCompiles(self.device) if background_compile else None
        capture = cuda_graphs and self.device.type == "cuda"
        graphed = capture or compile_unet
        self._graphs = (
            UNetGraphs(self.pipe.unet, capture=capture, compiled=compile_unet, background=self._background)
            if graphed
            else _NoGraphs()
        )
        # with the UNet compiled, the VAE's decoder (once a picture) is compiled too: see `DecoderCompile`
        self._decoder = DecoderCompile(self.pipe.vae.decoder, compiled=compile_unet, background=self._background)
        # and each text encoder's forward too (launch-bound: SD 1.5's took 12.7 ms for a prompt and its negative
        # prompt on an H100 eagerly, benchmarks/results/h100_gen_profile.json)
        self._text_graphs = [
            EncoderGraphs(getattr(self.pipe, name))
            for name in ("text_encoder", "text_encoder_2")
            if capture and getattr(self.pipe, name, None) is not None
        ]
        # on a CUDA GPU the UNet and the VAE hold their convolution weights channels-last (`channels_last=False`:
        # never): cuDNN's convolutions then read and write that layout directly instead of converting every
        # activation to it and back (a quarter of an SD 1.5 UNet call's GPU time on an H100:
        # benchmarks/results/h100_gen_profile.json)
        if channels_last if channels_last is not None else self.device.type == "cuda":
            for component in ("unet", "vae"):
                getattr(self.pipe, component).to(memory_format=torch.channels_last)
        # SDXL's VAE overflows in fp16 (its config says `force_upcast`), so diffusers' SDXL pipeline converts an
        # fp16 VAE to fp32 for every picture, decodes in fp32 and converts it back. Where the device has bf16
        # (fp32's range, half its bytes), the VAE is held in bf16 instead, as ComfyUI runs it (`vae_bf16=False`:
        # diffusers' way; True: bf16 whatever the model)
        if vae_bf16 if vae_bf16 is not None else self._vae_overflows_in_fp16(dtype):
            hold_vae_in_bf16(self.pipe.vae)

    def _vae_overflows_in_fp16(self, dtype: torch.dtype) -> bool:
        """Whether diffusers would decode this model's pictures by upcasting its fp16 VAE to fp32 (SDXL), on a
        device with bf16."""
        upcast = dtype == torch.float16 and bool(getattr(self.pipe.vae.config, "force_upcast", False))
        has_bf16 = self.device.type != "cuda" or torch.cuda.is_bf16_supported()
        return upcast and has_bf16 and self.family.pipeline_class == "StableDiffusionXLPipeline"

    @property
    def native_size(self) -> int:
        return native_size(self.pipe)

    # -- attaching ---------------------------------------------------------------------------------------------
    def read(self, path: Path) -> Lora:
        """Read an adapter file of any supported layout against this base model (errors name file and reason)."""
        tensors, metadata = read_safetensors(Path(path))
        return read_lora(tensors, metadata, self._shapes, source=str(path), base_family=self.family.name)

    def add(self, lora: Lora, name: str) -> str:
        """Attach in-memory LoRA weights under `name`, inactive until a strength is set.

        Trap: the name must be new; `load` is the one that reuses or replaces by name.
        """
        if name in self.adapters:
            raise UserError(f"an adapter named {name!r} is already loaded; unload it first or choose another name")
        if not lora:
            raise UserError(f"adapter {name!r} has no LoRA weights to attach")
        self._require_unfused("attach an adapter")
        self._evict(keep=len(self.adapters) + 1 - self.max_loaded)
        parts = split_components(lora)
        with warnings.catch_warnings():  # peft warns on every adapter after the first; several is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            layers = {
                component: install(getattr(self.pipe, component), modules, name)
                for component, modules in parts.items()
            }
        self.adapters[name] = sorted(parts)
        self._layers[name] = layers
        self._changed()
        self.set_strengths(self.strengths)
        return name

    def load(self, path: Path, name: str | None = None) -> str:
        """Attach an adapter file (name: the file's stem); the same unchanged file under the same name is reused."""
        path = Path(path)
        name = name or path.stem
        stat = path.stat() if path.is_file() else None
        source = (str(path.resolve()), stat.st_size, stat.st_mtime_ns) if stat else None
        if name in self.adapters:
            if self._sources.get(name) == source:
                self.adapters.move_to_end(name)
                return name
            self.unload(name)
        lora = self.read(path)
        self.files_read += 1
        self.add(lora, name)
        self._sources[name] = source
        self.hashes[name] = file_hash(path)[:12]
        return name

    def unload(self, name: str) -> None:
        """Remove an adapter's layers from the model entirely (its strength is dropped too)."""
        self._require_unfused("unload an adapter")
        for component in self.adapters.pop(name):
            _delete_adapter(getattr(self.pipe, component), name)
        self._layers.pop(name, None)
        self._sources.pop(name, None)
        self.hashes.pop(name, None)
        self.strengths.pop(name, None)
        self._changed()

    def _evict(self, keep: int) -> None:
        """Unload least-recently-used adapters, never an active one, until at most max_loaded would remain."""
        for name in list(self.adapters):
            if keep <= 0:
                return
            if name not in self.strengths:
                self.unload(name)
                keep -= 1

    # -- strengths -----------------------------------------------------------------------------------------------
    def set_strengths(self, strengths: dict[str, float]) -> None:
        """Activate exactly the adapters in `strengths`, each at its strength; all others off. No reload.

        When the same adapters stay active, only their strengths change: each layer's LoRA scale is a number on
        the model's device that is overwritten in place (one copy per adapter), so a captured generation graph
        stays valid. Otherwise every peft layer of the loaded adapters is given the active set and switched on, as
        diffusers' `set_adapters` does, or switched off; the layers are the ones `add` recorded (no walk over the
        model's modules), and a layer already in that state is left as it is."""
        unknown = set(strengths) - set(self.adapters)
        if unknown:
            raise UserError(f"adapter(s) {sorted(unknown)} are not loaded; loaded: {sorted(self.adapters)}")
        if self._fused is not None and strengths:
            raise UserError("the pipeline has adapters fused into its weights; unfuse() before changing strengths")
        for name in strengths:
            self.adapters.move_to_end(name)
        if self._scales is not None and list(strengths) == list(self.strengths):
            for name, strength in strengths.items():
                values, bases = self._scales[name]
                torch.mul(bases, float(strength), out=values)
            if self._packs is not None:
                self._packs.refresh()
            self.strengths = dict(strengths)
            return
        for component in self.family.components:
            layers = {id(layer): layer for parts in self._layers.values() for layer in parts.get(component, ())}
            names = [n for n in strengths if component in self.adapters[n]]
            for layer in layers.values():  # peft's own switches, each used only where the layer is not yet so
                if names and layer.active_adapters != names:
                    layer.set_adapter(names)
                if layer.disable_adapters == bool(names):
                    layer.enable_adapters(bool(names))
        self.strengths = dict(strengths)
        self._scales = self._scale_slots(strengths)
        if self._packs is not None:
            self._packs.remove()
        active = {name: self._adapter_layers(name) for name in strengths}
        if self.lora_forward != "peft" and strengths:
            merged = self.lora_forward in ("merged", "auto")
            budget = None if self.lora_forward == "merged" else spare_memory(self.device) // 4
            self._packs = Packs(active, self._scales, merged=merged, budget=budget, runs=self._merged_runs)
        else:
            self._packs = None
        self._drop_graphs()  # another set of adapters runs: what a graph recorded no longer applies

    def _drop_graphs(self) -> None:
        """Drop every captured generation graph (the UNet's and the text encoders'): they read the old layers."""
        self._graphs.clear()
        for graphs in self._text_graphs:
            graphs.clear()

    @property
    def lora_forward_now(self) -> str | None:
        """How the active adapters' LoRA Linear layers run now: "merged", "packed", "peft", or None (none active)."""
        if not self.strengths:
            return None
        return self._packs.mode if self._packs is not None and self._packs.layers else "peft"

    def use_lora_forward(self, mode: str) -> None:
        """How generation runs the active adapters' LoRA Linear layers, from now on (results equal up to rounding):

        - "merged": each layer computes with its own copy of the base weight plus every active adapter's delta at
          its strength (`MergedLinear`), as cheap as the base model; a strength change rewrites the copies in
          place (a handful of batched products), the base weights are never touched. Costs one copy of the
          adapted layers' weights in memory (SD 1.5's attention layers: about 0.2 GB in fp16).
        - "packed": every active adapter's LoRA in two extra products per layer (`PackedLinear`); no copy.
        - "peft": peft's own forward, adapter by adapter.
        - "auto" (the default): "merged" when the copies take at most a quarter of the device's free memory,
          else "packed".
        DoRA and convolution layers always run through peft's forward."""
        self.lora_forward = checked_lora_forward(mode)
        strengths = self.strengths
        self._changed()
        self.set_strengths(strengths)

    @property
    def compile_unet(self) -> bool:
        """Whether the UNet's denoising call is asked to run through torch.compile (see `use_compile`); where
        compiling failed (`compile_failed` says why) it runs uncompiled all the same."""
        return isinstance(self._graphs, UNetGraphs) and self._graphs.asked

    @property
    def compile_failed(self) -> str:
        """Why torch.compile was given up for this studio's UNet, or "" (generation then runs uncompiled)."""
        unet = self._graphs.compile_failed if isinstance(self._graphs, UNetGraphs) else ""
        return unet or self._decoder.compile_failed

    def use_compile(self, on: bool) -> None:
        """Draw through a torch.compile'd UNet (and VAE decoder) from the next picture on (True), or uncompiled
        (False), without reloading anything: as `Studio(compile_unet=...)` at the start. The first picture at each
        size after turning it on compiles (or reads the compile cache); turning it off and on again compiles
        nothing new. Once compiling has failed, turning it on again draws uncompiled without trying again."""
        self._decoder.use_compile(on)
        if isinstance(self._graphs, UNetGraphs):
            self._graphs.use_compile(on)
        elif on:  # no CUDA graphs here (the CPU, or cuda_graphs=False): the UNet runs compiled without a graph
            self._graphs = UNetGraphs(self.pipe.unet, capture=False, compiled=True, background=self._background)

    @property
    def compiling(self) -> bool:
        """Whether a background compile (`background_compile`) is running or waiting for the next picture to end;
        pictures drawn meanwhile are uncompiled."""
        return self._background is not None and self._background.busy

    def stop_compiling(self) -> None:
        """Start no more background compiles (the studio is being let go); one running finishes on its own, and
        until then no other studio captures a CUDA graph."""
        if self._background is not None:
            self._background.close(timeout=0)

    def wait_for_compile(self, timeout: float | None = None) -> bool:
        """Wait until the background compiles asked for so far are done (True) or `timeout` seconds have passed;
        the next picture then runs compiled. Without `background_compile`, True at once."""
        return self._background is None or self._background.wait(timeout)

    def _adapter_layers(self, name: str) -> list:
        """Adapter `name`'s peft layers, component by component, in the order of its scale slots."""
        return [layer for component in self.adapters[name] for layer in self._layers[name][component]]

    def _scale_slots(self, strengths: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each active adapter's LoRA scales gathered into one tensor per adapter on the model's device, every
        layer's scale a view into it: {name: (values, alpha / rank per layer)}."""
        slots = {}
        for name, strength in strengths.items():
            layers = self._adapter_layers(name)
            bases = torch.tensor([layer.lora_alpha[name] / layer.r[name] for layer in layers], device=self.device)
            values = bases * float(strength)
            for i, layer in enumerate(layers):
                layer.scaling[name] = values[i]
            slots[name] = (values, bases)
        return slots

    def _changed(self) -> None:
        """Adapters were attached, removed or replaced: the next strengths go through diffusers again, and any
        captured generation graph (which reads the old layers) is dropped."""
        self._scales = None
        if self._packs is not None:
            self._packs.remove()
            self._packs = None
        self._drop_graphs()

    # -- fuse / swap -----------------------------------------------------------------------------------------------
    def fuse(self, strengths: dict[str, float]) -> None:
        """Add the adapters' deltas at these strengths into the base weights and switch the LoRA layers off.

        Generation then costs what the base model costs. `unfuse` puts the saved base weights back, so the
        restoration is bit-for-bit (our own, not diffusers' `fuse_lora`/`unfuse_lora`, which subtract the delta
        again, so the restored weights can differ from the originals by rounding). Trap: while fused, strengths
        cannot change and adapters cannot be attached.
        """
        self._require_unfused("fuse again")
        self.set_strengths(dict(strengths))  # validates the names
        saved: dict[str, torch.Tensor] = {}
        for component in self.family.components:
            model = getattr(self.pipe, component)
            for name, strength in strengths.items():  # in turn, as peft applies them (DoRA rescales what came before)
                for path, layer in lora_layers(model, name):
                    weight = layer.base_layer.weight
                    key = f"{component}.{path}"
                    if key not in saved:
                        saved[key] = weight.detach().clone()
                    module = LoraModule(
                        down=layer.lora_A[name].weight,
                        up=layer.lora_B[name].weight,
                        alpha=layer.lora_alpha[name],
                        magnitude=magnitude_of(layer, name),
                    )
                    with torch.no_grad():
                        weight.copy_(module.applied(weight, strength, base=saved[key]).to(weight.dtype))
        self._fused = saved
        self._changed()
        self.set_strengths({})

    def unfuse(self) -> None:
        """Restore the exact base weights saved by `fuse` (bit-for-bit)."""
        if self._fused is None:
            return
        for key, original in self._fused.items():
            component, path = key.split(".", 1)
            layer = getattr(self.pipe, component).get_submodule(path)
            with torch.no_grad():
                layer.base_layer.weight.copy_(original)
        self._fused = None
        self._changed()

    def swap(self, name: str, lora: Lora) -> None:
        """Replace loaded adapter `name`'s weights in place with another of the same targets and ranks.

        No layer is added or removed, so this is a copy of the new tensors; the current strength is kept.
        """
        self._require_unfused("swap an adapter")
        if name not in self.adapters:
            raise UserError(f"adapter {name!r} is not loaded; load it before swapping its weights")
        layers = {
            f"{component}.{path}": layer
            for component in self.adapters[name]
            for path, layer in lora_layers(getattr(self.pipe, component), name)
        }
        if set(layers) != set(lora):
            raise UserError(f"cannot hot-swap {name!r}: the new adapter targets other layers; unload and load it")
        for key, module in lora.items():
            layer = layers[key]
            if layer.r[name] != module.rank:
                raise UserError(f"cannot hot-swap {name!r}: rank {module.rank} at {key}, loaded rank {layer.r[name]}")
            if (magnitude_of(layer, name) is None) != (module.magnitude is None):
                raise UserError(f"cannot hot-swap {name!r}: only one of the two is DoRA; unload it, then load")
        with torch.no_grad():
            for key, module in lora.items():
                layer = layers[key]
                layer.lora_A[name].weight.copy_(module.down)
                layer.lora_B[name].weight.copy_(module.up)
                layer.lora_alpha[name] = module.alpha
                if module.magnitude is not None:
                    magnitude_of(layer, name).copy_(module.magnitude)
        self._sources.pop(name, None)
        self.hashes.pop(name, None)  # no file holds these weights
        self._changed()
        self.set_strengths(self.strengths)  # recomputes each layer's scaling from the new alphas

    def _require_unfused(self, what: str) -> None:
        if self._fused is not None:
            raise UserError(f"cannot {what} while adapters are fused into the weights; unfuse() first")

    # -- pictures ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int = 0,
        sampling_steps: int = 20,
        guidance: float | None = None,
        guidance_rescale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        strengths: dict[str, float] | None = None,
        num_images: int = 1,
        after_step: Callable[[int, int], bool] | None = None,
    ) -> list[Image.Image]:
        """Images for one prompt; the same seed and settings give the same picture on the same machine.

        Picture i of `num_images` is drawn from seed `seed + i`, each from its own generator (A1111's batch rule), so
        every picture can be made again alone from its own seed. Guidance and guidance rescale default to the
        model's recommended values (`self.defaults`), width and height to its native size (at most `MAX_SIZE_FACTOR`
        times it); `strengths`, when given, is applied first (`set_strengths`), else the current strengths stay.
        `after_step(step, steps)` is called after every denoising step (steps counted from 1); when it returns True
        the steps left are skipped and `Interrupted` is raised (no half-made picture is returned).
        """
        width, height = width or self.native_size, height or self.native_size
        step = math.lcm(8, self.pipe.vae_scale_factor)  # diffusers' pipelines take multiples of 8 only
        largest = MAX_SIZE_FACTOR * self.native_size
        for field, value in (("width", width), ("height", height)):
            if value % step or value <= 0:
                raise UserError(f"{field} must be a positive multiple of {step}, got {value}")
            if value > largest:
                raise UserError(
                    f"{field} {value} is more than {MAX_SIZE_FACTOR}x the model's native {self.native_size} px; "
                    f"pictures far above the size a model was trained at repeat their subject and take long; use "
                    f"at most {largest}"
                )
        if sampling_steps < 1:
            raise UserError(f"sampling steps must be at least 1, got {sampling_steps}")
        if guidance is not None and not guidance >= 0:  # NaN too
            raise UserError(
                f"guidance must be 0 or more, got {guidance:g}: 1 and below draw without the negative prompt, "
                f"{self.defaults['guidance']:g} is this model's usual"
            )
        if num_images < 1:
            raise UserError(f"the number of pictures must be at least 1, got {num_images}")
        if strengths is not None:
            self.set_strengths(strengths)
        generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(num_images)]
        stopped = []
        if self._background is not None:
            self._background.picture_starts()

        def on_step_end(pipe, step, timestep, tensors):
            if after_step is not None and after_step(step + 1, sampling_steps) and not stopped:
                pipe._interrupt = True  # diffusers' own flag: the loop skips every step left
                stopped.append(step + 1)
            return tensors

        drawing = _TRACING if self._background is not None else contextlib.nullcontext()
        try:
            with drawing:
                images = self.pipe(
                    prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=sampling_steps,
                    guidance_scale=self.defaults["guidance"] if guidance is None else guidance,
                    guidance_rescale=self.defaults["guidance_rescale"]
                    if guidance_rescale is None
                    else guidance_rescale,
                    width=width,
                    height=height,
                    generator=generators[0] if num_images == 1 else generators,
                    num_images_per_prompt=num_images,
                    callback_on_step_end=on_step_end,
                ).images
        finally:
            if self._background is not None:
                self._background.start()  # what this picture asked to have compiled, once it is drawn
        if stopped:
            raise Interrupted(f"stopped after step {stopped[0]} of {sampling_steps}")
        return images

    def count_tokens(self, text: str) -> tuple[int, int, str]:
        """(tokens in `text`, tokens the text encoder reads, the first words it does not read), start and end marks
        left out: CLIP reads 75 (77 with the marks), and a pipeline silently cuts a prompt there."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(text, truncation=False, verbose=False).input_ids[1:-1]
        limit = tokenizer.model_max_length - 2
        return len(ids), limit, tokenizer.decode(ids[limit : limit + 8]).strip()

    @property
    def sampler(self) -> str:
        """The sampler that draws now, by the name A1111 gives it (a `SCHEDULERS` name), else its class name."""
        name = type(self.pipe.scheduler).__name__
        return next((k for k, v in SCHEDULERS.items() if v == name), name)

    def set_scheduler(self, name: str | None) -> None:
        """Sample with another solver on the same noise schedule (a `SCHEDULERS` name); None: the model's own."""
        import diffusers

        if name is None:
            self.pipe.scheduler = self._model_scheduler
            return
        if name not in SCHEDULERS:
            raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        cls = getattr(diffusers, SCHEDULERS[name])
        self.pipe.scheduler = cls.from_config(self._model_scheduler.config)


class PackedLinear:
    """Generation's forward of one peft LoRA Linear: every active adapter's LoRA in two matrix products.

    peft runs each adapter apart, `base(x) + B(A(x)) * scale`: two products, a multiply and an add, each over the
    whole output. Here the active adapters' down matrices are stacked into one (sum of ranks x in) and their up
    matrices side by side into one (out x sum of ranks): `h = (x @ A_all.T) * scales` (a multiply over sum-of-ranks
    columns only), then the output gets `h @ B_all.T` added in place (one product that also adds). One adapter or
    several, each layer does the same work. The scales are a view into `Packs.values`, overwritten in place when a
    strength changes, so a captured CUDA graph reads the new strengths. The sum is the same as peft's up to
    rounding (the scale is applied before the up product instead of after). With gradients on, with the layer's
    adapters off or merged, or with any other argument, peft's forward runs.
    """

    def __init__(self, layer, down: torch.Tensor, up: torch.Tensor, scales: torch.Tensor):
        self.layer, self.down, self.up, self.scales = layer, down, up, scales

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        if args or kwargs or torch.is_grad_enabled() or layer.disable_adapters or layer.merged:
            return type(layer).forward(layer, x, *args, **kwargs)
        result = layer.base_layer(x)
        h = torch.nn.functional.linear(x.to(self.down.dtype), self.down) * self.scales
        if result.is_contiguous() and result.dtype == h.dtype:
            result.view(-1, result.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.up.t())
            return result
        return result + (h @ self.up.t()).to(result.dtype)


class MergedLinear:
    """Generation's forward of one peft LoRA Linear through a merged copy of its weight: one product, as the base.

    `weight` is `W + sum over active adapters of scale * B @ A`, kept by `Packs` (rewritten in place on a strength
    change, so a captured CUDA graph reads the new weight); the base layer's own weight is never changed. The
    result equals peft's up to rounding (the delta is rounded into the weight's dtype once, as fusing does). With
    gradients on, with the layer's adapters off or merged, or with any other argument, peft's forward runs."""

    def __init__(self, layer, weight: torch.Tensor):
        self.layer, self.weight = layer, weight

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        if args or kwargs or torch.is_grad_enabled() or layer.disable_adapters or layer.merged:
            return type(layer).forward(layer, x, *args, **kwargs)
        return torch.nn.functional.linear(x, self.weight, layer.base_layer.bias)


LORA_FORWARDS = ("auto", "merged", "packed", "peft")


def checked_lora_forward(mode: str) -> str:
    """`mode` when it is one of `LORA_FORWARDS`, else a message naming the choices."""
    if mode not in LORA_FORWARDS:
        raise UserError(f"lora_forward must be one of {', '.join(LORA_FORWARDS)}, got {mode!r}")
    return mode


def spare_memory(device: torch.device) -> int:
    """Bytes the device can still give: a CUDA card's free memory, the machine's available memory for the CPU,
    0 where it is not known (so "auto" packs rather than merges)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 0


class Packs:
    """The active adapters' LoRA Linear layers, each run by a `MergedLinear` or a `PackedLinear` while these
    adapters are active.

    `active` is {adapter: its layers, in the order of its scale slots}; `slots` is `Studio._scale_slots`' result.
    A layer is taken only where every active adapter on it is a plain LoRA (no DoRA, no dropout) on a Linear;
    any other layer (LoCon convolutions, DoRA) keeps peft's forward. Every layer's scales are views into one
    tensor, `values`, filled from the slots by one gather (`refresh`, after each strength change).

    `merged=True` gives each layer a merged weight (`MergedLinear`) unless the copies would take more than
    `budget` bytes (then `mode` says "packed"). A layer's `MergedLinear` is taken from `runs` where an earlier
    `Packs` made one (and stored there), only its weight replaced: a compiled UNet (`compile_unet`) checks that
    the objects it was compiled with are still there, so switching between sets of adapters reuses it instead of
    compiling again. Layers of the same shape and total rank are kept as one stack
    (their merged weights, up and down matrices, scales), so a refresh is a copy of the base weights and one
    batched product per shape, some tens of kernels for a whole UNet."""

    def __init__(
        self,
        active: dict[str, list],
        slots: dict[str, tuple[torch.Tensor, torch.Tensor]],
        merged: bool = False,
        budget: int | None = None,
        runs: dict | None = None,
    ):
        from peft.tuners.lora.layer import Linear as LoraLinear

        uses: dict[int, tuple] = {}  # id(layer) -> (layer, [(adapter, index in its slot)])
        for name, layers in active.items():
            for i, layer in enumerate(layers):
                uses.setdefault(id(layer), (layer, []))[1].append((name, i))
        names = list(slots)
        offsets, start = {}, 0
        for name in names:
            offsets[name], start = start, start + len(slots[name][0])
        self._slots = [slots[name][0] for name in names]
        self.layers: list = []
        self.groups: list[tuple] = []
        groups: dict[tuple, list] = {}  # (out, in, total rank, dtype) -> [(layer, [(adapter, slot index)])]
        for layer, on in uses.values():
            plain = type(layer) is LoraLinear and all(
                name not in getattr(layer, "lora_variant", {})
                and isinstance(layer.lora_dropout[name], torch.nn.Identity)
                for name, _ in on
            )
            if plain:
                weight = layer.base_layer.weight
                rank = sum(layer.r[name] for name, _ in on)
                groups.setdefault((*weight.shape, rank, weight.dtype), []).append((layer, on))
        merged = merged and all(type(layer.base_layer) is torch.nn.Linear for g in groups.values() for layer, _ in g)
        copies = sum(layer.base_layer.weight.nbytes for g in groups.values() for layer, _ in g)
        self.mode = "merged" if merged and (budget is None or copies <= budget) else "packed"
        self.merged_bytes = copies if self.mode == "merged" else 0
        if not groups:
            self.values = None
            return
        index = []
        for members in groups.values():  # group by group, layer by layer: each group's scales are one block
            for layer, on in members:
                for name, i in on:
                    index += [offsets[name] + i] * layer.r[name]
        layer, on = next(iter(groups.values()))[0]
        some = layer.lora_A[on[0][0]].weight  # the LoRA weights' dtype: `PackedLinear`'s products stay in it
        self.index = torch.tensor(index, device=some.device)
        self.values = torch.empty(len(index), device=some.device, dtype=some.dtype)
        first = 0
        for (out_f, in_f, rank, dtype), members in groups.items():
            n = len(members)
            scales = self.values[first : first + n * rank].view(n, rank)
            first += n * rank
            downs = [
                torch.cat([layer.lora_A[name].weight.detach() for name, _ in on], dim=0) for layer, on in members
            ]
            ups = [torch.cat([layer.lora_B[name].weight.detach() for name, _ in on], dim=1) for layer, on in members]
            if self.mode == "merged":
                stack = torch.empty((n, out_f, in_f), device=some.device, dtype=dtype)
                bases = [layer.base_layer.weight.detach() for layer, _ in members]
                up_stack, down_stack = torch.stack(ups).to(dtype), torch.stack(downs).to(dtype)
                self.groups.append((stack, list(stack.unbind(0)), bases, up_stack, down_stack, scales))
                for j, (layer, _) in enumerate(members):
                    run = (runs or {}).get(id(layer))
                    if run is None or run.layer is not layer:
                        run = MergedLinear(layer, stack[j])
                        if runs is not None:
                            runs[id(layer)] = run
                    run.weight = stack[j]
                    layer.forward = run
                    self.layers.append(layer)
            else:
                for j, (layer, _) in enumerate(members):
                    down, up = downs[j], ups[j].contiguous()
                    layer.forward = PackedLinear(layer, down, up, scales[j])
                    self.layers.append(layer)
        self.refresh()

    def refresh(self) -> None:
        """Copy every layer's scales from the adapters' slots (after a strength was written there); with merged
        weights, rewrite them: base weight, plus each adapter's up matrix scaled times its down matrix."""
        if self.values is None:
            return
        self.values.copy_(torch.cat(self._slots).index_select(0, self.index))
        for stack, views, bases, ups, downs, scales in self.groups:
            torch._foreach_copy_(views, bases)
            stack.baddbmm_(ups * scales.unsqueeze(1).to(ups.dtype), downs)

    def remove(self) -> None:
        """Give every layer peft's forward back (and drop the merged copies)."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers = []
        self.groups = []


class _NoGraphs:
    """Where there is no CUDA: nothing captured, nothing to drop."""

    def clear(self) -> None:
        pass


def captured(run) -> tuple:
    """`run()` recorded as a CUDA graph, after two calls on a side stream outside the graph (lazy initialisations
    happen there): (the graph, what the recorded call returned, which each replay overwrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    return graph, output


def hold_vae_in_bf16(vae: torch.nn.Module) -> None:
    """The VAE's weights in bf16, and latents of any dtype cast to bf16 as decoding starts (at `post_quant_conv`,
    else the decoder), so a pipeline that hands it fp16 latents decodes in bf16; the picture comes out in bf16."""
    vae.to(torch.bfloat16)
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    first.register_forward_pre_hook(lambda module, args: (args[0].to(torch.bfloat16), *args[1:]))


def _cloned(output):
    """A copy of a module's output (a tensor, a tuple or list of them, or a transformers ModelOutput), so that the
    next replay of the graph that wrote it does not change what the caller holds."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_cloned(v) for v in output)
    if isinstance(output, dict):  # a ModelOutput: its fields that are set, in order
        return type(output)(**{k: _cloned(v) for k, v in output.items()})
    return output


class EncoderGraphs:
    """A text encoder's forward during generation, captured once per call shape as a CUDA graph and replayed.

    Encoding a prompt is a few hundred small kernels, launched one by one eagerly; a replay launches them at
    once. The pipeline calls it as it calls the encoder: token ids, an attention mask or none, and flags such as
    `output_hidden_states`; the output is a copy of what the graph wrote, in the encoder's own output type. Any
    other call (gradients on, another argument, not on CUDA) runs the encoder as it is; where a capture fails, the
    encoder runs as it is from then on, with a warning. Weights and LoRA strengths are read in place; `clear` drops
    the graphs when the adapters change. While a background compile runs (`compiles_running`), nothing new is
    captured (the call runs as it is)."""

    FLAGS = ("output_hidden_states", "output_attentions", "return_dict")

    def __init__(self, encoder: torch.nn.Module, keep: int = 4):
        self.encoder, self.keep = encoder, keep
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.failed = ""
        self._forward = type(encoder).forward
        encoder.forward = self

    def clear(self) -> None:
        self.graphs.clear()

    def __call__(self, input_ids=None, attention_mask=None, *args, **kwargs):
        flags = {k: kwargs[k] for k in self.FLAGS if k in kwargs}
        if (
            args
            or set(kwargs) - set(flags)
            or not all(v is None or isinstance(v, bool) for v in flags.values())
            or not isinstance(input_ids, torch.Tensor)
            or input_ids.device.type != "cuda"
            or not (attention_mask is None or isinstance(attention_mask, torch.Tensor))
            or torch.is_grad_enabled()
            or self.failed
        ):
            return self._forward(self.encoder, input_ids, attention_mask, *args, **kwargs)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        key = tuple((k, None if v is None else (tuple(v.shape), v.dtype)) for k, v in inputs.items())
        key += tuple(sorted(flags.items()))
        if key not in self.graphs:
            if compiles_running():  # a capture now could fail on what a compile worker does at the same time
                return self._forward(self.encoder, input_ids, attention_mask, **kwargs)
            try:
                self.graphs[key] = self._capture(inputs, flags)
            except Exception as exc:  # an encoder that syncs or branches on its input: run it as it is
                self.failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"lora-studio: the text encoder runs without CUDA graphs ({self.failed})", stacklevel=2)
                return self._forward(self.encoder, input_ids, attention_mask, **kwargs)
            while len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static, output = self.graphs[key]
        for name, value in inputs.items():
            if value is not None:
                static[name].copy_(value)
        graph.replay()
        return _cloned(output)

    def _capture(self, inputs: dict, flags: dict) -> tuple:
        static = {k: None if v is None else v.clone() for k, v in inputs.items()}

        def run():
            return self._forward(self.encoder, static["input_ids"], static["attention_mask"], **flags)

        graph, output = captured(run)
        return graph, static, output


COMPILE_BACKEND = "inductor"  # torch.compile's backend for `compile_unet` (tests count compiles with their own)


def use_compile_cache() -> str:
    """Where torch.compile keeps what it compiled, so a later run (another process, after a reboot) reuses it
    instead of compiling again: TORCHINDUCTOR_CACHE_DIR when the person set it, else lora-studio's folder in the
    user's cache (`$XDG_CACHE_HOME` or ~/.cache), not inductor's own default under the system's temp folder."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(home, "lora-studio", "torchinductor"))


def compile_error(exc: Exception) -> str:
    """Why torch.compile failed, on one line: the exception's kind and message, less torch's advice on logging."""
    why = str(exc).split("\n\nSet TORCHDYNAMO_VERBOSE")[0]
    return " ".join(f"{type(exc).__name__}: {why}".split())


# Held by a picture being drawn while a studio compiles in the background, by anything else in the process that
# calls a model (`model_calls`), and by torch.fx's tracer (see `_lock_fx_tracing`): while the tracer runs, every
# nn.Module call in the process goes into it
_TRACING = threading.RLock()
_WORKERS: set[threading.Thread] = set()  # background compile workers alive in this process
_WORKERS_LOCK = threading.Lock()
_SWITCH_INTERVAL = sys.getswitchinterval()  # the interpreter's own, put back when no worker runs


def model_calls():
    """A context in which model calls are safe from a background compile's tracer (see `_lock_fx_tracing`): code
    that runs a model in a process where a studio may compile in the background (the app's data check and
    captioner) calls it inside `with model_calls():`."""
    return _TRACING


def compiles_running() -> bool:
    """Whether any studio's background compile worker is running in this process (no CUDA graph is captured then:
    a capture in one thread fails on what another thread does on the GPU at the same time)."""
    with _WORKERS_LOCK:
        return any(t.is_alive() for t in _WORKERS)


def _lock_fx_tracing() -> bool:
    """Make torch.fx's `Tracer.trace` hold `_TRACING` while it runs; False where this torch has no such method.

    While it traces (AOTAutograd's make_fx does, in a cold compile), `Tracer.trace` replaces `nn.Module.__call__`
    for the whole process, not only for its own thread: a module called meanwhile on another thread is taken into
    the trace and fails (NameError: module is not installed as a submodule), as the drawing thread's modules did
    while a compile ran beside it. A compile read from the compile cache traces nothing this way."""
    tracer = getattr(getattr(torch.fx, "_symbolic_trace", None), "Tracer", None)
    trace = getattr(tracer, "trace", None)
    if trace is None:
        return False
    if getattr(trace, "lora_studio_locked", False):
        return True

    @functools.wraps(trace)
    def locked(self, *args, **kwargs):
        with _TRACING:
            return trace(self, *args, **kwargs)

    locked.lora_studio_locked = True
    tracer.trace = locked
    return True


class BackgroundCompiles:
    """torch.compile's first calls run on a worker thread while pictures go on being drawn uncompiled.

    A part (the UNet's denoising call, the VAE's decoder) asks for a compile of one input shape (`request`, with
    example inputs) the first time it is called at that shape; the worker starts when the picture is finished
    (`start`), calls the compiled forward once with the examples (that call compiles, or reads the compile cache),
    and marks the shape ready. At the start of each picture (`picture_starts`), if no worker is running, every
    ready shape is handed to the parts, which draw that picture through the compiled code; a picture never
    switches halfway. So no picture waits for a compile: the first ones are drawn as fast as without compiling,
    the later ones compiled. While a picture is drawn, the worker's compile does not enter torch.fx's tracer, nor
    the other way round (`_lock_fx_tracing`); a compile from an empty cache traces for a few seconds, so a picture
    may wait that long.

    What a compile traced can go stale: attaching, removing or replacing adapters changes the UNet's layers. A part
    then `bump`s its version; shapes marked ready under an older version are asked for again. A compile that fails
    while the module is being changed is tried once more; one that fails again gives a warning and leaves the part
    uncompiled for good. One that runs out of memory is given up for now and asked for again at the next picture.
    While a worker runs, no CUDA graph is captured (`compiles_running`): the parts draw uncaptured instead.
    `close` stops the worker after what it is compiling (a studio that is let go)."""

    # the interpreter's thread switch interval while the worker runs: the drawing thread releases the GIL at most
    # torch operations and then waits up to this long for it (Python's default, 5 ms, made a picture of the
    # built-in model on the CPU several times slower while a compile ran)
    SWITCH_INTERVAL_S = 0.0001

    def __init__(self, device: torch.device):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # the worker thread's own could differ
        self.device = device
        self.versions: dict[str, int] = {}
        self.ready: set[tuple] = set()  # (part, key, version)
        self.usable: set[tuple] = set()  # (part, key): what the picture being drawn runs compiled
        self._asked: OrderedDict[tuple, tuple] = OrderedDict()  # (part, key) -> (fn, example inputs, on_failure)
        self._running: tuple | None = None  # the (part, key) being compiled
        self._retried: set[tuple] = set()  # (part, key, version) tried again after a failure
        self._failed: set[str] = set()  # parts given up
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether this studio's worker is running or has compiles waiting for it."""
        with self._lock:
            return self._thread is not None or bool(self._asked)

    def bump(self, part: str) -> None:
        """`part`'s compiled code may no longer match the module: shapes ready before must be compiled again (the
        worker finds them in the compile cache when they are what they were)."""
        with self._lock:
            self.versions[part] = self.versions.get(part, 0) + 1
            self.usable = {u for u in self.usable if u[0] != part}

    def request(self, part: str, key: tuple, fn: Callable, inputs: tuple, on_failure: Callable[[Exception], None]):
        """Ask for `fn(*inputs)` (the compiled forward) to be run once on the worker, unless `key` is ready, asked
        for or being compiled."""
        with self._lock:
            if (
                self._closed
                or part in self._failed
                or (part, key, self.versions.get(part, 0)) in self.ready
                or (part, key) in self._asked
                or (part, key) == self._running
            ):
                return
            self._asked[(part, key)] = (fn, tuple(_cloned(v) for v in inputs), on_failure)

    def start(self) -> None:
        """Start the worker on what was asked for (a picture has just been drawn)."""
        with self._lock:
            if not self._asked or self._thread is not None or self._closed:
                return
            if _lock_fx_tracing():
                self._thread = threading.Thread(target=self._work, name="lora-studio compile", daemon=True)
                with _WORKERS_LOCK:
                    _WORKERS.add(self._thread)
                    sys.setswitchinterval(min(_SWITCH_INTERVAL, self.SWITCH_INTERVAL_S))
                self._thread.start()
                return
            self._thread = threading.current_thread()  # no way to keep the tracer off the drawing thread: compile
        self._work()  # here and now

    def picture_starts(self) -> None:
        """Decide what the coming picture runs compiled: every shape ready at the parts' current versions, while no
        worker runs (else nothing: a compiled shape's CUDA graph could not be captured now)."""
        running = compiles_running()
        with self._lock:
            if running or self._thread is not None:
                self.usable = set()
            else:
                self.usable = {(p, k) for p, k, v in self.ready if v == self.versions.get(p, 0)}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish what was asked so far (True), or `timeout` seconds."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return not self.busy

    def close(self, timeout: float | None = None) -> bool:
        """Ask for nothing more, drop what waits, and wait for what is being compiled to finish (True), or
        `timeout` seconds."""
        with self._lock:
            self._closed = True
            self._asked.clear()
        return self.wait(timeout)

    def _work(self) -> None:
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        try:
            while True:
                with self._lock:
                    if not self._asked or self._closed:
                        self._asked.clear()
                        self._thread = self._running = None  # under the lock: `start` may begin a new worker
                        return
                    (part, key), (fn, inputs, on_failure) = self._asked.popitem(last=False)
                    self._running, version = (part, key), self.versions.get(part, 0)
                    if part in self._failed:
                        continue
                try:
                    with torch.no_grad(), device:
                        fn(*inputs)
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                except torch.cuda.OutOfMemoryError:
                    continue  # not the compiler's fault: asked for again by the next picture at this shape
                except Exception as exc:
                    with self._lock:
                        if self._closed:
                            continue
                        retry = (part, key, version) not in self._retried
                        if retry:  # perhaps the module was being changed under the trace: once more, as it is now
                            self._retried.add((part, key, version))
                            self._asked[(part, key)] = (fn, inputs, on_failure)
                            continue
                        self._failed.add(part)
                    on_failure(exc)
                    continue
                with self._lock:
                    if version == self.versions.get(part, 0):
                        self.ready.add((part, key, version))
        finally:
            with self._lock:
                self._thread = self._running = None
            with _WORKERS_LOCK:
                _WORKERS.discard(threading.current_thread())
                if not any(t.is_alive() and t is not threading.current_thread() for t in _WORKERS):
                    sys.setswitchinterval(_SWITCH_INTERVAL)


class DecoderCompile:
    """The VAE decoder's forward through `torch.compile` (static shapes) while compiling is on, else as it is.

    A picture's decode is one call of some large convolutions with GroupNorm and SiLU between them; compiled, the
    norms and activations are fused into fewer passes over the activations. Installed on the decoder instance, so
    `vae.decode` calls it as it calls the decoder; forward hooks on the decoder (`hold_vae_in_bf16`) still run.
    With `background`, a shape is compiled on its worker thread and decoded compiled once ready (see
    `BackgroundCompiles`). Where compiling fails, decoding goes on uncompiled, with a warning."""

    PART = "vae decoder"

    def __init__(
        self, decoder: torch.nn.Module, compiled: bool = False, background: BackgroundCompiles | None = None
    ):
        self._plain = decoder.forward  # the bound method of the decoder's class
        self._compiled = None  # the torch.compile'd forward, once asked for
        self.on = False
        self.compile_failed = ""
        self.background = background
        self.use_compile(compiled)
        decoder.forward = self

    def use_compile(self, on: bool) -> None:
        self.on = on
        if on and self._compiled is None:
            use_compile_cache()
            self._compiled = torch.compile(self._plain, backend=COMPILE_BACKEND, dynamic=False)

    def _failed(self, exc: Exception) -> None:
        self.compile_failed = compile_error(exc)
        warnings.warn(f"lora-studio: the VAE decodes without torch.compile ({self.compile_failed})", stacklevel=4)

    def __call__(self, *args, **kwargs):
        if not self.on or self.compile_failed or torch.is_grad_enabled():
            return self._plain(*args, **kwargs)
        if self.background is not None:
            key = tuple((tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v for v in args)
            if kwargs or (self.PART, key) not in self.background.usable:
                if not kwargs:
                    self.background.request(self.PART, key, self._compiled, args, self._failed)
                return self._plain(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:
            self._failed(exc)
            return self._plain(*args, **kwargs)


class UNetGraphs:
    """The UNet's forward during generation, captured once per shape as a CUDA graph and replayed every step, and
    with `compiled=True` first put through torch.compile.

    A denoising step at common sizes is bound by launching some thousands of small kernels, not by the GPU's
    arithmetic; a replayed graph launches them all at once. Installed on the UNet instance, so the diffusers
    pipeline calls it as it calls the UNet. What a graph reads (the weights, each LoRA's scale or merged weight) is
    read in place, so strengths change without a new capture or compile; attaching, removing, replacing or fusing
    adapters drops the graphs (`clear`). Training (gradients on) and any call it does not recognise run the UNet as
    it is.

    `compiled`: the plain denoising call goes through `torch.compile` (whole UNet, static shapes) before it is
    captured (`capture=False`, as on the CPU: it is run as compiled). The first picture at a size compiles (about
    a minute for SD 1.5 on an H100 with an empty cache); what is compiled is kept on disk (`use_compile_cache`) for
    the next run. With `background`, that compile runs on a worker thread instead and pictures go on uncompiled
    until it is ready (see `BackgroundCompiles`). Where compiling fails, generation goes on without it, with a
    warning."""

    PART = "unet"

    def __init__(
        self,
        unet: torch.nn.Module,
        keep: int = 4,
        capture: bool = True,
        compiled: bool = False,
        background: BackgroundCompiles | None = None,
    ):
        self.unet, self.keep, self.capture, self.background = unet, keep, capture, background
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.failed = ""  # why capture was given up, if it was
        self.compile_failed = ""  # why torch.compile was given up, if it was
        self._forward = type(unet).forward
        self._run = self._plain
        self._compiled = None  # the torch.compile'd forward, once asked for: kept, so turning it on again reuses it
        self.asked = False  # whether compiling is asked for (it may have failed: `compile_failed`)
        if compiled:
            self.use_compile(True)
        unet.forward = self  # the instance's forward: nn.Module.__call__ finds it first

    def clear(self) -> None:
        self.graphs.clear()
        if self.background is not None:
            self.background.bump(self.PART)

    @property
    def compiled(self) -> bool:
        return self._run != self._plain  # bound methods: a new object at each access, equal when the same

    def use_compile(self, on: bool) -> None:
        """From the next call on, run the UNet through torch.compile (True) or as it is (False). The graphs
        captured through the other forward are dropped; what was compiled is kept for a later `use_compile(True)`.
        After a failed compile (`compile_failed`) it stays uncompiled: each try would compile and fail again. With
        `background` the compiled forward is used shape by shape, once the worker has compiled it."""
        self.asked = on
        if on and self._compiled is None:
            use_compile_cache()
            self._compiled = torch.compile(self._plain, backend=COMPILE_BACKEND, dynamic=False)
        if self.background is not None:
            return
        run = self._compiled if on and not self.compile_failed else self._plain
        if run != self._run:
            self._run = run
            self.graphs.clear()

    def _eager(self, *args, **kwargs):
        return self._forward(self.unet, *args, **kwargs)

    def _plain(self, sample, timestep, encoder_hidden_states, added):
        return self._forward(
            self.unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]

    def _compile_failed(self, exc: Exception) -> None:
        self.compile_failed = compile_error(exc)
        warnings.warn(f"lora-studio: generation runs without torch.compile ({self.compile_failed})", stacklevel=4)
        self._run = self._plain

    def _run_or_uncompiled(self, call, compiled: bool):
        """`call()`; where torch.compile fails in it, warn and call again with the UNet uncompiled from now on."""
        try:
            return call(self._compiled if compiled else self._run)
        except Exception as exc:
            if not (compiled or self.compiled):
                raise
            self._compile_failed(exc)
            return call(self._plain)

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        plain = not args and set(kwargs) <= {
            "timestep_cond",
            "cross_attention_kwargs",
            "added_cond_kwargs",
            "return_dict",
        }
        if (
            not plain
            or torch.is_grad_enabled()
            or kwargs.get("timestep_cond") is not None
            or kwargs.get("cross_attention_kwargs")
            or kwargs.get("return_dict", True)
        ):
            return self._eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        timestep = torch.as_tensor(timestep, device=sample.device)  # a number would be compiled in as a constant
        added = kwargs.get("added_cond_kwargs") or {}
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states, **added}
        key = tuple((k, tuple(v.shape), v.stride(), v.dtype) for k, v in inputs.items())
        # with a background compiler: this call runs compiled when its shape was ready as the picture started, else
        # uncompiled, and asks for the compile (`compiled` False: `self._run` decides, as without one)
        compiled = False
        background = self.background
        if background is not None and self.asked and not self.compile_failed:
            compiled = (self.PART, key) in background.usable
            if not compiled:
                example = (sample, timestep, encoder_hidden_states, added or None)
                background.request(self.PART, key, self._compiled, example, self._compile_failed)

        def uncaptured():  # the forward read at each call: after a failed compile it is the plain one
            states = encoder_hidden_states
            return (self._run_or_uncompiled(lambda run: run(sample, timestep, states, added or None), compiled),)

        if self.failed or not self.capture or sample.device.type != "cuda":
            return uncaptured()
        graph_key = (compiled, *key)
        if graph_key not in self.graphs:
            if compiles_running():  # a capture now could fail on what a compile worker does at the same time
                return uncaptured()
            try:
                self.graphs[graph_key] = self._run_or_uncompiled(
                    lambda run: self._capture(run, inputs, list(added)), compiled
                )
            except Exception as exc:  # an exotic model or driver: generate eagerly from now on
                self.failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"lora-studio: generation runs without CUDA graphs ({self.failed})", stacklevel=2)
                return uncaptured()
            while len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(graph_key)
        graph, static, output = self.graphs[graph_key]
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return (output.clone(),)

    def _capture(self, forward, inputs: dict, added_names: list) -> tuple:
        static = {k: v.clone() for k, v in inputs.items()}

        def run():
            added = {k: static[k] for k in added_names} or None
            return forward(static["sample"], static["timestep"], static["encoder_hidden_states"], added)

        graph, output = captured(run)
        return graph, static, output
