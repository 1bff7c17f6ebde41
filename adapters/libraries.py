"""Import, in the calling thread, every diffusers / transformers / peft name the app reaches for later.

diffusers and transformers load their classes lazily on first use, and that first use is not thread-safe: two
threads of the page asking at once (the Generate tab loading an SDXL pipeline while the Train tab plans a run)
get "cannot import name 'AutoencoderKL' from 'diffusers'" in one of them. The page calls `import_all()` once
before it serves, so every later import finds the classes already loaded.
"""

from __future__ import annotations

import importlib

from adapters.families import FAMILIES

# Names resolved by attribute on the package (lazily) somewhere in the code or in diffusers' own loaders.
DIFFUSERS = (
    "AutoencoderKL",
    "DDPMScheduler",
    "DiffusionPipeline",
    "UNet2DConditionModel",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDIMScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
)
TRANSFORMERS = (
    "AutoModel",
    "AutoModelForImageTextToText",
    "AutoProcessor",
    "CLIPModel",
    "CLIPProcessor",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTokenizer",
    "CLIPTokenizerFast",
)
MODULES = (
    "diffusers.loaders.peft",
    "diffusers.loaders.single_file_utils",
    "diffusers.models.resnet",
    "diffusers.models.transformers.transformer_2d",
    "diffusers.optimization",
    "diffusers.training_utils",
    "peft",
    "peft.tuners.lora",
    "peft.tuners.lora.layer",
    "peft.utils",
)


def import_all() -> None:
    """Load every library class the app uses, now, in this thread (see the module doc)."""
    import diffusers
    import transformers

    for name in {*DIFFUSERS, *(family.pipeline_class for family in FAMILIES)}:
        getattr(diffusers, name)
    for name in TRANSFORMERS:
        getattr(transformers, name)
    for module in MODULES:
        importlib.import_module(module)
