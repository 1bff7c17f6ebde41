"""The Generate tab: pictures from a base model with up to four library adapters at chosen strengths.

Every picture is saved to the workspace's `outputs/` with its settings inside (`app.outputs`); the History gallery
reads that folder, and clicking a picture there puts its settings back into the controls.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import typing
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from adapters.base import base_model_label, generation_defaults
from adapters.errors import UserError
from adapters.library import Library
from adapters.runtime import SCHEDULERS as RUNTIME_SCHEDULERS
from app.images import Parameters
from app.outputs import Outputs

SCHEDULERS = {"model default": None, **{name: name for name in RUNTIME_SCHEDULERS}}
NONE = "(none)"
SLOTS = 4
SMALL = 256  # pictures narrower than this are enlarged with square pixels (the built-in model's are 64)

# The tab's look, given to `launch`: pictures whole (never cropped), small ones enlarged without blur.
CSS = """
.small-pictures img { image-rendering: pixelated; }
"""


@dataclass
class GenerateRequest:
    """What the Generate tab's controls ask for, read from them in one place (`from_inputs`)."""

    base_model: str
    prompt: str
    negative_prompt: str
    seed: int
    random_seed: bool
    sampling_steps: int
    guidance: float
    guidance_rescale: float
    width: int  # 0 = the model's size
    height: int
    scheduler: str  # a key of SCHEDULERS
    compare_strengths: str  # strengths of the first chosen adapter to compare, as typed: "0, 0.5, 1"
    strengths: dict[str, float]  # adapter name -> strength, in slot order; empty slots left out

    @classmethod
    def from_inputs(cls, values: typing.Sequence) -> GenerateRequest:
        """Gradio passes the controls' values positionally, in the order of `GenerateTab.inputs`: every field
        above but `strengths`, then each slot's adapter, then each slot's strength."""
        n = len(dataclasses.fields(cls)) - 1
        plain = dict(zip([f.name for f in dataclasses.fields(cls)], values[:n]))
        names, levels = values[n : n + SLOTS], values[n + SLOTS : n + 2 * SLOTS]
        strengths = {name: float(level) for name, level in zip(names, levels) if name and name != NONE}
        for key in ("seed", "sampling_steps", "width", "height"):
            plain[key] = int(plain[key] or 0)
        for key in ("guidance", "guidance_rescale"):
            plain[key] = float(plain[key])
        return cls(**plain, strengths=strengths)

    def compare_values(self) -> list[float]:
        try:
            values = [float(v) for v in self.compare_strengths.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            typed = self.compare_strengths
            raise UserError(f"strengths must be numbers separated by commas, got {typed!r}") from None
        if not values:
            raise UserError("give at least one strength to compare, e.g. 0, 0.5, 1")
        return values


class StudioCache:
    """One loaded base pipeline at a time, shared by every Generate request; a lock keeps requests in turn."""

    def __init__(self):
        self.studio = None
        self.lock = threading.Lock()

    def get(self, base_model: str):
        from adapters.runtime import Studio

        if self.studio is None or self.studio.base_model != base_model:
            self.studio = None
            self.studio = Studio(base_model)
        return self.studio


class GenerateTab:
    """The tab's controls (made where it is built, inside the app's Blocks) and its handlers."""

    def __init__(self, library: Library, base_model: str, outputs: Outputs | None = None):
        self.library, self.studios = library, StudioCache()
        self.outputs = outputs or Outputs(Path(library.root).parent / "outputs")  # beside the library
        try:
            defaults = generation_defaults(base_model)  # the model's recommended guidance, for the sliders
        except UserError:
            defaults = {"guidance": 7.5, "guidance_rescale": 0.0}
        with gr.Tab("Generate", id="generate") as self.tab:
            with gr.Row(equal_height=False):
                with gr.Column(scale=5):
                    base = gr.Textbox(
                        value=base_model,
                        label="Base model",
                        info="builtin, a hub id, a diffusers folder or a .safetensors checkpoint file",
                        elem_id="generate-base",
                    )
                    self.prompt = gr.Textbox(label="Prompt", value="glowline, a green triangle", elem_id="prompt")
                    self.negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                    with gr.Row():
                        self.generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                        self.compare_button = gr.Button("Compare strengths", elem_id="compare-button")
                    with gr.Row():
                        self.seed = gr.Number(value=7, precision=0, label="Seed", elem_id="seed")
                        self.random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
                    with gr.Row():
                        self.steps = gr.Slider(1, 100, value=20, step=1, label="Sampling steps", elem_id="steps")
                        self.guidance = gr.Slider(
                            0, 20, value=defaults["guidance"], step=0.5, label="Guidance", elem_id="guidance"
                        )
                        self.rescale = gr.Slider(
                            0, 1, value=defaults["guidance_rescale"], step=0.05, label="Guidance rescale"
                        )
                    with gr.Row():
                        self.width = gr.Number(
                            value=0, precision=0, label="Width (0 = model's size)", elem_id="width"
                        )
                        self.height = gr.Number(
                            value=0, precision=0, label="Height (0 = model's size)", elem_id="height"
                        )
                    self.scheduler = gr.Dropdown(list(SCHEDULERS), value="model default", label="Scheduler")
                    self.slot_names, self.slot_strengths = [], []
                    for i in range(SLOTS):
                        with gr.Row():
                            self.slot_names.append(
                                gr.Dropdown(
                                    [NONE], value=NONE, label=f"Adapter {i + 1}", elem_id=f"adapter-{i}", scale=2
                                )
                            )
                            self.slot_strengths.append(
                                gr.Slider(
                                    -1, 2, value=1.0, step=0.05, label="Strength", elem_id=f"strength-{i}", scale=3
                                )
                            )
                    self.upload_adapter = gr.UploadButton(
                        "Upload a .safetensors adapter", file_types=[".safetensors"]
                    )
                    compare = gr.Textbox(
                        value="0, 0.5, 1", label="Compare strengths of adapter 1", elem_id="compare-strengths"
                    )
                with gr.Column(scale=4):
                    self.status = gr.Markdown(elem_id="generate-status")
                    self.gallery = gr.Gallery(
                        label="Pictures", columns=2, object_fit="contain", elem_id="gallery"
                    )
                    self.history = gr.Gallery(
                        label="History: every picture, newest first (click one to restore its settings)",
                        columns=6,
                        height=250,
                        object_fit="contain",
                        allow_preview=False,
                        fit_columns=False,
                        elem_id="history",
                    )
                    self.history_paths = gr.State([])  # the files the history shows, in its order
        controls = dict(
            base_model=base,
            prompt=self.prompt,
            negative_prompt=self.negative,
            seed=self.seed,
            random_seed=self.random_seed,
            sampling_steps=self.steps,
            guidance=self.guidance,
            guidance_rescale=self.rescale,
            width=self.width,
            height=self.height,
            scheduler=self.scheduler,
            compare_strengths=compare,
        )
        assert list(controls) == [f.name for f in dataclasses.fields(GenerateRequest)][:-1], "see from_inputs"
        self.inputs = [*controls.values(), *self.slot_names, *self.slot_strengths]
        # what a picture of the history puts back (`on_pick_history`), in this order
        self.restored = [
            self.prompt,
            self.negative,
            self.seed,
            self.random_seed,
            self.steps,
            self.guidance,
            self.rescale,
            self.width,
            self.height,
            self.scheduler,
            *self.slot_names,
            *self.slot_strengths,
            self.status,
        ]

    def wire(self) -> None:
        results = [self.gallery, self.status, self.history, self.history_paths]
        self.generate_button.click(self.on_generate, self.inputs, results)
        self.compare_button.click(self.on_compare, self.inputs, results)
        self.tab.select(self.on_open, None, [*self.slot_names, self.history, self.history_paths])
        self.history.select(self.on_pick_history, self.history_paths, self.restored)
        self.upload_adapter.upload(self.on_upload_adapter, self.upload_adapter, [*self.slot_names, self.status])

    def slot_updates(self):
        names = [NONE, *(e.name for e in self.library.list())]
        return [gr.Dropdown(choices=names) for _ in range(SLOTS)]

    def history_updates(self):
        paths = [str(p) for p in self.outputs.history()]
        return paths, paths

    def on_open(self):
        return [*self.slot_updates(), *self.history_updates()]

    def render(self, request: GenerateRequest, strength_sets: list[dict[str, float]], labels: list[str]):
        """One picture per strength set, all from the same seed, each saved to the outputs folder with its
        parameters; returns the labelled pictures (as saved files) and the seed."""
        seed = random.randint(0, 2**31 - 1) if request.random_seed else request.seed
        base = request.base_model.strip() or "builtin"
        with self.studios.lock:
            studio = self.studios.get(base)
            for name in {n for strengths in strength_sets for n in strengths}:
                studio.load(self.library.get(name).path, name=name)
            studio.set_scheduler(SCHEDULERS[request.scheduler])
            pictures = []
            for strengths, label in zip(strength_sets, labels):
                image = studio.generate(
                    request.prompt,
                    negative_prompt=request.negative_prompt,
                    seed=seed,
                    sampling_steps=request.sampling_steps,
                    guidance=request.guidance,
                    guidance_rescale=request.guidance_rescale,
                    width=request.width or None,
                    height=request.height or None,
                    strengths=strengths,
                )[0]
                parameters = Parameters(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    steps=request.sampling_steps,
                    sampler=studio.sampler,
                    cfg_scale=request.guidance,
                    seed=seed,
                    width=image.width,
                    height=image.height,
                    model=base_model_label(base),
                    guidance_rescale=request.guidance_rescale,
                    adapters=dict(strengths),
                    lora_hashes={name: studio.hashes[name] for name in strengths if name in studio.hashes},
                )
                pictures.append((str(self.outputs.save(image, parameters)), label))
                small = image.width < SMALL
        return pictures, seed, small

    def _shown(self, pictures, small: bool, status: str):
        saved = [Path(path) for path, _ in pictures]
        status += f" Saved in outputs/{saved[0].parent.name}/: {', '.join(p.name for p in saved)}."
        history, paths = self.history_updates()
        gallery = gr.Gallery(value=pictures, elem_classes=["small-pictures"] if small else [])
        return gallery, status, history, paths

    def on_generate(self, *values):
        try:
            request = GenerateRequest.from_inputs(values)
            label = ", ".join(f"{n} {s:g}" for n, s in request.strengths.items()) or "base model"
            pictures, seed, small = self.render(request, [request.strengths], [label])
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", gr.skip(), gr.skip()
        return self._shown(pictures, small, f"Seed {seed}. {label}.")

    def on_compare(self, *values):
        try:
            request = GenerateRequest.from_inputs(values)
            first = next(iter(request.strengths), None)
            if first is None:
                raise UserError("choose an adapter in slot 1 to compare its strengths")
            levels = request.compare_values()
            sets = [{**request.strengths, first: v} for v in levels]
            pictures, seed, small = self.render(request, sets, [f"{first} strength {v:g}" for v in levels])
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", gr.skip(), gr.skip()
        return self._shown(pictures, small, f"Seed {seed}, the same for every picture.")

    def on_pick_history(self, paths: list[str], evt: gr.SelectData):
        """Put a history picture's settings back: prompt, negative prompt, seed (random off), steps, guidance,
        size, sampler and adapters with their strengths (those the library has)."""
        keep = [gr.skip()] * (len(self.restored) - 1)
        try:
            path = Path(paths[evt.index])
            found = Parameters.of_file(path)
        except (IndexError, TypeError):
            return [*keep, "⚠ That picture is no longer in the history; open the tab again to refresh it."]
        except UserError as exc:
            return [*keep, f"⚠ {exc}"]
        known = [e.name for e in self.library.list()]
        adapters = [(n, s) for n, s in found.adapters.items() if n in known][:SLOTS]
        missing = [n for n in found.adapters if n not in known]
        names = [n for n, _ in adapters] + [NONE] * (SLOTS - len(adapters))
        levels = [s for _, s in adapters] + [1.0] * (SLOTS - len(adapters))
        notes = [f"Settings of **{path.name}** restored."]
        if missing:
            notes.append(f"⚠ Not in the library, left out: {', '.join(missing)}.")
        if len(found.adapters) - len(missing) > SLOTS:
            notes.append(f"⚠ Only the first {SLOTS} adapters fit in the slots.")

        def given(value):
            return gr.skip() if value is None else value

        return [
            found.prompt,
            found.negative_prompt,
            given(found.seed),
            False if found.seed is not None else gr.skip(),
            given(found.steps),
            given(found.cfg_scale),
            given(found.guidance_rescale),
            given(found.width),
            given(found.height),
            found.sampler if found.sampler in SCHEDULERS else "model default",
            *[gr.Dropdown(choices=[NONE, *known], value=n) for n in names],
            *levels,
            " ".join(notes),
        ]

    def on_upload_adapter(self, path):
        try:
            entry = self.library.add(path)
        except UserError as exc:
            return [*self.slot_updates(), f"⚠ {exc}"]
        return [*self.slot_updates(), f"Added **{entry.name}** to the library."]
