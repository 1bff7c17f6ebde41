"""The Train tab's settings form, built from TrainConfig's field metadata: every control is labelled and explained
by its field's help text, `basic` fields in view, the others under *Advanced*, grouped by their `group`."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import gradio as gr

from trainer.config import GROUPS, Prompts, TrainConfig
from trainer.presets import PRESET_FIELDS, PRESETS, page_values, preset_values

# The page shows previews as training goes and keeps runs resumable; the CLI defaults are leaner.
UI_DEFAULTS = {"preview_every": 100, "save_every": 200}


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def shown_fields(gpus: int) -> list[dataclasses.Field]:
    """The TrainConfig fields the page offers, in declaration order: never the `files` group (the page chooses the
    data, run folder and library itself), and the number of processes only where there are two GPUs or more."""
    return [
        f
        for f in dataclasses.fields(TrainConfig)
        if f.metadata["group"] != "files" and (f.name != "num_processes" or gpus >= 2)
    ]


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def float_step(value: float) -> float:
    """What one arrow press adds to a decimal setting: a tenth of its default's leading digit (1e-5 for a learning
    rate of 1e-4, 0.01 for 0.7), 0.1 for a default of 0; gradio's own step of 1 turned 0.0001 into 1."""
    if not value:
        return 0.1
    return 10.0 ** (math.floor(math.log10(abs(value))) - 1)


def _control(f: dataclasses.Field, hint) -> gr.components.Component:
    """A form control for one TrainConfig field, labelled and explained by the field's own help text."""
    value = UI_DEFAULTS.get(f.name, f.default)
    common = dict(label=_label(f.name), info=f.metadata["help"], elem_id=f"setting-{f.name}")
    if f.metadata.get("choices"):
        return gr.Radio(list(f.metadata["choices"]), value=value, **common)
    if hint is bool:
        return gr.Checkbox(value=value, **common)
    if hint is int:  # no rounding here: 2.5 reaches TrainConfig, which refuses it (precision=0 would make it 2)
        return gr.Number(value=value, **common)
    if hint is float:
        return gr.Number(value=value, step=float_step(value), **common)
    if hint == Prompts:  # one per line
        return gr.Textbox(value="\n".join(value), lines=2, max_lines=8, **common)
    return gr.Textbox(value=value, **common)


class SettingsForm:
    """The controls, made where it is built (inside a Blocks layout), keyed by field name."""

    def __init__(self, gpus: int | None = None):
        hints = typing.get_type_hints(TrainConfig)
        fields = shown_fields(gpu_count() if gpus is None else gpus)
        self.preset = gr.Dropdown(
            [("none", "")] + [(name, name) for name in PRESETS],
            value="",
            label="Preset",
            info="A named recipe: picking one sets its fields below (and puts the others a preset sets back to their "
            "defaults); change any after. " + " ".join(f"{name}: {p.about}." for name, p in PRESETS.items()),
            elem_id="preset",
        )
        self.controls = {f.name: _control(f, hints[f.name]) for f in fields if f.metadata["basic"]}
        with gr.Accordion("Advanced", open=False):
            for group in GROUPS:
                members = [f for f in fields if f.metadata["group"] == group and not f.metadata["basic"]]
                if members:
                    gr.Markdown(f"**{group.capitalize()}**")
                    self.controls.update({f.name: _control(f, hints[f.name]) for f in members})
        self.preset.change(self.apply_preset, self.preset, self.inputs)

    def apply_preset(self, name: str) -> list:
        """The form's values after picking preset `name`: one per control of `inputs`, untouched (skip) where the
        preset system names no field; nothing changes for 'none'."""
        if not name:
            return [gr.skip() for _ in self.controls]
        named = preset_values(name)
        values = {k: named[k] if k in named else UI_DEFAULTS.get(k, v) for k, v in page_values(name).items()}
        return [values[k] if k in PRESET_FIELDS else gr.skip() for k in self.controls]

    @property
    def inputs(self) -> list[gr.components.Component]:
        """The controls as event inputs; `config` reads their values in this order."""
        return list(self.controls.values())

    def config(self, values: typing.Sequence) -> TrainConfig:
        """The TrainConfig for the values of `inputs`; a bad value is a UserError naming the field. A number box
        sends 300 as 300.0: whole numbers become ints, anything else is left for TrainConfig to refuse."""
        hints = typing.get_type_hints(TrainConfig)
        given = {
            name: int(v) if hints[name] is int and isinstance(v, float) and v.is_integer() else v
            for name, v in zip(self.controls, values)
        }
        return TrainConfig.from_dict(given, source="the settings")

    def values_of(self, config: TrainConfig) -> list:
        """What `inputs` show for `config` (the inverse of `config`): a past run's settings back in the form."""
        hints = typing.get_type_hints(TrainConfig)
        return [
            "\n".join(getattr(config, name)) if hints[name] == Prompts else getattr(config, name)
            for name in self.controls
        ]

    def usable(self, saved: dict) -> dict:
        """Of setting values kept in the browser (`{field: value}`), those that still fit their control: a field
        the form no longer has, a value of another type or a choice no longer offered is left out."""
        hints = typing.get_type_hints(TrainConfig)
        kept = {}
        for name, value in (saved or {}).items():
            control, hint = self.controls.get(name), hints.get(name)
            if control is None or isinstance(value, bool) != (hint is bool):
                continue
            choices = _FIELDS[name].metadata.get("choices")
            kind = (int, float) if hint in (int, float) else str if hint == Prompts else hint  # Prompts: one a line
            fits = value in choices if choices else isinstance(value, kind)
            if fits:
                kept[name] = value
        return kept


# What the page calls the things the trainer's messages name by flag or by folder.
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_PAGE_CHOOSES = {
    "data": "the upload",
    "output": "the adapter file",
    "run_dir": "the run folder",
    "library": "the library",
}
_NAMED_FIELD = re.compile(r"\b([a-z_]+) \(--([a-z-]+)[^()]*\)")  # steps (--steps), resume (--resume latest)
_FLAG = re.compile(r"\(?--(no-)?([a-z][a-z-]*)\)?")
_ABSOLUTE_PATH = re.compile(r"(?<![\w/.~:])/(?:[^\s/'\"`()<>]+/)+([^\s/'\"`()<>]+)")


def _page_name(field: str) -> str:
    return _PAGE_CHOOSES.get(field) or f"*{_label(field)}*"


def page_words(message: str) -> str:
    """A message as the page says it: a setting by its label (*Default caption*, not --default-caption), a file by
    its name, without the folders of the machine the server runs on."""

    def named(match: re.Match) -> str:
        field = match.group(1)
        return _page_name(field) if field in _FIELDS and match.group(2) == field.replace("_", "-") else match.group(0)

    def flag(match: re.Match) -> str:
        field = match.group(2).replace("-", "_")
        if field not in _FIELDS:
            return match.group(0)
        said = _page_name(field) + (" off" if match.group(1) else "")
        return f"({said})" if match.group(0).startswith("(") and match.group(0).endswith(")") else said

    message = _NAMED_FIELD.sub(named, message)
    message = _FLAG.sub(flag, message)
    return _ABSOLUTE_PATH.sub(r"\1", message)
