"""Resumable checkpoints: everything a resume needs, in one folder, written atomically, never pickled.

`runs/<id>/checkpoints/step_000500/` holds `state.safetensors` (LoRA weights, AdamW moments, the batch
generator's state, torch's global generators, which draw --lora-dropout's masks) and `state.json` (step, optimizer
hyper-parameters, the batch order, the config). A folder
appears under its final name only when complete (written as `.tmp`, then renamed), so a run killed mid-save
leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.errors import UserError
from trainer.config import TrainConfig

RESUME_MUST_MATCH = (
    "base_model",
    "rank",
    "alpha",
    "attention",
    "train_ff",
    "train_proj",
    "conv_rank",
    "conv_alpha",
    "use_dora",
    "lora_dropout",
    "batch_size",
    "seed",
    "learning_rate",
    "caption_dropout",
    # the text encoders' LoRA: whether there is any (the checkpoint holds its tensors after the UNet's), its rate
    "train_text_encoder",
    "text_encoder_lr",
    # the optimiser (its state has its own shape), the schedule (a pure function of the step, given these),
    # accumulation and noise offset (how many draws a step takes from the batch generator) and the loss
    "optimizer",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "prodigy_d_coef",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "loss",
    "huber_c",
    "min_snr_gamma",
    "noise_offset",
    "input_perturbation",
    # the data's draws: how often each image comes up per epoch
    "repeats",
    "flip",
    "shuffle_tags",
    "keep_tokens",
    "tag_shuffles",
    "buckets",
    "crop",
)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path, step: int, params, optimizer, drawer, config: dict, keep: int, adapter=None, also_keep=()
) -> Path:
    """Write checkpoint `step` and delete all but the newest `keep` (0 keeps all) and those of the steps in
    `also_keep` (the judge's recommended one). `adapter(folder)`, when given, writes the adapter file of this step
    into the checkpoint's folder, before the folder gets its final name."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    for stale in root.glob(".step_*.tmp") if root.is_dir() else ():  # left by a save killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"param.{i}": p.detach().float().cpu().contiguous() for i, p in enumerate(params)}
    state = optimizer.state_dict()
    for i, entry in state["state"].items():
        for key, value in entry.items():
            # bitsandbytes nests its 8-bit moments and their scales one level down: optim.<i>.<key>/<inner key>
            inner = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, item in inner:
                name = f"optim.{i}.{key}" if sub is None else f"optim.{i}.{key}/{sub}"
                tensors[name] = torch.as_tensor(item).detach().cpu().contiguous()
    drawer_state = drawer.state()
    tensors["drawer.generator"] = drawer_state["generator"]
    tensors["rng.cpu"] = torch.get_rng_state()  # torch's own generators: LoRA dropout draws its masks from them
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    info = {"step": step, "param_groups": state["param_groups"], "order": drawer_state["order"], "config": config}
    try:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(info, indent=1))
        if adapter is not None:
            adapter(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = list_checkpoints(run_dir)
            kept = f"the previous checkpoint, {previous[-1].name}, is kept" if previous else "no earlier one exists"
            raise UserError(
                f"could not save checkpoint step {step} in {root}: the disk is full ({exc.strerror}). The partial "
                f"checkpoint was removed and {kept}; free some space, then resume with --resume latest"
            ) from exc
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep:
        spared = {f"step_{s:06d}" for s in also_keep}
        for old in list_checkpoints(run_dir)[:-keep]:
            if old.name not in spared:
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def checkpoint_adapter(checkpoint: Path) -> Path | None:
    """The adapter file a checkpoint folder holds (its step's LoRA, written as a finished run writes its adapter);
    None for a checkpoint saved before checkpoints kept one."""
    found = sorted(p for p in Path(checkpoint).glob("*.safetensors") if p.name != "state.safetensors")
    return found[0] if found else None


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint of the run; anything else is a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(
                f"resume (--resume latest): run folder {run_dir} has no checkpoints; train with --save-every N "
                "to make them, or start a new run"
            )
        return found[-1]
    path = Path(resume)
    if not (path / "state.safetensors").is_file():
        raise UserError(f"resume (--resume): {path} is not a checkpoint folder (no state.safetensors in it)")
    return path


def resume_step(path: Path, config: dict) -> int:
    """The step the checkpoint at `path` was saved at; refused where resuming from it with `config` would change
    what it trained (rank, targets…)."""
    return int(_checked_state(path, config)["step"])


def _checked_state(path: Path, config: dict) -> dict:
    """The checkpoint's state.json, read once; refused where it cannot be read or where resuming with `config`
    would change what it trained."""
    try:
        info = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot resume from {path}: its state.json cannot be read ({exc})") from exc
    # a setting the checkpoint does not name is newer than it: that run trained with the setting's default
    saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **info.get("config", {})}
    different = [k for k in RESUME_MUST_MATCH if saved.get(k) != config.get(k)]
    if different:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}" for k in different)
        raise UserError(f"cannot resume from {path}: settings differ ({detail}); use the run's own settings")
    return info


def load_checkpoint(path: Path, params, optimizer, drawer, config: dict) -> int:
    """Put a checkpoint's state back into params, optimizer and batch drawer; returns its step."""
    info = _checked_state(path, config)
    tensors = load_file(path / "state.safetensors")
    if sum(k.startswith("param.") for k in tensors) != len(params):
        raise UserError(f"cannot resume from {path}: it holds a different number of LoRA tensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
    state: dict = {"state": {}, "param_groups": info["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            entry = state["state"].setdefault(int(index), {})
            if "/" in name:  # a nested part (see save_checkpoint)
                outer, inner = name.split("/", 1)
                entry.setdefault(outer, {})[inner] = value
            else:
                entry[name] = value
    optimizer.load_state_dict(state)
    drawer.load_state({"generator": tensors["drawer.generator"], "order": info["order"]})
    if "rng.cpu" in tensors:  # checkpoints from before LoRA dropout lack them; nothing drew from them then
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(info["step"])
