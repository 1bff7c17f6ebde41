"""Adapter files: the kohya / AUTOMATIC1111 key layout we write, its header metadata, and safe reading.

Keys: `lora_unet_<module path with . as _>.lora_down.weight` [r, in], `.lora_up.weight` [out, r], `.alpha`
(0-dim; scale = alpha / rank); convolutions (LoCon) as kohya writes them: lora_down [r, in, kh, kw], lora_up
[out, r, 1, 1]. Text-encoder modules are named as in transformers 4's `CLIPTextModel`, which kohya
sd-scripts, AUTOMATIC1111 and ComfyUI match against: `lora_te_text_model_encoder_layers_<i>_self_attn_q_proj`
(`lora_te1_`/`lora_te2_` when there are two text encoders, as on SDXL), whatever transformers is installed here;
the diffusers layout's text-encoder keys keep that `text_model.` level too.

Reading also takes the UNet's modules under their names in the original (Stability / CompVis) UNet, as kohya
sd-scripts writes SDXL files (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) and ComfyUI saves its
own (`diffusion_model.input_blocks.4.1.….lora_up.weight`, text encoders under `text_encoders.clip_l.transformer.`).

DoRA is written in the diffusers (peft) layout only (`to_diffusers`, with `lora_magnitude_vector`): diffusers drops
a kohya file's `dora_scale` keys, and ComfyUI's `dora_scale` math is not peft's (README, *Adapter files*).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from adapters.errors import UserError
from adapters.families import Family, family_of_adapter
from adapters.lora import Lora, LoraModule, common_rank_alpha

FORMAT_VERSION = "1"
RECOMMENDED_STRENGTH = "lora_studio.recommended_strength"  # header key: the strength the run's judge recommends
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_TEXT_MODEL = "text_model."  # the CLIP level transformers 5's CLIPTextModel dropped; the other tools' names keep it
_KOHYA_READ_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)


def _with_text_model(path: str) -> str:
    """A text-encoder module path as transformers 4's CLIP models spell it, under `text_model.`."""
    return path if path.startswith(_TEXT_MODEL) else _TEXT_MODEL + path


def kohya_name(component: str, path: str, two_text_encoders: bool = False) -> str:
    """The kohya / A1111 / ComfyUI name of one module: `lora_unet_down_blocks_0_..._attn1_to_q`,
    `lora_te_text_model_encoder_layers_0_self_attn_q_proj` (the first encoder is `lora_te1_` when there are two)."""
    if component == "unet":
        return KOHYA_PREFIXES["unet"] + path.replace(".", "_")
    prefix = "lora_te1_" if component == "text_encoder" and two_text_encoders else KOHYA_PREFIXES[component]
    return prefix + _with_text_model(path).replace(".", "_")


_SAI_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_SAI_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_BLOCK = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _sai_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _SAI_RESNET.get(head, head) + ("." + tail if tail else "")


def sai_unet_names(paths) -> dict[str, str]:
    """{module path in the original (Stability / CompVis) UNet: diffusers module path} for a diffusers UNet's
    module paths, by its structure: input block 0 is conv_in, then each level's layers and its downsampler; the
    output blocks run from the deepest level, one layer more per level, the upsampler in a level's last block;
    the middle block is resnet, attention, resnet. Valid for any number of levels and layers (SD 1.x, 2.x, SDXL)."""
    parsed = {path: _UNET_BLOCK.fullmatch(path) for path in paths}
    layers: dict[tuple[str, int], int] = {}
    downsampled, attended = set(), set()
    for m in filter(None, parsed.values()):
        side, level, kind, i = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if kind == "resnets":
            layers[side, level] = max(layers.get((side, level), 0), i + 1)
        elif kind == "downsamplers":
            downsampled.add(level)
        elif kind == "attentions" and side == "up":
            attended.add(level)
    first, index = {}, {"down": 1, "up": 0}
    for side, level in sorted(layers):
        first[side, level] = index[side]
        index[side] += layers[side, level] + (side == "down" and level in downsampled)
    names = {}
    for path, m in parsed.items():
        sai = _SAI_TOP.get(path)
        if m and (m.group(1), int(m.group(2))) in first:
            side, level, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            start, count = first[side, level], layers[side, level]
            blocks = "input_blocks" if side == "down" else "output_blocks"
            if kind == "resnets":
                sai = f"{blocks}.{start + i}.0.{_sai_resnet(rest)}"
            elif kind == "attentions":
                sai = f"{blocks}.{start + i}.1.{rest}"
            elif kind == "downsamplers" and rest == "conv":
                sai = f"input_blocks.{start + count}.0.op"
            elif kind == "upsamplers" and rest == "conv":
                sai = f"output_blocks.{start + count - 1}.{2 if level in attended else 1}.conv"
        elif mid := _MID_BLOCK.fullmatch(path):
            kind, i, rest = mid.group(1), int(mid.group(2)), mid.group(3)
            sai = f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * i}.{_sai_resnet(rest)}"
        if sai:
            names[sai] = path
    return names


def _names(component: str, paths) -> dict[str, str]:
    """{a name other tools give a module of `component`, '.'-separated, prefix removed: its module path here}.
    Text encoders answer with and without `text_model.` (the other tools write it; transformers 5's CLIPTextModel
    and our files written under it before we followed them lack it); the UNet by its diffusers path and its path
    in the original UNet (`sai_unet_names`)."""
    paths = list(paths)
    table = {path: path for path in paths}
    if component == "unet":
        table.update(sai_unet_names(paths))
    else:
        for path in paths:
            table[path.removeprefix(_TEXT_MODEL)] = table[_with_text_model(path)] = path
    return table


DORA_NOT_KOHYA = (
    "a DoRA adapter is written in the diffusers layout only: diffusers' load_lora_weights drops the dora_scale keys "
    "of a kohya-layout file (it would draw plain LoRA), and ComfyUI computes dora_scale otherwise than the peft "
    "DoRA this was trained with; use --format diffusers (see the README, Adapter files)"
)


def to_kohya(
    lora: Lora, dtype: torch.dtype = torch.float32, two_text_encoders: bool | None = None
) -> dict[str, torch.Tensor]:
    """Tensors in the kohya layout (nothing else in the dict), named by `kohya_name`.

    `two_text_encoders` (the base model has two, as SDXL): default, whether the LoRA itself has `text_encoder_2`.
    A DoRA adapter is refused (UserError, `DORA_NOT_KOHYA`): no tool reads it from this layout as it was trained.
    """
    if any(m.magnitude is not None for m in lora.values()):
        raise UserError(DORA_NOT_KOHYA)
    out = {}
    if two_text_encoders is None:
        two_text_encoders = any(key.startswith("text_encoder_2.") for key in lora)
    for key, m in sorted(lora.items()):
        component, path = key.split(".", 1)
        name = kohya_name(component, path, two_text_encoders)
        out[f"{name}.lora_down.weight"] = m.down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype)
    return out


_PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"))
_MAGNITUDE_SUFFIXES = ((".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"))
_OLD_DIFFUSERS_SUFFIXES = (
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
)
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_COMPONENT_PREFIXES = ("unet.", "text_encoder_2.", "text_encoder.")
_KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
# ComfyUI's own files (its LoRA training and "Extract and Save Lora" nodes): the names of its model's state dict
_COMFYUI_PREFIXES = (
    ("diffusion_model.", "unet"),
    ("text_encoders.clip_l.transformer.", "text_encoder"),  # SD 1.x's encoder, SDXL's first
    ("text_encoders.clip_h.transformer.", "text_encoder"),  # SD 2.x's
    ("text_encoders.clip_g.transformer.", "text_encoder_2"),  # SDXL's second
)
_FULL_DIFFS = (".diff", ".diff_b", ".set_weight")  # whole-tensor patches ComfyUI writes beside LoRA weights
_UNSUPPORTED = (
    ("hada_w1_a", "a LoHa (LyCORIS) file"),
    ("lokr_w1", "a LoKr (LyCORIS) file"),
    (
        "dora_scale",
        "a DoRA adapter in the kohya / LyCORIS layout (dora_scale), whose magnitudes may be per input or per "
        "output and are applied otherwise than peft's; lora-studio reads DoRA in the diffusers (peft) layout "
        "(lora_magnitude_vector), as it writes it. Plain LoRA is read in the kohya and diffusers layouts",
    ),
    ("lora_mid.weight", "a LoCon file with a Tucker middle weight"),
)


def detect_layout(keys) -> str:
    """`kohya`, `comfyui` (lora_down/lora_up under ComfyUI's model names), `diffusers` (peft lora_A/lora_B),
    `diffusers-old` (lora.down/lora.up) or `unknown`, by content."""
    keys = list(keys)
    lora_keys = [k for k in keys if k.endswith((".lora_down.weight", ".lora_up.weight"))]
    if any(k.startswith("lora_") for k in lora_keys):
        return "kohya"
    if any(k.startswith(tuple(p for p, _ in _COMFYUI_PREFIXES)) for k in lora_keys):
        return "comfyui"
    if any(k.endswith(suffix) for k in keys for suffix, _ in _PEFT_SUFFIXES):
        return "diffusers"
    if any(k.endswith(suffix) for k in keys for suffix, _ in _OLD_DIFFUSERS_SUFFIXES):
        return "diffusers-old"
    return "unknown"


def _split_component(name: str) -> tuple[str, str]:
    for prefix in _COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix) :]
    return "unet", name  # a bare peft state dict of a UNet


def _diffusers_alphas(metadata: dict[str, str]) -> dict[str, tuple[float | None, dict]]:
    """{component: (lora_alpha, alpha_pattern)} from diffusers' `lora_adapter_metadata` header, if present."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    info = json.loads(raw)
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        alpha = info.get(f"{component}.lora_alpha")
        pattern = info.get(f"{component}.alpha_pattern") or {}
        if alpha is not None or pattern:
            out[component] = (alpha, pattern)
    return out


def _pieces(tensors: dict[str, torch.Tensor], layout: str, source: str) -> tuple[dict, list[str]]:
    """({(component, name as written): {"down"/"up"/"alpha"/"magnitude": tensor}}, keys that are none of those)."""
    pieces: dict[tuple[str, str], dict] = {}
    left = []
    if layout in ("kohya", "comfyui"):
        prefixes = _KOHYA_READ_PREFIXES if layout == "kohya" else _COMFYUI_PREFIXES
        for key, t in tensors.items():
            suffix, part = next(((s, p) for s, p in _KOHYA_SUFFIXES if key.endswith(s)), (None, None))
            if suffix is None:
                left.append(key)
                continue
            name = key[: -len(suffix)]
            prefix, component = next(((p, c) for p, c in prefixes if name.startswith(p)), (None, None))
            if component is None:
                known = "lora_unet_/lora_te_" if layout == "kohya" else "diffusion_model./text_encoders.clip_*"
                raise UserError(f"{source}: key {key} has no {known} prefix")
            pieces.setdefault((component, name[len(prefix) :]), {})[part] = t
    else:
        suffixes = (*_PEFT_SUFFIXES, *_MAGNITUDE_SUFFIXES) if layout == "diffusers" else _OLD_DIFFUSERS_SUFFIXES
        for key, t in tensors.items():
            for suffix, part in (*suffixes, (".alpha", "alpha")):
                if key.endswith(suffix):
                    component, path = _split_component(key[: -len(suffix)])
                    match = _OLD_PROCESSOR.search(path)
                    if match:  # diffusers' oldest attention-processor layout
                        proj = "to_out.0" if match.group(1) == "to_out" else match.group(1)
                        path = path[: match.start()] + "." + proj
                    pieces.setdefault((component, path), {})[part] = t
                    break
            else:
                left.append(key)
    return pieces, left


def raw_modules(tensors: dict[str, torch.Tensor], metadata: dict[str, str], layout: str, source: str):
    """(component, name as written, down, up, alpha or None, DoRA magnitude or None) per LoRA module, in the
    file's own naming."""
    pieces, _ = _pieces(tensors, layout, source)
    alphas = _diffusers_alphas(metadata)
    for (component, name), parts in sorted(pieces.items()):
        if "down" not in parts or "up" not in parts:
            missing = "lora_up" if "down" in parts else "lora_down"
            raise UserError(f"{source}: module {name} has no {missing} weight; the file is incomplete")
        alpha = parts.get("alpha")
        alpha = float(alpha) if alpha is not None else None
        if alpha is None and component in alphas:
            default, pattern = alphas[component]
            alpha = next((float(v) for k, v in pattern.items() if re.fullmatch(rf"(.*\.)?{k}", name)), None)
            alpha = alpha if alpha is not None else (float(default) if default is not None else None)
        yield component, name, parts["down"], parts["up"], alpha, parts.get("magnitude")


def read_lora(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    modules: dict[str, dict[str, tuple[int, int]]],
    *,
    source: str,
    base_family: str = "this base model",
) -> Lora:
    """Read a LoRA file of any supported layout against a loaded model ({component: {path: (in, out)}}).

    A missing alpha means alpha = rank (scale 1), as kohya and diffusers assume. Keys that match no layer and
    shapes that do not fit are errors (applying part of an adapter silently gives wrong pictures); when the file
    was made for another model family, the message says which.
    """
    for needle, what in _UNSUPPORTED:
        if any(needle in k for k in tensors):
            plain = "; lora-studio reads plain LoRA (kohya or diffusers layout) only"
            reads = "" if needle == "dora_scale" else plain
            raise UserError(f"{source} is {what}{reads}")
    layout = detect_layout(tensors)
    if layout == "unknown":
        raise UserError(
            f"{source} holds no LoRA weights in a layout lora-studio knows (kohya lora_unet_/lora_te_, "
            f"diffusers lora_A/lora_B or ComfyUI's diffusion_model.…lora_up); first keys: {sorted(tensors)[:3]}"
        )
    _, left = _pieces(tensors, layout, source)
    diffs = [k for k in left if k.endswith(_FULL_DIFFS)]
    if diffs:
        raise UserError(
            f"{source} holds whole-tensor differences besides its LoRA weights ({len(diffs)} keys such as "
            f"{diffs[:2]}: .diff / .diff_b patches of norms and biases, as ComfyUI's LoRA training and its "
            "'Extract and Save Lora' with bias_diff on write them); lora-studio applies LoRA weights only and will "
            "not apply part of a file. Extract the LoRA again with bias_diff off"
        )
    if left:
        raise UserError(
            f"{source}: {len(left)} key(s) are not LoRA weights lora-studio can apply, e.g. {left[:3]}; "
            "the file is of a kind lora-studio does not read (nothing was applied)"
        )
    made_for = family_of_adapter(tensors, metadata)
    mismatch = (
        f"{source} is an {made_for.name} adapter but the loaded base model is {base_family}; "
        f"use it with an {made_for.name} base"
        if made_for is not None and made_for.name != base_family
        else None
    )
    index = {component: _names(component, paths) for component, paths in modules.items()}
    if layout == "kohya":  # '.' written as '_'
        index = {component: {k.replace(".", "_"): p for k, p in names.items()} for component, names in index.items()}
    lora: Lora = {}
    unknown = []
    for component, name, down, up, alpha, magnitude in raw_modules(tensors, metadata, layout, source):
        path = index.get(component, {}).get(name)
        if path is None:
            unknown.append(name)
            continue
        if f"{component}.{path}" in lora:  # e.g. lora_te_ and lora_te1_, text_model_ or not, two UNet spellings
            raise UserError(f"{source}: two LoRA modules name the layer {component}.{path}; keep one of them")
        in_features, out_features = modules[component][path]
        if down.shape[1] != in_features or up.shape[0] != out_features:
            raise UserError(
                mismatch
                or f"{source}: {component}.{path} expects in {in_features} / out {out_features}, the file has "
                f"in {down.shape[1]} / out {up.shape[0]}; the adapter was made for a different base model"
            )
        if magnitude is not None and magnitude.numel() != out_features:
            raise UserError(
                f"{source}: {component}.{path} has a DoRA magnitude of {magnitude.numel()} values, the layer has "
                f"{out_features} outputs; the file is damaged or was made for another model"
            )
        lora[f"{component}.{path}"] = LoraModule(
            down=down.float(),
            up=up.float(),
            alpha=alpha if alpha is not None else float(down.shape[0]),
            magnitude=None if magnitude is None else magnitude.float(),
        )
    if unknown:
        raise UserError(
            mismatch
            or f"{source}: {len(unknown)} LoRA module(s) match no layer of {base_family}, e.g. {unknown[:3]}; "
            "the adapter was made for a different model architecture"
        )
    return lora


def to_diffusers(lora: Lora) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors in diffusers/peft layout plus the `lora_adapter_metadata` header that keeps every alpha.

    Text-encoder keys keep transformers 4's `text_model.` level (`text_encoder.text_model.encoder.layers.0.…`), as
    diffusers writes them there and ComfyUI maps them; diffusers drops it again where the installed CLIP model
    lacks it. The header names text-encoder modules without it, which peft matches under either transformers."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, object] = {}
    for component in sorted({k.split(".", 1)[0] for k in lora}):
        modules = {k.split(".", 1)[1]: m for k, m in lora.items() if k.startswith(component + ".")}
        for path, m in sorted(modules.items()):
            written = path if component == "unet" else _with_text_model(path)
            tensors[f"{component}.{written}.lora_A.weight"] = m.down.contiguous()
            tensors[f"{component}.{written}.lora_B.weight"] = m.up.contiguous()
            if m.magnitude is not None:  # peft's own key, which diffusers' load_lora_weights reads as DoRA
                tensors[f"{component}.{written}.lora_magnitude_vector"] = m.magnitude.contiguous()
        if component != "unet":
            modules = {path.removeprefix(_TEXT_MODEL): m for path, m in modules.items()}
        rank, alpha = common_rank_alpha(modules)
        info.update(
            {
                f"{component}.r": rank,
                f"{component}.lora_alpha": alpha,
                f"{component}.target_modules": sorted(modules),
                f"{component}.rank_pattern": {p: m.rank for p, m in modules.items() if m.rank != rank},
                f"{component}.alpha_pattern": {p: m.alpha for p, m in modules.items() if m.alpha != alpha},
            }
        )
        if any(m.magnitude is not None for m in modules.values()):  # diffusers builds peft's LoraConfig from these
            info[f"{component}.use_dora"] = True
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(info, indent=2, sort_keys=True)}


def model_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data as safetensors lays it out (kohya's `sshs_model_hash`; metadata excluded)."""
    blob = save_bytes(tensors)
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a safetensors file's tensor data (what follows its header), as AUTOMATIC1111 hashes a LoRA file for
    its `Lora hashes` (the first 12 digits) and kohya for `sshs_model_hash`: a header edit leaves it unchanged."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(path: Path, field: str) -> None:
    """Refuse, before any work, an output path that could never be written: a folder, a file standing where a
    folder must be, or a folder this user may not write in (else the work would be done and lost at the end)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{field} {path} is a folder; give a file name, such as {path / 'name'}{path.suffix}")
    for parent in path.parents:  # the nearest one that exists is where the folders above the file are made
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{field} {path} cannot be written: {parent} is a file, not a folder; choose another")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{field} {path} cannot be written: no permission to write in {parent}")
            return


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temp file beside `path`, then rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file should read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            before = "is left as it was" if path.exists() else "was not created"
            raise UserError(
                f"could not write {path}: the disk is full ({exc.strerror}). The partial file was removed and "
                f"{path.name} {before}; free some space and try again"
            ) from exc
        raise


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors adapter atomically; every metadata value must already be a string. Weights holding
    NaN or Inf are refused (UserError), as reading refuses them: no such file is ever written."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise UserError(f"not writing {path}: tensor(s) {broken[:3]} hold NaN or Inf values")
    write_atomic(Path(path), save_bytes(tensors, metadata=metadata))


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")  # formats that run code when loaded: never read
HOW_TO_CONVERT = (
    "To use a .ckpt/.pt/.bin file you trust, convert it once in Python: "
    "`import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('in.pt', weights_only=True), 'out.safetensors')` (weights_only refuses code; for a "
    "whole-model .ckpt save its ['state_dict']), or download the .safetensors version its author publishes"
)


def refuse_pickle(path: Path, what: str) -> None:
    """A UserError for a .ckpt/.pt/.pth/.bin/.pkl file offered as `what`: safetensors only, and how to convert."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{what} {path} is a {Path(path).suffix} file, which can run code when loaded: lora-studio reads "
            f"weights only from .safetensors. {HOW_TO_CONVERT}"
        )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; anything else (a pickle, a truncated file) is refused.

    Nothing is ever unpickled: the header is parsed as JSON by the safetensors library and tensors are raw bytes.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"adapter file {path} is a folder; give the .safetensors file inside it")
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist")
    refuse_pickle(path, "adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"{path} is not a valid safetensors file: {_what_it_is(path, exc)}") from exc
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{path}: tensor(s) {bad[:3]} contain NaN or Inf values; the adapter is corrupt")
    return tensors, metadata


PICTURE_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP"}


def _what_it_is(path: Path, exc: Exception) -> str:
    """What a file safetensors could not read is, told by its first bytes, and what to do about it."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "it is empty (0 bytes), a download or copy that did not finish; download or copy it again"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a bare pickle
        return f"it is a pickled PyTorch checkpoint named .safetensors, never unpickled here. {HOW_TO_CONVERT}"
    picture = next((kind for magic, kind in PICTURE_MAGIC.items() if head.startswith(magic)), None)
    if picture:
        return f"it is a {picture} picture, not an adapter; give the adapter's .safetensors file"
    if head[8:9] == b"{":  # a safetensors header begins there: the file is one, cut short or damaged
        return f"it is cut short or damaged ({exc}); download or copy it again"
    return f"{exc}; lora-studio reads adapters only from .safetensors files"


def build_metadata(
    *,
    tensors: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    base_model: str,
    family: Family,
    prediction_type: str = "epsilon",
    output_name: str,
    resolution: int,
    num_images: int,
    tag_frequency: dict[str, dict[str, int]],
    trigger_word: str,
    config: dict,
    steps: int,
    network_args: dict[str, str] | None = None,
    recommended_strength: float | None = None,
) -> dict[str, str]:
    """The header: kohya `ss_*` fields, `modelspec.*` fields, and our own (full TrainConfig, format version and,
    when the run was judged, the strength its judge recommends). `network_args`: kohya's `ss_network_args` (e.g.
    conv_dim, conv_alpha), written when given."""
    extra = {"ss_network_args": json.dumps(network_args)} if network_args else {}
    metadata = {
        **extra,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": family.kohya_version,
        "ss_v2": str(family.v2),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_images),
        "ss_steps": str(steps),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "sshs_model_hash": model_hash(tensors),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger_word,
        "lora_studio.format_version": FORMAT_VERSION,
        "lora_studio.config": json.dumps(config, sort_keys=True),
    }
    if recommended_strength is not None:
        metadata[RECOMMENDED_STRENGTH] = f"{recommended_strength:g}"
    return metadata
