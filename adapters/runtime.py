"""Generation with adapters: a base pipeline loaded once, adapters attached by name, strengths changed in place.

    studio = Studio("builtin")
    studio.load("style.safetensors", name="style")
    images = studio.generate("a red circle", seed=7, scales={"style": 0.8})
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from PIL import Image

from adapters.base import load_pipeline, pick_device
from adapters.errors import UserError
from adapters.formats import from_kohya, read_safetensors
from adapters.lora import Lora, install, split_components

COMPONENTS = ("unet", "text_encoder")


def module_names(model: torch.nn.Module) -> list[str]:
    """Paths of the layers LoRA can sit on (Linear and Conv2d)."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` -> (file, strength); the strength defaults to 1 and a colon in a path is kept."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


class Studio:
    """One base pipeline and the adapters attached to it; nothing here reloads the base model."""

    def __init__(self, base_model: str = "builtin", *, device=None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device else pick_device()
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.base_model = base_model
        self.pipe = load_pipeline(base_model, device=self.device, dtype=dtype)
        self._names = {c: module_names(getattr(self.pipe, c)) for c in COMPONENTS}
        self.adapters: dict[str, list[str]] = {}  # adapter name -> components it has weights for

    @property
    def native_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def read(self, path: Path) -> Lora:
        """Read an adapter file against this base model (errors name the file and the reason)."""
        tensors, _ = read_safetensors(Path(path))
        return from_kohya(tensors, self._names, source=str(path))

    def add(self, lora: Lora, name: str) -> str:
        """Attach in-memory LoRA weights under `name` (inactive until a strength is set)."""
        if name in self.adapters:
            raise UserError(f"an adapter named {name!r} is already loaded; unload it first or choose another name")
        parts = split_components(lora)
        with warnings.catch_warnings():  # peft warns on every adapter after the first; several is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for component, modules in parts.items():
                install(getattr(self.pipe, component), modules, name)
        self.adapters[name] = sorted(parts)
        self.set_scales({})
        return name

    def load(self, path: Path, name: str | None = None) -> str:
        """Read and attach an adapter file; the name defaults to the file's stem."""
        return self.add(self.read(path), name or Path(path).stem)

    def unload(self, name: str) -> None:
        """Remove an adapter's layers from the model entirely."""
        for component in self.adapters.pop(name):
            getattr(self.pipe, component).delete_adapters(name)

    def set_scales(self, scales: dict[str, float]) -> None:
        """Activate exactly the adapters in `scales`, each at its strength; all others off. No reload."""
        unknown = set(scales) - set(self.adapters)
        if unknown:
            raise UserError(f"adapter(s) {sorted(unknown)} are not loaded; loaded: {sorted(self.adapters)}")
        for component in COMPONENTS:
            model = getattr(self.pipe, component)
            names = [n for n in scales if component in self.adapters[n]]
            has_any = any(component in parts for parts in self.adapters.values())
            if not has_any:
                continue
            weights = [float(scales[n]) for n in names]
            if component == "unet":
                if names:
                    model.enable_adapters()
                    model.set_adapters(names, weights)
                else:
                    model.disable_adapters()
            elif names:
                enable_lora_for_text_encoder(model)
                set_adapters_for_text_encoder(names, model, weights)
            else:
                disable_lora_for_text_encoder(model)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = 20,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        scales: dict[str, float] | None = None,
        num_images: int = 1,
    ) -> list[Image.Image]:
        """Images for one prompt; the same seed and settings give the same picture on the same machine."""
        width, height = width or self.native_size, height or self.native_size
        for field, value in (("width", width), ("height", height)):
            if value % self.pipe.vae_scale_factor or value <= 0:
                raise UserError(f"{field} must be a positive multiple of {self.pipe.vae_scale_factor}, got {value}")
        if steps < 1:
            raise UserError(f"steps must be at least 1, got {steps}")
        if scales is not None:
            self.set_scales(scales)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return self.pipe(
            prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=generator,
            num_images_per_prompt=num_images,
        ).images
