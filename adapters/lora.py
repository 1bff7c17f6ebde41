"""LoRA on a model through peft: choose the target layers, attach, read the weights back, install loaded weights.

The in-memory form every other module speaks is `Lora`: {"<component>.<module path>": LoraModule}, where the
component is `unet`, `text_encoder` or `text_encoder_2` and the path is the module's name in that component.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import dispatch_default
from peft.utils import set_peft_model_state_dict

from adapters.errors import UserError

ATTENTION_CHOICES = ("self", "cross", "both")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraModule:
    down: torch.Tensor  # lora_down / lora_A: [rank, in] (or [rank, in, kh, kw] for a conv)
    up: torch.Tensor  # lora_up / lora_B: [out, rank] (or [out, rank, 1, 1])
    alpha: float  # the delta is up @ down * alpha / rank
    # DoRA (peft's `use_dora`): the learned magnitude of each output row / channel, peft's shape ([out] for a
    # Linear, [1, out, 1, 1] for a conv); None for plain LoRA
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The low-rank weight change up @ down * alpha / rank, flattened to [out, in * kh * kw]. For plain LoRA
        this is what the module adds at strength 1; a DoRA module adds `weight_change` instead."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return (up @ down) * (self.alpha / self.rank)

    def applied(self, weight: torch.Tensor, strength: float = 1.0, base: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` with this module added at `strength`, as peft's forward computes it (fp32, `weight`'s shape).

        Plain LoRA adds strength * delta. DoRA also rescales every output row (channel) to its learned magnitude:
        m / ||W + s dW|| * (weight + s dW), W being the layer's own `base` weight (default: `weight`). So at
        strength 0 a DoRA module still rescales (m / ||W|| * W): that is not the base weight. Several adapters
        on one layer are applied in turn, each DoRA one rescaling what came before it (peft's order)."""
        base = weight if base is None else base
        change = strength * self.delta().view(weight.shape)
        if self.magnitude is None:
            return weight.float() + change
        scale = self.magnitude.float().flatten() / (base.float() + change).flatten(1).norm(dim=1)
        return (weight.float() + change) * scale.view(-1, *[1] * (weight.dim() - 1))


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


_FEED_FORWARD = re.compile(r"(^|\.)transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")
_CONV_BLOCKS = {"ResnetBlock2D": ("conv1", "conv2"), "Downsample2D": ("conv",), "Upsample2D": ("conv",)}


def feed_forward_targets(unet: torch.nn.Module) -> list[str]:
    """Module paths of every transformer block's feed-forward layers: ff.net.0.proj (into GEGLU) and ff.net.2."""
    return [
        name
        for name, module in unet.named_modules()
        if _FEED_FORWARD.search(name) and isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
    ]


def projection_targets(unet: torch.nn.Module) -> list[str]:
    """Module paths of each Transformer2DModel's proj_in and proj_out (a Linear, or a 1x1 conv in SD 1.x)."""
    return [
        f"{name}.{child}"
        for name, block in unet.named_modules()
        if type(block).__name__ == "Transformer2DModel"
        for child in ("proj_in", "proj_out")
        if hasattr(block, child)
    ]


def conv_targets(unet: torch.nn.Module) -> list[str]:
    """Module paths of the 3x3 convolutions LoCon (kohya's conv_dim) adds: each ResNet block's conv1 and conv2,
    and the down- and upsamplers' conv."""
    paths = []
    for name, block in unet.named_modules():
        for child in _CONV_BLOCKS.get(type(block).__name__, ()):
            module = getattr(block, child, None)
            conv = getattr(module, "base_layer", module)
            if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size != (1, 1):
                paths.append(f"{name}.{child}")
    return paths


def module_kind(path: str) -> str:
    """What a UNet module path is, in the words `lora-studio inspect` uses: attn1 (self-attention), attn2 (cross),
    ff (feed-forward), proj (proj_in / proj_out), resnet conv (conv1 / conv2), sampler conv, or other. Paths may
    be written with `.` or, as in the kohya layout, with `_`."""
    dotted = path.replace("_", ".")
    for needle, kind in (
        (r"\.attn1\.", "attn1"),
        (r"\.attn2\.", "attn2"),
        (r"\.ff\.net\.", "ff"),
        (r"\.proj\.(in|out)$", "proj"),
        (r"\.resnets\.\d+\.conv[12]$", "resnet conv"),
        (r"\.(down|up)samplers\.\d+\.conv$", "sampler conv"),
    ):
        if re.search(needle, "." + dotted):
            return kind
    return "other"


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
    model: torch.nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    adapter_name: str = "default",
    *,
    conv: list[str] = (),
    conv_rank: int = 0,
    conv_alpha: float = 0.0,
    dropout: float = 0.0,
    use_dora: bool = False,
) -> None:
    """Add a fresh, trainable LoRA (B = 0, so the model is unchanged until trained) to exactly `targets`, and to
    the convolutions `conv` at `conv_rank` and `conv_alpha` (LoCon). `dropout` is peft's lora_dropout (on the
    LoRA branch's input, in training mode only); `use_dora` makes it peft's DoRA (a learned magnitude per output).

    Trap: a second call with the same adapter_name raises (ValueError); pick another name or first undo this one
    with `model.delete_adapters(adapter_name)` (peft's, through diffusers; there is no `remove` here). A rank
    above a target's smaller side (in or out features) is a UserError: it could learn nothing a smaller one cannot.
    """
    shapes = module_shapes(model)
    for paths, r, field in ((targets, rank, "rank (--rank)"), (conv, conv_rank, "conv_rank (--conv-rank)")):
        narrowest = min(paths, key=lambda t: min(shapes[t]), default=None)
        if narrowest is not None and r > min(shapes[narrowest]):
            raise UserError(
                f"{field} {r} is larger than the layer {narrowest} ({shapes[narrowest][0]} in, "
                f"{shapes[narrowest][1]} out); use a rank of at most {min(shapes[narrowest])}"
            )
    extra = {}  # only what differs from peft's defaults, so a plain run's config is what it always was
    if conv:
        extra["rank_pattern"] = {re.escape(p): conv_rank for p in conv}
        extra["alpha_pattern"] = {re.escape(p): conv_alpha for p in conv}
    if dropout:
        extra["lora_dropout"] = dropout
    if use_dora:
        extra["use_dora"] = True
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=[*targets, *conv], **extra
    )
    model.add_adapter(config, adapter_name=adapter_name)


def magnitude_of(layer: LoraLayer, adapter_name: str) -> torch.nn.Parameter | None:
    """A peft layer's DoRA magnitude for one adapter (None when that adapter is plain LoRA)."""
    dora = getattr(layer, "lora_magnitude_vector", None)
    return dora[adapter_name].weight if dora is not None and adapter_name in dora else None


def lora_layers(model: torch.nn.Module, adapter_name: str):
    """(path, layer) for every peft LoRA layer of `model` that carries `adapter_name`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def trainable_parameters(model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """The LoRA parameters of one adapter, in a stable order (per layer: A, B, and DoRA's magnitude if any)."""
    params = []
    for _, layer in lora_layers(model, adapter_name):
        params += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
        magnitude = magnitude_of(layer, adapter_name)
        if magnitude is not None:
            params.append(magnitude)
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
        magnitude = magnitude_of(layer, adapter_name)
        out[f"{component}.{path}"] = LoraModule(
            down=layer.lora_A[adapter_name].weight.detach().float().cpu().clone(),
            up=layer.lora_B[adapter_name].weight.detach().float().cpu().clone(),
            alpha=float(layer.lora_alpha[adapter_name]),
            magnitude=None if magnitude is None else magnitude.detach().float().cpu().clone(),
        )
    return out


def split_components(lora: Lora) -> dict[str, dict[str, LoraModule]]:
    """{"unet": {path: module}, "text_encoder": {...}} from a `Lora`."""
    parts: dict[str, dict[str, LoraModule]] = {}
    for key, module in lora.items():
        component, path = key.split(".", 1)
        parts.setdefault(component, {})[path] = module
    return parts


def install(model: torch.nn.Module, modules: dict[str, LoraModule], adapter_name: str) -> list[LoraLayer]:
    """Attach `modules` (paths of this model) as adapter `adapter_name`, ranks and alphas per module; DoRA when
    the modules carry magnitudes (all of them, or none: peft's DoRA is set per adapter). Returns the peft layers
    that now hold it, in the order of `modules`.

    Each layer is looked up by its path and given the adapter by peft's own layer code: the first adapter on a
    Linear or Conv2d wraps it in peft's `lora.Linear` / `lora.Conv2d`, a later one is added to that wrapper by its
    `update_layer`, as peft's `add_adapter` does, but without walking every module of the model (which took longer
    the more adapters were loaded). The LoRA weights are made empty and the given tensors copied into their place.
    DoRA adapters, and layers of other kinds, go through peft's `add_adapter` and `set_peft_model_state_dict`.

    Traps: the model keeps the adapter until `model.delete_adapters(adapter_name)`; installing many without
    deleting slows every forward pass and set_adapters call. Which adapters are active afterwards is the caller's
    to set (`Studio.set_strengths` does): a layer wrapped here starts with this adapter active.
    """
    config = _lora_config(modules, adapter_name)
    targets = {path: model.get_submodule(path) for path in modules}
    plain = all(isinstance(getattr(t, "base_layer", t), (torch.nn.Linear, torch.nn.Conv2d)) for t in targets.values())
    if config.use_dora or not plain:
        return _install_through_peft(model, modules, adapter_name, config)
    if getattr(model, "_hf_peft_config_loaded", False) and adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    wrapped = []
    empty = dataclasses.replace(config, init_lora_weights=False)  # no random init: the weights are given
    # the LoRA weights made on the meta device, filled in below; torch.device("meta") holds for this thread only
    # (peft's and accelerate's init_empty_weights patch nn.Module for the whole process: a model another thread of
    # the page loads meanwhile, e.g. a base model for Generate, would get meta weights)
    with torch.device("meta"):
        for path, target in targets.items():
            m = modules[path]
            if isinstance(target, LoraLayer):
                target.update_layer(adapter_name, m.rank, lora_alpha=m.alpha, config=empty, target_name=path)
            else:
                parent, _, child = path.rpartition(".")
                layer = dispatch_default(target, adapter_name, empty, r=m.rank, lora_alpha=m.alpha, target_name=path)
                setattr(model.get_submodule(parent), child, layer)
                target = layer
            wrapped.append((path, target))
    for path, layer in wrapped:
        m, weight = modules[path], layer.get_base_layer().weight
        for slot, tensor in ((layer.lora_A[adapter_name], m.down), (layer.lora_B[adapter_name], m.up)):
            if tuple(slot.weight.shape) != tuple(tensor.shape):
                raise RuntimeError(
                    f"adapter {adapter_name!r}: a LoRA weight for {path} has shape {tuple(tensor.shape)}, the layer "
                    f"takes {tuple(slot.weight.shape)}"
                )
            slot.weight = torch.nn.Parameter(
                tensor.to(weight.device, weight.dtype, copy=True), requires_grad=slot.weight.requires_grad
            )
    # what peft's add_adapter records on the model (diffusers' and transformers' models alike)
    if not getattr(model, "_hf_peft_config_loaded", False) or getattr(model, "peft_config", None) is None:
        model.peft_config = {}
    model._hf_peft_config_loaded = True
    config.base_model_name_or_path = model.__dict__.get("name_or_path")
    model.peft_config[adapter_name] = config
    return [layer for _, layer in wrapped]


def _lora_config(modules: dict[str, LoraModule], adapter_name: str) -> LoraConfig:
    """The peft config of an adapter made of `modules`: its targets, ranks and alphas, DoRA or not."""
    rank, alpha = common_rank_alpha(modules)
    dora = [p for p, m in modules.items() if m.magnitude is not None]
    if dora and len(dora) != len(modules):
        raise UserError(
            f"adapter {adapter_name!r} has DoRA magnitudes on {len(dora)} of its {len(modules)} layers; an adapter "
            "is DoRA on all of its layers or on none"
        )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={re.escape(p): m.rank for p, m in modules.items() if m.rank != rank},
        alpha_pattern={re.escape(p): m.alpha for p, m in modules.items() if m.alpha != alpha},
        **({"use_dora": True} if dora else {}),
    )


def _install_through_peft(
    model: torch.nn.Module, modules: dict[str, LoraModule], name: str, config: LoraConfig | None = None
) -> list[LoraLayer]:
    """`install` by peft's `add_adapter` (a walk over every module) and `set_peft_model_state_dict`: the way every
    adapter was attached before `install` placed them by path."""
    model.add_adapter(config or _lora_config(modules, name), adapter_name=name)
    dtype = next(model.parameters()).dtype
    state = {}
    for path, m in modules.items():
        state[f"{path}.lora_A.weight"] = m.down.to(dtype)
        state[f"{path}.lora_B.weight"] = m.up.to(dtype)
        if m.magnitude is not None:
            state[f"{path}.lora_magnitude_vector"] = m.magnitude.to(dtype)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if name in k or "lora" in k]
    if unexpected:
        raise RuntimeError(f"LoRA weights for {unexpected[:3]} found no layer while installing {name!r}")
    return [model.get_submodule(path) for path in modules]
