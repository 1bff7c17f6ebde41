"""The Generate tab: pictures from a base model with up to four library adapters at chosen strengths."""

from __future__ import annotations

import dataclasses
import random
import threading
import typing
from dataclasses import dataclass

import gradio as gr

from adapters.base import generation_defaults
from adapters.errors import UserError
from adapters.library import Library
from adapters.runtime import SCHEDULERS as RUNTIME_SCHEDULERS

SCHEDULERS = {"model default": None, **{name: name for name in RUNTIME_SCHEDULERS}}
NONE = "(none)"
SLOTS = 4


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

    def __init__(self, library: Library, base_model: str):
        self.library, self.studios = library, StudioCache()
        try:
            defaults = generation_defaults(base_model)  # the model's recommended guidance, for the sliders
        except UserError:
            defaults = {"guidance": 7.5, "guidance_rescale": 0.0}
        with gr.Tab("Generate", id="generate") as self.tab:
            with gr.Row():
                with gr.Column(scale=2):
                    base = gr.Textbox(
                        value=base_model,
                        label="Base model",
                        info="builtin, a hub id, a diffusers folder or a .safetensors checkpoint file",
                        elem_id="generate-base",
                    )
                    prompt = gr.Textbox(label="Prompt", value="glowline, a green triangle", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(value=7, precision=0, label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=20, step=1, label="Sampling steps")
                        guidance = gr.Slider(0, 20, value=defaults["guidance"], step=0.5, label="Guidance")
                        rescale = gr.Slider(
                            0, 1, value=defaults["guidance_rescale"], step=0.05, label="Guidance rescale"
                        )
                    with gr.Row():
                        width = gr.Number(value=0, precision=0, label="Width (0 = model's size)")
                        height = gr.Number(value=0, precision=0, label="Height (0 = model's size)")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value="model default", label="Scheduler")
                with gr.Column(scale=2):
                    self.slot_names, slot_strengths = [], []
                    for i in range(SLOTS):
                        with gr.Row():
                            self.slot_names.append(
                                gr.Dropdown(
                                    [NONE], value=NONE, label=f"Adapter {i + 1}", elem_id=f"adapter-{i}", scale=2
                                )
                            )
                            slot_strengths.append(
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
            with gr.Row():
                self.generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                self.compare_button = gr.Button("Compare strengths", elem_id="compare-button")
            self.status = gr.Markdown(elem_id="generate-status")
            self.gallery = gr.Gallery(label="Pictures", columns=4, height=320, elem_id="gallery")
        controls = dict(
            base_model=base,
            prompt=prompt,
            negative_prompt=negative,
            seed=seed,
            random_seed=random_seed,
            sampling_steps=steps,
            guidance=guidance,
            guidance_rescale=rescale,
            width=width,
            height=height,
            scheduler=scheduler,
            compare_strengths=compare,
        )
        assert list(controls) == [f.name for f in dataclasses.fields(GenerateRequest)][:-1], "see from_inputs"
        self.inputs = [*controls.values(), *self.slot_names, *slot_strengths]

    def wire(self) -> None:
        self.generate_button.click(self.on_generate, self.inputs, [self.gallery, self.status])
        self.compare_button.click(self.on_compare, self.inputs, [self.gallery, self.status])
        self.tab.select(self.slot_updates, None, self.slot_names)
        self.upload_adapter.upload(self.on_upload_adapter, self.upload_adapter, [*self.slot_names, self.status])

    def slot_updates(self):
        names = [NONE, *(e.name for e in self.library.list())]
        return [gr.Dropdown(choices=names) for _ in range(SLOTS)]

    def render(self, request: GenerateRequest, strength_sets: list[dict[str, float]], labels: list[str]):
        """One picture per strength set, all from the same seed; returns the labelled pictures and the seed."""
        seed = random.randint(0, 2**31 - 1) if request.random_seed else request.seed
        with self.studios.lock:
            studio = self.studios.get(request.base_model.strip() or "builtin")
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
                pictures.append((image, label))
        return pictures, seed

    def on_generate(self, *values):
        try:
            request = GenerateRequest.from_inputs(values)
            label = ", ".join(f"{n} {s:g}" for n, s in request.strengths.items()) or "base model"
            pictures, seed = self.render(request, [request.strengths], [label])
        except UserError as exc:
            return gr.Gallery(), f"⚠ {exc}"
        return pictures, f"Seed {seed}. {label}."

    def on_compare(self, *values):
        try:
            request = GenerateRequest.from_inputs(values)
            first = next(iter(request.strengths), None)
            if first is None:
                raise UserError("choose an adapter in slot 1 to compare its strengths")
            levels = request.compare_values()
            sets = [{**request.strengths, first: v} for v in levels]
            pictures, seed = self.render(request, sets, [f"{first} strength {v:g}" for v in levels])
        except UserError as exc:
            return gr.Gallery(), f"⚠ {exc}"
        return pictures, f"Seed {seed}, the same for every picture."

    def on_upload_adapter(self, path):
        try:
            entry = self.library.add(path)
        except UserError as exc:
            return [*self.slot_updates(), f"⚠ {exc}"]
        return [*self.slot_updates(), f"Added **{entry.name}** to the library."]
