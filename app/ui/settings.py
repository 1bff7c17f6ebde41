"""The Train tab's settings form, built from TrainConfig's field metadata: every control is labelled and explained
by its field's help text, `basic` fields in view, the others under *Advanced*, grouped by their `group`."""

from __future__ import annotations

import dataclasses
import typing

import gradio as gr

from trainer.config import GROUPS, TrainConfig

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


def _control(f: dataclasses.Field, hint) -> gr.components.Component:
    """A form control for one TrainConfig field, labelled and explained by the field's own help text."""
    value = UI_DEFAULTS.get(f.name, f.default)
    common = dict(label=_label(f.name), info=f.metadata["help"], elem_id=f"setting-{f.name}")
    if f.metadata.get("choices"):
        return gr.Radio(list(f.metadata["choices"]), value=value, **common)
    if hint is bool:
        return gr.Checkbox(value=value, **common)
    if hint is int:
        return gr.Number(value=value, precision=0, **common)
    if hint is float:
        return gr.Number(value=value, **common)
    return gr.Textbox(value=value, **common)


class SettingsForm:
    """The controls, made where it is built (inside a Blocks layout), keyed by field name."""

    def __init__(self, gpus: int | None = None):
        hints = typing.get_type_hints(TrainConfig)
        fields = shown_fields(gpu_count() if gpus is None else gpus)
        self.controls = {f.name: _control(f, hints[f.name]) for f in fields if f.metadata["basic"]}
        with gr.Accordion("Advanced", open=False):
            for group in GROUPS:
                members = [f for f in fields if f.metadata["group"] == group and not f.metadata["basic"]]
                if members:
                    gr.Markdown(f"**{group.capitalize()}**")
                    self.controls.update({f.name: _control(f, hints[f.name]) for f in members})

    @property
    def inputs(self) -> list[gr.components.Component]:
        """The controls as event inputs; `config` reads their values in this order."""
        return list(self.controls.values())

    def config(self, values: typing.Sequence) -> TrainConfig:
        """The TrainConfig for the values of `inputs`; a bad value is a UserError naming the field."""
        return TrainConfig.from_dict(dict(zip(self.controls, values)), source="the settings")
