"""Presets: named recipes of TrainConfig fields, on the command line (`--preset`) and in the page's menu."""

import dataclasses

import gradio as gr
import pytest

from adapters.errors import UserError
from app.cli import build_parser, main
from app.ui.settings import SettingsForm, shown_fields
from trainer.config import TrainConfig, from_args
from trainer.presets import PRESET_FIELDS, PRESETS, preset_values


def test_every_preset_names_real_fields_the_page_shows_and_makes_a_valid_config():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    page = {f.name for f in shown_fields(gpus=1)}
    for name, preset in PRESETS.items():
        assert set(preset.values) <= set(fields), f"{name} names fields TrainConfig lacks"
        assert set(preset.values) <= page, f"{name} names fields the page does not show"
        config = TrainConfig(data="d", **preset.values)
        assert any(getattr(config, k) != fields[k].default for k in preset.values), f"{name} changes nothing"
    assert {"style-fast", "style-sdxl-12gb", "prodigy"} <= set(PRESETS)


def _train_args(argv):
    return build_parser().parse_args(["train", *argv])


def test_flags_and_the_config_file_override_a_preset(tmp_path):
    config = from_args(_train_args(["--data", "d", "--preset", "prodigy"]))
    assert (config.optimizer, config.learning_rate, config.lr_scheduler) == ("prodigy", 1.0, "constant")
    config = from_args(_train_args(["--data", "d", "--preset", "style-sdxl-12gb", "--batch-size", "2"]))
    assert (config.resolution, config.gradient_checkpointing, config.batch_size) == (1024, "on", 2)
    file = tmp_path / "c.yaml"
    file.write_text("data: d\nsteps: 77\n")
    args = _train_args(["--preset", "style-fast", "--config", str(file), "--rank", "4"])
    config = from_args(args, args.config)
    assert (config.steps, config.rank, config.lr_scheduler) == (77, 4, "cosine")  # file, flag, preset
    with pytest.raises(UserError, match=r"preset \(--preset\) 'prodigi' is not one of .*did you mean 'prodigy'"):
        preset_values("prodigi")


def test_a_value_refused_that_came_from_a_preset_says_so():
    """style-fast warms up for 20 steps: with --steps 20 the warm-up is refused, and the message says the preset set
    it and which flag changes it; a value the person typed is refused as it was."""
    warm = preset_values("style-fast")["lr_warmup_steps"]
    with pytest.raises(UserError) as caught:
        from_args(_train_args(["--data", "d", "--preset", "style-fast", "--steps", str(warm)]))
    said = str(caught.value)
    assert said.startswith("lr_warmup_steps (--lr-warmup-steps) must be 0 or more and below --steps")
    assert said.endswith(
        f"(lr_warmup_steps {warm} comes from --preset style-fast; give --lr-warmup-steps to change it)"
    )
    typed = ["--data", "d", "--preset", "style-fast", "--steps", "30", "--lr-warmup-steps", "30"]
    with pytest.raises(UserError) as caught:
        from_args(_train_args(typed))
    assert "comes from" not in str(caught.value)


def test_preset_list_names_each_preset_and_its_flags(capsys):
    assert main(["train", "--preset", "list"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.about}" in out
    assert "--optimizer prodigy --learning-rate 1 --lr-scheduler constant" in out


def test_picking_a_preset_in_the_page_fills_the_form_without_mixing_presets():
    with gr.Blocks():
        form = SettingsForm(gpus=1)
    names = list(form.controls)
    values = [c.value for c in form.inputs]
    values[names.index("trigger_word")] = "zq"  # what the person typed is not a preset's to change

    def pick(name):
        for i, update in enumerate(form.apply_preset(name)):
            if not isinstance(update, dict):  # gr.skip() leaves a control as it is
                values[i] = update

    pick("prodigy")
    config = form.config(values)
    assert (config.optimizer, config.learning_rate, config.trigger_word) == ("prodigy", 1.0, "zq")
    pick("style-fast")  # prodigy's optimizer goes back to the default, style-fast's own fields come in
    config = form.config(values)
    assert (config.optimizer, config.learning_rate, config.steps, config.batch_size) == ("adamw", 2e-4, 300, 4)
    assert config.trigger_word == "zq" and config.preview_every == 100  # the page's own default kept
    assert all(name in form.controls for name in PRESET_FIELDS)


def test_a_config_file_names_a_preset_under_its_own_values_and_the_flags(tmp_path):
    """`preset:` in a config file applies the preset first, then the file's values, then the flags: the order of
    --preset; a --preset on the command line takes the file's place."""
    file = tmp_path / "c.yaml"
    file.write_text("preset: style-sdxl-12gb\ndata: d\nsteps: 77\n")
    args = _train_args(["--config", str(file), "--batch-size", "2"])
    config = from_args(args, args.config)
    assert (config.resolution, config.gradient_checkpointing) == (1024, "on")  # the preset's
    assert (config.steps, config.batch_size) == (77, 2)  # the file's over the preset's 600, the flag over its 1
    args = _train_args(["--config", str(file), "--preset", "prodigy"])
    config = from_args(args, args.config)
    assert (config.optimizer, config.resolution, config.steps) == ("prodigy", 0, 77)  # prodigy instead, file over
    json_file = tmp_path / "c.json"
    json_file.write_text('{"preset": "prodigy", "data": "d", "learning_rate": 0.5}')
    config = TrainConfig.from_file(json_file)
    assert (config.optimizer, config.weight_decay, config.learning_rate) == ("prodigy", 0.01, 0.5)


@pytest.mark.parametrize("written", ["prodigi", "3"])
def test_a_config_file_naming_no_preset_is_refused_naming_the_file(tmp_path, capsys, written):
    file = tmp_path / "c.yaml"
    file.write_text(f"preset: {written}\ndata: d\n")
    args = _train_args(["--config", str(file)])
    with pytest.raises(UserError) as refused:
        from_args(args, args.config)
    said = str(refused.value)
    assert said.startswith(f"config file {file}: preset ")
    assert "is not one of style-fast, style-sdxl-12gb, prodigy" in said
    assert ("did you mean 'prodigy'" in said) == (written == "prodigi")
    assert main(["train", "--config", str(file)]) == 2
    assert capsys.readouterr().err == f"error: {said}\n"
