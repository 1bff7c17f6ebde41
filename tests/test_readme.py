"""The README documents what the program offers: every train flag and every command."""

import dataclasses
import re
from pathlib import Path

from app.cli import build_parser
from trainer.config import TrainConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_train_flag_is_documented():
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name.replace('_', '-')}" not in README]
    assert not missing, f"README lacks these train flags: {missing}"


def test_every_command_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"lora-studio {name}" not in README]
    assert not missing, f"README lacks these commands: {missing}"


def test_the_two_setup_commands_come_first():
    first_block = README.split("```")[1]
    assert first_block.strip().splitlines()[0].startswith("make run")
    assert first_block.strip().splitlines()[1].startswith("make test")


def test_the_flag_table_matches_the_fields():
    """Regenerate with `python -m trainer.config` and paste between the FLAGS markers."""
    from trainer.config import markdown_table

    table = README.split("<!-- FLAGS -->\n", 1)[1].split("\n<!-- /FLAGS -->", 1)[0]
    assert table == markdown_table()


def test_the_preset_table_matches_the_presets():
    """Regenerate with `python -m trainer.presets` and paste between the PRESETS markers."""
    from trainer.presets import markdown_table

    table = README.split("<!-- PRESETS -->\n", 1)[1].split("\n<!-- /PRESETS -->", 1)[0]
    assert table == markdown_table()


def test_the_builtin_models_lora_target_count_is_counted_from_it():
    """The README's count of the built-in UNet's LoRA targets is what `attention_targets` finds in the shipped one."""
    from diffusers import UNet2DConditionModel

    from adapters.lora import attention_targets

    shipped = Path(__file__).resolve().parent.parent / "adapters" / "builtin" / "unet"
    config = UNet2DConditionModel.load_config(shipped)
    unet = UNet2DConditionModel.from_config(config)  # the shipped architecture; its weights do not matter here
    stated = re.search(r"(\d+) LoRA targets, (\d+) in attn1 and (\d+) in attn2", README)
    assert stated, "README no longer states the built-in model's LoRA target count"
    counted = [len(attention_targets(unet, attention)) for attention in ("both", "self", "cross")]
    assert [int(n) for n in stated.groups()] == counted
