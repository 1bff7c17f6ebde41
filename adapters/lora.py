"""LoRA on a model through peft: choose the target layers, attach, read the weights back, install loaded weights.

The in-memory form every other module speaks is `Lora`: {"<component>.<module path>": LoraModule}, where the
component is `unet`, `text_encoder` or `text_encoder_2` and the path is the module's name in that component.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict

from adapters.errors import UserError

ATTENTION_CHOICES = ("self", "cross", "both")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraModule:
    down: torch.Tensor  # lora_down / lora_A: [rank, in] (or [rank, in, kh, kw] for a conv)
    up: torch.Tensor  # lora_up / lora_B: [out, rank] (or [out, rank, 1, 1])
    alpha: float  # the delta is up @ down * alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The full weight change this module adds at strength 1 (for tests and merging)."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return (up @ down) * (self.alpha / self.rank)


Lora = dict[str, LoraModule]


def common_rank_alpha(modules: dict[str, LoraModule]) -> tuple[int, float]:
    """The most common rank and alpha among `modules`: a peft config's defaults, the rest go into its patterns."""
    ranks = Counter(m.rank for m in modules.values())
    alphas = Counter(m.alpha for m in modules.values())
    return ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]


def attention_targets(unet: torch.nn.Module, attention: str = "both") -> list[str]:
    """Module paths of to_q/to_k/to_v/to_out.0 in attn1 (self), attn2 (cross) or both, in every transformer block."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    attns = {"self": ("attn1",), "cross": ("attn2",), "both": ("attn1", "attn2")}[attention]
    pattern = re.compile(r"(^|\.)transformer_blocks\.\d+\.(" + "|".join(attns) + r")\.(to_q|to_k|to_v|to_out\.0)$")
    return [
        name
        for name, module in unet.named_modules()
        if pattern.search(name) and isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
    ]


# kohya sd-scripts' text-encoder targets: the Linear layers inside these CLIP blocks (q/k/v/out_proj, fc1/fc2)
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPMLP")


def text_encoder_targets(encoder: torch.nn.Module) -> list[str]:
    """Module paths of every CLIP encoder layer's attention projections (q_proj, k_proj, v_proj, out_proj) and MLP
    (fc1, fc2): the Linear children of its CLIPAttention and CLIPMLP blocks, as kohya sd-scripts targets them."""
    return [
        f"{name}.{child}"
        for name, block in encoder.named_modules()
        if type(block).__name__ in TEXT_ENCODER_BLOCKS
        for child, module in block.named_children()
        if isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
    ]


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{path: (in, out)} of the layers LoRA can sit on (Linear and Conv2d)."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes[name] = (m.in_features, m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            shapes[name] = (m.in_channels, m.out_channels)
    return shapes


def attach(
    model: torch.nn.Module, targets: list[str], rank: int, alpha: float, adapter_name: str = "default"
) -> None:
    """Add a fresh, trainable LoRA (B = 0, so the model is unchanged until trained) to exactly `targets`.

    Trap: a second call with the same adapter_name raises (ValueError); pick another name or first undo this one
    with `model.delete_adapters(adapter_name)` (peft's, through diffusers; there is no `remove` here). A rank
    above a target's smaller side (in or out features) is a UserError: it could learn nothing a smaller one cannot.
    """
    shapes = module_shapes(model)
    narrowest = min(targets, key=lambda t: min(shapes[t]), default=None)
    if narrowest is not None and rank > min(shapes[narrowest]):
        raise UserError(
            f"rank (--rank) {rank} is larger than the layer {narrowest} ({shapes[narrowest][0]} in, "
            f"{shapes[narrowest][1]} out); use a rank of at most {min(shapes[narrowest])}"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    model.add_adapter(config, adapter_name=adapter_name)


def lora_layers(model: torch.nn.Module, adapter_name: str):
    """(path, layer) for every peft LoRA layer of `model` that carries `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def trainable_parameters(model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """The LoRA parameters of one adapter, in a stable order."""
    params = []
    for _, layer in lora_layers(model, adapter_name):
        params += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
    return params


def train_in_fp32(model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """The adapter's LoRA parameters, made trainable and fp32 (diffusers' `cast_training_params`) whatever dtype
    the frozen base is in. Trap: every other parameter of `model` must already be frozen, or it is cast too."""
    from diffusers.training_utils import cast_training_params

    params = trainable_parameters(model, adapter_name)
    for p in params:
        p.requires_grad_(True)
    cast_training_params(model, torch.float32)
    return params


def extract(model: torch.nn.Module, component: str, adapter_name: str = "default") -> Lora:
    """Copy one adapter's weights out of `model` as a `Lora` (fp32, detached, on the CPU)."""
    out: Lora = {}
    for path, layer in lora_layers(model, adapter_name):
        out[f"{component}.{path}"] = LoraModule(
            down=layer.lora_A[adapter_name].weight.detach().float().cpu().clone(),
            up=layer.lora_B[adapter_name].weight.detach().float().cpu().clone(),
            alpha=float(layer.lora_alpha[adapter_name]),
        )
    return out


def split_components(lora: Lora) -> dict[str, dict[str, LoraModule]]:
    """{"unet": {path: module}, "text_encoder": {...}} from a `Lora`."""
    parts: dict[str, dict[str, LoraModule]] = {}
    for key, module in lora.items():
        component, path = key.split(".", 1)
        parts.setdefault(component, {})[path] = module
    return parts


def install(model: torch.nn.Module, modules: dict[str, LoraModule], adapter_name: str) -> None:
    """Attach `modules` (paths of this model) as adapter `adapter_name`, ranks and alphas per module.

    Trap: the model keeps the adapter until `model.delete_adapters(adapter_name)`; installing many without
    deleting slows every forward pass and set_adapters call.
    """
    rank, alpha = common_rank_alpha(modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={re.escape(p): m.rank for p, m in modules.items() if m.rank != rank},
        alpha_pattern={re.escape(p): m.alpha for p, m in modules.items() if m.alpha != alpha},
    )
    model.add_adapter(config, adapter_name=adapter_name)
    dtype = next(model.parameters()).dtype
    state = {}
    for path, m in modules.items():
        state[f"{path}.lora_A.weight"] = m.down.to(dtype)
        state[f"{path}.lora_B.weight"] = m.up.to(dtype)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if adapter_name in k or "lora" in k]
    if unexpected:
        raise RuntimeError(f"LoRA weights for {unexpected[:3]} found no layer while installing {adapter_name!r}")
