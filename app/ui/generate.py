"""The Generate tab: pictures from a base model with up to four library adapters at chosen strengths.

Every picture is saved to the workspace's `outputs/` with its settings inside (`app.outputs`); the History gallery
reads that folder, and clicking a picture there puts its settings back into the controls.
"""

from __future__ import annotations

import dataclasses
import random
import re
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
# Run once when the page loads: Ctrl+Enter (Cmd+Enter on a Mac) in a prompt box presses Generate, as in A1111.
JS = """
() => {
  document.addEventListener("keydown", (event) => {
    const inPrompt = event.target.closest("#prompt, #negative-prompt");
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && inPrompt) {
      event.preventDefault();
      document.querySelector("#generate-button")?.click();
    }
  }, true);
}
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
    batch_count: int  # pipeline calls, one after the other
    batch_size: int  # pictures per call
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
        for key in ("seed", "sampling_steps", "width", "height", "batch_count", "batch_size"):
            plain[key] = int(plain[key] or 0)
        for key in ("guidance", "guidance_rescale"):
            plain[key] = float(plain[key])
        request = cls(**plain, strengths=strengths)
        if request.batch_count < 1 or request.batch_size < 1:
            raise UserError("Batch count and Batch size must be at least 1")
        request.random_seed = request.random_seed or request.seed == -1  # -1: a random seed, as in A1111
        return request

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
        self.loads = 0  # base models loaded so far

    def get(self, base_model: str):
        from adapters.runtime import Studio

        if self.studio is None or self.studio.base_model != base_model:
            self.studio = None
            self.studio = Studio(base_model)
            self.loads += 1
        return self.studio


@dataclass
class Shown:
    """What one press of Generate or Compare made: the saved pictures (path, caption), from which seed."""

    seed: int
    pictures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    asked: int = 0  # pictures asked for
    loaded: list[str] = dataclasses.field(default_factory=list)  # what had to be loaded for them
    small: bool = False  # pictures narrower than SMALL: shown with square pixels
    interrupted: bool = False


class GenerateTab:
    """The tab's controls (made where it is built, inside the app's Blocks) and its handlers."""

    def __init__(self, library: Library, base_model: str, outputs: Outputs | None = None):
        self.library, self.studios = library, StudioCache()
        self.stops: dict[str, threading.Event] = {}  # browser session -> its Interrupt flag
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
                    self.prompt = gr.Textbox(
                        label="Prompt (Ctrl+Enter generates)", value="glowline, a green triangle", elem_id="prompt"
                    )
                    self.negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                    self.tokens = gr.Markdown(elem_id="prompt-tokens")
                    with gr.Row():
                        self.generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                        self.interrupt_button = gr.Button("Interrupt", variant="stop", elem_id="interrupt-button")
                        self.compare_button = gr.Button("Compare strengths", elem_id="compare-button")
                    with gr.Row():
                        self.seed = gr.Number(
                            value=7, precision=0, label="Seed (-1 = random)", elem_id="seed", scale=2, min_width=120
                        )
                        self.random_seed = gr.Checkbox(
                            value=False,
                            label="Random seed",
                            info="the box shows the last seed drawn",
                            elem_id="random-seed",
                            min_width=120,
                        )
                        self.reuse_seed = gr.Button("Reuse seed", elem_id="reuse-seed", min_width=100)
                        self.last_seed = gr.State(None)  # the seed of the last picture made in this session
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
                        self.batch_count = gr.Number(
                            value=1, precision=0, minimum=1, label="Batch count", elem_id="batch-count", min_width=80
                        )
                        self.batch_size = gr.Number(
                            value=1, precision=0, minimum=1, label="Batch size", elem_id="batch-size", min_width=80
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
                    self.auto_update = gr.Checkbox(
                        value=False,
                        label="Auto-update: draw again when a strength slider is let go (same seed, no reload)",
                        elem_id="auto-update",
                    )
                    self.upload_adapter = gr.UploadButton(
                        "Upload a .safetensors adapter", file_types=[".safetensors"]
                    )
                    compare = gr.Textbox(
                        value="0, 0.5, 1", label="Compare strengths of adapter 1", elem_id="compare-strengths"
                    )
                with gr.Column(scale=4):
                    self.status = gr.Markdown(elem_id="generate-status")
                    self.gallery = gr.Gallery(label="Pictures", columns=2, object_fit="contain", elem_id="gallery")
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
            batch_count=self.batch_count,
            batch_size=self.batch_size,
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
        results = [self.gallery, self.status, self.history, self.history_paths, self.seed, self.random_seed]
        results.append(self.last_seed)
        self.generate_button.click(self.on_generate, self.inputs, results, show_progress_on=self.gallery)
        self.compare_button.click(self.on_compare, self.inputs, results, show_progress_on=self.gallery)
        self.interrupt_button.click(self.on_interrupt, None, self.status, concurrency_limit=None)
        for slot, strength in zip(self.slot_names, self.slot_strengths):
            slot.input(self.on_pick_adapter, [slot, self.prompt], [self.prompt, self.status])
            strength.release(
                self.on_auto_update, [self.auto_update, *self.inputs], results, show_progress_on=self.gallery
            )
        self.reuse_seed.click(self.on_reuse_seed, self.last_seed, [self.seed, self.random_seed, self.status])
        for box in (self.prompt, self.negative):
            box.change(
                self.on_tokens, [self.inputs[0], self.prompt, self.negative], self.tokens, trigger_mode="always_last"
            )
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

    def render(self, request: GenerateRequest, jobs: list[tuple[dict[str, float], str]], stop, progress) -> Shown:
        """For each (strengths, label) of `jobs`: batch count x batch size pictures, the k-th from seed + k (the
        same seeds for every job), each saved to the outputs folder with its parameters. `stop()` is asked after
        every denoising step; `Interrupted` leaves what was made before it in the returned `Shown`."""
        from adapters.runtime import Interrupted

        seed = random.randint(0, 2**31 - 1) if request.random_seed else request.seed
        base = request.base_model.strip() or "builtin"
        per_job = request.batch_count * request.batch_size
        shown = Shown(seed=seed, asked=len(jobs) * per_job)
        total = len(jobs) * per_job * request.sampling_steps
        with self.studios.lock:
            progress(0, desc="Loading the base model and adapters")
            loads = self.studios.loads
            studio = self.studios.get(base)
            files_read = studio.files_read
            for name in {n for strengths, _ in jobs for n in strengths}:
                studio.load(self.library.get(name).path, name=name)
            if self.studios.loads > loads:
                shown.loaded.append(f"base model {base_model_label(base)}")
            if studio.files_read > files_read:
                shown.loaded.append(f"{studio.files_read - files_read} adapter file(s)")
            studio.set_scheduler(SCHEDULERS[request.scheduler])
            for j, (strengths, label) in enumerate(jobs):
                for batch in range(request.batch_count):
                    first = seed + batch * request.batch_size
                    done = (j * per_job + batch * request.batch_size) * request.sampling_steps

                    def after_step(step, steps, done=done, first=first):
                        progress(
                            (done + step * request.batch_size, total),
                            desc=f"Pictures from seed {first}: step {step}/{steps}",
                            unit="steps",
                        )
                        return stop()

                    try:
                        images = studio.generate(
                            request.prompt,
                            negative_prompt=request.negative_prompt,
                            seed=first,
                            sampling_steps=request.sampling_steps,
                            guidance=request.guidance,
                            guidance_rescale=request.guidance_rescale,
                            width=request.width or None,
                            height=request.height or None,
                            strengths=strengths,
                            num_images=request.batch_size,
                            after_step=after_step,
                        )
                    except Interrupted:
                        shown.interrupted = True
                        return shown
                    for k, image in enumerate(images):
                        parameters = Parameters(
                            prompt=request.prompt,
                            negative_prompt=request.negative_prompt,
                            steps=request.sampling_steps,
                            sampler=studio.sampler,
                            cfg_scale=request.guidance,
                            seed=first + k,
                            width=image.width,
                            height=image.height,
                            model=base_model_label(base),
                            guidance_rescale=request.guidance_rescale,
                            adapters=dict(strengths),
                            lora_hashes={name: studio.hashes[name] for name in strengths if name in studio.hashes},
                        )
                        caption = f"{label}, seed {first + k}" if per_job > 1 else label
                        shown.pictures.append((str(self.outputs.save(image, parameters)), caption))
                        shown.small = image.width < SMALL
        return shown

    def _answer(self, request: GenerateRequest, shown: Shown, said: str):
        """What Generate and Compare put on the page: the pictures, what happened, the history, and the seed used
        in the Seed box (Random seed stays as it was, or is turned on by a -1 typed there)."""
        if shown.pictures:
            saved = [Path(path) for path, _ in shown.pictures]
            said += f" Saved in outputs/{saved[0].parent.name}/: {', '.join(p.name for p in saved)}."
        if shown.loaded:
            said += f" Loaded {' and '.join(shown.loaded)}."
        if shown.interrupted:
            said = f"Interrupted: {len(shown.pictures)} of {shown.asked} picture(s) made, the rest not. " + said
        history, paths = self.history_updates()
        gallery = gr.Gallery(value=shown.pictures, elem_classes=["small-pictures"] if shown.small else [])
        return gallery, said, history, paths, shown.seed, request.random_seed, shown.seed

    def _stop_flag(self, session: str) -> threading.Event:
        """This browser session's Interrupt flag, cleared: a new press of Generate starts unstopped."""
        flag = self.stops.setdefault(session, threading.Event())
        flag.clear()
        return flag

    def on_generate(self, request: gr.Request, progress=gr.Progress(), *values):
        try:
            asked = GenerateRequest.from_inputs(values)
            label = ", ".join(f"{n} {s:g}" for n, s in asked.strengths.items()) or "base model"
            flag = self._stop_flag(request.session_hash)
            shown = self.render(asked, [(asked.strengths, label)], flag.is_set, progress)
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", *[gr.skip()] * 5
        count = asked.batch_count * asked.batch_size
        seeds = f"Seed {shown.seed}" if count == 1 else f"Seeds {shown.seed}–{shown.seed + count - 1}"
        return self._answer(asked, shown, f"{seeds}. {label}.")

    def on_compare(self, request: gr.Request, progress=gr.Progress(), *values):
        try:
            asked = GenerateRequest.from_inputs(values)
            first = next(iter(asked.strengths), None)
            if first is None:
                raise UserError("choose an adapter in slot 1 to compare its strengths")
            asked.batch_count = asked.batch_size = 1
            jobs = [({**asked.strengths, first: v}, f"{first} strength {v:g}") for v in asked.compare_values()]
            shown = self.render(asked, jobs, self._stop_flag(request.session_hash).is_set, progress)
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", *[gr.skip()] * 5
        return self._answer(asked, shown, f"Seed {shown.seed}, the same for every picture.")

    def on_auto_update(self, request: gr.Request, progress=gr.Progress(), auto=False, *values):
        """A strength slider let go: with Auto-update on, one picture again from the seed in the Seed box (the seed
        of the last picture, when it was random), at the new strengths; nothing is reloaded."""
        if not auto:
            return [gr.skip()] * 7
        try:
            asked = GenerateRequest.from_inputs(values)
            asked.random_seed, asked.batch_count, asked.batch_size = False, 1, 1
            label = ", ".join(f"{n} {s:g}" for n, s in asked.strengths.items()) or "base model"
            shown = self.render(
                asked, [(asked.strengths, label)], self._stop_flag(request.session_hash).is_set, progress
            )
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", *[gr.skip()] * 5
        return self._answer(asked, shown, f"Auto-update: seed {shown.seed}. {label}.")

    def on_pick_adapter(self, name: str, prompt: str):
        """An adapter picked in a slot: its trigger word (from its file's header) goes in front of the prompt,
        unless the prompt already holds it."""
        if not name or name == NONE:
            return gr.skip(), gr.skip()
        try:
            trigger = self.library.get(name).summary["trigger_word"].strip()
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}"
        if not trigger:
            return gr.skip(), f"{name} names no trigger word in its file; the prompt is left as it is."
        if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", prompt or "", re.IGNORECASE):
            return gr.skip(), f"The prompt already holds {name}'s trigger word “{trigger}”."
        return (
            f"{trigger}, {prompt}" if prompt else trigger,
            f"Added {name}'s trigger word “{trigger}” to the prompt.",
        )

    def on_interrupt(self, request: gr.Request):
        """Stop this session's pictures after the denoising step under way (what is finished is kept)."""
        self.stops.setdefault(request.session_hash, threading.Event()).set()
        return "Interrupting after the current step…"

    def on_reuse_seed(self, last_seed):
        if last_seed is None:
            return gr.skip(), gr.skip(), "⚠ No picture made yet in this page, so there is no seed to reuse."
        return last_seed, False, f"Seed {last_seed} set, Random seed off: Generate draws it again."

    def on_tokens(self, base_model: str, prompt: str, negative: str) -> str:
        """How many tokens each prompt has of the 75 the text encoder reads (CLIP: 77 with its start and end
        marks), and, past that, which words are cut."""
        if not (prompt or negative):
            return ""
        try:
            with self.studios.lock:
                studio = self.studios.get(base_model.strip() or "builtin")
                counts = [
                    (what, *studio.count_tokens(text))
                    for what, text in (("Prompt", prompt), ("Negative prompt", negative))
                    if text
                ]
        except UserError as exc:
            return f"⚠ {exc}"
        said = []
        for what, count, limit, cut in counts:
            if count <= limit:
                said.append(f"{what}: {count}/{limit} tokens")
            else:
                said.append(
                    f"⚠ {what}: {count}/{limit} tokens. The text encoder reads the first {limit}; the rest, "
                    f"from “{cut}…”, is cut off"
                )
        return " · ".join(said)

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
